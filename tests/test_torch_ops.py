"""The torch.library custom ops behind the autograd Functions (docs/design/api.md#torch-integration):
registered with fake implementations that agree with the real ones, so
torch.compile and export can trace them."""

from __future__ import annotations

import pytest
import torch

import na_rtc
from na_rtc import _torch  # noqa: F401 - registers the ops
from na_rtc.runtime import families, registry  # noqa: F401 - families registers them

torch.manual_seed(0)
Q1 = torch.randn(2, 12, 3, 8, dtype=torch.float64)
Q2 = torch.randn(1, 7, 6, 2, 8, dtype=torch.float64)
RPB1 = torch.randn(3, 9, dtype=torch.float64)
Q3 = torch.randn(1, 4, 3, 5, 2, 4, dtype=torch.float64)  # [batch, depth, height, width, heads, dim]
RPB3 = torch.randn(2, 5, 5, 5, dtype=torch.float64)
ATTN3 = torch.randn(1, 4, 3, 5, 2, 18, dtype=torch.float64)  # kernel (2, 3, 3)
KV1 = torch.randn(2, 12, 1, 8, dtype=torch.float64)  # one key/value head for Q1's three

SAMPLES = {
    "fused_fwd-1d-rpb": (torch.ops.na_rtc.fused_fwd, (Q1, Q1 + 1, Q1 - 1, RPB1, [5], [1], [2], [False], 0.3, "reference")),
    "fused_fwd-2d-causal-stride": (torch.ops.na_rtc.fused_fwd,
                                   (Q2, Q2 + 1, Q2 - 1, None, [3, 4], [2, 3], [1, 1], [True, False], 0.5, "reference")),
    "qk_fwd-1d": (torch.ops.na_rtc.qk_fwd, (Q1, Q1 + 1, RPB1, [5], [1], [False], "reference")),
    "av_fwd-2d": (torch.ops.na_rtc.av_fwd, (torch.randn(1, 7, 6, 2, 12, dtype=torch.float64), Q2, [3, 4], [2, 1],
                                           [False, True], "reference")),
    "qk_bwd-1d": (torch.ops.na_rtc.qk_bwd, (torch.randn(2, 12, 3, 5, dtype=torch.float64), Q1, Q1 + 1, RPB1, [5], [2],
                                           [False], "reference")),
    "av_bwd-1d": (torch.ops.na_rtc.av_bwd, (Q1, torch.randn(2, 12, 3, 5, dtype=torch.float64), Q1 - 1, [5], [1],
                                           [True], "reference")),
    # 3D: the same ops, rank-generic (the window lists have three entries)
    "fused_fwd-3d-rpb": (torch.ops.na_rtc.fused_fwd, (Q3, Q3 + 1, Q3 - 1, RPB3, [3, 3, 3], [1, 1, 1], [1, 1, 1],
                                                      [False, False, False], 0.4, "reference")),
    "fused_fwd-3d-causal-in-time-stride": (torch.ops.na_rtc.fused_fwd,
                                           (Q3, Q3 + 1, Q3 - 1, None, [2, 3, 3], [2, 1, 3], [1, 1, 1],
                                            [True, False, False], 0.5, "reference")),
    "qk_fwd-3d-rpb": (torch.ops.na_rtc.qk_fwd, (Q3, Q3 + 1, RPB3, [3, 3, 3], [1, 1, 1], [False, False, False],
                                                "reference")),
    "qk_bwd-3d": (torch.ops.na_rtc.qk_bwd, (ATTN3, Q3, Q3 + 1, None, [2, 3, 3], [2, 1, 1], [True, False, False],
                                            "reference")),
    "av_fwd-3d": (torch.ops.na_rtc.av_fwd, (ATTN3, Q3, [2, 3, 3], [1, 1, 1], [False, True, False], "reference")),
    "av_bwd-3d": (torch.ops.na_rtc.av_bwd, (Q3, ATTN3, Q3 - 1, [2, 3, 3], [2, 1, 1], [True, False, False],
                                            "reference")),
    # a query box (context parallelism): the query covers rows 3..9 of the key's 12, the keyword at the end
    "fused_fwd-1d-query-box": (torch.ops.na_rtc.fused_fwd, (Q1[:, 3:10], Q1 + 1, Q1 - 1, RPB1, [5], [1], [2],
                                                            [False], 0.3, "reference", None, None, [3])),
    # GQA/MQA: key and value with fewer heads (the reference serves it)
    "fused_fwd-1d-gqa": (torch.ops.na_rtc.fused_fwd, (Q1, KV1, KV1 - 1, RPB1, [5], [1], [2], [False], 0.3,
                                                      "reference")),
    "qk_bwd-1d-mqa": (torch.ops.na_rtc.qk_bwd, (torch.randn(2, 12, 3, 5, dtype=torch.float64), Q1, KV1[..., :1, :],
                                               None, [5], [1], [False], "reference")),
    "av_fwd-1d-mqa": (torch.ops.na_rtc.av_fwd, (torch.randn(2, 12, 3, 5, dtype=torch.float64), KV1[..., :1, :], [5],
                                               [1], [True], "reference")),
}
# the emulator's opcheck takes every sample its kernels serve: a 3D stride needs fused 3D kernels
KERNEL_SAMPLES = {name: sample for name, sample in SAMPLES.items()
                  if not ("-3d" in name and "stride" in name and registry.for_rank("fused", 3) is None)
                  and not name.endswith(("-gqa", "-mqa"))}  # the kernel backends serve no grouped key/value heads yet


@pytest.mark.parametrize("op, args", SAMPLES.values(), ids=SAMPLES.keys())
def test_custom_op_passes_opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _on_emulator(args):
    """The sample as float32 (the fused kernels' dtypes) on the emulator backend."""
    return tuple(a.float() if isinstance(a, torch.Tensor) else "emulator" if a == "reference" else a for a in args)


@pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")
@pytest.mark.parametrize("op, args", KERNEL_SAMPLES.values(), ids=KERNEL_SAMPLES.keys())
def test_custom_op_passes_opcheck_on_the_emulator(op, args):
    torch.library.opcheck(op, _on_emulator(args), test_utils=("test_schema", "test_faketensor"))


def test_fused_bwd_fake_matches_real():
    out, lse = torch.ops.na_rtc.fused_fwd(Q1, Q1, Q1, RPB1, [5], [1], [1], [False], 0.3, "reference")
    args = (torch.randn_like(Q1), Q1, Q1, Q1, RPB1, out, lse, [5], [1], [1], [False], 0.3, "reference")
    torch.library.opcheck(torch.ops.na_rtc.fused_bwd, args, test_utils=("test_schema", "test_faketensor"))


def test_fused_bwd_with_a_logsumexp_gradient_fake_matches_real():
    out, lse = torch.ops.na_rtc.fused_fwd(Q1, Q1, Q1, RPB1, [5], [1], [1], [False], 0.3, "reference")
    args = (torch.randn_like(Q1), Q1, Q1, Q1, RPB1, out, lse, [5], [1], [1], [False], 0.3, "reference",
            torch.randn_like(lse))
    torch.library.opcheck(torch.ops.na_rtc.fused_bwd, args, test_utils=("test_schema", "test_faketensor"))


def test_compiled_merge_of_two_branches_matches_eager_without_graph_breaks():
    """A loss through both logsumexps and merge_attentions traces in one graph (fullgraph)."""
    def merged(q, k, v, k2, v2):
        a = na_rtc.na2d(q, k, v, 3, return_lse=True)
        b = na_rtc.na2d(q, k2, v2, (3, 5), is_causal=(True, False), return_lse=True)
        out, lse = na_rtc.merge_attentions([a[0], b[0]], [a[1], b[1]])
        return out.square().sum() + lse.sum()

    inputs = [torch.randn(1, 5, 6, 2, 4, requires_grad=True) for _ in range(5)]
    torch._dynamo.reset()
    compiled = torch.compile(merged, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(merged(*inputs), inputs), torch.autograd.grad(compiled(*inputs), inputs)):
        torch.testing.assert_close(a, b)


def test_fused_bwd_fake_matches_real_in_3d():
    out, lse = torch.ops.na_rtc.fused_fwd(Q3, Q3, Q3, RPB3, [3, 3, 3], [1, 1, 1], [1, 1, 1], [False] * 3, 0.3,
                                          "reference")
    args = (torch.randn_like(Q3), Q3, Q3, Q3, RPB3, out, lse, [3, 3, 3], [1, 1, 1], [1, 1, 1], [False] * 3, 0.3,
            "reference")
    torch.library.opcheck(torch.ops.na_rtc.fused_bwd, args, test_utils=("test_schema", "test_faketensor"))


def test_compiled_3d_functions_match_eager_without_graph_breaks():
    def video(q, k, v, rpb):
        out = na_rtc.na3d(q, k, v, (2, 3, 3), stride=(1, 2, 1), is_causal=(True, False, False))
        attn = na_rtc.na3d_qk(q * 0.5, k, 3, rpb=rpb).softmax(-1)
        return out.sum() + na_rtc.na3d_av(attn, v, 3).square().sum()

    q, k, v = (torch.randn(1, 3, 4, 5, 2, 4, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, 5, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(video, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(video(q, k, v, rpb), (q, k, v, rpb))
    compiled_grads = torch.autograd.grad(compiled(q, k, v, rpb), (q, k, v, rpb))
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


def test_compiled_model_matches_eager_without_graph_breaks():
    def layer(q, k, v, rpb):
        return na_rtc.na2d(q, k, v, (3, 5), rpb=rpb).sum()

    q, k, v = (torch.randn(1, 8, 9, 2, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 9, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(layer(q, k, v, rpb), (q, k, v, rpb))
    compiled_grads = torch.autograd.grad(compiled(q, k, v, rpb), (q, k, v, rpb))
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)
