"""The few array operations the NumPy/torch backends need (the reference, the blocked backend), behind one
interface, so that one algorithm serves NumPy arrays and torch tensors on any device.

Internally every tensor is heads-first, ``[batch, heads, tokens, last]``, so that contractions are batched
matrix products over (batch, heads, ...).
"""

from __future__ import annotations

import math

import numpy as np

from ._args import Problem
from .window import SlotTable


class NumpyMath:
    """The few array operations the algorithm needs, for NumPy."""

    def compute_dtype(self, dtype_name: str):
        return np.float64 if dtype_name == "float64" else np.float32

    def heads_first(self, x, problem: Problem, dtype):
        """``[batch, *spatial, heads, last]`` -> contiguous ``[batch, heads, tokens, last]``."""
        x = np.asarray(x)
        flat = x.reshape(problem.batch, math.prod(x.shape[1:-2]), *x.shape[-2:])  # queries (a box) or keys
        return np.ascontiguousarray(flat.swapaxes(1, 2), dtype=dtype)

    def cast(self, x, dtype):
        return np.asarray(x, dtype=dtype)

    def tokens_heads_first(self, x, dtype):
        """Extra tokens ``[batch, tokens, heads, last]`` -> contiguous ``[batch, heads, tokens, last]``."""
        return np.ascontiguousarray(np.asarray(x).swapaxes(1, 2), dtype=dtype)

    def transpose_last(self, x):
        return x.swapaxes(-1, -2)

    def concat_last(self, a, b):
        return np.concatenate((a, b), axis=-1)

    def concat(self, a, b, axis: int):
        return np.concatenate((a, b), axis=axis)

    def repeat_heads(self, x, times: int):
        """``[B, H, N, D]`` -> ``[B, H * times, N, D]``, head h repeated as heads h * times .. h * times + times - 1."""
        return np.repeat(x, times, axis=1)

    def table(self, table: SlotTable) -> SlotTable:
        return table

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def gather_tokens(self, x, index):
        """``x[:, :, index]`` for ``[B, H, N, D]`` (``np.take`` is ~3x faster than fancy indexing)."""
        return np.take(x, index, axis=2)

    def index(self, a: np.ndarray):
        """A host index or mask array where this library indexes with it."""
        return a

    def put_tokens(self, target, index, source):
        """``target[:, :, index[m]] = source[:, :, m]`` for ``[B, H, N, ...]`` (a repeated index: any one)."""
        target[:, :, index] = source

    def amax(self, x):
        return x.max(axis=-1, keepdims=True)

    def sum_last(self, x):
        return x.sum(axis=-1)

    exp = staticmethod(np.exp)

    def exp_(self, x):
        """``exp`` in place."""
        return np.exp(x, out=x)
    log = staticmethod(np.log)
    where = staticmethod(np.where)

    def scatter_add(self, target, axis: int, index, source):
        """``target[..., index[m], ...] += source[..., m, ...]`` along ``axis``, deterministically.

        Sorting the contributions by destination and summing runs with
        ``reduceat`` is much faster than ``np.add.at`` and its order is fixed.
        """
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
        sums = np.add.reduceat(np.take(source, order, axis=axis), starts, axis=axis)
        target[(slice(None),) * axis + (sorted_index[starts],)] += sums

    def heads_last(self, x, dtype_name: str, shape):
        """``[batch, heads, tokens, ...]`` -> ``shape`` (heads-last) in ``dtype_name``."""
        return np.ascontiguousarray(x.swapaxes(1, 2).reshape(shape), dtype=dtype_name)

    def finish(self, x, dtype_name: str, shape):
        return x.reshape(shape).astype(dtype_name, copy=False)


class TorchMath:
    """The same operations for torch tensors (any device; no autograd inside)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device

    def compute_dtype(self, dtype_name: str):
        return self.torch.float64 if dtype_name == "float64" else self.torch.float32

    def heads_first(self, x, problem: Problem, dtype):
        flat = x.reshape(problem.batch, math.prod(x.shape[1:-2]), *x.shape[-2:])  # queries (a box) or keys
        return flat.transpose(1, 2).to(dtype).contiguous()

    def cast(self, x, dtype):
        return x.to(dtype)

    def tokens_heads_first(self, x, dtype):
        return x.transpose(1, 2).to(dtype).contiguous()

    def transpose_last(self, x):
        return x.transpose(-1, -2)

    def concat_last(self, a, b):
        return self.torch.cat((a, b), dim=-1)

    def concat(self, a, b, axis: int):
        return self.torch.cat((a, b), dim=axis)

    def repeat_heads(self, x, times: int):
        return x.repeat_interleave(times, dim=1)

    def table(self, table: SlotTable) -> SlotTable:
        """A chunk's slot rows as torch tensors on the inputs' device (a copy per chunk on a GPU: small beside
        the gathers it indexes)."""
        return SlotTable(*(self.torch.from_numpy(a).to(self.device) for a in table))

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def gather_tokens(self, x, index):
        """``x[:, :, index]`` for ``[B, H, N, D]`` (``index_select`` is ~2.5x faster than advanced indexing)."""
        return x.index_select(2, index.reshape(-1)).view(*x.shape[:2], *index.shape, x.shape[-1])

    def index(self, a: np.ndarray):
        return self.torch.from_numpy(a).to(self.device)

    def put_tokens(self, target, index, source):
        target.index_copy_(2, index, source)

    def amax(self, x):
        return x.amax(dim=-1, keepdim=True)

    def sum_last(self, x):
        return x.sum(dim=-1)

    def exp(self, x):
        return self.torch.exp(x)

    def exp_(self, x):
        return x.exp_()

    def log(self, x):
        return self.torch.log(x)

    def where(self, condition, x, y):
        return self.torch.where(condition, x, y)

    def scatter_add(self, target, axis: int, index, source):
        # index_add_ is deterministic on CPU; on CUDA it uses atomics, which only
        # matters if someone forces the reference there (benchmarks do, tests do not)
        target.index_add_(axis, index, source)

    def heads_last(self, x, dtype_name: str, shape):
        return x.transpose(1, 2).reshape(shape).to(getattr(self.torch, dtype_name)).contiguous()

    def finish(self, x, dtype_name: str, shape):
        return x.reshape(shape).to(getattr(self.torch, dtype_name))


def math_for(problem: Problem, like):
    if problem.kind == "numpy":
        return NumpyMath()
    if problem.kind == "torch":
        return TorchMath(like.device)
    raise TypeError(f"this backend runs on NumPy arrays and torch tensors, not {problem.kind} arrays")


