"""Argument normalization and validation: done once, at the public entry points.

Every public call turns its arguments into a :class:`Problem` here; backends
trust it and never re-validate. Errors are ``TypeError`` for the wrong kind of
thing and ``ValueError`` for the wrong value, and always name the argument and
what is allowed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from . import _arrays, _layouts
from .window import Axis

FUSED, QK, AV = "fused", "qk", "av"


@dataclass(frozen=True)
class Problem:
    """A validated neighborhood attention call (shapes, window, dtype, placement)."""

    op: str
    axes: tuple[Axis, ...]
    batch: int
    heads: int
    head_dim: int
    dtype: str
    kind: str
    device: str
    has_rpb: bool = False
    scale: float | None = None
    #: key/value heads (GQA/MQA: fewer than ``heads``, dividing them; query head h reads key/value head
    #: h // group); None: as many as the query's
    heads_kv: int | None = None
    #: the value's head dim (and the output's) where it differs from ``head_dim`` (the query's and key's); None:
    #: the same
    head_dim_v: int | None = None
    #: extra key/value tokens every query attends besides its neighborhood (the fused ops' ``additional_keys`` /
    #: ``additional_values``, ``[batch, extra_tokens, kv_heads, head_dim(_v)]``); 0: none
    extra_tokens: int = 0
    #: the queries, where they are not every position: per axis the positions ``[first, stop)`` the query,
    #: output and logsumexp cover (their spatial shape is the box's), keys and values covering the whole axes
    #: (context parallelism computes a slab's queries against slab and halo); None: every position
    query_box: tuple[tuple[int, int], ...] | None = None

    @property
    def v_dim(self) -> int:
        """The value's (and the output's) head dim."""
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def max_head_dim(self) -> int:
        """The larger head dim: the fused kernels' head-dim bucket holds both."""
        return max(self.head_dim, self.v_dim)

    def values_problem(self) -> "Problem":
        """The problem whose head dim is the value's: what the split kernels take where they reduce over or
        write value head dims (``av``, the value gradient, ``dOut . V``)."""
        return self if self.head_dim_v is None else replace(self, head_dim=self.head_dim_v, head_dim_v=None)

    @property
    def kv_heads(self) -> int:
        return self.heads if self.heads_kv is None else self.heads_kv

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.heads // self.kv_heads if self.kv_heads else 1

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(a.length for a in self.axes)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(a.kernel_size for a in self.axes)

    @property
    def slots(self) -> int:
        """Window slots per query (last dimension of the attention weights)."""
        return math.prod(self.kernel_size)

    @property
    def rpb_shape(self) -> tuple[int, ...]:
        return (self.heads, *(2 * k - 1 for k in self.kernel_size))

    @property
    def query_spatial(self) -> tuple[int, ...]:
        """The spatial shape of the query, output and logsumexp (the box's, or every position's)."""
        return self.spatial if self.query_box is None else tuple(stop - first for first, stop in self.query_box)

    @property
    def query_tokens(self) -> int:
        return math.prod(self.query_spatial)

    def every_query(self) -> "Problem":
        """The problem over every position (no query box): what a backend without boxes computes."""
        return replace(self, query_box=None)

    @property
    def attn_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.spatial, self.heads, self.slots)

    @property
    def qkv_shape(self) -> tuple[int, ...]:
        """The query's shape (and the output's without ``head_dim_v``; the keys' and values' too without GQA and
        a query box)."""
        return (self.batch, *self.query_spatial, self.heads, self.head_dim)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output's shape (and dOut's): the query's heads, the value's head dim."""
        return (self.batch, *self.query_spatial, self.heads, self.v_dim)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """The keys' shape (the values' too without ``head_dim_v``): ``kv_heads`` heads."""
        return (self.batch, *self.spatial, self.kv_heads, self.head_dim)

    @property
    def v_shape(self) -> tuple[int, ...]:
        """The values' shape: ``kv_heads`` heads of the value's head dim."""
        return (self.batch, *self.spatial, self.kv_heads, self.v_dim)

    @property
    def lse_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.query_spatial, self.heads)

    @property
    def extra_keys_shape(self) -> tuple[int, ...]:
        """``additional_keys``' shape: ``[batch, extra_tokens, kv_heads, head_dim]``."""
        return (self.batch, self.extra_tokens, self.kv_heads, self.head_dim)

    @property
    def extra_values_shape(self) -> tuple[int, ...]:
        """``additional_values``' shape: ``[batch, extra_tokens, kv_heads, head_dim_v]``."""
        return (self.batch, self.extra_tokens, self.kv_heads, self.v_dim)

    @property
    def empty_neighborhood(self) -> bool:
        """Whether no query has a window slot: dense attention over the extra tokens alone (:func:`dense_problem`)."""
        return self.slots == 0

    def without_extra_tokens(self) -> "Problem":
        """The neighborhood part of a call with extra tokens (what the neighborhood's kernels and gradients
        take once the forward's output and logsumexp cover both parts)."""
        return self if not self.extra_tokens else replace(self, extra_tokens=0)


# ---------------------------------------------------------------- scalars


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def per_axis_ints(name: str, value, ndim: int) -> tuple[int, ...]:
    """An int, or a tuple/list of ``ndim`` ints, as a tuple of ints."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(items) != ndim or not all(_is_int(v) for v in items):
        raise TypeError(
            f"{name} must be an int or a tuple of {ndim} ints (one per spatial axis), got {value!r}"
        )
    return tuple(int(v) for v in items)


def per_axis_bools(name: str, value, ndim: int) -> tuple[bool, ...]:
    """A bool, or a tuple/list of ``ndim`` bools, as a tuple of bools."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(items) != ndim or not all(isinstance(v, (bool, np.bool_)) for v in items):
        raise TypeError(
            f"{name} must be a bool or a tuple of {ndim} bools (one per spatial axis), got {value!r}"
        )
    return tuple(bool(v) for v in items)


def _scale(value, head_dim: int) -> float:
    if value is None:
        return head_dim**-0.5
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- arrays


def _array_kind(name: str, x) -> str:
    kind = _arrays.kind_of(x)
    if kind is None:
        raise TypeError(
            f"{name} must be a NumPy array, CuPy array or torch tensor, got {type(x).__qualname__}"
        )
    return kind


def _floating(name: str, x) -> str:
    dtype = _arrays.dtype_name(x)
    if dtype not in _arrays.FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype ({', '.join(_arrays.FLOAT_DTYPES)}), got {dtype}")
    return dtype


def _same_placement(reference_name: str, reference, others: dict, same_dtype: bool = True) -> None:
    """Every array in ``others`` has the kind, device and (``same_dtype``) dtype of ``reference``."""
    kind = _arrays.kind_of(reference)
    for name, x in others.items():
        if _array_kind(name, x) != kind:
            raise TypeError(
                f"{name} is a {_arrays.describe(x)} but {reference_name} is a "
                f"{_arrays.describe(reference)}: all inputs must be the same kind of array"
            )
        if _arrays.device_of(x) != _arrays.device_of(reference):
            raise ValueError(
                f"{name} is on {_arrays.device_of(x)} but {reference_name} is on "
                f"{_arrays.device_of(reference)}: all inputs must be on one device"
            )
        if same_dtype and _arrays.dtype_name(x) != _arrays.dtype_name(reference):
            raise TypeError(
                f"{name} has dtype {_arrays.dtype_name(x)} but {reference_name} has "
                f"{_arrays.dtype_name(reference)}: inputs must share one dtype"
            )


def _unpack_heads_last(name: str, x, ndim: int) -> tuple[int, tuple[int, ...], int, int]:
    """(batch, spatial, heads, last) of a ``[batch, *spatial, heads, last]`` array."""
    expected = ndim + 3
    if len(x.shape) != expected:
        raise ValueError(
            f"{name} must have {expected} dimensions {_layouts.layout(ndim)} (heads-last) for {ndim}D "
            f"neighborhood attention, got shape {tuple(x.shape)}; {_layouts.heads_last_note(ndim)}"
        )
    shape = tuple(int(s) for s in x.shape)
    return shape[0], shape[1:-2], shape[-2], shape[-1]


def check_window_fits(spatial, kernel_size, dilation, note=None) -> None:
    """Every axis holds ``kernel_size * dilation`` positions; ``note()`` (called only on failure) says how
    the sizes were read from which array, for the caller's layout."""
    for axis, (length, k, d) in enumerate(zip(spatial, kernel_size, dilation)):
        if k * d > length:
            raise ValueError(
                f"kernel_size * dilation must not exceed the input size on every axis: axis {axis} "
                f"has size {length} but kernel_size {k} * dilation {d} = {k * d}{note() if note else ''}"
            )


def _axes(ndim, spatial, kernel_size, stride, dilation, is_causal, note=None) -> tuple[Axis, ...]:
    kernel_size = per_axis_ints("kernel_size", kernel_size, ndim)
    stride = per_axis_ints("stride", stride, ndim)
    dilation = per_axis_ints("dilation", dilation, ndim)
    causal = per_axis_bools("is_causal", is_causal, ndim)
    if any(k < 2 for k in kernel_size):
        raise ValueError(f"kernel_size must be >= 2 on every axis, got {kernel_size}")
    if any(d < 1 for d in dilation):
        raise ValueError(f"dilation must be >= 1 on every axis, got {dilation}")
    for axis, (k, s) in enumerate(zip(kernel_size, stride)):
        if not 1 <= s <= k:
            raise ValueError(
                f"stride must be between 1 and kernel_size on every axis, got stride {stride} "
                f"with kernel_size {kernel_size} (axis {axis})"
            )
    check_window_fits(spatial, kernel_size, dilation, note)
    return tuple(
        Axis(length, k, s, d, c) for length, k, s, d, c in zip(spatial, kernel_size, stride, dilation, causal)
    )


def _check_rpb(rpb, primary_name, primary, axes, heads) -> bool:
    if rpb is None:
        return False
    kind = _array_kind("rpb", rpb)
    if kind != _arrays.kind_of(primary):
        raise TypeError(
            f"rpb is a {_arrays.describe(rpb)} but {primary_name} is a {_arrays.describe(primary)}: "
            "all inputs must be the same kind of array"
        )
    if _arrays.device_of(rpb) != _arrays.device_of(primary):
        raise ValueError(f"rpb is on {_arrays.device_of(rpb)} but {primary_name} is on {_arrays.device_of(primary)}")
    _check_rpb_dtype(_floating("rpb", rpb), primary_name, _arrays.dtype_name(primary))
    if any(a.kernel_size % 2 == 0 for a in axes):
        raise ValueError(
            f"rpb needs an odd kernel_size on every axis, got kernel_size "
            f"{tuple(a.kernel_size for a in axes)}"
        )
    if any(a.causal for a in axes):
        raise ValueError("rpb cannot be combined with is_causal (relative positional bias is defined for centered windows)")
    expected = (heads, *(2 * a.kernel_size - 1 for a in axes))
    if tuple(rpb.shape) != expected:
        raise ValueError(
            f"rpb must have shape [heads, *(2 * kernel_size - 1)] = {expected}, got {tuple(rpb.shape)}; "
            f"heads = {heads} is {primary_name}'s axis -2"
            f"{_layouts.shape_note(primary_name, primary, len(axes), _layouts.HEADS_LAST)}"
        )
    return True


def rpb_dtypes(dtype: str) -> tuple[str, ...]:
    """The dtypes ``rpb`` may have with inputs of ``dtype``: theirs, and float32 next to float16/bfloat16
    (a full-precision bias parameter, as the layers keep it under torch.autocast)."""
    return (dtype, "float32") if dtype in ("float16", "bfloat16") else (dtype,)


def _check_rpb_dtype(rpb_dtype: str, primary_name: str, dtype: str) -> None:
    allowed = rpb_dtypes(dtype)
    if rpb_dtype not in allowed:
        raise TypeError(
            f"rpb has dtype {rpb_dtype} but {primary_name} has {dtype}: rpb must be "
            f"{' or '.join(allowed)} with {dtype} inputs (inputs share one dtype; only float16/bfloat16 "
            f"inputs may have a float32 rpb)"
        )


def _check_grad(name: str, grad, primary_name: str, primary, shape) -> None:
    _array_kind(name, grad)
    _same_placement(primary_name, primary, {name: grad})
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(grad.shape)}"
                         f"{_layouts.shape_note(primary_name, primary, len(shape) - 3, _layouts.HEADS_LAST)}")


def _kv_heads(ndim: int, primary_name: str, primary, heads: int, others, own_head_dim: str = "") -> int | None:
    """The key/value heads of ``others`` (``(name, array)``, shaped like ``primary`` except, with GQA/MQA,
    along the heads axis, and for the one named ``own_head_dim``, along the head dim): None where they have
    ``heads``, else a count that divides ``heads``."""
    counts = set()
    for name, x in others:
        shape = tuple(int(s) for s in x.shape)
        own = name == own_head_dim
        if len(shape) != len(primary.shape) or shape[:-2] + (() if own else shape[-1:]) != tuple(
                primary.shape[:-2]) + (() if own else (int(primary.shape[-1]),)):
            what = "fewer heads on axis -2" + (", a head dim of its own" if own else "")
            raise ValueError(
                f"{name} must have the shape of {primary_name} {tuple(primary.shape)} (with GQA/MQA, {what}), got "
                f"{shape}{_layouts.shape_note(primary_name, primary, ndim, _layouts.HEADS_LAST)}")
        if own and shape[-1] < 1:
            raise ValueError(f"{name} head_dim (last dimension) must be >= 1, got {shape[-1]}")
        counts.add(shape[-2])
    if len(counts) > 1:
        names = " and ".join(name for name, _ in others)
        raise ValueError(f"{names} must have the same number of heads, got {sorted(counts)}")
    kv = counts.pop()
    if kv == heads:
        return None
    if kv < 1 or heads % kv:
        raise ValueError(f"{others[0][0]} has {kv} heads, which must divide {primary_name}'s {heads} heads "
                         f"(GQA/MQA: each key/value head serves heads // {kv} query heads)")
    return kv


def _note(name: str, x, ndim: int):
    """The shape note of ``x`` for :func:`check_window_fits`, built only when an error needs it."""
    return lambda: _layouts.shape_note(name, x, ndim, _layouts.HEADS_LAST)


# ---------------------------------------------------------------- problems


class _Shaped:
    """Something with a shape, standing in for an array in the shape checks."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _query_box(ndim: int, query, key, query_box) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """The validated query box (per axis ``(first, stop)`` inside the key's positions, holding the query's
    rows) and the query's shape over every position, for the shape checks that compare it with the key's."""
    _unpack_heads_last("key", key, ndim)
    positions = tuple(int(s) for s in key.shape[1:-2])
    box = tuple((int(first), int(first) + int(n)) for first, n in zip(query_box, query.shape[1:-2]))
    if len(box) != ndim or any(not 0 <= first < stop <= length for (first, stop), length in zip(box, positions)):
        raise ValueError(f"query rows from {tuple(query_box)} with query spatial shape "
                         f"{tuple(query.shape[1:-2])} must lie inside the key's positions {positions}")
    return box, (query.shape[0], *positions, *query.shape[-2:])


def fused_problem(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                  additional_keys=None, additional_values=None, query_start=None) -> Problem:
    """Validate the arguments of ``na1d``/``na2d``/``na3d``. ``query_start`` (internal: context parallelism):
    per axis the position of the query's first row among the key's positions; the query covers a box of them."""
    kind = _array_kind("query", query)
    _same_placement("query", query, {"key": key, "value": value})
    dtype = _floating("query", query)
    _unpack_heads_last("query", query, ndim)
    box, shaped = (None, query) if query_start is None else _query_box(ndim, query, key, query_start)
    if box is not None:
        shaped = _Shaped(shaped)
    batch, spatial, heads, head_dim = _unpack_heads_last("query", shaped, ndim)
    heads_kv = _kv_heads(ndim, "query", shaped, heads, (("key", key), ("value", value)), own_head_dim="value")
    if head_dim < 1:
        raise ValueError(f"query head_dim (last dimension) must be >= 1, got {head_dim}")
    axes = _axes(ndim, spatial, kernel_size, stride, dilation, is_causal, _note("query", query, ndim))
    has_rpb = _check_rpb(rpb, "query", query, axes, heads)
    scale = _scale(scale, head_dim)
    _layouts.warn_if_transposed("query", query, ndim, _layouts.HEADS_LAST)
    head_dim_v = int(value.shape[-1])
    problem = Problem(FUSED, axes, batch, heads, head_dim, dtype, kind, _arrays.device_of(query), has_rpb, scale,
                      heads_kv, None if head_dim_v == head_dim else head_dim_v, query_box=box)
    tokens = _extra_tokens(problem, query, additional_keys, additional_values)
    return replace(problem, extra_tokens=tokens) if tokens else problem


def dense_problem(query, key, value, scale) -> Problem:
    """Validate the arguments of ``na_rtc.attention`` (``[batch, tokens, heads(_kv), head_dim(_v)]`` arrays) and
    return its problem: the fused op with an empty neighborhood and the keys as extra tokens. The one axis has
    the query's length and kernel 0 with one stride block over the whole axis, so that every window is the
    empty ``[s, s)`` of the window math (window.py) and every query tile's key box is empty: the kernels
    stream the extra tokens alone."""
    _array_kind("query", query)
    _same_placement("query", query, {"key": key, "value": value})
    dtype = _floating("query", query)
    shapes = {name: tuple(int(s) for s in x.shape) for name, x in (("query", query), ("key", key), ("value", value))}
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, tokens, heads, head_dim], got shape {shape}")
    (batch, queries, heads, dim), (_, keys, heads_kv, key_dim), value_shape = shapes.values()
    if dim < 1:
        raise ValueError(f"query head_dim (last dimension) must be >= 1, got {dim}")
    if key_dim != dim or shapes["key"][0] != batch:
        raise ValueError(f"key must be [batch, keys, heads_kv, head_dim] = [{batch}, keys, heads_kv, {dim}] (the "
                         f"query's batch and head dim), got shape {shapes['key']}")
    if value_shape[:3] != shapes["key"][:3] or value_shape[3] < 1:
        raise ValueError(f"value must be [batch, keys, heads_kv, head_dim_v] with the key's batch, keys and heads "
                         f"{shapes['key'][:3]}, got shape {value_shape}")
    if heads_kv < 1 or heads % heads_kv:
        raise ValueError(f"key has {heads_kv} heads, which must divide query's {heads} heads (GQA/MQA: each "
                         f"key/value head serves heads // heads_kv query heads)")
    empty = Axis(queries, 0, max(queries, 1))
    head_dim_v = value_shape[3]
    return Problem(FUSED, (empty,), batch, heads, dim, dtype, _arrays.kind_of(query), _arrays.device_of(query),
                   scale=_scale(scale, dim), heads_kv=heads_kv, head_dim_v=None if head_dim_v == dim else head_dim_v,
                   extra_tokens=keys)


def _extra_tokens(problem: Problem, query, additional_keys, additional_values) -> int:
    """The token count of a fused call's extra tokens, validated: both or neither, the query's kind, device and
    dtype, ``[batch, tokens, heads_kv, head_dim]`` keys and ``head_dim_v`` values of one token count."""
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together (or both left out)")
    if additional_keys is None:
        return 0
    _same_placement("query", query, {"additional_keys": additional_keys, "additional_values": additional_values})
    tokens = None
    for name, x, dim in (("additional_keys", additional_keys, problem.head_dim),
                         ("additional_values", additional_values, problem.v_dim)):
        shape = tuple(int(s) for s in x.shape)
        layout = (f"[batch, tokens, heads_kv, {'head_dim' if name == 'additional_keys' else 'head_dim_v'}] = "
                  f"[{problem.batch}, tokens, {problem.kv_heads}, {dim}]")
        if len(shape) != 4 or shape[0] != problem.batch or shape[2] != problem.kv_heads or shape[3] != dim:
            raise ValueError(f"{name} must be {layout} (the key's heads, the "
                             f"{'query' if name == 'additional_keys' else 'value'}'s head dim), got shape {shape}")
        if tokens is not None and shape[1] != tokens:
            raise ValueError(f"additional_keys and additional_values must hold the same number of tokens, got "
                             f"{tokens} and {shape[1]}")
        tokens = shape[1]
    return tokens


def qk_problem(ndim, query, key, kernel_size, dilation, is_causal, rpb) -> Problem:
    """Validate the arguments of ``na1d_qk``/``na2d_qk``/``na3d_qk``."""
    kind = _array_kind("query", query)
    _same_placement("query", query, {"key": key})
    dtype = _floating("query", query)
    batch, spatial, heads, head_dim = _unpack_heads_last("query", query, ndim)
    heads_kv = _kv_heads(ndim, "query", query, heads, (("key", key),))
    if head_dim < 1:
        raise ValueError(f"query head_dim (last dimension) must be >= 1, got {head_dim}")
    axes = _axes(ndim, spatial, kernel_size, 1, dilation, is_causal, _note("query", query, ndim))
    has_rpb = _check_rpb(rpb, "query", query, axes, heads)
    _layouts.warn_if_transposed("query", query, ndim, _layouts.HEADS_LAST)
    return Problem(QK, axes, batch, heads, head_dim, dtype, kind, _arrays.device_of(query), has_rpb,
                   heads_kv=heads_kv)


def av_problem(ndim, attn, value, kernel_size, dilation, is_causal) -> Problem:
    """Validate the arguments of ``na1d_av``/``na2d_av``/``na3d_av``."""
    kind = _array_kind("attn", attn)
    _same_placement("value", value, {"attn": attn})
    dtype = _floating("value", value)
    batch, spatial, value_heads, head_dim = _unpack_heads_last("value", value, ndim)
    if head_dim < 1:
        raise ValueError(f"value head_dim (last dimension) must be >= 1, got {head_dim}")
    note = _note("value", value, ndim)
    axes = _axes(ndim, spatial, kernel_size, 1, dilation, is_causal, note)
    slots = math.prod([a.kernel_size for a in axes])  # a list: torch.compile cannot trace a generator here
    # the heads are attn's (the queries'); with GQA/MQA value has fewer, dividing them
    heads = int(attn.shape[-2]) if len(attn.shape) == ndim + 3 else value_heads
    expected = (batch, *spatial, heads, slots)
    if len(attn.shape) != len(expected):
        raise ValueError(f"attn must have {len(expected)} dimensions {expected}, got shape {tuple(attn.shape)}"
                         f"{note()}")
    if int(attn.shape[-1]) != slots:
        raise ValueError(
            f"attn's last dimension must be the number of window slots prod(kernel_size) = {slots}, "
            f"got {int(attn.shape[-1])}"
        )
    if tuple(attn.shape) != expected:
        raise ValueError(f"attn must have shape [batch, *spatial, heads, slots] = {expected} to match value, "
                         f"got {tuple(attn.shape)}{note()}")
    if value_heads != heads and (value_heads < 1 or heads % value_heads):
        raise ValueError(f"value has {value_heads} heads, which must divide attn's {heads} heads (GQA/MQA: each "
                         f"value head serves heads // {value_heads} query heads)")
    _layouts.warn_if_transposed("value", value, ndim, _layouts.HEADS_LAST)
    return Problem(AV, axes, batch, heads, head_dim, dtype, kind, _arrays.device_of(value),
                   heads_kv=None if value_heads == heads else value_heads)


def check_fused_backward(problem: Problem, grad_out, query, output, logsumexp, grad_logsumexp=None) -> None:
    _check_grad("grad_out", grad_out, "query", query, problem.out_shape)
    if output is not None:
        _check_grad("output", output, "query", query, problem.out_shape)
    for name, rows in (("logsumexp", logsumexp), ("grad_logsumexp", grad_logsumexp)):
        if rows is None:
            continue
        _array_kind(name, rows)
        if tuple(rows.shape) != problem.lse_shape:
            raise ValueError(f"{name} must have shape {problem.lse_shape}, got {tuple(rows.shape)}")
    if grad_logsumexp is not None:  # the query's kind and device, the logsumexp's dtype (float32 for 16-bit inputs)
        _same_placement("query", query, {"grad_logsumexp": grad_logsumexp}, same_dtype=False)
        _floating("grad_logsumexp", grad_logsumexp)
    if (output is None) != (logsumexp is None):
        raise ValueError("output and logsumexp must be given together (or both left out to recompute them)")


def check_qk_backward(problem: Problem, grad_attn, query) -> None:
    _check_grad("grad_attn", grad_attn, "query", query, problem.attn_shape)


def check_av_backward(problem: Problem, grad_out, value) -> None:
    _check_grad("grad_out", grad_out, "value", value, problem.qkv_shape)
