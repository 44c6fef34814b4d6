"""Extra key/value tokens streamed by the fused forward kernels, through the emulator.

A forward kernel whose family says it streams them (``Role.extra_tokens``) takes the extra tokens
(``NA_EXTRA``) as one more key range after each query tile's neighborhood, in the same online softmax; the
others' results are merged with dense attention over the tokens (``na_rtc/extra_tokens.py``). Here, against
the float64 reference (itself held to the brute-force one-softmax oracle in test_extra_tokens.py):

* the forward (out, logsumexp) of each streaming family, 1D to 3D, with GQA, a value head dim of its own,
  stride, dilation, causal axes and rpb, and 1, 7, 64 and 141 tokens (within one chunk, across chunk
  boundaries); the launch is the family's kernel with the tokens' pointers, nothing merged;
* the backward from that forward (the neighborhood's kernels given the output and logsumexp over both, the
  tokens' dense part) with a logsumexp gradient: dq, dk, dv, drpb and both extra tensors' gradients;
* a NaN in an extra key reaches every query of its key/value head's group, and only those;
* the op table streams where the chosen family does, and merges where it does not.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from helpers import KernelCase, RecordingExecutor, assert_close, kernel_policy, make_inputs

import na_rtc
from na_rtc import _args, extra_tokens
from na_rtc.runtime import composed
from na_rtc.runtime.dispatch import Dispatcher, streams_extra_tokens
from na_rtc.runtime.ops import make_ops

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")


Case = KernelCase


CASES = [
    Case((37,), 4, 2, dict(kernel_size=7, stride=2, dilation=2), rpb=True, head_dim_v=32, tokens=7),
    Case((40,), 2, 1, dict(kernel_size=9, is_causal=True), head_dim=32, tokens=141),
    Case((9, 11), 4, 1, dict(kernel_size=(3, 5), dilation=(2, 1)), rpb=True, head_dim_v=8, tokens=64),
    Case((10, 8), 4, 4, dict(kernel_size=5, stride=(2, 1), is_causal=(True, False)), head_dim=32, tokens=1),
    Case((5, 6, 7), 4, 2, dict(kernel_size=(2, 3, 3), is_causal=(True, False, False)), head_dim_v=24, tokens=7),
    Case((6, 5, 7), 2, 1, dict(kernel_size=3, dilation=(1, 1, 2)), rpb=True, tokens=64),
]
#: id -> (path, policy switches, dtype, the kernel-name prefix of its forward)
PATHS = {
    "simt-fp32": ("simt", dict(), "float32", "na_fused_fwd"),
    "simt-bf16": ("simt", dict(), "bfloat16", "na_fused_fwd"),
    "mma.sync-fp16": ("mma.sync", dict(tensor_cores=True), "float16", "na_fused_tc_fwd"),
    "mma.sync-bf16": ("mma.sync", dict(tensor_cores=True), "bfloat16", "na_fused_tc_fwd"),
    "wgmma-bf16": ("wgmma", dict(tensor_cores=True, wgmma=True), "bfloat16", "na_fused_wg_fwd"),
}
#: id -> (path, policy switches, dtype, the kernel-name prefix of its dq kernel): the backward pairs whose dq
#: kernel streams the extra tokens (the tokens' dK/dV kernel follows)
BACKWARD_PATHS = {
    "simt-fp32": ("simt", dict(), "float32", "na_fused_bwd_dq"),
    "simt-fp16": ("simt", dict(), "float16", "na_fused_bwd_dq"),
    "mma.sync-fp16": ("mma.sync", dict(tensor_cores=True), "float16", "na_fused_tc_bwd_dq"),
    "mma.sync-bf16": ("mma.sync", dict(tensor_cores=True), "bfloat16", "na_fused_tc_bwd_dq"),
    "wgmma-bf16": ("wgmma", dict(tensor_cores=True, wgmma=True), "bfloat16", "na_fused_wg_bwd_dq"),
}


def _inputs(case: Case, dtype: str, seed: int = 0):
    """(q, k, v, xk, xv, dOut, dLSE, rpb) in ``dtype`` (rpb and dLSE float32) and their float64 copies."""
    rng = np.random.default_rng(seed)
    dv = case.head_dim_v or case.head_dim
    q_shape = (2, *case.spatial, case.heads, case.head_dim)
    kv_shape = (2, *case.spatial, case.heads_kv, case.head_dim)
    shapes = [q_shape, kv_shape, (*kv_shape[:-1], dv), (2, case.tokens, case.heads_kv, case.head_dim),
              (2, case.tokens, case.heads_kv, dv), (*q_shape[:-1], dv)]
    lowered, exact = [], []
    for shape in shapes:
        (x,), (x64,) = make_inputs(rng, shape, getattr(torch, dtype))
        lowered.append(x)
        exact.append(torch.from_numpy(x64))
    (dlse,), (dlse64,) = make_inputs(rng, q_shape[:-1], torch.float32)
    lowered.append(dlse)
    exact.append(torch.from_numpy(dlse64))
    rpb = rpb64 = None
    if case.rpb:
        (rpb,), (rpb64,) = make_inputs(rng, (case.heads, *(2 * n - 1 for n in case.kernel_size)), torch.float32)
        rpb64 = torch.from_numpy(rpb64)
    return (*lowered, rpb), (*exact, rpb64)


def _problem(case: Case, q, k, v, rpb, xk, xv):
    window = case.window
    return _args.fused_problem(case.ndim, q, k, v, window["kernel_size"], window.get("stride", 1),
                               window.get("dilation", 1), window.get("is_causal", False), None, rpb, xk, xv)


def _reference(case: Case, q64, k64, v64, xk64, xv64, g64, dlse64, rpb64):
    """out, lse and (dq, dk, dv, drpb, dxk, dxv) of the float64 reference for a loss with dOut and dLSE."""
    op = getattr(na_rtc, f"na{case.ndim}d")
    leaves = [None if x is None else x.clone().requires_grad_() for x in (q64, k64, v64, rpb64, xk64, xv64)]
    q, k, v, rpb, xk, xv = leaves
    out, lse = op(q, k, v, **case.window, rpb=rpb, return_lse=True, additional_keys=xk, additional_values=xv,
                  backend="reference")
    torch.autograd.backward((out, lse), (g64, dlse64))
    return out.detach(), lse.detach(), tuple(None if x is None else x.grad for x in (q, k, v, rpb, xk, xv))


def _check(dtype, out, lse, grads, reference):
    out64, lse64, grads64 = reference
    if out is not None:
        assert_close(out, out64, dtype, "forward", "out")
        assert_close(lse, lse64, dtype, "forward", "lse")
    for name, got, want in zip(("dq", "dk", "dv", "drpb", "dxk", "dxv"), grads, grads64):
        if want is None:
            assert got is None, name
            continue
        assert tuple(got.shape) == tuple(want.shape), name
        assert_close(got, want, dtype, "grad", name)


@pytest.mark.parametrize("path_id", PATHS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_streamed_forward_matches_the_reference(case, path_id):
    """The forward kernel alone serves the call (nothing merged); the backward from its output and logsumexp
    (the neighborhood's kernels of the path, the tokens' part wherever it runs) gives every gradient."""
    path, switches, dtype, forward_kernel = PATHS[path_id]
    (q, k, v, xk, xv, g, dlse, rpb), exact = _inputs(case, dtype)
    problem = _problem(case, q, k, v, rpb, xk, xv)
    assert problem.extra_tokens == case.tokens
    run = RecordingExecutor()
    kernels = Dispatcher(run, kernel_policy(**switches))
    route = kernels.forward_route(problem.without_extra_tokens())[0]
    assert route.path == path and streams_extra_tokens(route)
    out, lse = kernels.forward(problem, q, k, v, composed.bias_in_accumulator(problem, rpb), route, xk, xv)
    assert len(run.names) == 1 and run.names[0].startswith(forward_kernel), run.names
    ops = make_ops(run, "emulator", "peek")
    with pytest.MonkeyPatch.context() as patch:  # the op table under the test's policy
        patch.setattr(ops["fused_backward"].__self__, "dispatcher", lambda problem: kernels)
        grads = ops["fused_backward"](problem, g, q, k, v, rpb, out, lse, dlse, xk, xv)
    _check(dtype, out, lse, grads, _reference(case, *exact))


#: the backward's cases: also head dim 128 (the mma.sync dq kernel's stream addresses in shared memory in 1D
#: and 2D, in registers in 3D), with a partial head dim (rows staged element by element) and rpb
BACKWARD_CASES = CASES + [
    Case((37,), 2, 1, dict(kernel_size=5, dilation=2), head_dim=128, tokens=45),
    Case((9, 11), 4, 2, dict(kernel_size=(3, 5)), rpb=True, head_dim=100, tokens=70),
    Case((5, 6, 7), 2, 1, dict(kernel_size=3), head_dim=128, tokens=33),
]


@pytest.mark.parametrize("path_id", BACKWARD_PATHS)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_streamed_backward_matches_the_reference(case, path_id):
    """The dq kernel streams the tokens and their own kernel writes their gradients, from the reference's
    forward (so that the gradients are checked alone)."""
    path, switches, dtype, dq_kernel = BACKWARD_PATHS[path_id]
    (q, k, v, xk, xv, g, dlse, rpb), exact = _inputs(case, dtype)
    problem = _problem(case, q, k, v, rpb, xk, xv)
    reference = _reference(case, *exact)
    out, lse = reference[0].to(q.dtype), reference[1].float()
    run = RecordingExecutor()
    kernels = Dispatcher(run, kernel_policy(**switches))
    pair = kernels.backward_pair(problem)[0]
    assert pair[0].path == path and kernels.streams_extra_tokens_backward(problem, pair) == (True, "")
    grads = kernels.backward(problem, g, q, k, v, composed.bias_in_accumulator(problem, rpb), out, lse,
                             grad_lse=dlse, extra_keys=xk, extra_values=xv)
    assert any(name.startswith(dq_kernel) for name in run.names), run.names
    assert run.names[-1].startswith("na_tokens_bwd_dkdv<"), run.names
    _check(dtype, None, None, grads, reference)
    again = kernels.backward(problem, g, q, k, v, composed.bias_in_accumulator(problem, rpb), out, lse,
                             grad_lse=dlse, extra_keys=xk, extra_values=xv)
    for first, second in zip(grads, again):  # fixed-order sums: bitwise the same
        assert first is None or torch.equal(first, second)


@pytest.mark.parametrize("path_id", BACKWARD_PATHS)
def test_slots_past_the_last_token_add_nothing_to_dq(path_id):
    """Every logit far below 0 (scale q.k between about -170 and -120, so lse near -120): exp(-lse) overflows
    float32, so a slot of the tokens' last, partial chunk (5 tokens) that counted (a zero row, logit 0) would
    make its ds infinite and dq NaN through 0 * inf. The gradients still match the reference."""
    path, switches, dtype, dq_kernel = BACKWARD_PATHS[path_id]
    case = Case((37,), 2, 1, dict(kernel_size=5), tokens=5)
    (q, k, v, xk, xv, g, dlse, _), _ = _inputs(case, dtype)
    q = (6 + 0.5 * q.float().clamp(-1, 1)).to(q.dtype)  # queries in [5.5, 6.5], keys in [-6.5, -5.5]
    k, xk = ((-6 + 0.5 * x.float().clamp(-1, 1)).to(x.dtype) for x in (k, xk))
    problem = _problem(case, q, k, v, None, xk, xv)
    reference = _reference(case, *(x.double() for x in (q, k, v, xk, xv, g, dlse)), None)
    assert reference[1].max() < -100
    out, lse = reference[0].to(q.dtype), reference[1].float()
    run = RecordingExecutor()
    kernels = Dispatcher(run, kernel_policy(**switches))
    pair = kernels.backward_pair(problem)[0]
    assert pair[0].path == path and kernels.streams_extra_tokens_backward(problem, pair) == (True, "")
    grads = kernels.backward(problem, g, q, k, v, None, out, lse, grad_lse=dlse, extra_keys=xk, extra_values=xv)
    assert any(name.startswith(dq_kernel) for name in run.names), run.names
    assert torch.isfinite(grads[0]).all()
    _check(dtype, None, None, grads, reference)


def _laid_out(x, layout: str):
    """``x`` [b, tokens, heads, dim] with the same values in another memory layout."""
    if layout == "strided dims":  # head-dim stride 2: staged element by element
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "unaligned":  # contiguous, one element past 16 bytes: element by element too
        flat = torch.zeros(x.numel() + 1, dtype=x.dtype)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    return x.transpose(1, 2).contiguous().transpose(1, 2)  # heads-first storage: 16-byte pieces, other strides


@pytest.mark.parametrize("path_id", [p for p in PATHS if p.endswith(("fp32", "fp16"))])
@pytest.mark.parametrize("layout", ["strided dims", "unaligned", "heads first"])
@pytest.mark.parametrize("case", [Case((37,), 2, 1, dict(kernel_size=5), head_dim=128, tokens=45),
                                  Case((9, 11), 4, 1, dict(kernel_size=(3, 5)), head_dim=64, head_dim_v=32,
                                       tokens=70),
                                  Case((5, 6, 7), 4, 2, dict(kernel_size=(2, 3, 3)), tokens=33)], ids=str)
def test_tokens_in_any_layout(case, layout, path_id):
    """The tokens' rows staged from views of every kind (the forward alone): head dims strided, rows unaligned,
    tokens of one head apart; 1D at head dim 128 takes the tensor-core loader's stepped-address path."""
    _, switches, dtype, forward_kernel = PATHS[path_id]
    (q, k, v, xk, xv, *_), exact = _inputs(case, dtype)
    xk, xv = _laid_out(xk, layout), _laid_out(xv, layout)
    problem = _problem(case, q, k, v, None, xk, xv)
    run = RecordingExecutor()
    kernels = Dispatcher(run, kernel_policy(**switches))
    out, lse = kernels.forward(problem, q, k, v, None, None, xk, xv)
    assert len(run.names) == 1 and run.names[0].startswith(forward_kernel), run.names
    out64, lse64, _ = _reference(case, *exact)
    assert_close(out, out64, dtype, "forward", "out")
    assert_close(lse, lse64, dtype, "forward", "lse")


@pytest.mark.parametrize("path_id", PATHS)
def test_a_nan_token_reaches_exactly_its_group(path_id):
    """A NaN in key/value head 0's extra key: every query of heads 0..group-1 is NaN, the others finite."""
    _, switches, dtype, _ = PATHS[path_id]
    case = Case((9, 7), 4, 2, dict(kernel_size=3), tokens=5)
    q, k, v, xk, xv = _inputs(case, dtype)[0][:5]
    xk[:, 3, 0, 1] = float("nan")
    problem = _problem(case, q, k, v, None, xk, xv)
    kernels = Dispatcher(RecordingExecutor(), kernel_policy(**switches))
    out, lse = kernels.forward(problem, q, k, v, None, None, xk, xv)
    assert torch.isnan(out[..., :2, :]).all() and torch.isnan(lse[..., :2]).all()
    assert torch.isfinite(out[..., 2:, :]).all() and torch.isfinite(lse[..., 2:]).all()


def test_the_op_table_streams_where_the_family_does_and_the_merge_agrees():
    """The op table on the emulator: float32 runs the SIMT forward, which streams, so one kernel launch serves
    the call; the merge (what a family that does not stream gets) gives the same result."""
    case = CASES[2]
    (q, k, v, xk, xv, _, _, rpb), exact = _inputs(case, "float32")
    run = RecordingExecutor()
    ops = make_ops(run, "emulator", "peek")
    problem = _problem(case, q, k, v, rpb, xk, xv)
    out, lse = ops["fused_forward"](problem, q, k, v, rpb, xk, xv)
    assert len(run.names) == 1 and run.names[0].startswith("na_fused_fwd"), run.names
    merged_out, merged_lse = extra_tokens.merged_forward(ops["fused_forward"], problem, q, k, v, rpb, xk, xv)
    out64, lse64, _ = _reference(case, *exact)
    for got_out, got_lse in ((out, lse), (merged_out, merged_lse)):
        assert_close(got_out, out64, "float32", "forward", "out")
        assert_close(got_lse, lse64, "float32", "forward", "lse")


def test_explain_says_where_the_tokens_go():
    q, tokens = torch.ones(1, 9, 8, 2, 16), torch.ones(1, 5, 2, 16)
    text = str(na_rtc.explain("na2d", q, q, q, 3, additional_keys=tokens, additional_values=tokens, backward=True,
                              backend="emulator"))
    assert "5 extra tokens" in text and "forward kernel streams the extra tokens" in text, text
    assert "its dq kernel streams the extra tokens, their own kernel writes their gradients" in text, text
    q, tokens = q.double(), tokens.double()  # no fused kernel: the split kernels composed, the tokens merged
    text = str(na_rtc.explain("na2d", q, q, q, 3, additional_keys=tokens, additional_values=tokens,
                              backend="emulator"))
    assert "merged with this result" in text, text


#: the wgmma forward's block settings (as tests/test_fused_wg.py sets them): the table's blocks (two warpgroups),
#: one warpgroup a block, and 32-key chunks
WGMMA_SETTINGS = {"table": {}, "1wg": {"NA_RTC_WGMMA_WARPGROUPS": "1"}, "kc32": {"NA_RTC_WGMMA_CHUNK_KEYS": "32"}}
#: token chunks after boxes of several chunks: in 1D with two warpgroups the second one's box chunks start past
#: chunk 0 and end before the box's last, and it still takes every token chunk; head dim 128 reads Q from shared
#: memory (QS) with the table's 64-key chunks in 1D and 2D; a box of one chunk loads a token chunk before the loop
WGMMA_CASES = [
    Case((300,), 2, 1, dict(kernel_size=33), head_dim=128, tokens=141),
    Case((20, 18), 4, 2, dict(kernel_size=7, dilation=(1, 2)), rpb=True, head_dim=64, head_dim_v=40, tokens=70),
    Case((12,), 2, 2, dict(kernel_size=5), head_dim=128, head_dim_v=72, tokens=200),
    Case((6, 9, 8), 2, 1, dict(kernel_size=3, is_causal=(False, True, False)), head_dim=32, tokens=33),
]


@pytest.mark.parametrize("setting", WGMMA_SETTINGS)
@pytest.mark.parametrize("case", WGMMA_CASES, ids=str)
def test_wgmma_streams_tokens_under_every_block_setting(case, setting, monkeypatch):
    from na_rtc.runtime.families import fused_wg

    for name, value in WGMMA_SETTINGS[setting].items():
        monkeypatch.setenv(name, value)
    q, k, v, xk, xv, g, dlse, rpb = (inputs := _inputs(case, "bfloat16"))[0]
    problem = _problem(case, q, k, v, rpb, xk, xv)
    run = RecordingExecutor()
    kernels = Dispatcher(run, kernel_policy(tensor_cores=True, wgmma=True))
    out, lse = kernels.forward(problem, q, k, v, composed.bias_in_accumulator(problem, rpb), None, xk, xv)
    hd = fused_wg.head_dim_bucket(max(case.head_dim, case.head_dim_v or 0))
    wanted = fused_wg.kernel_name_of(hd, "bfloat16", case.ndim, warpgroups=1 if setting == "1wg" else None,
                                     chunk_keys=32 if setting == "kc32" else None)
    assert run.names == [wanted]
    out64, lse64, _ = _reference(case, *inputs[1])
    assert_close(out, out64, "bfloat16", "forward", "out")
    assert_close(lse, lse64, "bfloat16", "forward", "lse")


@pytest.mark.parametrize("setting", ["table", "1wg"])
def test_wgmma_stages_tokens_element_by_element(setting, monkeypatch):
    """Token rows that 16-byte pieces cannot stage: a key head dim of 20 elements, and the values' head dims 2
    elements apart (a view): the wgmma forward copies them element by element, zeros past NX and past D."""
    for name, value in WGMMA_SETTINGS[setting].items():
        monkeypatch.setenv(name, value)
    case = Case((150,), 2, 1, dict(kernel_size=9), head_dim=20, head_dim_v=24, tokens=45)
    (q, k, v, xk, xv, _, _, rpb), exact = _inputs(case, "bfloat16")
    strided = torch.zeros(*xv.shape[:-1], 2 * xv.shape[-1], dtype=xv.dtype)[..., ::2]
    strided.copy_(xv)
    assert strided.stride(-1) == 2
    problem = _problem(case, q, k, v, rpb, xk, strided)
    run = RecordingExecutor()
    out, lse = Dispatcher(run, kernel_policy(tensor_cores=True, wgmma=True)).forward(problem, q, k, v, None, None,
                                                                                     xk, strided)
    assert len(run.names) == 1 and run.names[0].startswith("na_fused_wg_fwd<"), run.names
    out64, lse64, _ = _reference(case, *exact)
    assert_close(out, out64, "bfloat16", "forward", "out")
    assert_close(lse, lse64, "bfloat16", "forward", "lse")


#: the wgmma dq kernel's cases: the forward's (token chunks after boxes of several chunks, the second warpgroup's
#: box chunks starting past chunk 0 and ending before the box's last; a bias, whose partials take no token), and
#: 2D at head dim 128, where the dq kernel reads Q and dOut from shared memory (QS)
WGMMA_DQ_CASES = [*WGMMA_CASES, Case((9, 11), 2, 1, dict(kernel_size=3), rpb=True, head_dim=128, tokens=45)]


@pytest.mark.parametrize("setting", ["table", "1wg"])
@pytest.mark.parametrize("case", WGMMA_DQ_CASES, ids=str)
def test_wgmma_dq_streams_tokens_under_every_block_setting(case, setting, monkeypatch):
    """The wgmma dq kernel under the table's blocks (two warpgroups) and one warpgroup a block (its chunk size
    is the family's own: NA_RTC_WGMMA_CHUNK_KEYS sets the forward's); every gradient against the reference."""
    from na_rtc.runtime.families import fused_wg, fused_wg_bwd

    for name, value in WGMMA_SETTINGS[setting].items():
        monkeypatch.setenv(name, value)
    (q, k, v, xk, xv, g, dlse, rpb), exact = _inputs(case, "bfloat16")
    problem = _problem(case, q, k, v, rpb, xk, xv)
    reference = _reference(case, *exact)
    out, lse = reference[0].to(q.dtype), reference[1].float()
    run = RecordingExecutor()
    kernels = Dispatcher(run, kernel_policy(tensor_cores=True, wgmma=True))
    pair = kernels.backward_pair(problem)[0]
    assert pair[0].path == "wgmma" and kernels.streams_extra_tokens_backward(problem, pair) == (True, "")
    grads = kernels.backward(problem, g, q, k, v, composed.bias_in_accumulator(problem, rpb), out, lse,
                             grad_lse=dlse, extra_keys=xk, extra_values=xv)
    hd = fused_wg.head_dim_bucket(max(case.head_dim, case.head_dim_v or 0))
    wanted = fused_wg_bwd.dq_name_of(hd, "bfloat16", case.ndim, warpgroups=1 if setting == "1wg" else None)
    assert wanted in run.names, run.names
    assert run.names[-1].startswith("na_tokens_bwd_dkdv<"), run.names
    _check("bfloat16", None, None, grads, reference)
