"""Heads-first <-> heads-last as strided views (no copies), and the checks of
heads-first arguments in the caller's own terms.

NATTEN 0.14 and 0.17's split ops take ``[batch, heads, *spatial, dim]``;
na_rtc's ops take ``[batch, *spatial, heads, dim]`` and read any strides, so a
permutation is all the translation needs. Shape errors are raised here,
before the permutation: na_rtc's own checks would describe the permuted view
in the heads-last layout the caller never wrote.
"""

from __future__ import annotations

from .. import _args, _arrays, _layouts

_LAYOUT = {1: "[batch, heads, length, dim]", 2: "[batch, heads, height, width, dim]",
           3: "[batch, heads, depth, height, width, dim]"}
_HEADS_FIRST = _layouts.HEADS_FIRST


def _permute(x, order):
    return x.permute(*order) if _arrays.kind_of(x) == _arrays.TORCH else x.transpose(order)


def check_rank(name: str, x, ndim: int) -> None:
    if _arrays.kind_of(x) is None:
        raise TypeError(f"{name} must be a torch tensor (or NumPy/CuPy array), got {type(x).__qualname__}")
    if len(x.shape) != ndim + 3:
        raise ValueError(f"{name} must have {ndim + 3} dimensions {_LAYOUT[ndim]} (heads-first, as in NATTEN), "
                         f"got shape {tuple(x.shape)}; {_layouts.heads_first_note(ndim)}")


def _note(name: str, x, ndim: int) -> str:
    return _layouts.shape_note(name, x, ndim, _HEADS_FIRST)


def _check_window(ndim: int, name: str, x, kernel_size, dilation) -> tuple[int, ...]:
    kernel = _args.per_axis_ints("kernel_size", kernel_size, ndim)
    _args.check_window_fits(tuple(x.shape[2:-1]), kernel, _args.per_axis_ints("dilation", dilation, ndim),
                            lambda: _note(name, x, ndim))
    return kernel


def check_qk(ndim: int, query, key, rpb, kernel_size, dilation) -> None:
    """The layout-dependent checks of a heads-first ``qk`` call; one :class:`~na_rtc.LayoutWarning` when the
    query looks heads-last."""
    check_rank("query", query, ndim)
    check_rank("key", key, ndim)
    if tuple(key.shape) != tuple(query.shape):
        raise ValueError(f"key must have the shape of query {tuple(query.shape)}, got {tuple(key.shape)}"
                         f"{_note('query', query, ndim)}")
    kernel = _check_window(ndim, "query", query, kernel_size, dilation)
    if rpb is not None and _arrays.kind_of(rpb) is not None and all(k % 2 for k in kernel):
        expected = (int(query.shape[1]), *(2 * k - 1 for k in kernel))
        if tuple(rpb.shape) != expected:
            raise ValueError(f"rpb must have shape [heads, *(2 * kernel_size - 1)] = {expected}, got "
                             f"{tuple(rpb.shape)}; heads = {expected[0]} is query's axis 1"
                             f"{_note('query', query, ndim)}")
    _layouts.warn_if_transposed("query", query, ndim, _HEADS_FIRST)


def check_av(ndim: int, attn, value, kernel_size, dilation) -> None:
    """The layout-dependent checks of a heads-first ``av`` call; one :class:`~na_rtc.LayoutWarning` when the
    value looks heads-last."""
    check_rank("attn", attn, ndim)
    check_rank("value", value, ndim)
    if tuple(attn.shape[:-1]) != tuple(value.shape[:-1]):
        raise ValueError(f"attn must have shape [batch, heads, *spatial, slots] with [batch, heads, *spatial] = "
                         f"{tuple(value.shape[:-1])} as in value, got {tuple(attn.shape)}"
                         f"{_note('value', value, ndim)}")
    _check_window(ndim, "value", value, kernel_size, dilation)
    _layouts.warn_if_transposed("value", value, ndim, _HEADS_FIRST)


def heads_last(name: str, x, ndim: int):
    """``[batch, heads, *spatial, last]`` -> a ``[batch, *spatial, heads, last]`` view."""
    check_rank(name, x, ndim)
    return _permute(x, (0, *range(2, ndim + 2), 1, ndim + 2))


def heads_first(x, ndim: int):
    """``[batch, *spatial, heads, last]`` -> a ``[batch, heads, *spatial, last]`` view."""
    return _permute(x, (0, ndim + 1, *range(1, ndim + 1), ndim + 2))
