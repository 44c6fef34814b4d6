"""Context-parallel neighborhood attention: a 3D (video) layer split along time over a process group.

Run with torchrun (N processes, one per GPU with NCCL, or CPU processes with gloo):

    torchrun --nproc_per_node=2 examples/context_parallel.py
    python -m torch.distributed.run --nproc_per_node=3 --standalone examples/context_parallel.py --frames 16

Every rank holds a contiguous slab of the frames of a ``[batch, T, H, W, C]``
input and runs ``na_rtc.NeighborhoodAttention3D(..., process_group=...)`` on it:
forward and backward exchange only the halo rows the windows reach across the
slab borders, never the whole sequence. The script shows that

- each rank's output and input gradient equal its slab of one process's
  result on the full input, and the all-reduced (SUM) parameter gradients
  equal one process's (within na_rtc's tolerance table; exit status 1 if not);
- what it costs: halo bytes sent/received per step, peak memory and time per
  step, beside one process running the full input.

Slabs may be uneven (e.g. 16 frames over 3 ranks: 6, 5, 5).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

import na_rtc
from na_rtc import distributed as cp
from na_rtc.verify.tolerances import TOLERANCES


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=16, help="T, the axis split over the ranks")
    p.add_argument("--size", type=int, default=12, help="H = W")
    p.add_argument("--dim", type=int, default=32, help="embedding channels C")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kernel", default="3,5,5", help="odd window per axis: one int or T,H,W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up); the median is shown")
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCES))
    args = p.parse_args()
    kernel = tuple(int(k) for k in args.kernel.split(","))
    args.kernel = kernel * 3 if len(kernel) == 1 else kernel
    if len(args.kernel) != 3 or args.steps < 1:
        p.error("--kernel takes one int or three (T,H,W); --steps must be >= 1")
    return args


def init():
    """The process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) and this rank's
    device."""
    if torch.cuda.is_available():
        # NCCL only moves tensors on the rank's current CUDA device: pick it before anything is allocated,
        # and create every tensor (input, layer, loss weights) there.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device) -> float:
    """Peak memory so far: allocated CUDA memory since the last reset, or the process's resident set on CPU
    (a high-water mark that never goes down: the one-process figure, measured second, includes the
    context-parallel one). Both include the full input every rank keeps for the check."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def step(layer, x, weights, group=None):
    """One training step's gradients (no optimizer): forward, the loss, backward, and with a group the
    all-reduce of the parameter gradients. Returns the output."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out = layer(x)
    # The loss must be a sum over ranks of per-slab losses, so that the ranks' gradients add up to the
    # single-process gradient: here sum(out * weights) over the slab. A mean loss must divide by the GLOBAL
    # number of elements (out.numel() of the full tensor: the sum over ranks), not by the slab's.
    loss = (out * weights).sum()
    loss.backward()
    if group is not None:
        # Each rank holds its share of the replicated parameters' gradients (qkv, rpb, proj): their SUM is the
        # single-process gradient, as in data-parallel training.
        for p in layer.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
    return out


def timed(run, steps, device) -> tuple[float, object]:
    """Median milliseconds of ``steps`` calls of ``run`` after one warm-up, and the last result."""
    result = run()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        result = run()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def max_error(got, want, kind, dtype) -> tuple[float, bool]:
    """The largest |got - want| and whether every element is within the tolerance table's bound."""
    atol, rtol = TOLERANCES[dtype][kind]
    got, want = got.detach().double(), want.detach().double()
    difference = (got - want).abs()
    if not difference.numel():  # a rank with no frames (more ranks than frames) has an empty slab
        return 0.0, True
    return difference.max().item(), bool((difference <= atol + rtol * want.abs()).all())


def main():
    args = parse_args()
    device = init()
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)

    # Identical input, loss weights and layer weights on every rank: the same seed before each draw.
    torch.manual_seed(0)
    shape = (args.batch, args.frames, args.size, args.size, args.dim)
    x_full = torch.randn(shape, device=device, dtype=dtype)
    weights_full = torch.randn(shape, device=device, dtype=dtype)
    torch.manual_seed(1)
    layer = na_rtc.NeighborhoodAttention3D(args.dim, args.heads, args.kernel, rel_pos_bias=True,
                                           process_group=group, shard_dim=0).to(device, dtype)
    # the single-process copy: same weights, no process group
    single = na_rtc.NeighborhoodAttention3D(args.dim, args.heads, args.kernel, rel_pos_bias=True).to(device, dtype)
    single.load_state_dict(layer.state_dict())

    # This rank's slab of frames (torch.tensor_split order: the first T % N ranks get one frame more); the
    # loss weights are cut the same way. detach: the slab is this rank's own leaf, with its own gradient.
    x = cp.shard(x_full, shard_dim=0, group=group).detach().requires_grad_()
    weights = cp.shard(weights_full, shard_dim=0, group=group)
    lengths = [len(part) for part in torch.tensor_split(torch.arange(args.frames), world)]
    first = sum(lengths[:rank])
    last = first + lengths[rank]

    # context parallel: warm-up, then the bytes of one step, then the timed steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step(layer, x, weights, group)
    cp.reset_bytes_exchanged()
    step(layer, x, weights, group)
    traffic = cp.bytes_exchanged()
    cp_ms, out = timed(lambda: step(layer, x, weights, group), args.steps, device)
    cp_mb = peak_memory_mb(device)

    # one process on the full input (every rank runs it, to check its own slab)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x_single = x_full.clone().requires_grad_()
    single_ms, out_single = timed(lambda: step(single, x_single, weights_full), args.steps, device)
    single_mb = peak_memory_mb(device)

    checks = [max_error(out, cp.shard(out_single, 0, group), "forward", args.dtype),
              max_error(x.grad, cp.shard(x_single.grad, 0, group), "grad", args.dtype)]
    single_params = dict(single.named_parameters())
    checks += [max_error(p.grad, single_params[name].grad, "grad", args.dtype)
               for name, p in layer.named_parameters()]
    worst = max(e for e, _ in checks)
    ok = all(passed for _, passed in checks)

    # one line per rank, in rank order
    memory = "peak RSS" if device.type == "cpu" else "peak mem"
    for r in range(world):
        if r == rank:
            print(f"rank {rank}/{world}: frames {first}:{last} ({last - first} of {args.frames}) | halo sent "
                  f"{traffic['sent']} B, received {traffic['received']} B | {memory} {cp_mb:.0f} MB (one "
                  f"process {single_mb:.0f} MB) | step {cp_ms:.1f} ms (one process {single_ms:.1f} ms) | max "
                  f"error {worst:.2e}{'' if ok else ' MISMATCH'}", flush=True)
        dist.barrier(group)

    failed = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if rank == 0:
        if failed.item():
            print(f"MISMATCH: context-parallel results differ from one process beyond the {args.dtype} "
                  f"tolerances (see the ranks above)", flush=True)
        else:
            print(f"ok: context-parallel output and gradients match one process ({world} ranks)", flush=True)
    dist.destroy_process_group()
    return 1 if failed.item() else 0


if __name__ == "__main__":
    sys.exit(main())
