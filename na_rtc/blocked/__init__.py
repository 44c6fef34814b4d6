"""The blocked backend: neighborhood attention as block-sparse dense attention, on any array library's matrix
products (NumPy on the CPU; torch on any device: CPU, Apple MPS, AMD ROCm, Intel XPU, NVIDIA CUDA).

Queries are cut into tiles inside one dilation group per axis (:mod:`na_rtc.blocked.tiles`); each tile
attends the box of keys its windows cover, densely, with the exact NA mask of the window math (causal,
stride, dilation and even kernels included) and the bias gathered for the box. That is more multiply-adds than
the neighborhood itself (a 8 x 8 tile of 13 x 13 windows sees a 20 x 20 box: 2.4x the window's keys) but in
large batched matrix products, which every array library runs near its hardware's speed, where the reference
backend gathers every (query, slot) pair. The query heads of one key/value head (GQA/MQA) are rows of the
same products: the keys and values are never repeated per query head.

The forward computes each chunk of tiles' logits, softmax and output, and keeps the logsumexp; the backward
recomputes the chunk's probabilities from it (no ``[queries, box]`` matrix is kept between the two) and adds
the key and value gradients of overlapping boxes. Tiles are processed in chunks whose ``[batch, heads, tile
queries, box keys]`` logits fit ``NA_RTC_REFERENCE_CHUNK_MB`` (the reference backend's budget; a few such
buffers are alive at once): beyond working copies of its inputs and outputs, an op holds about four times the
budget. Extra key/value tokens are merged with the neighborhood through the logsumexps
(:mod:`na_rtc.extra_tokens`); the split ops (``qk``/``av``) are the reference backend's.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _arrays, config, extra_tokens, reference
from .._args import Problem
from .._array_math import math_for
from ..window import Axis
from .tiles import Tiles, tiles_of

__all__ = ["OPS", "TILES", "fused_backward", "fused_forward", "tile_shape"]

#: queries per tile per axis, by rank (a tile is clamped to an axis shorter than it). Chosen by measurement on
#: this project's 2-core CPU (torch 2.13, fp32, batch 1, 4 heads, head dim 32, one thread, fastest of 4 runs
#: taken in turns, forward+backward ms; python -m na_rtc bench --preset portable times the chosen ones):
#:   1D 4096 k=127:          32: 65, 64: 57, 128: 55, 256: 67
#:   2D 128x128 k=13:        8x8: 388, 4x16: 401, 16x8: 418, 4x8: 453, 6x6: 460, 12x12: 470, 16x16: 512
#:   2D 64x64 k=7 dil 2:     4x8: 64, 8x4: 68, 8x8: 73, 16x16: 78, 4x4: 82, 2x8: 100
#:   2D 56x56 k=7, batch 8:  8x8: 345, 4x8: 360, 7x7: 365, 14x14: 415, 4x4: 592
#:   3D 16x32x32 k=(3,7,7):  2x4x8: 561, 2x8x8: 587, 1x8x8: 593, 2x4x4: 594, 4x4x4: 636, 4x8x8: 840
#:   3D 16x16x16 k=5:        2x8x8: 119, 2x4x8: 121, 4x4x8: 127, 4x4x4: 136
TILES = {1: (64,), 2: (8, 8), 3: (2, 4, 8)}


def tile_shape(axes: tuple[Axis, ...]) -> tuple[int, ...]:
    return TILES[len(axes)]


class _Run:
    """One op's state: the math shim, compute dtype, the tiles and their chunks, heads-first working copies with
    a zero row at index ``N`` (where padding queries and keys point)."""

    def __init__(self, problem: Problem, like):
        self.problem = problem
        self.m = math_for(problem, like)
        self.dtype = self.m.compute_dtype(problem.dtype)
        self.tiles: Tiles = tiles_of(problem.axes, tile_shape(problem.axes))
        itemsize = 8 if problem.dtype == "float64" else 4
        self.extra = problem.extra_tokens  # appended to every box (every query sees them, no bias)
        per_tile = (max(problem.batch, 1) * problem.heads * self.tiles.tile_queries
                    * (self.tiles.box_keys + self.extra) * itemsize)
        self.step = max(1, config.reference_chunk_bytes() // per_tile)
        self.bias_pad = None
        self.flash = _cpu_flash_attention(problem, like)

    def padded(self, x):
        """``[batch, *spatial, heads, last]`` heads-first in the compute dtype, one zero token row appended."""
        p = self.problem
        flat = self.m.heads_first(x, p, self.dtype)
        out = self.m.zeros((*flat.shape[:2], p.tokens + 1, *flat.shape[3:]), self.dtype)
        out[:, :, :p.tokens] = flat
        return out

    def zeros(self, heads: int, last: int | None):
        p = self.problem
        return self.m.zeros((p.batch, heads, p.tokens + 1) + (() if last is None else (last,)), self.dtype)

    def chunks(self, rpb):
        """``(queries [c * Tq], keys [c * Kb], added, bias [c, Tq, Kb] or None)`` per chunk of ``c`` tiles, on the
        arrays' device: ``added`` is what each logit gets beside ``q.k``: the bias (with ``rpb``) inside the
        windows, ``-inf`` outside, ``[(Hkv,) c, G * Tq, Kb]`` in the compute dtype."""
        tiles, m, p = self.tiles, self.m, self.problem
        for start in range(0, tiles.count, self.step):
            stop = min(start + self.step, tiles.count)
            queries, keys, mask, bias = tiles.chunk(start, stop, rpb is not None)
            outside = np.where(mask, 0.0, -np.inf)
            if p.group > 1:  # the group's query heads are rows g * Tq + t of each tile
                outside = np.tile(outside, (1, p.group, 1))
            added = m.cast(m.index(outside), self.dtype)
            if bias is not None:
                bias = m.index(bias)
                added = self.bias_rows(rpb, bias, stop - start) + added
            if self.extra:
                added = self.token_columns(added)
            yield m.index(queries.reshape(-1)), m.index(keys.reshape(-1)), added, bias, stop - start

    # ------------------------------------------------------------ [B, heads, tokens, ...] <-> tile rows

    def query_rows(self, x, index, count: int):
        """Query-side ``[B, H, N + 1, ...]`` -> ``[B, Hkv, c, G * Tq, ...]`` (the rows of each tile's products)."""
        p, tq = self.problem, self.tiles.tile_queries
        rows = self.m.gather_tokens(x, index)  # [B, H, c * Tq, ...]
        tail = tuple(rows.shape[3:])
        rows = rows.reshape(p.batch, p.kv_heads, p.group, count, tq, *tail).swapaxes(2, 3)
        return rows.reshape(p.batch, p.kv_heads, count, p.group * tq, *tail)

    def put_query_rows(self, target, index, rows, count: int):
        """The inverse of :meth:`query_rows` into ``target`` (every query belongs to one tile)."""
        p, tq = self.problem, self.tiles.tile_queries
        tail = tuple(rows.shape[4:])
        rows = rows.reshape(p.batch, p.kv_heads, count, p.group, tq, *tail).swapaxes(2, 3)
        self.m.put_tokens(target, index, rows.reshape(p.batch, p.heads, count * tq, *tail))

    def key_rows(self, x, index, count: int, tokens=None):
        """Key-side ``[B, Hkv, N + 1, D]`` -> ``[B, Hkv, c, Kb, D]``; with ``tokens`` (heads-first extra tokens)
        appended to every box, ``[B, Hkv, c, Kb + T, D]``."""
        rows = self.m.gather_tokens(x, index).reshape(x.shape[0], x.shape[1], count, self.tiles.box_keys, -1)
        return rows if tokens is None else self.with_tokens(rows, tokens, count)

    def add_key_rows(self, target, index, rows, tokens_target=None):
        """Add ``[B, Hkv, c, Kb (+ T), D]`` to the keys they came from (boxes overlap; the extra tokens' part,
        summed over the tiles, to ``tokens_target`` ``[B, Hkv, T, D]``)."""
        b, h = rows.shape[:2]
        if tokens_target is not None:
            tokens_target += rows[:, :, :, self.tiles.box_keys:].sum(2)
            rows = rows[:, :, :, :self.tiles.box_keys]
        self.m.scatter_add(target, 2, index, rows.reshape(b, h, -1, rows.shape[-1]))

    # ------------------------------------------------------------ extra tokens: more keys in every box

    def tokens(self, x):
        """Extra tokens ``[B, T, Hkv, D]`` heads-first in the compute dtype: ``[B, Hkv, T, D]``."""
        return self.m.tokens_heads_first(x, self.dtype)

    def with_tokens(self, box_rows, tokens, count: int):
        """``[B, Hkv, c, Kb, D]`` with the tokens appended to every box: ``[B, Hkv, c, Kb + T, D]``."""
        b, h, t, d = tokens.shape
        every = self.m.zeros((b, h, count, t, d), self.dtype)
        every += tokens[:, :, None]
        return self.m.concat(box_rows, every, -2)

    def token_columns(self, added):
        """``added`` with a 0 for every extra token (no window, no bias): ``[..., Kb + T]``."""
        return self.m.concat_last(added, self.m.zeros((*added.shape[:-1], self.extra), self.dtype))

    def bias_rows(self, rpb, bias_index, count: int):
        """The bias of each (query, box key) pair, ``[Hkv, c, G * Tq, Kb]`` (0 outside the window)."""
        p, tq, kb = self.problem, self.tiles.tile_queries, self.tiles.box_keys
        if self.bias_pad is None:
            table = self.m.cast(rpb.reshape(p.heads, -1), self.dtype)
            self.bias_pad = self.m.concat_last(table, self.m.zeros((p.heads, 1), self.dtype))
        rows = self.bias_pad[:, bias_index]  # [H, c, Tq, Kb]
        rows = rows.reshape(p.kv_heads, p.group, count, tq, kb).swapaxes(1, 2)
        return rows.reshape(p.kv_heads, count, p.group * tq, kb)

    def logits(self, q_rows, k_rows, added):
        """``scale * q.k`` (the query rows come scaled) plus ``added`` per (query, box key): a new array that the
        caller may change in place."""
        logits = q_rows @ self.m.transpose_last(k_rows)
        logits += added
        return logits

    def heads_last(self, x, shape, dtype_name: str | None = None):
        """Drop the padding row: ``[B, heads, N + 1, ...]`` -> heads-last ``shape``."""
        return self.m.heads_last(x[:, :, :self.problem.tokens], dtype_name or self.problem.dtype, shape)


def _cpu_flash_attention(problem: Problem, like):
    """torch's fused CPU attention kernels ``(forward, backward)`` where they serve this problem (torch tensors on
    the CPU, one head dim for query, key and value), else None: they run the masked softmax of a chunk's tiles
    blockwise in one pass and return its logsumexp, several times faster than the matrix products and
    elementwise passes they replace. They are torch's own operators, not a public API: where a torch build lacks
    them the matrix products serve."""
    if problem.kind != _arrays.TORCH or like.device.type != "cpu" or problem.head_dim_v is not None:
        return None
    import torch

    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return None if forward is None or backward is None else (forward, backward)


def _flash_rows(x, batch_rows: int):
    """``[B, Hkv, c, rows, ...]`` -> ``[B * Hkv, c, rows, ...]`` (the fused kernels' [batch, heads, L, E])."""
    return x.reshape(batch_rows, *x.shape[2:])


def _flash_mask(added, problem: Problem):
    """The chunk's ``added`` as the fused kernels' 4D mask: ``[1, c, G * Tq, Kb]`` (no bias: the same for every
    batch and head) or, with a bias per head, ``[B * Hkv, c, G * Tq, Kb]``."""
    if added.dim() == 3:
        return added[None]
    return added[None].expand(problem.batch, *added.shape).reshape(-1, *added.shape[1:])


def fused_forward(problem: Problem, query, key, value, rpb=None, extra_keys=None, extra_values=None):
    """``(out, lse)`` of the fused op (lse float32; float64 for float64 inputs); extra tokens are keys appended
    to every tile's box (an empty neighborhood, ``na_rtc.attention``: dense attention over them alone)."""
    if problem.empty_neighborhood:
        return extra_tokens.merged_forward(fused_forward, problem, query, key, value, rpb, extra_keys, extra_values)
    if math.prod(problem.qkv_shape) == 0:
        return reference.fused_forward(problem, query, key, value, rpb, extra_keys, extra_values)
    run = _Run(problem, query)
    m = run.m
    q, k, v = run.padded(query), run.padded(key), run.padded(value)
    q *= problem.scale
    xk, xv = (run.tokens(x) for x in (extra_keys, extra_values)) if run.extra else (None, None)
    out, lse = run.zeros(problem.heads, problem.v_dim), run.zeros(problem.heads, None)
    batch_rows = problem.batch * problem.kv_heads
    for queries, keys, added, _, count in run.chunks(rpb):
        k_rows, v_rows = run.key_rows(k, keys, count, xk), run.key_rows(v, keys, count, xv)
        if run.flash is not None:
            rows = [_flash_rows(x, batch_rows) for x in (run.query_rows(q, queries, count), k_rows, v_rows)]
            rows_out, rows_lse = run.flash[0](*rows, 0.0, False, attn_mask=_flash_mask(added, problem), scale=1.0)
            shape = (problem.batch, problem.kv_heads, *rows_lse.shape[1:])
            run.put_query_rows(out, queries, rows_out.reshape(*shape, -1), count)
            run.put_query_rows(lse, queries, rows_lse.reshape(shape), count)
            continue
        weights = run.logits(run.query_rows(q, queries, count), k_rows, added)
        peak = m.amax(weights)
        weights -= peak
        m.exp_(weights)
        total = m.sum_last(weights)
        weights /= total[..., None]
        run.put_query_rows(out, queries, weights @ v_rows, count)
        run.put_query_rows(lse, queries, peak[..., 0] + m.log(total), count)
    lse_dtype = "float64" if problem.dtype == "float64" else "float32"
    return run.heads_last(out, problem.out_shape), run.heads_last(lse, problem.lse_shape, lse_dtype)


def fused_backward(problem: Problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None,
                   grad_lse=None, extra_keys=None, extra_values=None):
    """``(dq, dk, dv, drpb or None)``; ``delta = rowsum(dOut * out) - grad_lse``; with extra tokens
    ``(..., d_extra_keys, d_extra_values)``, summed over the boxes they were appended to (an empty neighborhood:
    :func:`na_rtc.extra_tokens.fused_backward`)."""
    if problem.empty_neighborhood:
        return extra_tokens.fused_backward(fused_backward, fused_forward, problem, grad_out, query, key, value, rpb,
                                           output, logsumexp, grad_lse, extra_keys, extra_values)
    if math.prod(problem.qkv_shape) == 0:
        return reference.fused_backward(problem, grad_out, query, key, value, rpb, output, logsumexp, grad_lse,
                                        extra_keys, extra_values)
    if output is None:
        output, logsumexp = fused_forward(problem, query, key, value, rpb, extra_keys, extra_values)
    run = _Run(problem, query)
    m = run.m
    q, k, v = run.padded(query), run.padded(key), run.padded(value)
    q *= problem.scale
    dout, out = run.padded(grad_out), run.padded(output)
    lse = run.padded(logsumexp[..., None])[..., 0]
    delta = m.sum_last(dout * out)  # rowsum(dOut * out), 0 in the padding row
    if grad_lse is not None:
        delta = delta - run.padded(grad_lse[..., None])[..., 0]
    dq = run.zeros(problem.heads, problem.head_dim)
    dk, dv = run.zeros(problem.kv_heads, problem.head_dim), run.zeros(problem.kv_heads, problem.v_dim)
    xk = xv = dxk = dxv = None
    if run.extra:
        xk, xv = run.tokens(extra_keys), run.tokens(extra_values)
        dxk, dxv = m.zeros(xk.shape, run.dtype), m.zeros(xv.shape, run.dtype)
    drpb = None
    if rpb is not None:
        drpb = m.zeros((problem.heads, math.prod(problem.rpb_shape[1:]) + 1), run.dtype)
    # the fused CPU kernels' backward takes no logsumexp gradient and returns no bias gradient
    flash = run.flash if rpb is None and grad_lse is None else None
    batch_rows = problem.batch * problem.kv_heads
    for queries, keys, added, bias_index, count in run.chunks(rpb):
        q_rows, k_rows = run.query_rows(q, queries, count), run.key_rows(k, keys, count, xk)
        v_rows, dout_rows = run.key_rows(v, keys, count, xv), run.query_rows(dout, queries, count)
        if flash is not None:
            rows = [_flash_rows(x, batch_rows) for x in (dout_rows, q_rows, k_rows, v_rows,
                                                          run.query_rows(out, queries, count))]
            rows_lse = _flash_rows(run.query_rows(lse[..., None], queries, count)[..., 0], batch_rows)
            grads = flash[1](*rows, rows_lse, 0.0, False, attn_mask=_flash_mask(added, problem), scale=1.0)
            dq_rows, dk_rows, dv_rows = (g.reshape(problem.batch, problem.kv_heads, *g.shape[1:]) for g in grads)
            run.put_query_rows(dq, queries, dq_rows * problem.scale, count)
            run.add_key_rows(dk, keys, dk_rows, dxk)  # the query rows come scaled
            run.add_key_rows(dv, keys, dv_rows, dxv)
            continue
        probs = run.logits(q_rows, k_rows, added)
        probs -= run.query_rows(lse[..., None], queries, count)
        m.exp_(probs)
        run.add_key_rows(dv, keys, m.transpose_last(probs) @ dout_rows, dxv)
        grad_logits = dout_rows @ m.transpose_last(v_rows)
        grad_logits -= run.query_rows(delta[..., None], queries, count)
        grad_logits *= probs
        run.put_query_rows(dq, queries, (grad_logits @ k_rows) * problem.scale, count)
        run.add_key_rows(dk, keys, m.transpose_last(grad_logits) @ q_rows, dxk)  # the query rows come scaled
        if drpb is not None:
            per_pair = grad_logits[..., :run.tiles.box_keys].sum(0).reshape(problem.kv_heads, count, problem.group, -1).swapaxes(1, 2)
            m.scatter_add(drpb, 1, bias_index.reshape(-1), per_pair.reshape(problem.heads, -1))
    grads = (run.heads_last(dq, problem.qkv_shape), run.heads_last(dk, problem.kv_shape),
             run.heads_last(dv, problem.v_shape))
    if drpb is not None:
        # drop the padding entry into a fresh contiguous table: the slice is a strided view, and the custom op's
        # fake implementation (and torch.compile) promise a contiguous bias gradient
        table = m.zeros((problem.heads, drpb.shape[1] - 1), run.dtype)
        table[:] = drpb[:, :-1]
        drpb = m.finish(table, _arrays.dtype_name(rpb), problem.rpb_shape)
    if not run.extra:
        return (*grads, drpb)
    return (*grads, drpb, m.heads_last(dxk, problem.dtype, problem.extra_keys_shape),
            m.heads_last(dxv, problem.dtype, problem.extra_values_shape))


#: The blocked backend's op table (the split ops are the reference's).
OPS = {
    **reference.OPS,
    "fused_forward": fused_forward,
    "fused_backward": fused_backward,
}
