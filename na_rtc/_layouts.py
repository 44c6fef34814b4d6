"""Heads-last or heads-first: what a tensor's shape suggests, for errors and one warning.

na_rtc's ops read ``[batch, *spatial, heads, dim]`` (heads-last); NATTEN 0.14
and 0.17's split ops, and so :mod:`na_rtc.compat`'s, read ``[batch, heads,
*spatial, dim]`` (heads-first). Both have the same rank, so a tensor in the
other layout is often accepted and silently computes attention over the wrong
axes. This module holds the text every shape error appends, and the guess
behind :class:`LayoutWarning`.

The guess looks only at the middle axes ``m = shape[1:-1]`` (spatial axes and
heads) and compares the reading in use with the other one. It fires when

- 1D: the axis read as heads is at least 8 long and at least 4 times the
  sequence length (the other reading: a sequence 4 times longer than its
  heads count);
- 2D and 3D: the other reading has square frames (its last two spatial axes
  equal) of side >= 8 and fewer heads than the side, while the reading in use
  has no square frames (``[1, 4, 20, 20, 32]`` given to ``na2d`` reads as a
  4 x 20 map with 20 heads, or NATTEN's 4 heads on 20 x 20; in 3D the first
  axis is time or depth, whose length says nothing, so only the frames count:
  ``[1, 8, 16, 32, 32, 64]`` given to ``na3d`` reads as 32 heads on
  8 x 16 x 32, or 8 heads on 16 frames of 32 x 32);

and the array is not a view permuted from the other layout (an axis read as
heads that lies in memory where the other layout keeps heads: the caller
moved it on purpose, as :mod:`na_rtc.compat` does). Small shapes never fire:
their two readings are equally plausible. The guess costs a few integer
comparisons per call; strides are read only when the shape fires.
"""

from __future__ import annotations

from . import _arrays, _diskcache

__all__ = ["LayoutWarning", "HEADS_LAST", "HEADS_FIRST", "looks_transposed", "guess", "shape_note",
           "warn_if_transposed", "heads_last_note", "heads_first_note", "layout"]

HEADS_LAST = "heads-last"
HEADS_FIRST = "heads-first"

#: the shortest square side (2D) / heads count (1D) at which a shape is taken as evidence of a transposition
MIN_EVIDENCE = 8
#: 1D: how many times longer than the sequence the axis read as heads must be
RATIO_1D = 4


class LayoutWarning(UserWarning):
    """A tensor's shape suggests the other layout (heads-first where na_rtc's ops
    expect heads-last, or the reverse in :mod:`na_rtc.compat`). Shown once per
    shape; silence it with
    ``warnings.filterwarnings("ignore", category=na_rtc.LayoutWarning)``."""


_SPATIAL = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _layout(ndim: int, reading: str) -> str:
    spatial = ", ".join(_SPATIAL[ndim])
    return (f"[batch, heads, {spatial}, head_dim]" if reading == HEADS_FIRST
            else f"[batch, {spatial}, heads, head_dim]")


def shape_note(name: str, x, ndim: int, reading: str) -> str:
    """What a shape error adds after its own sentence: the transposition guess, or the shape it read, then
    the layout the call takes and where the other layout's code goes."""
    said = guess(name, x, ndim, reading) or f"{name} has shape {tuple(int(s) for s in x.shape)}"
    note = heads_last_note(ndim) if reading == HEADS_LAST else heads_first_note(ndim)
    return f". {said}. {note}"


def layout(ndim: int, reading: str = HEADS_LAST) -> str:
    """``[batch, height, width, heads, head_dim]`` and its kin, for messages."""
    return _layout(ndim, reading)


def heads_last_note(ndim: int) -> str:
    """Appended to the shape errors of na_rtc's own ops."""
    if ndim == 3:  # NATTEN 0.14 had no 3D ops; 0.15-0.17.4 named them natten3dqkrpb/natten3dav
        return (f"na_rtc's ops take heads-last tensors {_layout(ndim, HEADS_LAST)}; heads-first code written for "
                f"NATTEN ({_layout(ndim, HEADS_FIRST)}: natten3dqkrpb/natten3dav, 0.17's na3d_qk/na3d_av) runs "
                f"unchanged through na_rtc.compat.natten017")
    return (f"na_rtc's ops take heads-last tensors {_layout(ndim, HEADS_LAST)}; heads-first code written for "
            f"NATTEN ({_layout(ndim, HEADS_FIRST)}: 0.14's natten{ndim}dqkrpb/natten{ndim}dav, 0.17's "
            f"na{ndim}d_qk/na{ndim}d_av) runs unchanged through na_rtc.compat.natten014 / natten017")


def heads_first_note(ndim: int) -> str:
    """Appended to the shape errors of na_rtc.compat's heads-first split ops."""
    return (f"na_rtc.compat's split ops take NATTEN's heads-first tensors {_layout(ndim, HEADS_FIRST)}; "
            f"heads-last tensors {_layout(ndim, HEADS_LAST)} go to na_rtc.na{ndim}d_qk / na{ndim}d_av "
            f"(or natten017.na{ndim}d, heads-last as in NATTEN 0.17)")


def _readings(middle: tuple[int, ...], reading: str):
    """(heads, spatial) of the reading in use and of the other one."""
    heads_last = (middle[-1], middle[:-1])
    heads_first = (middle[0], middle[1:])
    return (heads_last, heads_first) if reading == HEADS_LAST else (heads_first, heads_last)


def looks_transposed(middle: tuple[int, ...], reading: str) -> bool:
    """Whether the middle axes ``shape[1:-1]`` look like the other layout's (the rule in the module doc)."""
    (heads, spatial), (other_heads, other_spatial) = _readings(middle, reading)
    if len(spatial) == 1:
        return heads >= MIN_EVIDENCE and heads >= RATIO_1D * spatial[0]
    # the frame: the last two spatial axes (the whole map in 2D; height x width after time/depth in 3D)
    frame, other_frame = spatial[-2:], other_spatial[-2:]
    side = other_frame[0]
    return (side >= MIN_EVIDENCE and other_frame[1] == side and other_heads < side
            and frame[0] != frame[1])


def _permuted_on_purpose(x, ndim: int, reading: str) -> bool:
    """Whether the axis read as heads lies in memory where the other layout keeps heads: outermost of the
    middle axes for a heads-last reading, innermost for a heads-first one (axes of size 1 have no say)."""
    shape, strides = tuple(x.shape), _arrays.element_strides(x)
    heads_axis = ndim + 1 if reading == HEADS_LAST else 1
    others = [abs(strides[a]) for a in range(1, ndim + 2) if a != heads_axis and shape[a] > 1]
    if not others or shape[heads_axis] <= 1:
        return False
    heads_stride = abs(strides[heads_axis])
    return heads_stride > max(others) if reading == HEADS_LAST else heads_stride < min(others)


def _middle(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape[1:-1])


def _suspect(x, ndim: int, reading: str) -> bool:
    return looks_transposed(_middle(x), reading) and not _permuted_on_purpose(x, ndim, reading)


def _extent(spatial: tuple[int, ...]) -> str:
    if len(spatial) == 1:
        return f"a sequence of {spatial[0]}"
    return f"a {' x '.join(map(str, spatial))} {'map' if len(spatial) == 2 else 'volume'}"


def _guess_text(name: str, x, ndim: int, reading: str) -> str:
    shape = tuple(int(s) for s in x.shape)
    other = HEADS_FIRST if reading == HEADS_LAST else HEADS_LAST
    (heads, spatial), (other_heads, other_spatial) = _readings(shape[1:-1], reading)
    return (f"{name} of shape {shape} reads as {reading} with {heads} heads on {_extent(spatial)}, but looks "
            f"{other} {_layout(ndim, other)}: {other_heads} heads on {_extent(other_spatial)}")


def guess(name: str, x, ndim: int, reading: str) -> str | None:
    """Why ``x`` looks transposed (a sentence for an error message), or None when it does not."""
    return _guess_text(name, x, ndim, reading) if _suspect(x, ndim, reading) else None


_warned: set = set()


def _permutation(ndim: int, reading: str) -> tuple[int, ...]:
    """The axes order that turns the other layout into ``reading``."""
    if reading == HEADS_LAST:  # heads-first -> heads-last
        return (0, *range(2, ndim + 2), 1, ndim + 2)
    return (0, ndim + 1, *range(1, ndim + 1), ndim + 2)


def _tracing(x) -> bool:
    """Whether torch.compile is tracing the call: dynamo cannot trace ``warnings.warn`` (with
    ``fullgraph=True`` it would fail the compile), so the warning is left to eager calls."""
    if _arrays.kind_of(x) != _arrays.TORCH:
        return False
    import torch

    return torch.compiler.is_compiling()


def warn_if_transposed(name: str, x, ndim: int, reading: str) -> None:
    """One :class:`LayoutWarning` per (reading, shape) and process when ``x`` looks transposed.

    Called only for calls that passed validation (an error says it all, with :func:`guess`). Silent while
    torch.compile traces.
    """
    if not _suspect(x, ndim, reading) or _tracing(x):
        return
    key = (reading, ndim, _middle(x))
    if key in _warned:
        return
    _warned.add(key)
    order = ", ".join(map(str, _permutation(ndim, reading)))
    if reading == HEADS_LAST:
        remedy = (f"if it is heads-first, move the heads axis (x.permute({order}) in torch, x.transpose({order}) "
                  f"in NumPy/CuPy: a view, no copy) or run the heads-first code through na_rtc.compat.natten014 "
                  f"/ natten017")
    else:
        remedy = (f"if it is heads-last, call na_rtc.na{ndim}d_qk / na{ndim}d_av instead, or move the heads "
                  f"axis (x.permute({order}) in torch, x.transpose({order}) in NumPy/CuPy)")
    _diskcache.warn(
        f"{_guess_text(name, x, ndim, reading)}. The call ran as {reading}; {remedy}. If the shape is meant, "
        f"silence this with warnings.filterwarnings('ignore', category=na_rtc.LayoutWarning) "
        f"(shown once per shape)", LayoutWarning)


def _reset_for_tests() -> None:
    _warned.clear()

