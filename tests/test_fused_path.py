"""The fused path as the public API runs it on the emulator: it equals the
composed split ops, and its memory does not grow with the kernel size."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import RecordingExecutor, assert_close, misaligned_copy

import na_rtc
from na_rtc import _args
from na_rtc.runtime import ops

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")

CASES = {
    "1d-k9-rpb": dict(spatial=(40,), kernel_size=9, dilation=2, is_causal=False, rpb=True),
    "1d-k6-causal": dict(spatial=(33,), kernel_size=6, dilation=1, is_causal=True, rpb=False),
    "2d-k5x3-rpb": dict(spatial=(13, 11), kernel_size=(5, 3), dilation=(1, 2), is_causal=False, rpb=True),
    "2d-k4-causal-x": dict(spatial=(10, 12), kernel_size=4, dilation=1, is_causal=(True, False), rpb=False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_equals_softmax_of_split_ops(case):
    rng = np.random.default_rng(5)
    ndim = len(case["spatial"])
    heads, head_dim = 2, 16
    q, k, v = (rng.standard_normal((2, *case["spatial"], heads, head_dim)).astype(np.float32) for _ in range(3))
    window = dict(kernel_size=case["kernel_size"], dilation=case["dilation"], is_causal=case["is_causal"])
    kernels = np.broadcast_to(np.asarray(case["kernel_size"]), (ndim,))
    rpb = rng.standard_normal((heads, *(2 * kernels - 1))).astype(np.float32) if case["rpb"] else None
    fused, qk, av = ((na_rtc.na1d, na_rtc.na1d_qk, na_rtc.na1d_av) if ndim == 1 else
                     (na_rtc.na2d, na_rtc.na2d_qk, na_rtc.na2d_av))
    scale = head_dim**-0.5
    out = fused(q, k, v, **window, rpb=rpb, backend="emulator")
    logits = qk(q * scale, k, **window, rpb=rpb, backend="emulator")
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    composed = av((weights / weights.sum(-1, keepdims=True)).astype(np.float32), v, **window, backend="emulator")
    assert_close(out, composed, "float32", "forward", "fused vs split")


def _fused_allocations(kernel_size: int) -> list[int]:
    """Bytes of every array the fused forward and backward launch with, largest first."""
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((1, 20, 18, 2, 32)).astype(np.float16) for _ in range(4))
    problem = _args.fused_problem(2, q, k, v, kernel_size, 1, 1, False, None, None)
    recorder = RecordingExecutor()
    seen = []

    def run(plan):
        seen.extend(a.value.nbytes for a in plan.args if a.kind == "ptr" and a.value is not None)
        recorder(plan)

    table = ops.make_ops(run, "emulator")
    out, lse = table["fused_forward"](problem, q, k, v, None)
    table["fused_backward"](problem, g, q, k, v, None, out, lse)
    assert all(name.startswith("na_fused") for name in recorder.names), recorder.names
    return sorted(set(seen), reverse=True)


def test_fused_memory_does_not_grow_with_the_kernel_size():
    small, large = _fused_allocations(3), _fused_allocations(13)
    assert small == large  # the same buffers (q, k, v, out, lse, grads, delta): nothing is [tokens, kernel_size]
    assert large[0] == 1 * 20 * 18 * 2 * 32 * 2  # the largest is an input-sized tensor


@pytest.mark.parametrize("ndim, dtype, head_dim, stride", [(2, "float16", 32, 2), (1, "bfloat16", 64, 1),
                                                           (2, "float32", 24, 1)])
def test_vector_and_element_staging_agree_bit_for_bit(ndim, dtype, head_dim, stride):
    """Forward and backward on 16-byte-aligned rows (vector staging) and on misaligned ones: same bits."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    shape = (2, *(11,) * ndim, 2, head_dim)
    tensors = [torch.randn(shape).to(getattr(torch, dtype)) for _ in range(4)]  # q, k, v, dOut
    fwd, bwd = getattr(na_rtc, f"na{ndim}d"), getattr(na_rtc, f"na{ndim}d_backward")

    def run(q, k, v, g):
        out, lse = fwd(q, k, v, 5, stride=stride, return_lse=True, backend="emulator")
        return (out, lse, *bwd(g, q, k, v, 5, stride=stride, output=out, logsumexp=lse, backend="emulator")[:3])

    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    shifted = [misaligned_copy(t) for t in tensors]
    assert all(t.data_ptr() % 16 != 0 for t in shifted)
    for a, b in zip(run(*tensors), run(*shifted)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
