"""Collective validation: a bad input on one rank raises the same error on every rank, never a hang.

Every call starts with one small all-gather: each rank's slab length and a
digest of its call's description (shapes with the slab's extent left out,
dtypes, devices, arguments). What follows depends only on what was gathered,
so every rank takes the same branch: when the digests agree and this layout
was validated before, the cached halo plan is used; otherwise the full
descriptions are gathered, compared, and the call is checked as one problem
over the concatenated slabs (on meta tensors: no data, no device work), and
every rank raises the same ``ValueError``/``TypeError``, or none does.

Why a gather on every call, not a cache keyed by what a rank sees locally:
ranks' slab lengths can change independently (``torch.tensor_split`` of 16
rows over three ranks gives 6, 5, 5; of 15 rows 5, 5, 5), so a rank whose own
slab did not change cannot know that the layout did, and a rank-local cache
would send it into a stale halo exchange while the others gather: a hang.
The gather is two integers per rank; over NCCL it waits for the GPU stream
(a host synchronization), over gloo it is a CPU round trip.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from .. import _args
from ..window import Axis
from .halo import HaloPlan, plan_halo

__all__ = ["Validated", "validate"]

_CACHE: dict = {}


@dataclass(frozen=True)
class Validated:
    """A call checked on every rank: the global problem's axes, every rank's slab length and this rank's plan
    (``None`` when its slab and the halo it needs are empty)."""

    axes: tuple[Axis, ...]
    lengths: tuple[int, ...]
    plan: HaloPlan


def _describe(t):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return ("not a tensor", type(t).__qualname__)
    return (tuple(t.shape), str(t.dtype), t.device.type)


def _slab_free(desc, dim: int):
    """A description with the shard dimension's extent blanked (it may differ between ranks)."""
    if desc is None or desc[0] == "not a tensor" or len(desc[0]) <= dim:
        return desc
    shape = list(desc[0])
    shape[dim] = "*"
    return (tuple(shape), *desc[1:])


def shard_dim_error(shard_dim, ndim: int) -> str | None:
    """What is wrong with ``shard_dim`` for ``ndim`` spatial axes (a message), or None."""
    if isinstance(shard_dim, bool) or not isinstance(shard_dim, int) or not 0 <= shard_dim < ndim:
        return f"shard_dim must be a spatial axis index in [0, {ndim}), got {shard_dim!r}"
    return None


def _local_error(ndim: int, shard_dim, tensors: dict, comm) -> str | None:
    """What is wrong with this rank's call on its own (a message), checked before anything is gathered."""
    for name in ("query", "key", "value"):
        if not isinstance(tensors[name], torch.Tensor):
            return f"TypeError: {name} must be a torch tensor (na_rtc.distributed is torch only), got " \
                   f"{type(tensors[name]).__qualname__}"
    if (shard_error := shard_dim_error(shard_dim, ndim)) is not None:
        return f"ValueError: {shard_error}"
    dim = 1 + shard_dim
    query = tensors["query"]
    if query.dim() != ndim + 3:
        return None  # the global check names the layout
    for name in ("key", "value"):
        t = tensors[name]
        if t.dim() == query.dim() and t.shape[dim] != query.shape[dim]:
            return f"ValueError: {name}'s slab has {t.shape[dim]} rows along shard_dim {shard_dim} but query's " \
                   f"has {query.shape[dim]}: a rank holds the same rows of query, key and value"
    if getattr(comm, "backend", None) == "gloo":
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                return f"ValueError: {name} is on {t.device}, but a gloo group exchanges CPU tensors only: use " \
                       f"an NCCL group for CUDA tensors (torch.distributed.init_process_group('nccl'))"
    if getattr(comm, "backend", None) == "nccl":
        current = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.device != current:
                return f"ValueError: {name} is on {t.device}, but with NCCL every tensor must be on the rank's " \
                       f"current CUDA device ({current}; call torch.cuda.set_device(local_rank) first)"
    return None


def _raise(message: str, rank: int, where: str):
    kind, _, text = message.partition(": ")
    error = TypeError if kind == "TypeError" else ValueError
    raise error(f"{where}rank {rank}: {text}")


def _meta(t, dim: int, length: int):
    if t is None:
        return None
    shape = list(t.shape)
    if length is not None:
        shape[dim] = length
    return torch.empty(shape, dtype=t.dtype, device="meta")


def validate(comm, ndim: int, shard_dim, tensors: dict, arguments: dict) -> Validated:
    """Check one context-parallel call on every rank of ``comm`` (see the module docstring); the cache holds
    the same entries on every rank (its keys are gathered facts), so every rank evicts at the same call.

    ``tensors``: query, key, value, rpb, additional_keys, additional_values; ``arguments``: kernel_size,
    stride, dilation, is_causal, scale (as the user passed them).
    """
    error = _local_error(ndim, shard_dim, tensors, comm)
    dim = 1 + shard_dim if error is None else 1
    slab = int(tensors["query"].shape[dim]) if error is None and tensors["query"].dim() == ndim + 3 else 0
    description = (("shard_dim", repr(shard_dim)),
                   *((name, _slab_free(_describe(t), dim) if name in ("query", "key", "value") else _describe(t))
                     for name, t in tensors.items()),
                   *((name, repr(value)) for name, value in arguments.items()))
    digest = zlib.crc32(repr((description, error)).encode())
    agreed = tuple(comm.all_gather_object((slab, digest)))
    key = (comm.key(), ndim, description, agreed)
    if error is None and len({d for _, d in agreed}) == 1 and key in _CACHE:
        return _CACHE[key]
    gathered = comm.all_gather_object((description, slab, error))
    where = f"na_rtc.distributed.na{ndim}d: "
    for rank, (_, _, rank_error) in enumerate(gathered):
        if rank_error is not None:
            _raise(rank_error, rank, where)
    for rank, (rank_description, _, _) in enumerate(gathered[1:], start=1):
        for (name, mine), (_, theirs) in zip(gathered[0][0], rank_description):
            if mine != theirs:
                raise ValueError(f"{where}rank {rank}'s {name} is {theirs} but rank 0's is {mine}: every rank "
                                 f"passes the same arguments and shapes, except the slab's length along shard_dim")
    lengths = tuple(int(s) for _, s, _ in gathered)
    total = sum(lengths)
    meta = {name: _meta(t, dim, total if name in ("query", "key", "value") else None) for name, t in tensors.items()}
    try:
        problem = _args.fused_problem(ndim, meta["query"], meta["key"], meta["value"], arguments["kernel_size"],
                                      arguments["stride"], arguments["dilation"], arguments["is_causal"],
                                      arguments["scale"], meta["rpb"], meta["additional_keys"],
                                      meta["additional_values"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}the slabs concatenated along shard_dim {shard_dim} (slab lengths {lengths}): "
                        f"{exc}") from None
    validated = Validated(problem.axes, lengths, plan_halo(problem.axes[shard_dim], lengths, comm.rank))
    if len(_CACHE) >= 256:
        _CACHE.clear()
    _CACHE[key] = validated
    return validated


@torch.compiler.disable  # a collective: torch.compile breaks the graph here
def slab_lengths(comm, slab: int) -> tuple[int, ...]:
    """Every rank's slab length (one small all-gather; the layers pad inputs shorter than the window along
    the global axis)."""
    return tuple(int(n) for n in comm.all_gather_object(int(slab)))
