"""Canaries: one small problem per kernel instantiation, checked against the float64 reference.

A canary exercises what a kernel does on every problem, not the logic of one
call: the problem has a partial query tile, so the bounds checks run, and a
tile whose key box holds at least three staged chunks (the largest tiles are
128 queries in 1D and 16 x 8 in 2D, the largest chunks 64 keys), so the
pipeline of asynchronous copies wraps around its stages; it carries a positional bias,
so the bias paths of the forward and of the gradients run. It keeps the
dtype, head dim, rank, array library and device of the call it vouches for,
so it runs the same instantiation, on the same GPU.

Inputs are multiples of 1/64 in [-1, 1] (exact in float16 and bfloat16, so the
reference sees exactly what the kernel sees); results are compared, with the
tolerance table of :mod:`na_rtc.verify.tolerances`, against dense masked
attention in float64 on the host (:mod:`na_rtc.verify.dense`). On the GPU a
canary costs a few milliseconds of kernel time and a few tens of
milliseconds on the host.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import numpy as np

from .. import _arrays
from .._args import FUSED, Problem
from ..window import Axis
from . import dense
from .tolerances import TOLERANCES

FORWARD, BACKWARD = "forward", "backward"
#: what each op returns, in order
OUTPUTS = {FORWARD: ("out", "lse"), BACKWARD: ("dq", "dk", "dv", "drpb")}

#: rank -> the canary's axes. 1D: 329 = 2 x 128 + 73 leaves a partial last tile for every tile of up to 128
#: queries, and a window of 177 gives every tile, down to the 16 keys of a SIMT dK/dV tile, a box of three
#: chunks (16 + 176 queries: three 64-query chunks). 2D: 23 x 21 leaves partial tiles on both axes for every
#: tile of 16 x 8 or smaller, and an 11 x 11 window gives a 4 x 4 tile a box of 14 x 14 = 196 (three 64-row
#: chunks) and an inner 8 x 8 tile one of 18 x 18. The dK/dV kernels' query boxes are as large as the
#: forward's key boxes (non-causal windows are symmetric).
AXES = {
    1: (Axis(329, 177),),
    2: (Axis(23, 11), Axis(21, 11)),
}
BATCH, HEADS = 1, 2
SEED = 20260


def canary_problem(like: Problem) -> Problem:
    """The canary for the instantiation that serves ``like``: its dtype, head dim, rank, library and device."""
    axes = AXES[like.ndim]
    return Problem(FUSED, axes, BATCH, HEADS, like.head_dim, like.dtype, like.kind, like.device, has_rpb=True,
                   scale=2.0 * like.head_dim**-0.5)  # a larger scale than the default: a less uniform softmax


def _grid(rng: np.random.Generator, shape) -> np.ndarray:
    """Multiples of 1/64 in [-1, 1]: exact in every dtype the kernels take."""
    return rng.integers(-64, 65, size=shape).astype(np.float64) / 64


@dataclasses.dataclass
class Inputs:
    """A canary's host (float64) inputs and their copies on the call's device, in its library and dtype."""

    host: dict[str, np.ndarray]
    device: dict[str, object]


def _to_device(x: np.ndarray, problem: Problem, dtype: str):
    """``x`` (float64) in ``problem``'s array library, on its device, as ``dtype``."""
    if problem.kind == _arrays.TORCH:
        torch = sys.modules["torch"]
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=problem.device, dtype=getattr(torch, dtype))
    if problem.kind == _arrays.CUPY:
        from ..runtime import device

        with device.guard(int(problem.device.partition(":")[2] or 0)):
            return sys.modules["cupy"].asarray(x.astype(dtype))
    return x.astype(dtype)


def to_host64(x) -> np.ndarray:
    """A result as float64 NumPy, from any library and device."""
    kind = _arrays.kind_of(x)
    if kind == _arrays.TORCH:
        return x.detach().to("cpu").double().numpy()
    if kind == _arrays.CUPY:
        return x.get().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def make_inputs(problem: Problem, op: str) -> Inputs:
    """Deterministic inputs for ``op``; a backward also gets the forward's output and logsumexp (the
    reference's, rounded to what a forward kernel returns)."""
    rng = np.random.default_rng(SEED)
    host = {name: _grid(rng, problem.qkv_shape) for name in ("q", "k", "v")}
    host["rpb"] = _grid(rng, problem.rpb_shape)
    device = {name: _to_device(host[name], problem, problem.dtype) for name in ("q", "k", "v")}
    device["rpb"] = _to_device(host["rpb"], problem, "float32")  # the kernels read the bias in float32
    if op == BACKWARD:
        host["dout"] = _grid(rng, problem.qkv_shape)
        device["dout"] = _to_device(host["dout"], problem, problem.dtype)
        out, lse = reference_forward(problem, host)
        device["out"] = _to_device(out, problem, problem.dtype)
        device["lse"] = _to_device(lse, problem, "float32")
    return Inputs(host, device)


def reference_forward(problem: Problem, host: dict) -> tuple[np.ndarray, np.ndarray]:
    return dense.forward(problem, host["q"], host["k"], host["v"], host["rpb"])


def reference_backward(problem: Problem, host: dict) -> tuple[np.ndarray, ...]:
    return dense.backward(problem, host["dout"], host["q"], host["k"], host["v"], host["rpb"])


def mismatch(name: str, got: np.ndarray, want: np.ndarray, dtype: str, kind: str) -> str | None:
    """None when ``got`` is within the tolerance of ``want``; otherwise what is wrong, for a warning."""
    atol, rtol = TOLERANCES[dtype][kind]
    if got.shape != want.shape:
        return f"{name} has shape {got.shape}, expected {want.shape}"
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    excess = np.where(np.isnan(excess), np.inf, excess)  # a NaN anywhere is wrong
    bad = excess > 0
    if not bad.any():
        return None
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    return (f"{name}: {int(bad.sum())} of {bad.size} values outside atol {atol:g} + rtol {rtol:g} of the float64 "
            f"reference; worst at {tuple(int(i) for i in worst)}: got {got[worst]:.6g}, expected {want[worst]:.6g}")


#: runs one op of a candidate kernel path: forward ``(problem, q, k, v, rpb) -> (out, lse)``; backward
#: ``(problem, dout, q, k, v, rpb, out, lse) -> (dq, dk, dv, drpb)``; the bias arrives in float32
Runner = Callable[..., tuple]


def check(op: str, problem: Problem, run: Runner) -> dict[str, str | None]:
    """Run ``op`` on ``problem`` (a canary) through ``run``; per output, None or the mismatch."""
    inputs = make_inputs(problem, op)
    d = inputs.device
    if op == FORWARD:
        got = run(problem, d["q"], d["k"], d["v"], d["rpb"])
        want = reference_forward(problem, inputs.host)
        kinds = ("forward", "forward")
    else:
        got = run(problem, d["dout"], d["q"], d["k"], d["v"], d["rpb"], d["out"], d["lse"])
        want = reference_backward(problem, inputs.host)
        kinds = ("grad",) * 4
    return {name: mismatch(name, to_host64(g), np.asarray(w, np.float64), problem.dtype, kind)
            for name, g, w, kind in zip(OUTPUTS[op], got, want, kinds)}
