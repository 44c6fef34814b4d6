"""Neighborhood attention layers: ``NeighborhoodAttention1D`` / ``2D`` / ``3D``.

Input and output are heads-last token maps ``[batch, *spatial, embed_dim]``.
A layer is a qkv projection, neighborhood attention over ``num_heads`` heads
and an output projection, with an optional relative positional bias ``rpb``.

Two execution paths give the same numbers (within the tolerance table of
``na_rtc.verify.tolerances``):

- fused (``na1d``/``na2d``/``na3d``): the default, including training without
  attention dropout; stride and the bias are handled inside the kernel.
- split (``na*_qk``, softmax, dropout, ``na*_av``): taken only while training
  with ``attn_drop > 0``, because dropout on the attention weights needs the
  weights, which the fused kernels never materialize. Split ops have no
  stride, so that combination is an error instead of a silent change of the
  model.

This module imports torch; ``na_rtc`` exposes it lazily.
"""

from __future__ import annotations

import inspect
import numbers
import types

import torch
import torch.nn.functional as F
from torch import nn

from . import _args, distributed
from . import _torch  # noqa: F401 - the ops and their FLOP formulas, registered once a layer can exist
from .functional import na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av, na3d_qk

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

# ndim -> (fused, qk, av)
_OPS = {1: (na1d, na1d_qk, na1d_av), 2: (na2d, na2d_qk, na2d_av), 3: (na3d, na3d_qk, na3d_av)}
_CONTEXT_PARALLEL_OPS = {1: distributed.na1d, 2: distributed.na2d, 3: distributed.na3d}

# ndim -> the input layout, for errors
_INPUT = {1: "[batch, length, embed_dim]", 2: "[batch, height, width, embed_dim]",
          3: "[batch, depth, height, width, embed_dim]"}

# ndim -> (what NATTEN releases took as the module's fourth argument, the compat modules with NATTEN's
# positional order): a positional fourth argument could mean any of them
_FOURTH = {
    1: ("dilation in 0.14-0.17, stride in later ones", ("natten014", "natten017")),
    2: ("dilation in 0.14-0.17, stride in later ones", ("natten014", "natten017")),
    3: ("kernel_size_d in 0.15, dilation in 0.17, stride in later ones", ("natten017",)),
}


def _positive_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def _positional_after_kernel_size(cls, extra: tuple) -> TypeError:
    """The error for NATTEN-style positional arguments after ``kernel_size``."""
    name = cls.__name__
    fourth, compat = _FOURTH[cls.ndim]
    versions = "/".join(f"{m[6]}.{m[7:]}" for m in compat)  # natten014 -> 0.14
    modules = " or ".join(f"na_rtc.compat.{m}.{name}" for m in compat)
    return TypeError(
        f"{name}() takes embed_dim, num_heads and kernel_size positionally, but got {3 + len(extra)} positional "
        f"arguments; pass the rest by keyword, e.g. {name}(embed_dim, num_heads, kernel_size, dilation="
        f"{extra[0]!r}) or stride={extra[0]!r}. Everything after kernel_size is keyword-only because NATTEN "
        f"releases disagree on the fourth argument ({fourth}), so a positional value could silently mean "
        f"another. For NATTEN {versions}'s positional order (dim, num_heads, kernel_size, dilation, ...) use "
        f"{modules}, which also keep{'s' if len(compat) == 1 else ''} NATTEN's state-dict keys")


class _NeighborhoodAttention(nn.Module):
    """Shared implementation; subclasses fix the number of spatial axes."""

    ndim: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            # The public layers get their own copy of __init__ named after them, so the argument errors
            # Python raises itself (a missing kernel_size, an unknown keyword) name the class the user
            # called, not this private base.
            base = _NeighborhoodAttention.__init__
            init = types.FunctionType(base.__code__, base.__globals__, "__init__", base.__defaults__,
                                      base.__closure__)
            init.__kwdefaults__ = base.__kwdefaults__
            init.__qualname__ = f"{cls.__qualname__}.__init__"
            init.__doc__ = base.__doc__
            init.__signature__ = base.__signature__
            cls.__init__ = init

    def __init__(self, embed_dim, num_heads, kernel_size, *positional, stride=1, dilation=1, is_causal=False,
                 rel_pos_bias=False, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 num_kv_heads=None, process_group=None, shard_dim=0):
        if positional:
            raise _positional_after_kernel_size(type(self), positional)
        super().__init__()
        ndim = self.ndim
        embed_dim = _positive_int("embed_dim", embed_dim)
        num_heads = _positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}): each key/value "
                             "head serves num_heads // num_kv_heads query heads (GQA/MQA)")
        # The same per-axis normalization as the functional API, so a module
        # rejects at construction what the ops would reject at the first call.
        kernel = _args.per_axis_ints("kernel_size", kernel_size, ndim)
        strides = _args.per_axis_ints("stride", stride, ndim)
        dilations = _args.per_axis_ints("dilation", dilation, ndim)
        causal = _args.per_axis_bools("is_causal", is_causal, ndim)
        if any(k < 2 for k in kernel):
            raise ValueError(f"kernel_size must be >= 2 on every axis, got {kernel}")
        if any(d < 1 for d in dilations):
            raise ValueError(f"dilation must be >= 1 on every axis, got {dilations}")
        if not all(1 <= s <= k for s, k in zip(strides, kernel)):
            raise ValueError(f"stride must be between 1 and kernel_size on every axis, got stride {strides} "
                             f"with kernel_size {kernel}")
        rel_pos_bias = _flag("rel_pos_bias", rel_pos_bias)
        if rel_pos_bias and any(k % 2 == 0 for k in kernel):
            raise ValueError(f"rel_pos_bias needs an odd kernel_size on every axis, got {kernel}")
        if rel_pos_bias and any(causal):
            raise ValueError("rel_pos_bias cannot be combined with is_causal (the bias is defined for centered "
                             "windows)")
        if qk_scale is not None and (isinstance(qk_scale, bool) or not isinstance(qk_scale, numbers.Real)):
            raise TypeError(f"qk_scale must be a real number or None, got {qk_scale!r}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5 if qk_scale is None else float(qk_scale)
        self.kernel_size, self.stride, self.dilation, self.is_causal = kernel, strides, dilations, causal
        # Normalized copies the forward reads: subclasses for the historical
        # APIs may replace the public attributes with the old int forms.
        self._window = (kernel, strides, dilations, causal)
        self._min_size = tuple(k * d for k, d in zip(kernel, dilations))
        # context parallelism: the input is this rank's slab of spatial axis shard_dim (na_rtc.distributed)
        if (error := distributed.validate.shard_dim_error(shard_dim, ndim)) is not None:
            raise ValueError(error)
        self.process_group, self.shard_dim = process_group, shard_dim

        # one projection, outputs [q | k | v]: num_heads query heads, num_kv_heads key and value heads each
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim,
                             bias=_flag("qkv_bias", qkv_bias))
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in kernel)))
            # Drawn between qkv and proj, as NATTEN does: under one seed the
            # layer starts from NATTEN's exact weights.
            self._reset_rpb()
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(_probability("attn_drop", attn_drop))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(_probability("proj_drop", proj_drop))

    def _reset_rpb(self) -> None:
        if self.rpb is not None:
            # NATTEN's initialization: std 0.02 with absolute bounds +-2, i.e.
            # practically untruncated; kept so models trained from scratch
            # start from the same distribution.
            nn.init.trunc_normal_(self.rpb, mean=0.0, std=0.02, a=-2.0, b=2.0)

    # ------------------------------------------------------------ forward

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__qualname__}")
        layout = _INPUT[self.ndim]
        if x.dim() != self.ndim + 2:
            raise ValueError(f"{type(self).__name__} expects input of rank {self.ndim + 2} {layout}, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"input's last dimension must be embed_dim={self.embed_dim}, got shape "
                             f"{tuple(x.shape)}")

    def _use_split_path(self) -> bool:
        return self.training and self.attn_drop.p > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on ``x`` ``[batch, *spatial, embed_dim]``: the output, of the same shape.

        :raises TypeError: ``x`` is not a torch tensor.
        :raises ValueError: ``x`` of the wrong rank or last dimension, or
            ``attn_drop > 0`` in training with ``stride > 1`` or a
            ``process_group``; otherwise what the fused op raises.
        """
        self._check_input(x)
        kernel, strides, dilations, causal = self._window
        split = self._use_split_path()
        if split and any(s > 1 for s in strides):
            raise ValueError(
                f"attn_drop={self.attn_drop.p} in training needs the split ops, which have no stride, but "
                f"stride={strides}; use attn_drop=0 (or proj_drop) with stride > 1, or call .eval()")

        if self.process_group is not None and split:
            raise ValueError(
                f"attn_drop={self.attn_drop.p} in training needs the split ops, which have no context-parallel "
                f"version; use attn_drop=0 (or proj_drop) with process_group, or call .eval()")

        spatial = tuple(x.shape[1:-1])
        # NATTEN's modules zero-pad inputs smaller than the window at the end
        # of each axis (before the qkv projection) and crop the output back;
        # the ops themselves require kernel_size * dilation <= size.
        pads = self._padding(spatial)
        if any(pads):
            spec = []
            for p in reversed(pads):
                spec += [0, p]
            x = F.pad(x, [0, 0, *spec])
        padded = tuple(x.shape[1:-1])

        batch = x.shape[0]
        qkv = self.qkv(x).reshape(batch, *padded, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # split gives heads-last strided views; the ops read them through
        # strides, so no copy is made here.
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=-2)
        fused, qk, av = _OPS[self.ndim]
        if split:
            attn = qk(q * self.scale, k, kernel, dilations, causal, rpb=self.rpb)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = av(attn, v, kernel, dilations, causal)
        elif self.process_group is not None:
            out = _CONTEXT_PARALLEL_OPS[self.ndim](q, k, v, kernel, strides, dilations, causal, scale=self.scale,
                                             rpb=self.rpb, group=self.process_group, shard_dim=self.shard_dim)
        else:
            out = fused(q, k, v, kernel, strides, dilations, causal, scale=self.scale, rpb=self.rpb)
        out = out.reshape(batch, *padded, self.embed_dim)
        if any(pads):
            out = out[(slice(None), *(slice(0, n) for n in spatial))]
        return self.proj_drop(self.proj(out))

    def _padding(self, spatial) -> tuple[int, ...]:
        """Rows to append on each axis up to ``kernel_size * dilation``. Context parallel, the shard axis is
        every rank's slab together (one gather of their lengths) and only the last rank, which holds the
        axis' end, pads it, as one process pads its end."""
        sizes, pads_shard_axis = spatial, True
        if self.process_group is not None:
            comm = distributed.communicator(self.process_group)
            lengths = distributed.validate.slab_lengths(comm, spatial[self.shard_dim])
            sizes = tuple(sum(lengths) if axis == self.shard_dim else n for axis, n in enumerate(spatial))
            pads_shard_axis = comm.rank == len(lengths) - 1
        return tuple(0 if axis == self.shard_dim and not pads_shard_axis else max(0, m - n)
                     for axis, (m, n) in enumerate(zip(self._min_size, sizes)))

    def extra_repr(self) -> str:
        kv = f"num_kv_heads={self.num_kv_heads}, " if self.num_kv_heads != self.num_heads else ""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {kv}head_dim={self.head_dim}, "
                f"kernel_size={self._window[0]}, stride={self._window[1]}, dilation={self._window[2]}, "
                f"is_causal={self._window[3]}, rel_pos_bias={self.rpb is not None}, scale={self.scale:g}"
                + ("" if self.process_group is None else f", context parallel over shard_dim={self.shard_dim}"))


# help() and inspect show the keyword-only signature, without the catch-all that exists only to explain the
# positional mistake.
_NeighborhoodAttention.__init__.__signature__ = inspect.signature(_NeighborhoodAttention.__init__).replace(
    parameters=[p for p in inspect.signature(_NeighborhoodAttention.__init__).parameters.values()
                if p.kind is not inspect.Parameter.VAR_POSITIONAL])


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1D neighborhood attention layer on ``[batch, length, embed_dim]`` (torch).

    A qkv projection, :func:`na_rtc.na1d` over ``num_heads`` heads and an output
    projection. ``NeighborhoodAttention1D(embed_dim, num_heads, kernel_size, *,
    stride=1, dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0, num_kv_heads=None,
    process_group=None, shard_dim=0)``. Everything after ``kernel_size`` is
    keyword-only: NATTEN versions disagree on what came fourth (dilation in
    0.14-0.17, stride later), so a positional call could silently mean something
    else; for the historical signatures use :mod:`na_rtc.compat`.

    Weights: ``qkv`` (Linear, ``(num_heads + 2 * num_kv_heads) * head_dim``
    outputs in the order ``[q | k | v]``), ``rpb`` (``[num_heads, 2k - 1]`` when
    ``rel_pos_bias``), ``proj`` (Linear).

    Calling the layer on ``x`` ``[batch, length, embed_dim]`` (any floating
    dtype the ops take; autocast applies) returns ``[batch, length,
    embed_dim]``. Inputs shorter than ``kernel_size * dilation`` are zero-padded
    at the end and the output cropped back (with ``process_group``, at the end of
    the whole axis, on the last rank). A call raises ``TypeError`` for an input
    that is not a tensor, ``ValueError`` for one of the wrong rank or last
    dimension, and ``ValueError`` for ``attn_drop > 0`` in training together with
    ``stride > 1`` or with ``process_group`` (the split ops have neither);
    otherwise what :func:`na_rtc.na1d` raises.

    :param embed_dim: channels of the input and output, a positive int divisible
        by ``num_heads`` (``head_dim = embed_dim // num_heads``).
    :param num_heads: query heads, a positive int.
    :param kernel_size: window size, an int ``>= 2`` (or one per axis), as are
        ``stride`` (``1`` to ``kernel_size``), ``dilation`` (``>= 1``) and
        ``is_causal``; see :func:`na_rtc.na1d`.
    :param rel_pos_bias: a learned relative positional bias (odd
        ``kernel_size``, not causal).
    :param qkv_bias: a bias in the qkv projection.
    :param qk_scale: the logit scale, a real number; default
        ``head_dim ** -0.5``.
    :param attn_drop: dropout probability on the attention weights in training
        (``[0, 1)``); above 0 the layer runs the split ops, which have no stride.
    :param proj_drop: dropout probability after the output projection, ``[0, 1)``.
    :param num_kv_heads: key/value heads (GQA/MQA), a divisor of ``num_heads``
        (default ``num_heads``): query head ``h`` attends with key/value head
        ``h // (num_heads // num_kv_heads)``.
    :param process_group: a torch.distributed group: the layer is context
        parallel (:mod:`na_rtc.distributed`): its input is this rank's contiguous
        slab of spatial axis ``shard_dim`` (:func:`na_rtc.distributed.shard` cuts
        it), the output is the slab's rows, and the parameters' gradients are
        this rank's share (all-reduce them with ``SUM``).
    :param shard_dim: the spatial axis the slabs split, ``0 <= shard_dim <
        ndim``.
    :raises TypeError: a positional argument after ``kernel_size``, or
        arguments of the wrong type (window arguments not ints/bools, a flag not
        a bool, ``qk_scale`` or a dropout probability not a real number).
    :raises ValueError: sizes that are not positive, ``embed_dim`` not divisible
        by ``num_heads``, ``num_kv_heads`` not dividing ``num_heads``, window
        arguments out of range, ``rel_pos_bias`` with an even ``kernel_size`` or
        with ``is_causal``, a dropout probability outside ``[0, 1)``, a
        ``shard_dim`` that is not a spatial axis.
    """

    ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2D neighborhood attention layer on ``[batch, height, width, embed_dim]`` (torch).

    As :class:`NeighborhoodAttention1D`, with the same constructor arguments,
    errors and parameters; what differs: ``kernel_size``, ``stride``,
    ``dilation`` and ``is_causal`` may be pairs, ``rpb`` is ``[num_heads,
    2kx - 1, 2ky - 1]``, ``shard_dim`` is 0 or 1, and a call maps ``[batch,
    height, width, embed_dim]`` to the same shape with :func:`na_rtc.na2d`.
    """

    ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3D neighborhood attention layer on ``[batch, depth, height, width, embed_dim]`` (torch).

    As :class:`NeighborhoodAttention1D`, with the same constructor arguments,
    errors and parameters. The first spatial axis is depth or time (NATTEN's
    ``kernel_size_d`` axis): a video layer causal in time only takes
    ``is_causal=(True, False, False)``. What differs: ``kernel_size``,
    ``stride``, ``dilation`` and ``is_causal`` may be triples, ``rpb`` is
    ``[num_heads, 2kd - 1, 2kh - 1, 2kw - 1]``, ``shard_dim`` is 0, 1 or 2, and a
    call maps ``[batch, depth, height, width, embed_dim]`` to the same shape
    with :func:`na_rtc.na3d`.
    """

    ndim = 3
