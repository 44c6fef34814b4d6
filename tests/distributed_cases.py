"""Context-parallel test cases, shared by the simulated-group tests and the gloo workers.

A case is one problem over full tensors and a split of one spatial axis into
slabs. ``full_result`` computes the single-process float64 reference (output,
logsumexp and every gradient of a fixed random loss); ``rank_result`` runs one
rank's slab through :mod:`na_rtc.distributed`; ``check`` puts the ranks'
slabs back together (replicated gradients summed, as their all-reduce would)
and compares with the tolerance table.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

import na_rtc
from na_rtc import distributed as cp
from na_rtc.window import Axis, is_neighbor

from helpers import assert_close

SLABBED = ("out", "lse", "query", "key", "value")
REPLICATED = ("rpb", "additional_keys", "additional_values")


@dataclass(frozen=True)
class Case:
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    lengths: tuple[int, ...]  # slab lengths of axis shard_dim, one per rank
    shard_dim: int = 0
    stride: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    causal: tuple[bool, ...] | None = None
    rpb: bool = False
    heads: int = 2
    heads_kv: int | None = None
    head_dim: int = 4
    head_dim_v: int | None = None
    extra: int = 0
    batch: int = 1
    dtype: torch.dtype = torch.float64
    label: str = field(default="", compare=False)

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def world(self) -> int:
        return len(self.lengths)

    def per_axis(self, value, default):
        return tuple(value) if value is not None else (default,) * self.ndim

    def axis(self) -> Axis:
        d = self.shard_dim
        return Axis(self.spatial[d], self.kernel[d], self.per_axis(self.stride, 1)[d],
                    self.per_axis(self.dilation, 1)[d], self.per_axis(self.causal, False)[d])

    def bounds(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])

    def id(self) -> str:
        if self.label:
            return self.label
        parts = [f"{self.ndim}d", "x".join(map(str, self.spatial)), "k" + "x".join(map(str, self.kernel)),
                 "slabs" + "-".join(map(str, self.lengths)), f"dim{self.shard_dim}"]
        for name, value in (("s", self.stride), ("d", self.dilation)):
            if value is not None:
                parts.append(name + "x".join(map(str, value)))
        if self.causal is not None:
            parts.append("causal" + "".join("1" if c else "0" for c in self.causal))
        parts += [p for p, on in (("rpb", self.rpb), (f"gqa{self.heads}:{self.heads_kv}", self.heads_kv),
                                  (f"dv{self.head_dim_v}", self.head_dim_v), (f"extra{self.extra}", self.extra)) if on]
        return "-".join(parts)


def inputs(case: Case) -> dict:
    """Full tensors of the case (the same on every rank and process: a fixed seed) and the loss weights."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id().encode()))

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(case.dtype)

    b, s, h = case.batch, case.spatial, case.heads
    hk, dv = case.heads_kv or h, case.head_dim_v or case.head_dim
    t = {"query": rand(b, *s, h, case.head_dim), "key": rand(b, *s, hk, case.head_dim), "value": rand(b, *s, hk, dv)}
    t["rpb"] = rand(h, *(2 * k - 1 for k in case.kernel)) if case.rpb else None
    t["additional_keys"] = rand(b, case.extra, hk, case.head_dim) if case.extra else None
    t["additional_values"] = rand(b, case.extra, hk, dv) if case.extra else None
    t["grad_out"], t["grad_lse"] = rand(b, *s, h, dv), rand(b, *s, h).float()
    return t


def _kwargs(case: Case, tensors: dict) -> dict:
    return dict(stride=case.per_axis(case.stride, 1), dilation=case.per_axis(case.dilation, 1),
                is_causal=case.per_axis(case.causal, False), rpb=tensors["rpb"], return_lse=True,
                additional_keys=tensors["additional_keys"], additional_values=tensors["additional_values"])


def _leaves(tensors: dict, slab=None) -> dict:
    out = {}
    for name in SLABBED[2:] + REPLICATED:
        t = tensors[name]
        if t is not None:
            out[name] = (t if slab is None or name in REPLICATED else slab(t)).clone().requires_grad_()
    return out


def _result(out, lse, leaves, grad_out, grad_lse) -> dict:
    ((out.double() * grad_out.double()).sum() + (lse.double() * grad_lse.double()).sum()).backward()
    result = {"out": out.detach(), "lse": lse.detach()}
    result.update({name: leaf.grad for name, leaf in leaves.items()})
    return result


def full_result(case: Case) -> dict:
    """One process, float64 reference backend."""
    t = inputs(case)
    t = {k: (v.double() if v is not None else None) for k, v in t.items()}
    leaves = _leaves(t)
    op = getattr(na_rtc, f"na{case.ndim}d")
    out, lse = op(leaves["query"], leaves["key"], leaves["value"], case.kernel,
                  **{**_kwargs(case, t), **{n: leaves.get(n) for n in REPLICATED}}, backend="reference")
    return _result(out, lse, leaves, t["grad_out"], t["grad_lse"])


def slab_of(case: Case, rank: int):
    lo, hi = case.bounds()[rank], case.bounds()[rank + 1]
    return lambda t: t.narrow(1 + case.shard_dim, int(lo), int(hi - lo))


def rank_result(case: Case, group, backend: str) -> dict:
    """This rank's slab of output and logsumexp and its gradients (``group``: a process group or a
    communicator)."""
    rank = group.rank if hasattr(group, "exchange") else torch.distributed.get_rank(group)
    t = inputs(case)
    slab = slab_of(case, rank)
    leaves = _leaves(t, slab)
    op = getattr(cp, f"na{case.ndim}d")
    out, lse = op(leaves["query"], leaves["key"], leaves["value"], case.kernel,
                  **{**_kwargs(case, t), **{n: leaves.get(n) for n in REPLICATED}}, group=group,
                  shard_dim=case.shard_dim, backend=backend)
    return _result(out, lse, leaves, slab(t["grad_out"]), slab(t["grad_lse"]))


def check(case: Case, ranks: list, expected: dict) -> None:
    """The ranks' results put together equal ``expected`` (:func:`full_result`) within the tolerance table."""
    dtype = str(case.dtype).replace("torch.", "")
    for name, want in expected.items():
        if name in SLABBED:
            got = torch.cat([r[name] for r in ranks], dim=1 + case.shard_dim)
        else:
            got = sum(r[name] for r in ranks)
        kind = "forward" if name in ("out", "lse") else "grad"
        assert_close(got, want, dtype, kind, name)


def predicted_bytes_sent(case: Case) -> list[int]:
    """Bytes each rank sends in one forward and backward, from the window math by brute force: forward, the
    rows of its slab that other ranks' windows read (key and value); backward, the gradients of the rows it
    read from others."""
    axis = case.axis()
    b = case.bounds()
    keys = np.arange(axis.length)
    needed = [set(keys[is_neighbor(axis, np.arange(b[r], b[r + 1])[:, None], keys[None, :]).any(0)])
              for r in range(case.world)]
    other = math.prod(n for i, n in enumerate(case.spatial) if i != case.shard_dim) * case.batch
    hk = case.heads_kv or case.heads
    row = other * hk * (case.head_dim + (case.head_dim_v or case.head_dim)) * torch.finfo(case.dtype).bits // 8
    sent = []
    for r in range(case.world):
        own = set(range(b[r], b[r + 1]))
        forward = sum(len(needed[p] & own) for p in range(case.world) if p != r)
        backward = len(needed[r] - own)
        sent.append((forward + backward) * row)
    return sent
