"""``na_rtc.attention``: dense attention with the NA ops' conventions (GQA/MQA, a value head dim of its own,
query and key lengths apart, a differentiable logsumexp), the extra-token path with an empty neighborhood.

Against softmax attention written out in float64 torch: output, logsumexp, and the gradients of query, key and
value through both (1e-9); chunks of queries smaller than the problem give the same result; NumPy arrays
within the tolerance table; two halves of the keys merged equal all of them; no keys; bad input named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close

import na_rtc


def _draw(seed, *shapes):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _softmax_attention(q, k, v, scale=None):
    group = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    out = torch.einsum("bhnm,bmhv->bnhv", torch.softmax(logits, -1), v)
    return out, torch.logsumexp(logits, -1).transpose(1, 2)


CASES = [  # (batch, queries, keys, heads, heads_kv, head_dim, head_dim_v)
    (2, 7, 19, 4, 2, 8, 8),
    (1, 33, 5, 6, 1, 4, 12),
    (2, 16, 16, 2, 2, 16, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-q{}-k{}-h{}kv{}-d{}v{}".format(*c))
def test_against_softmax_attention_with_gradients(case, monkeypatch):
    batch, queries, keys, heads, heads_kv, dim, dim_v = case
    q, k, v, g, glse = _draw(1, (batch, queries, heads, dim), (batch, keys, heads_kv, dim),
                             (batch, keys, heads_kv, dim_v), (batch, queries, heads, dim_v), (batch, queries, heads))
    want = _softmax_attention(*(x.clone().requires_grad_() for x in (q, k, v)), scale=0.3)
    monkeypatch.setenv("NA_RTC_REFERENCE_CHUNK_MB", "0.0005")  # a few queries per chunk: the chunks are stitched
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = na_rtc.attention(*leaves, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want[1], rtol=0, atol=1e-12)
    torch.autograd.backward((out, lse), (g, glse))
    wanted = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.autograd.backward(_softmax_attention(*wanted, scale=0.3), (g, glse))
    for got, expected in zip(leaves, wanted):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-9)


def test_numpy_and_float32():
    q, k, v = _draw(2, (1, 9, 4, 8), (1, 11, 2, 8), (1, 11, 2, 6))
    want_out, want_lse = _softmax_attention(q, k, v)
    out, lse = na_rtc.attention(q.float().numpy(), k.float().numpy(), v.float().numpy(), return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 9, 4, 6)
    assert_close(out, want_out.numpy(), "float32", "forward", "out")
    assert_close(lse, want_lse.numpy(), "float32", "forward", "lse")


def test_two_halves_merged_are_all_keys():
    q, k, v = _draw(3, (2, 5, 2, 4), (2, 12, 2, 4), (2, 12, 2, 4))
    parts = [na_rtc.attention(q, k[:, s], v[:, s], return_lse=True) for s in (slice(0, 7), slice(7, None))]
    out, lse = na_rtc.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    want_out, want_lse = _softmax_attention(q, k, v)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)


def test_no_keys():
    q, k, v = _draw(4, (1, 3, 2, 4), (1, 0, 2, 4), (1, 0, 2, 4))
    q.requires_grad_()
    out, lse = na_rtc.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_custom_ops_pass_opcheck_and_compile():
    """The forward and backward custom ops' schemas and fake implementations, a fullgraph torch.compile, and meta
    tensors (shapes only)."""
    q, k, v = (x.float() for x in _draw(8, (2, 5, 4, 8), (2, 9, 2, 8), (2, 9, 2, 6)))
    torch.library.opcheck(torch.ops.na_rtc.attention_fwd.default, (q, k, v, 0.3, "reference"),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.na_rtc.attention_fwd(q, k, v, 0.3, "reference")
    torch.library.opcheck(torch.ops.na_rtc.attention_bwd.default,
                          (torch.ones_like(out), q, k, v, out, lse, torch.ones_like(lse), 0.3, "reference"),
                          test_utils=("test_schema", "test_faketensor"))

    def attend(q, k, v):
        return na_rtc.attention(q, k, v, scale=0.3, return_lse=True)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    for got, want in zip(compiled(q, k, v), attend(q, k, v)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    out, lse = na_rtc.attention(*(x.to("meta") for x in (q, k, v)), return_lse=True)
    assert out.shape == (2, 5, 4, 6) and lse.shape == (2, 5, 4) and lse.dtype == torch.float32


@pytest.mark.parametrize("shapes, match", [
    (((1, 3, 2, 4), (1, 5, 2, 6), (1, 5, 2, 4)), r"key must be \[batch, keys, heads_kv, head_dim\]"),
    (((1, 3, 2, 4), (1, 5, 2, 4), (1, 6, 2, 4)), "value must be"),
    (((1, 3, 4, 4), (1, 5, 3, 4), (1, 5, 3, 4)), "key has 3 heads, which must divide query's 4 heads"),
    (((1, 3, 4), (1, 5, 2, 4), (1, 5, 2, 4)), "query must have 4 dimensions"),
])
def test_bad_input_is_named(shapes, match):
    with pytest.raises(ValueError, match=match):
        na_rtc.attention(*(torch.ones(s) for s in shapes))
    with pytest.raises(TypeError, match="key"):
        na_rtc.attention(torch.ones(1, 3, 2, 4), np.ones((1, 3, 2, 4)), torch.ones(1, 3, 2, 4))


# ---------------------------------------------------------------- on the kernels (emulator)

_EMULATOR = na_rtc.backends.get("emulator")
needs_emulator = pytest.mark.skipif(not _EMULATOR.probe()[0], reason="emulator needs a C++ compiler")

#: id -> (dtype, settings, the kernel-name prefixes of the forward and the dq kernel)
KERNEL_PATHS = {
    "simt-fp32": ("float32", {}, "na_fused_fwd<", "na_fused_bwd_dq<"),
    "simt-bf16": ("bfloat16", {"NA_RTC_TENSOR_CORES": "0"}, "na_fused_fwd<", "na_fused_bwd_dq<"),
    "mma.sync-fp16": ("float16", {}, "na_fused_tc_fwd<", "na_fused_tc_bwd_dq<"),
    "mma.sync-bf16": ("bfloat16", {}, "na_fused_tc_fwd<", "na_fused_tc_bwd_dq<"),
    "wgmma-1wg-bf16": ("bfloat16", {"NA_RTC_WGMMA": "1", "NA_RTC_WGMMA_WARPGROUPS": "1"}, "na_fused_wg_fwd<",
                       "na_fused_wg_bwd_dq<"),
    "wgmma-2wg-fp16": ("float16", {"NA_RTC_WGMMA": "1", "NA_RTC_WGMMA_WARPGROUPS": "2"}, "na_fused_wg_fwd<",
                       "na_fused_wg_bwd_dq<"),
}
#: (batch, queries, keys, heads, heads_kv, head_dim, head_dim_v): keys across chunk boundaries with a partial last
#: chunk, a partial query tile; 130 queries leave the last tile's second warpgroup without a query (with two
#: warpgroups) and the first with two
KERNEL_CASES = [
    (2, 37, 141, 4, 2, 32, 24),
    (1, 130, 5, 2, 1, 64, 64),
]


class _Recorder:
    """The emulator's executor, remembering the kernels it ran."""

    def __init__(self):
        from na_rtc.runtime import emulated

        self.names, self._run = [], emulated.run

    def __call__(self, plan):
        self.names.append(plan.kernel.name)
        return self._run(plan)


@needs_emulator
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "b{}-q{}-k{}-h{}kv{}-d{}v{}".format(*c))
@pytest.mark.parametrize("path_id", KERNEL_PATHS)
def test_the_kernels_stream_the_keys_forward_and_backward(path_id, case, monkeypatch):
    """On the emulator backend one forward kernel serves the call (the keys streamed as extra tokens after an
    empty key box), and the backward is the dq kernel plus the tokens' dK/dV kernel, no dK/dV kernel of a
    neighborhood; output, logsumexp and every gradient (through both) against float64 softmax attention."""
    from na_rtc.runtime.ops import make_ops

    dtype, settings, forward_kernel, dq_kernel = KERNEL_PATHS[path_id]
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    recorder = _Recorder()
    monkeypatch.setattr(_EMULATOR, "_ops", make_ops(recorder, "emulator", "peek"))
    batch, queries, keys, heads, heads_kv, dim, dim_v = case
    q, k, v, g, glse = _draw(5, (batch, queries, heads, dim), (batch, keys, heads_kv, dim),
                             (batch, keys, heads_kv, dim_v), (batch, queries, heads, dim_v), (batch, queries, heads))
    leaves = [x.to(getattr(torch, dtype)).requires_grad_() for x in (q, k, v)]
    out, lse = na_rtc.attention(*leaves, return_lse=True, backend="emulator")
    assert len(recorder.names) == 1 and recorder.names[0].startswith(forward_kernel), recorder.names
    exact = [x.detach().double().requires_grad_() for x in leaves]  # the inputs as the kernels read them
    want_out, want_lse = _softmax_attention(*exact)
    assert_close(out, want_out.detach(), dtype, "forward", "out")
    assert_close(lse, want_lse.detach(), dtype, "forward", "lse")
    del recorder.names[:]
    torch.autograd.backward((out, lse), (g.to(out.dtype), glse.float()))
    torch.autograd.backward((want_out, want_lse), (g.to(out.dtype).double(), glse.float().double()))
    assert any(n.startswith(dq_kernel) for n in recorder.names), recorder.names
    assert recorder.names[-1].startswith("na_tokens_bwd_dkdv<"), recorder.names
    assert not any("dkdv" in n and not n.startswith("na_tokens") for n in recorder.names), recorder.names
    for name, got, want in zip(("dq", "dk", "dv"), leaves, exact):
        assert_close(got.grad, want.grad, dtype, "grad", name)


@needs_emulator
def test_numpy_arrays_on_the_kernels(monkeypatch):
    recorder = _Recorder()
    from na_rtc.runtime.ops import make_ops

    monkeypatch.setattr(_EMULATOR, "_ops", make_ops(recorder, "emulator", "peek"))
    q, k, v = _draw(6, (1, 9, 4, 16), (1, 70, 2, 16), (1, 70, 2, 8))
    out, lse = na_rtc.attention(q.float().numpy(), k.float().numpy(), v.float().numpy(), return_lse=True,
                                backend="emulator")
    assert recorder.names and recorder.names[0].startswith("na_fused_fwd<"), recorder.names
    want_out, want_lse = _softmax_attention(*(x.float().double() for x in (q, k, v)))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert_close(out, want_out.numpy(), "float32", "forward", "out")
    assert_close(lse, want_lse.numpy(), "float32", "forward", "lse")


@needs_emulator
def test_float64_and_no_keys_on_the_emulator_backend():
    """No float64 kernel: the matrix products serve (exact); no keys: zeros and -inf, no kernel launched."""
    q, k, v = _draw(7, (1, 6, 2, 8), (1, 9, 1, 8), (1, 9, 1, 8))
    out, lse = na_rtc.attention(q, k, v, return_lse=True, backend="emulator")
    want_out, want_lse = _softmax_attention(q, k, v)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    out, lse = na_rtc.attention(q.float(), k[:, :0].float(), v[:, :0].float(), return_lse=True, backend="emulator")
    assert (out == 0).all() and torch.isneginf(lse).all()
