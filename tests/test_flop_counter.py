"""torch's FlopCounterMode counts na_rtc's ops (MFU and FLOP reports), with
exact neighbor counts: what ``python -m na_rtc bench`` reports for the same
problem, and what the brute-force oracle's neighborhoods give."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from oracle import oracle_neighbor_mask
from torch.utils.flop_counter import FlopCounterMode

import na_rtc
from na_rtc.bench import flops as bench_flops
from na_rtc.bench.presets import Spec

OPS = torch.ops.na_rtc
ROOT = Path(__file__).resolve().parents[1]

# (spatial, kernel, stride, dilation, causal); batch 2, heads 3, head_dim 4
PROBLEMS = {
    "1d": ((13,), (5,), (1,), (1,), (False,)),
    "1d-causal-stride-dilation": ((17,), (4,), (3,), (2,), (True,)),
    "2d-stride": ((7, 9), (3, 5), (2, 3), (1, 1), (False, False)),
    "2d-causal-dilation": ((8, 9), (3, 4), (1, 1), (2, 1), (True, False)),
}
SPLIT = {name: p for name, p in PROBLEMS.items() if max(p[2]) == 1}  # split ops have no stride
BATCH, HEADS, HEAD_DIM = 2, 3, 4


def _spec(problem) -> Spec:
    spatial, kernel, stride, dilation, causal = problem
    return Spec(spatial, kernel, dilation, stride, causal, BATCH, HEADS, HEAD_DIM, "fp32")


def _inputs(problem, n=3, device="cpu"):
    return [torch.randn(BATCH, *problem[0], HEADS, HEAD_DIM, device=device, requires_grad=True) for _ in range(n)]


def _counted(run) -> dict:
    with FlopCounterMode(display=False) as counter:
        run()
    return dict(counter.get_flop_counts()["Global"])


def _oracle_pairs(problem) -> int:
    spatial, kernel, stride, dilation, causal = problem
    return int(oracle_neighbor_mask(spatial, kernel, stride, dilation, causal)[0].sum())


@pytest.mark.parametrize("problem", PROBLEMS.values(), ids=PROBLEMS.keys())
def test_fused_op_counts_what_bench_reports(problem):
    spatial, kernel, stride, dilation, causal = problem
    fused = na_rtc.na1d if len(spatial) == 1 else na_rtc.na2d
    q, k, v = _inputs(problem)
    counts = _counted(lambda: fused(q, k, v, kernel, stride, dilation, causal).sum().backward())
    forward = bench_flops.forward_flops(_spec(problem))
    assert forward == 4 * HEAD_DIM * BATCH * HEADS * _oracle_pairs(problem)  # exact neighbor counts
    # the backward is five products (QK^T recomputed), as torch counts SDPA's backward
    assert counts == {OPS.fused_fwd: forward, OPS.fused_bwd: 2.5 * forward}
    assert bench_flops.forward_backward_flops(_spec(problem)) == sum(counts.values())


@pytest.mark.parametrize("problem", SPLIT.values(), ids=SPLIT.keys())
def test_split_ops_count_one_product_forward_and_two_backward(problem):
    spatial, kernel, _, dilation, causal = problem
    qk, av = (na_rtc.na1d_qk, na_rtc.na1d_av) if len(spatial) == 1 else (na_rtc.na2d_qk, na_rtc.na2d_av)
    q, k, v = _inputs(problem)

    def split():
        attn = qk(q, k, kernel, dilation, causal).softmax(-1)
        av(attn, v, kernel, dilation, causal).sum().backward()

    counts = _counted(split)
    product = bench_flops.forward_flops(_spec(problem)) // 2  # qk + av together are bench's forward
    assert product == 2 * HEAD_DIM * BATCH * HEADS * _oracle_pairs(problem)
    # the split backward recomputes nothing: dq, dk (qk) and dattn, dv (av), one product each
    assert counts == {OPS.qk_fwd: product, OPS.av_fwd: product, OPS.qk_bwd: 2 * product, OPS.av_bwd: 2 * product}


# 3D: (spatial, kernel, stride, dilation, causal), counted against the oracle's neighbor pairs
PROBLEMS_3D = {
    "3d-causal-in-time-stride-dilation": ((4, 6, 6), (2, 3, 3), (2, 1, 3), (1, 2, 1), (True, False, False)),
    "3d-causal-two-axes": ((6, 4, 4), (3, 2, 3), (1, 1, 1), (2, 1, 1), (True, False, True)),
    "3d-rpb-shape": ((3, 4, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False)),
}


@pytest.mark.parametrize("problem", PROBLEMS_3D.values(), ids=PROBLEMS_3D.keys())
def test_3d_ops_count_exact_neighborhoods(problem):
    spatial, kernel, stride, dilation, causal = problem
    pairs = _oracle_pairs(problem)
    if causal != (False,) * 3:
        assert pairs < math.prod(spatial) * math.prod(kernel)  # causal windows are cut short: not tokens x slots
    product = 2 * HEAD_DIM * BATCH * HEADS * pairs
    q, k, v = _inputs(problem)
    counts = _counted(lambda: na_rtc.na3d(q, k, v, kernel, stride, dilation, causal).sum().backward())
    assert counts == {OPS.fused_fwd: 2 * product, OPS.fused_bwd: 2.5 * 2 * product}
    if stride == (1, 1, 1):
        def split():
            attn = na_rtc.na3d_qk(q, k, kernel, dilation, causal).softmax(-1)
            na_rtc.na3d_av(attn, v, kernel, dilation, causal).sum().backward()

        assert _counted(split) == {OPS.qk_fwd: product, OPS.av_fwd: product, OPS.qk_bwd: 2 * product,
                                   OPS.av_bwd: 2 * product}


def test_a_3d_layer_counts_its_attention():
    layer = na_rtc.NeighborhoodAttention3D(HEADS * HEAD_DIM, HEADS, kernel_size=(2, 3, 3),
                                           is_causal=(True, False, False))
    x = torch.randn(BATCH, 4, 5, 6, HEADS * HEAD_DIM)
    counts = _counted(lambda: layer(x))
    pairs = _oracle_pairs(((4, 5, 6), (2, 3, 3), (1, 1, 1), (1, 1, 1), (True, False, False)))
    assert counts[OPS.fused_fwd] == 4 * HEAD_DIM * BATCH * HEADS * pairs


def test_a_layer_counts_its_attention_beside_its_projections():
    layer = na_rtc.NeighborhoodAttention2D(HEADS * HEAD_DIM, HEADS, kernel_size=3, dilation=2, rel_pos_bias=True)
    x = torch.randn(BATCH, 7, 8, HEADS * HEAD_DIM, requires_grad=True)
    counts = _counted(lambda: layer(x).sum().backward())
    forward = bench_flops.forward_flops(_spec(((7, 8), (3, 3), (1, 1), (2, 2), (False, False))))
    assert counts[OPS.fused_fwd] == forward and counts[OPS.fused_bwd] == 2.5 * forward
    assert counts[torch.ops.aten.addmm] > 0  # the projections are still there


def test_meta_tensors_count_the_same_flops_as_real_ones():
    # counting FLOPs on meta tensors is how large models are sized without memory
    problem = PROBLEMS["2d-causal-dilation"]
    runs = {}
    for device in ("cpu", "meta"):
        q, k, v = _inputs(problem, device=device)
        runs[device] = _counted(lambda: na_rtc.na2d(q, k, v, (3, 4), 1, (2, 1), (True, False)).sum().backward())
    assert runs["meta"] == runs["cpu"] and runs["cpu"][OPS.fused_fwd] > 0


def test_flops_are_counted_when_the_first_op_runs_inside_the_counter():
    # FlopCounterMode copies torch's formula registry when constructed, and na_rtc's torch wiring is
    # imported at the first op: a fresh process whose first call is inside the counter must count too
    script = textwrap.dedent("""
        import sys, torch, na_rtc
        from torch.utils.flop_counter import FlopCounterMode
        assert "na_rtc._torch" not in sys.modules
        q = torch.randn(1, 16, 2, 8)
        with FlopCounterMode(display=False) as counter:
            na_rtc.na1d(q, q, q, 5)
        print(counter.get_total_flops())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == 4 * 8 * 1 * 2 * 16 * 5


def test_a_counter_made_after_the_layers_exist_counts_them_when_entered_later():
    """A model built first, a counter made before any op, a warm-up step outside it, then a counted step (how
    training scripts wrap one): the layers' import registered the formulas before the counter was made."""
    script = textwrap.dedent("""
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        from na_rtc import NeighborhoodAttention1D
        layer = NeighborhoodAttention1D(16, 2, 5)
        counter = FlopCounterMode(display=False)
        x = torch.randn(1, 16, 16)
        layer(x)  # the warm-up step, outside the counter
        with counter:
            layer(x)
        print(sum(n for op, n in counter.get_flop_counts()["Global"].items() if "na_rtc" in str(op)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == 4 * 8 * 1 * 2 * 16 * 5


def test_importing_na_rtc_does_not_import_torch_for_the_flop_formulas():
    script = "import sys, na_rtc, na_rtc.flops, na_rtc.bench.flops; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_counts_grow_with_the_neighborhood_not_the_kernel_footprint():
    # causal windows near the start hold fewer keys than kernel_size: tokens * prod(kernel) would overcount
    problem = ((9,), (5,), (1,), (1,), (True,))
    q, k, v = _inputs(problem)
    counted = _counted(lambda: na_rtc.na1d(q, k, v, 5, is_causal=True))[OPS.fused_fwd]
    assert counted == 4 * HEAD_DIM * BATCH * HEADS * (1 + 2 + 3 + 4 + 5 * 5)
    assert counted < math.prod((4, HEAD_DIM, BATCH, HEADS, 9, 5))
