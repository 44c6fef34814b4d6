"""Heads-first <-> heads-last as strided views (no copies).

NATTEN 0.14 and 0.17's split ops take ``[batch, heads, *spatial, dim]``;
na_rtc's ops take ``[batch, *spatial, heads, dim]`` and read any strides, so a
permutation is all the translation needs.
"""

from __future__ import annotations

from .. import _arrays

_LAYOUT = {1: "[batch, heads, length, dim]", 2: "[batch, heads, height, width, dim]"}


def _permute(x, order):
    return x.permute(*order) if _arrays.kind_of(x) == _arrays.TORCH else x.transpose(order)


def check_rank(name: str, x, ndim: int) -> None:
    if _arrays.kind_of(x) is None:
        raise TypeError(f"{name} must be a torch tensor (or NumPy/CuPy array), got {type(x).__qualname__}")
    if len(x.shape) != ndim + 3:
        raise ValueError(f"{name} must have {ndim + 3} dimensions {_LAYOUT[ndim]} (heads-first, as in NATTEN), "
                         f"got shape {tuple(x.shape)}")


def heads_last(name: str, x, ndim: int):
    """``[batch, heads, *spatial, last]`` -> a ``[batch, *spatial, heads, last]`` view."""
    check_rank(name, x, ndim)
    return _permute(x, (0, *range(2, ndim + 2), 1, ndim + 2))


def heads_first(x, ndim: int):
    """``[batch, *spatial, heads, last]`` -> a ``[batch, heads, *spatial, last]`` view."""
    return _permute(x, (0, ndim + 1, *range(1, ndim + 1), ndim + 2))
