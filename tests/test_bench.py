"""``python -m na_rtc bench``: FLOP counts, the harness end to end on the CPU, reports, errors.

The end-to-end runs use tiny problems and few repeats: they check that the
harness measures, cross-checks, writes and reports, not how fast anything is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from na_rtc import _args
from na_rtc.bench import cli, flops, peers, plot, report, runner, timing
from na_rtc.bench.presets import PRESETS, spec
from na_rtc.window import Axis, is_neighbor
from oracle import oracle_neighbor_mask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--repeat", "2", "--warmup", "0", "--min-time", "0"]


# ---------------------------------------------------------------- FLOP counting, against counts done by hand


def test_non_causal_windows_hold_k_keys():
    # 1D, L=5, k=3: the window shifts inward at the borders, so every query has 3 neighbors: 15 pairs
    problem = spec(5, 3, batch=2, heads=3, head_dim=4, dtype="fp32")
    assert flops.neighbor_pairs(problem) == 15
    assert flops.forward_flops(problem) == 4 * 4 * 2 * 3 * 15  # 4 * head_dim * batch * heads * pairs = 1440
    assert flops.forward_backward_flops(problem) == 1440 * 3.5


def test_causal_counts_grow_from_one():
    # 1D causal, L=5, k=3: queries 0..4 see 1, 2, 3, 3, 3 keys
    assert flops.neighbor_pairs(spec(5, 3, causal=True, dtype="fp32")) == 12


def test_causal_strided_counts_by_hand():
    # 1D causal, L=6, k=3, stride 2: leader c' = min((i div 2) * 2 + 1, 5), window [max(c' - 2, 0), i + 1)
    #   i=0: c'=1, [0, 1) -> 1     i=1: c'=1, [0, 2) -> 2
    #   i=2: c'=3, [1, 3) -> 2     i=3: c'=3, [1, 4) -> 3
    #   i=4: c'=5, [3, 5) -> 2     i=5: c'=5, [3, 6) -> 3      total 13
    assert flops.neighbor_pairs(spec(6, 3, stride=2, causal=True, dtype="fp32")) == 13


def test_strided_non_causal_and_dilated_causal():
    # stride without causal keeps k neighbors per query: L=7, k=3, s=3 -> 21
    assert flops.neighbor_pairs(spec(7, 3, stride=3, dtype="fp32")) == 21
    # dilation 2 splits L=6 into two groups of 3; causal k=2 in a group: 1, 2, 2 -> 5 per group, 10 in all
    assert flops.neighbor_pairs(spec(6, 2, dilation=2, causal=True, dtype="fp32")) == 10


def test_2d_counts_are_products_of_the_axes():
    # x: L=5, k=3 causal -> 12 (above); y: L=6, k=3, stride 2, causal -> 13 (above); 2D pairs = 12 * 13
    problem = spec((5, 6), 3, stride=(1, 2), causal=True, batch=1, heads=1, head_dim=8, dtype="fp32")
    assert flops.neighbor_pairs(problem) == 156
    assert flops.forward_flops(problem) == 4 * 8 * 156
    assert flops.full_attention_flops(problem) == 4 * 8 * 30 * 30


# 3D: spatial, kernel, stride, dilation, causal; even kernels, per-axis stride, dilation and causal
SMALL_3D = {
    "causal-time-stride-dilation": ((4, 6, 5), (2, 3, 4), (2, 1, 3), (1, 2, 1), (True, False, False)),
    "dilated-two-causal": ((6, 4, 8), (3, 2, 3), (1, 2, 1), (2, 1, 2), (False, True, True)),
    "kernel-is-the-volume": ((3, 4, 5), (3, 4, 5), (1, 1, 1), (1, 1, 1), (False, False, False)),
    "one-box-per-block": ((4, 16, 16), (3, 5, 5), (1, 1, 2), (1, 1, 1), (False, False, False)),
}


def _small_3d(name: str):
    spatial, kernel, stride, dilation, causal = SMALL_3D[name]
    return spec(spatial, kernel, stride=stride, dilation=dilation, causal=causal, batch=2, heads=3, head_dim=4,
                dtype="fp32")


def test_3d_counts_by_hand():
    # x: L=4, k=2 causal -> 1, 2, 2, 2 = 7; y: L=6, k=3 -> 18; z: L=5, k=4, stride 2 -> 20; 3D pairs = 7 * 18 * 20
    problem = spec((4, 6, 5), (2, 3, 4), stride=(1, 1, 2), causal=(True, False, False), dtype="fp32")
    assert flops.neighbor_pairs(problem) == 7 * 18 * 20


@pytest.mark.parametrize("name", SMALL_3D)
def test_3d_flops_are_the_oracles_neighbor_pairs(name):
    problem = _small_3d(name)
    mask, _ = oracle_neighbor_mask(problem.spatial, problem.kernel, problem.stride, problem.dilation, problem.causal)
    pairs = int(mask.sum())
    assert flops.neighbor_pairs(problem) == pairs
    assert flops.forward_flops(problem) == 4 * 4 * 2 * 3 * pairs
    assert flops.forward_backward_flops(problem) == 3.5 * flops.forward_flops(problem)
    assert flops.full_attention_flops(problem) == 4 * 4 * 2 * 3 * problem.tokens**2


def test_tflops():
    assert flops.tflops(2e12, 0.5) == pytest.approx(4.0)
    assert flops.tflops(1e12, 0.0) is None


def test_summary_of_samples():
    stats = timing.summarize([0.005, 0.001, 0.004, 0.002, 0.003])
    assert stats == pytest.approx({"median_ms": 3.0, "min_ms": 1.0, "max_ms": 5.0, "q1_ms": 2.0, "q3_ms": 4.0,
                                   "repeats": 5})


def test_measure_respects_repeat_bounds():
    calls = []
    settings = timing.Settings(warmup=1, repeat=4, min_repeat=2, min_time=10.0)
    measured = timing.measure(lambda: calls.append(1), timing.Clock("cpu"), settings)
    # first call + 1 warm-up + 1 estimate + at most `repeat` timed calls (min_time asks for more)
    assert measured["repeats"] == 4 and len(calls) == 1 + 1 + 1 + 4
    assert measured["first_call_ms"] >= 0 and measured["min_ms"] <= measured["median_ms"] <= measured["max_ms"]


# ---------------------------------------------------------------- presets


def test_presets_hold_the_target_shapes():
    keys = {problem.key for problem in PRESETS["targets"]}
    assert {"2d-56x56-k7x7-b8-h4-D32-fp16", "2d-128x128-k7x7-b2-h8-D32-fp16", "2d-128x128-k13x13-b2-h8-D64-fp16",
            "2d-128x128-k13x13-b2-h8-D64-bf16", "2d-128x128-k13x13-b2-h8-D128-bf16",
            "1d-32768-k2047-b1-h8-D128-bf16"} == keys
    full = [problem.key for problem in PRESETS["full"]]
    assert len(full) == len(set(full)) and keys <= set(full)
    assert "2d-256x256-k13x13-d4x4-b1-h4-D32-fp16" in full


def test_3d_preset_holds_the_video_shapes():
    problems = {problem.key: problem for problem in PRESETS["3d"]}
    assert set(problems) == {
        "3d-16x32x32-k3x7x7-b2-h8-D64-bf16",
        "3d-8x16x16-k7x7x7-d1x2x2-b2-h8-D64-bf16",
        "3d-30x48x80-k18x24x24-b1-h24-D128-bf16",
        "3d-30x48x80-k18x24x24-s16x8x8-b1-h24-D128-bf16",
        "3d-16x32x32-k5x7x7-c1x0x0-b2-h8-D64-bf16",
    }
    assert set(problems) <= {problem.key for problem in PRESETS["full"]}
    for problem in problems.values():  # each a valid na3d problem
        _args._axes(3, problem.spatial, problem.kernel, problem.stride, problem.dilation, problem.causal)
    labels = [problem.label for problem in PRESETS["3d"]]
    assert labels[0] == "3D 16x32x32 k=3x7x7 b2 h8 D64 bf16"
    assert labels[3] == "3D 30x48x80 k=18x24x24 stride=16x8x8 b1 h24 D128 bf16"
    assert labels[4] == "3D 16x32x32 k=5x7x7 causal=1x0x0 b2 h8 D64 bf16"


QUICK_GQA = next(problem for problem in PRESETS["quick"] if problem.heads_kv is not None)
QUICK_EXTRA = next(problem for problem in PRESETS["quick"] if problem.extra_tokens)


def test_keys_without_gqa_are_unchanged():
    """Results files are keyed by Spec.key (``--resume`` matches them): heads_kv appears only where it is set."""
    target = PRESETS["targets"][0]
    assert target.heads_kv is None
    assert target.key == "2d-128x128-k13x13-b2-h8-D64-bf16" and target.label == "2D 128x128 k=13 b2 h8 D64 bf16"
    assert PRESETS["quick"][0].key == "1d-128-k15-b1-h2-D32-fp32"
    # heads_kv equal to heads is the same work, so the same key; a record written before heads_kv loads as before
    assert spec((128, 128), 13, batch=2, heads=8, heads_kv=8, head_dim=64, dtype="bf16").key == target.key
    old_record = {name: value for name, value in target.to_json().items() if name != "heads_kv"}
    assert runner.spec_from_json(old_record) == target


def test_gqa_keys_and_labels_name_the_key_value_heads():
    gqa, mqa = PRESETS["gqa"]
    assert (gqa.key, gqa.label) == ("2d-64x64-k13x13-b2-h16-kv4-D64-bf16", "2D 64x64 k=13 b2 h16/kv4 D64 bf16")
    assert (mqa.key, mqa.heads_kv, mqa.group) == ("2d-64x64-k13x13-b2-h16-kv1-D64-bf16", 1, 16)
    assert gqa.kv_shape == (2, 64, 64, 4, 64) and gqa.qkv_shape == (2, 64, 64, 16, 64)
    assert {gqa.key, mqa.key} <= {problem.key for problem in PRESETS["full"]}
    assert runner.spec_from_json(json.loads(json.dumps(gqa.to_json()))) == gqa
    # FLOPs count every query head: 4 key/value heads do not make the work smaller
    assert flops.forward_flops(gqa) == flops.forward_flops(spec((64, 64), 13, batch=2, heads=16, head_dim=64))


def test_extra_token_keys_and_labels_name_the_tokens():
    """Extra tokens appear in keys and labels only when there are some: every earlier key stays as results
    files (and --resume) hold it, and a record written before extra_tokens loads as before."""
    assert (QUICK_EXTRA.key, QUICK_EXTRA.label) == ("1d-128-k15-b1-h2-x7-D32-fp32", "1D 128 k=15 b1 h2 D32 fp32 +7 tokens")
    assert [problem.key for problem in PRESETS["extra-tokens"]] == [
        "2d-64x64-k13x13-b2-h16-kv4-x256-D64-bf16", "2d-64x64-k13x13-b2-h16-kv4-x512-D64-bf16",
        "1d-65536-k80-s16-b1-h24-x512-D128-bf16"]
    gqa = PRESETS["extra-tokens"][1]
    assert gqa.label == "2D 64x64 k=13 b2 h16/kv4 D64 bf16 +512 tokens" and gqa.extra_shape == (2, 512, 4, 64)
    assert {problem.key for problem in PRESETS["extra-tokens"]} <= {problem.key for problem in PRESETS["full"]}
    assert runner.spec_from_json(json.loads(json.dumps(gqa.to_json()))) == gqa
    target = PRESETS["targets"][0]
    assert spec((128, 128), 13, batch=2, heads=8, head_dim=64, dtype="bf16", extra_tokens=0).key == target.key
    old_record = {name: value for name, value in target.to_json().items() if name != "extra_tokens"}
    assert runner.spec_from_json(old_record) == target
    # every query attends the tokens too: 15 neighbors and 7 tokens, 128 queries, 2 heads, head dim 32
    assert flops.forward_flops(QUICK_EXTRA) == 4 * 32 * 2 * 128 * (15 + 7)


def test_extra_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="extra_tokens=-1 must be 0"):
        spec(16, 3, extra_tokens=-1)


@pytest.mark.parametrize("heads_kv", [3, 0, 8])
def test_heads_kv_must_divide_heads(heads_kv):
    with pytest.raises(ValueError, match=f"heads_kv={heads_kv} must divide heads=4"):
        spec(16, 3, heads=4, heads_kv=heads_kv)


def test_portable_preset_holds_the_portable_shapes():
    """fp32, batch 1, 4 heads, head dim 32 (the NAT-tiny stage at batch 8), each a valid NA problem."""
    problems = PRESETS["portable"]
    assert [problem.key for problem in problems] == [
        "2d-128x128-k13x13-b1-h4-D32-fp32",
        "1d-4096-k127-b1-h4-D32-fp32",
        "2d-64x64-k7x7-d2x2-b1-h4-D32-fp32",
        "3d-16x32x32-k3x7x7-b1-h4-D32-fp32",
        "2d-56x56-k7x7-b8-h4-D32-fp32",
    ]
    for problem in problems:
        _args._axes(problem.ndim, problem.spatial, problem.kernel, problem.stride, problem.dilation, problem.causal)
    assert {problem.key for problem in problems} <= {problem.key for problem in PRESETS["full"]}
    assert "portable" in cli._list() and problems[-1].note == "NAT-tiny stage 1"


def test_portable_preset_runs_on_a_cpu_with_full_attention_for_the_nat_stage():
    """Every problem is within the CPU run's size limit for the NA entries; SDPA (full attention) runs on the
    NAT-tiny stage's 3136 tokens and is left out, with the reason, where 16384 tokens would take minutes."""
    cpu = runner.Machine("cpu", "emulator")
    table = {entry.name: entry for entry in runner.all_entries()}

    def limit(name, problem):
        return runner._size_limit(table[name], problem, cpu, flops.forward_flops(problem))

    *others, nat = PRESETS["portable"]
    assert nat.tokens == 3136 and nat.batch == 8
    for problem in PRESETS["portable"]:
        for name in ("blocked", "reference", "naive_torch"):
            assert limit(name, problem) is None, (name, problem.key)
    assert limit("sdpa", nat) is None
    for problem in others:
        if problem.tokens == 16384:
            assert "full attention over 16384 tokens is too large for a CPU run" in limit("sdpa", problem)
        else:
            assert limit("sdpa", problem) is None
    big = PRESETS["portable"][0]  # a GPU runs full attention at every size
    assert runner._size_limit(table["sdpa"], big, runner.Machine("cuda:0", "cuda"), flops.forward_flops(big)) is None


def test_quick_preset_runs_every_rank():
    assert {problem.ndim for problem in PRESETS["quick"]} == {1, 2, 3}


def test_quick_preset_fits_the_emulator_limit():
    assert all(flops.forward_flops(problem) <= runner.EMULATOR_FLOP_LIMIT for problem in PRESETS["quick"])


# ---------------------------------------------------------------- FlexAttention's mask is the NA definition


def _dense_neighbors(problem) -> np.ndarray:
    """Brute force over every (query, key) pair with the per-axis neighbor test of docs/design/definition.md."""
    coords = np.indices(problem.spatial).reshape(problem.ndim, -1)
    mask = np.ones((problem.tokens, problem.tokens), dtype=bool)
    for axis_coords, length, k, s, d, c in zip(coords, problem.spatial, problem.kernel, problem.stride,
                                               problem.dilation, problem.causal):
        axis = Axis(length, k, s, d, c)
        mask &= is_neighbor(axis, axis_coords[:, None], axis_coords[None, :])
    return mask


@pytest.mark.parametrize("problem", [
    spec((9, 12), (3, 5), dilation=(1, 2), stride=(2, 1), causal=(True, False), dtype="fp32"),
    spec((16, 8), 3, dilation=2, dtype="fp32"),
    spec(40, 7, dilation=3, stride=2, dtype="fp32"),
    *(_small_3d(name) for name in SMALL_3D),
], ids=lambda p: p.key)
@pytest.mark.parametrize("tiled", [False, True], ids=["natural", "tiled"])
def test_flex_mask_mod_is_the_neighborhood(problem, tiled):
    order = peers.tiled_order(problem, peers.tile_shape(problem)) if tiled else None
    if tiled:
        assert sorted(order) == list(range(problem.tokens))  # a permutation of the tokens
    mask_mod = peers.na_mask_mod(problem, "cpu", order)
    positions = torch.arange(problem.tokens)
    got = mask_mod(0, 0, positions[:, None], positions[None, :]).numpy()
    expected = _dense_neighbors(problem)
    if tiled:  # position p of the tiled order holds natural token order[p]
        expected = expected[np.ix_(order, order)]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", SMALL_3D)
def test_3d_neighborhoods_of_the_window_module_are_the_oracles(name):
    """The mask test's expectation, na_rtc.window's per-axis test, is the brute-force definition in 3D too."""
    problem = _small_3d(name)
    mask, _ = oracle_neighbor_mask(problem.spatial, problem.kernel, problem.stride, problem.dilation, problem.causal)
    np.testing.assert_array_equal(_dense_neighbors(problem), mask)


def test_3d_tiled_order_puts_one_box_in_a_block():
    problem = spec((4, 16, 16), 3, dtype="fp32")
    order = peers.tiled_order(problem, (2, 8, 8))
    x, y, z = np.unravel_index(np.asarray(order[:128]), problem.spatial)  # the first block: one 2x8x8 box
    assert set(x) == {0, 1} and set(y) == set(range(8)) and set(z) == set(range(8))
    x, y, z = np.unravel_index(np.asarray(order[128:256]), problem.spatial)  # the next box along the last axis
    assert set(x) == {0, 1} and set(y) == set(range(8)) and set(z) == set(range(8, 16))


@pytest.mark.parametrize("problem", [
    _small_3d("one-box-per-block"),
    spec((4, 16, 16), (2, 5, 4), dilation=(1, 2, 1), stride=(2, 1, 3), causal=(True, False, True), dtype="fp32"),
    spec((32, 32), (5, 4), dilation=(1, 2), causal=(False, True), dtype="fp32"),
], ids=lambda p: p.key)
def test_tile_has_the_fewest_nonempty_blocks_flex_builds(problem):
    """The tile is chosen by counting FlexAttention's non-empty blocks per axis; the count is the block mask's."""
    from torch.nn.attention import flex_attention as flex

    tile = peers.tile_shape(problem)
    candidates = [t for t in peers.fitting_tiles(problem) if np.prod(t) == peers.FLEX_BLOCK]
    assert len(candidates) > 1 and tile in candidates
    assert all(peers.nonempty_blocks(problem, tile) <= peers.nonempty_blocks(problem, t) for t in candidates)
    mask = flex.create_block_mask(peers.na_mask_mod(problem, "cpu", peers.tiled_order(problem, tile)), None, None,
                                  problem.tokens, problem.tokens, device="cpu", BLOCK_SIZE=peers.FLEX_BLOCK,
                                  _compile=False)
    built = int(mask.kv_num_blocks.sum()) + int(mask.full_kv_num_blocks.sum())
    assert peers.nonempty_blocks(problem, tile) == built


def test_tiled_order_groups_a_dilation_group():
    problem = spec((8, 8), 3, dilation=2, dtype="fp32")
    order = peers.tiled_order(problem, (4, 4))
    first = np.array(order[:16])  # the first 16 positions: group (0, 0), one whole 4x4 tile
    assert set((first // 8) % 2) == {0} and set((first % 8) % 2) == {0}


# ---------------------------------------------------------------- the harness end to end, on the CPU

# 2D 10x10, k=3, dilation 2 and causal on the first axis, batch 1, 1 head, head_dim 8:
#   x: two dilation groups of 5, causal k=3 -> 1, 2, 3, 3, 3 = 12 per group, 24; y: 10 queries x 3 = 30
HARNESS_PROBLEM = ["--shape", "10x10", "--kernel", "3", "--dilation", "2,1", "--causal", "1,0", "--dtype", "fp32",
                   "--heads", "1", "--head-dim", "8", "--batch", "1"]
HARNESS_FLOPS = 4 * 8 * 24 * 30
HARNESS_ENTRIES = ("reference", "blocked", "fused", "naive_kernels", "naive_torch", "sdpa")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One CPU run of the harness: (exit status, results, JSON path, printed output)."""
    folder = tmp_path_factory.mktemp("bench")
    path = folder / "results.json"
    threads = torch.get_num_threads()
    capture = _Capture()
    with capture:
        status = cli.main([*HARNESS_PROBLEM, *FAST, "--entries", ",".join(HARNESS_ENTRIES), "--out", str(path),
                           "--plot"])
    assert torch.get_num_threads() == threads, "the harness must give torch its thread count back"
    return status, json.loads(path.read_text()), path, capture.text


class _Capture:
    """stdout of an in-process CLI run (capsys is function-scoped; the harness runs once per module)."""

    def __enter__(self):
        import io

        self._stdout, sys.stdout = sys.stdout, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.text = sys.stdout.getvalue()
        sys.stdout = self._stdout
        return False


def test_harness_writes_valid_json(harness):
    status, results, path, _ = harness
    assert status == 0
    assert results["schema"] == runner.SCHEMA and results["complete"] and results["remaining"] == []
    env = results["environment"]
    for key in ("device", "driver", "cuda", "torch", "cupy", "nvrtc", "commit", "na_rtc", "command", "utc"):
        assert env.get(key), f"environment lacks {key}"
    assert env["device_type"] == "cpu"
    assert any("GPU figures need a GPU" in note for note in results["notes"])
    [problem] = results["problems"]
    assert problem["key"] == "2d-10x10-k3x3-d2x1-c1x0-b1-h1-D8-fp32"
    assert problem["flops_forward"] == HARNESS_FLOPS


def test_every_entry_measured_and_agrees(harness):
    _, results, _, _ = harness
    entries = results["problems"][0]["entries"]
    for name in HARNESS_ENTRIES:
        entry = entries[name]
        assert entry["status"] == "ok", (name, entry)
        for mode, factor in (("forward", 1.0), ("forward_backward", 3.5)):
            measured = entry[mode]
            assert measured["repeats"] == 2
            assert 0 < measured["min_ms"] <= measured["median_ms"] <= measured["max_ms"]
            assert measured["tflops"] == pytest.approx(HARNESS_FLOPS * factor / (measured["median_ms"] / 1e3) / 1e12)
            if "VmHWM" in results["settings"]["memory"]:
                assert measured["peak_extra_mb"] >= 0
        if name == "sdpa":  # full attention is a different function: never compared
            assert "output_check" not in entry
        else:
            assert entry["output_check"]["agrees"], (name, entry["output_check"])
    assert entries["fused"]["label"] == "na_rtc fused (emulator)"
    assert entries["fused"]["notes"]["forward_kernels"].startswith("na_fused_fwd<float")


def test_cpu_run_reports_gpu_only_entries(harness):
    _, results, _, _ = harness
    entries = results["problems"][0]["entries"]
    for name in ("flex_natural", "flex_tiled"):
        assert entries[name]["status"] == "skipped"
        assert "GPU" in entries[name]["reason"]
    assert "not measured" in results["compile"]["skipped"]


def test_gpu_only_entries_are_one_line_of_the_report_not_a_row_each(harness):
    """On a CPU the GPU comparisons (kernel variants, FlexAttention) are named once per problem, on one line."""
    _, results, path, printed = harness
    gpu_only = [name for name, entry in results["problems"][0]["entries"].items() if entry.get("gpu_only")]
    assert {"fused_simt", "fused_wgmma", "flex_natural", "flex_tiled"} <= set(gpu_only)
    text = path.with_suffix(".md").read_text()
    assert "skipped:" not in text and "is a GPU comparison" not in text
    [line] = [line for line in text.splitlines() if "GPU comparisons" in line]
    assert all(name in line for name in gpu_only) and line.startswith(f"Not run on a CPU-only machine: {len(gpu_only)}")


def test_markdown_and_readme_table(harness, capsys):
    _, results, path, printed = harness
    text = path.with_suffix(".md").read_text()
    assert text == report.markdown(results)
    assert text in printed
    assert "| entry | fwd ms [min-max] |" in text and "GPU figures need a GPU" in text
    for name in HARNESS_ENTRIES:
        assert results["problems"][0]["entries"][name]["label"] in text
    assert cli.main(["--readme-table", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| 2D 10x10 k=3 dil=2x1 causal=1x0 b1 h1 D8 fp32 |" in table
    assert "CPU only" in table and "emulator" in table
    assert cli.main(["--from-json", str(path)]) == 0
    assert capsys.readouterr().out == text


def test_png_chart(harness, tmp_path):
    _, results, path, _ = harness
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    again = plot.draw(results, tmp_path / "again.png")
    assert again.read_bytes()[:8] == PNG_SIGNATURE


def test_missing_matplotlib_is_reported(harness, monkeypatch, tmp_path, capsys):
    _, results, _, _ = harness
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plot.PlotUnavailable, match="matplotlib is not installed"):
        plot.draw(results, tmp_path / "no.png")
    cli._plot(results, str(tmp_path / "no.png"), None)
    assert "chart: not drawn" in capsys.readouterr().out
    assert not (tmp_path / "no.png").exists()


def test_missing_flex_attention_is_reported_not_a_crash(monkeypatch, tmp_path, capsys):
    import torch.nn.attention

    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    monkeypatch.delattr(torch.nn.attention, "flex_attention", raising=False)
    path = tmp_path / "noflex.json"
    status = cli.main(["--shape", "16", "--kernel", "5", "--dtype", "fp32", "--heads", "1", "--head-dim", "8", *FAST,
                       "--entries", "flex_natural,flex_tiled,naive_torch", "--out", str(path)])
    assert status == 0
    entries = json.loads(path.read_text())["problems"][0]["entries"]
    for name in ("flex_natural", "flex_tiled"):
        assert entries[name]["status"] == "unavailable"
        assert "FlexAttention is not available" in entries[name]["reason"]
    assert entries["naive_torch"]["status"] == "ok"
    assert "unavailable: FlexAttention is not available" in capsys.readouterr().out


def test_split_ops_have_no_stride():
    problem = spec((8, 8), 3, stride=2, dtype="fp32", heads=1, head_dim=8)
    machine = runner.Machine("cpu", "emulator")
    selection = runner.select_entries(["split"], machine)
    record = runner.run_problem(problem, selection, machine, timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
    entry = record["entries"]["split"]
    assert entry["status"] == "unavailable" and "no stride" in entry["reason"]


# 3D 4x6x6, k=(2,3,3), causal in time, dilation 2 on the last axis: small enough for every CPU entry
TINY_3D = spec((4, 6, 6), (2, 3, 3), dilation=(1, 1, 2), causal=(True, False, False), batch=1, heads=1, head_dim=8,
               dtype="fp32")


def test_3d_runs_on_the_backend_that_serves_it(monkeypatch):
    """The fused and split entries call na3d and its split ops where they run (the reference backend where the
    kernels lack 3D, as a backend serving fewer ranks would), agree with the naive torch gather, and say so;
    entries that launch kernels directly say why they cannot."""
    from na_rtc import backends

    monkeypatch.setattr(backends.get("emulator"), "ranks", frozenset({1, 2}))
    machine = runner.Machine("cpu", "emulator")
    names = ["fused", "split", "naive_kernels", "reference", "host_overhead", "naive_torch"]
    settings = timing.Settings(0, 2, 2, 0.0)
    record = runner.run_problem(TINY_3D, runner.select_entries(names, machine), machine, settings, log=lambda _: None)
    entries = record["entries"]
    assert record["neighbor_pairs"] == 7 * 18 * 18  # x: causal k=2 over 4 -> 1+2+2+2; y, z: 6 queries x 3 keys
    for name in ("fused", "split", "naive_torch"):
        assert entries[name]["status"] == "ok", entries[name]
        assert entries[name]["output_check"]["agrees"], entries[name]["output_check"]
    for name in ("fused", "split"):
        assert entries[name]["label"].endswith("(reference)")
        assert entries[name]["notes"]["because"].startswith("the emulator backend's kernels serve 1D/2D only")
    for name, measured_by in (("naive_kernels", "fused and split entries"), ("reference", "fused entry"),
                              ("host_overhead", "no launch plans")):
        assert entries[name]["status"] == "unavailable"
        assert "serve 1D/2D only" in entries[name]["reason"] and measured_by in entries[name]["reason"]
    results = runner.new_results(None, [TINY_3D], names, machine, settings)
    results["problems"].append(record)
    label = "3D 4x6x6 k=2x3x3 dil=1x1x2 causal=1x0x0 b1 h1 D8 fp32"
    text = report.markdown(results)
    assert f"#### {label}" in text and "| na_rtc fused (reference) | " in text
    assert f"| {label} (na_rtc on the reference backend) | " in report.readme_table(results)
    emulated = {"label": "na_rtc fused (emulator)", "status": "ok", "notes": {"backend": "emulator"}}
    problems = [{"entries": {"fused": emulated}}, record]  # a 2D problem on the kernels, then the 3D one
    assert plot._label(problems, "fused") == "na_rtc fused (emulator / reference)"  # the chart's legend
    assert plot._label(problems[1:], "split") == "na_rtc split (qk, softmax, av) (reference)"


def _natten_stand_in(version: str, calls: list, ndim: int = 3):
    """A module with NATTEN's fused op as ``version`` spells it (0.20+: ``natten.na3d`` with a stride; 0.17:
    ``natten.functional.na3d`` without), computing na_rtc's and recording the keyword arguments."""
    import types

    import na_rtc

    def fused(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None):
        calls.append({"kernel_size": kernel_size, "stride": stride, "dilation": dilation, "is_causal": is_causal})
        return getattr(na_rtc, f"na{ndim}d")(query, key, value, kernel_size, stride, dilation, is_causal, scale)

    ops = {f"na{ndim}d": fused}
    if version.startswith("0.17"):
        return types.SimpleNamespace(__version__=version, functional=types.SimpleNamespace(**ops))
    return types.SimpleNamespace(__version__=version, **ops)


@pytest.mark.parametrize("version", ["0.21.0", "0.17.5"])
def test_natten_entry_runs_3d_with_the_window_of_each_axis(monkeypatch, version):
    calls = []
    monkeypatch.setitem(sys.modules, "natten", _natten_stand_in(version, calls))
    machine = runner.Machine("cpu", "emulator")
    record = runner.run_problem(TINY_3D, runner.select_entries(["naive_torch", "natten"], machine), machine,
                                timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
    entry = record["entries"]["natten"]
    assert entry["status"] == "ok" and entry["output_check"]["agrees"] and entry["notes"] == {"natten": version}
    window = {"kernel_size": (2, 3, 3), "dilation": (1, 1, 2), "is_causal": (True, False, False)}
    assert calls[0] == {**window, "stride": (1, 1, 1) if version == "0.21.0" else 1}


def test_natten_entry_gives_1d_windows_as_ints(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "natten", _natten_stand_in("0.21.0", calls, ndim=1))
    machine = runner.Machine("cpu", "emulator")
    problem = spec(24, 5, dilation=2, causal=True, heads=1, head_dim=8, dtype="fp32")
    record = runner.run_problem(problem, runner.select_entries(["naive_torch", "natten"], machine), machine,
                                timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
    assert record["entries"]["natten"]["output_check"]["agrees"]
    assert calls[0] == {"kernel_size": 5, "stride": 1, "dilation": 2, "is_causal": True}


def test_natten_entry_says_why_it_cannot_run(monkeypatch):
    machine = runner.Machine("cpu", "emulator")
    strided = spec((4, 6, 6), 3, stride=(1, 2, 2), heads=1, head_dim=8, dtype="fp32")
    selection = runner.select_entries(["natten"], machine)

    def reason(problem):
        record = runner.run_problem(problem, selection, machine, timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
        assert record["entries"]["natten"]["status"] == "unavailable"
        return record["entries"]["natten"]["reason"]

    monkeypatch.setitem(sys.modules, "natten", None)  # import natten -> ImportError
    assert reason(TINY_3D).startswith("NATTEN is not importable here (ModuleNotFoundError")
    monkeypatch.setitem(sys.modules, "natten", _natten_stand_in("0.17.5", []))
    assert reason(strided) == "NATTEN 0.17.5 takes no stride (0.20 and later do)"


def _natten_without_gqa(version: str):
    """NATTEN's 2D op as a release without GQA has it: key/value must have the query's heads."""
    import types

    def fused(query, key, value, kernel_size, **kwargs):
        raise ValueError("query, key and value must have the same shape")

    return types.SimpleNamespace(__version__=version, na2d=fused)


def _natten_row(monkeypatch, problem, stand_in, names):
    """The natten entry's record of ``problem`` with ``stand_in`` importable as natten, beside ``names``."""
    machine = runner.Machine("cpu", "emulator")
    monkeypatch.setitem(sys.modules, "natten", stand_in)
    record = runner.run_problem(problem, runner.select_entries(names, machine), machine,
                                timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
    return record["entries"]["natten"]


def test_natten_entry_runs_gqa_where_natten_takes_it(monkeypatch):
    def natten_row(stand_in, names):
        return _natten_row(monkeypatch, QUICK_GQA, stand_in, names)

    row = natten_row(_natten_stand_in("0.21.0", [], ndim=2), ["naive_torch", "natten"])
    assert row["status"] == "ok" and row["output_check"]["agrees"], row
    row = natten_row(_natten_without_gqa("0.20.0"), ["natten"])
    assert row["status"] == "unavailable"
    assert row["reason"] == ("NATTEN 0.20.0 does not take key/value with fewer heads than the query (GQA/MQA, "
                             "heads_kv=2 of heads=4): ValueError: query, key and value must have the same shape")


def test_3d_moves_to_the_kernels_when_they_serve_it(monkeypatch):
    from na_rtc import backends
    from na_rtc.bench.entries import entry_backend

    table = {entry.name: entry for entry in runner.all_entries()}
    with monkeypatch.context() as without_3d:
        without_3d.setattr(backends.get("emulator"), "ranks", frozenset({1, 2}))
        assert entry_backend(table["fused"], TINY_3D, "emulator") == "reference"
    assert 3 in backends.get("emulator").ranks  # the split kernels serve 3D
    for name in ("fused", "split", "naive_kernels"):
        assert entry_backend(table[name], TINY_3D, "emulator") == "emulator"
    assert entry_backend(table["reference"], TINY_3D, "emulator") == "reference"
    assert entry_backend(table["blocked"], TINY_3D, "emulator") == "blocked"
    assert entry_backend(table["naive_torch"], TINY_3D, "emulator") is None


def test_the_reference_is_not_asked_for_video_sizes_on_a_gpu(monkeypatch):
    from na_rtc import backends

    video = next(p for p in PRESETS["3d"] if p.spatial == (30, 48, 80))
    small = PRESETS["3d"][0]
    gpu = runner.Machine("cuda:0", "cuda")
    table = {entry.name: entry for entry in runner.all_entries()}

    def limit(name, problem):
        return runner._size_limit(table[name], problem, gpu, flops.forward_flops(problem))

    assert limit("fused", video) is None  # the kernels serve 3D: a GPU runs every size
    monkeypatch.setattr(backends.get("cuda"), "ranks", frozenset({1, 2}))  # a backend without 3D kernels
    assert "too large for the reference backend" in limit("fused", video)
    assert limit("fused", small) is None and limit("flex_tiled", video) is None


def test_naive_torch_says_out_of_memory_before_building_a_video_problems_tables(monkeypatch):
    """The gather of a 30x48x80 problem with an 18x24x24 window would take TBs: the entry says so at once
    instead of building index tables of tens of GB first."""
    from na_rtc.bench.entries import Inputs

    video = next(p for p in PRESETS["3d"] if p.spatial == (30, 48, 80))
    import na_rtc.window

    monkeypatch.setattr(na_rtc.window, "flat_slot_table", lambda axes: pytest.fail("built the index tables"))
    with pytest.raises(MemoryError) as error:
        peers._prepare_naive_torch(video, Inputs(None, None, None, None, "cpu", "emulator"))
    failure = runner._failure(error.value)
    assert failure["status"] == "oom"
    assert failure["reason"].startswith("out of memory: MemoryError: the gathered keys alone would take 6834 GiB")


def test_gqa_runs_through_every_cpu_entry():
    """The quick preset's GQA problem: key/value with 2 heads for 4 query heads through each entry a CPU runs by
    default; every output agrees with the first entry's (the naive torch gather repeats K/V per group, an
    independent account of which query head reads which key/value head)."""
    machine = runner.Machine("cpu", "emulator")
    selection = runner.select_entries(None, machine)
    names = [entry.name for entry in selection.run]
    assert {"fused", "split", "naive_kernels", "reference", "naive_torch", "sdpa"} <= set(names)
    record = runner.run_problem(QUICK_GQA, selection, machine, timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
    assert (record["heads"], record["heads_kv"]) == (4, 2)
    for name in names:
        entry = record["entries"][name]
        assert entry["status"] == "ok", (name, entry)
        if name not in ("sdpa", "host_overhead"):  # full attention, and nothing computed: never compared
            assert entry["output_check"]["agrees"], (name, entry["output_check"])


def test_extra_tokens_run_through_every_cpu_entry():
    """The quick preset's extra-token problem through each entry a CPU runs by default: the fused and reference
    entries (the fused op with additional_keys/additional_values) agree with the naive torch gather (one softmax
    over its gathered logits and a dense matmul's, an independent account); the entries that cannot take the
    tokens say why."""
    machine = runner.Machine("cpu", "emulator")
    selection = runner.select_entries(None, machine)
    record = runner.run_problem(QUICK_EXTRA, selection, machine, timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
    assert record["extra_tokens"] == 7
    entries = record["entries"]
    for name in ("fused", "reference", "naive_torch", "sdpa"):
        assert entries[name]["status"] == "ok", (name, entries[name])
    for name in ("reference", "naive_torch"):
        assert entries[name]["output_check"]["agrees"], (name, entries[name]["output_check"])
    assert entries["fused"]["notes"]["extra_tokens"].startswith("7: forward kernels that stream them")
    assert "and the 7 extra tokens" in entries["sdpa"]["notes"]["attends_to"]
    for name, why in (("split", "the split ops (na*_qk, na*_av) take no extra tokens"),
                      ("naive_kernels", "compose the split ops (qk, softmax, av), which take no extra tokens")):
        assert entries[name]["status"] == "unavailable", (name, entries[name])
        assert why in entries[name]["reason"] and "the fused entry measures the 7 extra tokens" in entries[name]["reason"]
    ran = [entry.name for entry in selection.run]
    assert {name for name in ran if entries[name]["status"] == "ok"} | {"split", "naive_kernels"} == set(ran)


def test_extra_token_gradients_agree_with_the_naive_gather():
    """The fused entry's backward differentiates the extra keys and values too, as the naive gather's does."""
    from na_rtc.bench.entries import _prepare_fused, make_inputs

    inputs = make_inputs(QUICK_EXTRA, "cpu", "emulator")
    assert inputs.extra_k.shape == inputs.extra_v.shape == (1, 7, 2, 32) and inputs.extra_k.requires_grad
    fused = _prepare_fused(QUICK_EXTRA, inputs).forward_backward()
    naive = peers._prepare_naive_torch(QUICK_EXTRA, inputs).forward_backward()
    assert len(fused) == len(naive) == 5
    for got, expected in zip(fused, naive):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# 2D with GQA and extra tokens, where the tiled order is not the natural one (16x8 tiles)
FLEX_EXTRA = spec((16, 16), 5, batch=1, heads=2, heads_kv=1, head_dim=16, dtype="fp32", extra_tokens=5)


@pytest.mark.parametrize("problem", [QUICK_EXTRA, FLEX_EXTRA], ids=lambda p: p.key)
@pytest.mark.parametrize("tiled", [False, True], ids=["natural", "tiled"])
def test_flex_mask_mod_lets_every_query_see_the_extra_tokens(problem, tiled):
    order = peers.tiled_order(problem, peers.tile_shape(problem)) if tiled else None
    mask_mod = peers.na_mask_mod(problem, "cpu", order)
    got = mask_mod(0, 0, torch.arange(problem.tokens)[:, None],
                   torch.arange(problem.tokens + problem.extra_tokens)[None, :]).numpy()
    neighbors = _dense_neighbors(problem)
    if tiled:
        neighbors = neighbors[np.ix_(order, order)]
    np.testing.assert_array_equal(got[:, :problem.tokens], neighbors)
    assert got[:, problem.tokens:].all()  # the extra tokens stay at the end, in either order


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("tiled", [False, True], ids=["natural", "tiled"])
def test_flex_with_extra_tokens_agrees_with_the_naive_gather_on_cpu(monkeypatch, tiled):
    """FlexAttention's forward with the extra tokens appended to K/V and the mask letting every query see them
    agrees with the naive gather. Run eagerly: compiling C++ on the CPU takes seconds per entry and changes
    none of what the entry builds (token order, K/V with the tokens, mask, block mask over tokens + extra)."""
    from torch.nn.attention import flex_attention as module

    from na_rtc.bench.entries import make_inputs

    monkeypatch.setattr(peers, "_compiled_flex", lambda flex: module.flex_attention)
    inputs = make_inputs(FLEX_EXTRA, "cpu", "emulator")
    flex = peers._prepare_flex(FLEX_EXTRA, inputs, tiled=tiled)
    assert flex.notes["extra_tokens"].startswith("5, after the spatial tokens")
    got = flex.natural_output(flex.forward())
    expected = peers._prepare_naive_torch(FLEX_EXTRA, inputs).forward()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _natten_with_extra_tokens(version: str):
    """NATTEN's 1D op as a release with extra tokens spells it (0.17: ``natten.functional``), computing na_rtc's."""
    import types

    import na_rtc

    def fused(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
              additional_keys=None, additional_values=None):
        return na_rtc.na1d(query, key, value, kernel_size, dilation=dilation, is_causal=is_causal, scale=scale,
                           additional_keys=additional_keys, additional_values=additional_values)

    return types.SimpleNamespace(__version__=version, functional=types.SimpleNamespace(na1d=fused))


def test_natten_entry_runs_extra_tokens_where_its_op_takes_them(monkeypatch):
    def natten_row(stand_in, names):
        return _natten_row(monkeypatch, QUICK_EXTRA, stand_in, names)

    row = natten_row(_natten_with_extra_tokens("0.17.5"), ["naive_torch", "natten"])
    assert row["status"] == "ok" and row["output_check"]["agrees"], row
    row = natten_row(_natten_stand_in("0.21.0", [], ndim=1), ["natten"])
    assert row == {"label": "NATTEN fused", "status": "unavailable",
                   "reason": "NATTEN 0.21.0's na1d takes no additional_keys/additional_values (the 7 extra tokens)"}


def test_explain_prints_gqa_problems():
    text = cli.explain_plan([QUICK_GQA])
    assert text.startswith("== 2D 12x12 k=5 b1 h4/kv2 D16 fp32")


def test_explain_prints_3d_problems(capsys):
    assert cli.main(["--shape", "4x6x6", "--kernel", "2x3x3", "--causal", "1,0,0", "--dtype", "bf16",
                     "--explain"]) == 0
    out = capsys.readouterr().out
    assert "== 3D 4x6x6 k=2x3x3 causal=1x0x0 b1 h4 D32 bf16" in out
    assert "na_rtc.na3d: bfloat16" in out and "na_rtc.na3d_qk" in out and "na_rtc.na3d_av" in out
    assert "axes 4 (kernel 2, causal), 6 (kernel 3), 6 (kernel 3)" in out


def test_emulator_entries_are_not_asked_for_gpu_sizes():
    problem = PRESETS["targets"][2]
    machine = runner.Machine("cpu", "emulator")
    selection = runner.select_entries(["fused", "naive_torch"], machine)
    record = runner.run_problem(problem, selection, machine, timing.Settings(0, 2, 2, 0.0), log=lambda _: None)
    for name in ("fused", "naive_torch"):
        assert record["entries"][name]["status"] == "skipped"
        assert "GPU figures need a GPU" in record["entries"][name]["reason"]


def test_slices_resume_where_they_stopped(tmp_path):
    path = tmp_path / "slices.json"
    # a tiny budget: every slice measures one problem (the first always runs), then stops with status 3
    statuses = [cli.main(["--preset", "quick", "--entries", "naive_torch", *FAST, "--budget", "1e-6",
                          "--out", str(path)])]
    while statuses[-1] == cli.INCOMPLETE and len(statuses) < 10:
        statuses.append(cli.main(["--resume", str(path), *FAST, "--budget", "1e-6"]))
    results = json.loads(path.read_text())
    quick = [problem.key for problem in PRESETS["quick"]]
    assert statuses == [cli.INCOMPLETE] * (len(quick) - 1) + [0]
    assert [problem["key"] for problem in results["problems"]] == quick
    assert [s["problems"] for s in results["slices"]] == [[key] for key in quick]
    assert results["complete"] and results["settings"]["entries"] == ["naive_torch"]


def test_resume_refuses_another_machine(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"environment": {"device": "NVIDIA H100 80GB HBM3"}, "problems": [], "plan": [],
                                "settings": {}}))
    assert cli.main(["--resume", str(path), "--preset", "quick"]) == 2
    assert "was measured on NVIDIA H100" in capsys.readouterr().err


def test_profile_prints_the_kernel_table(capsys):
    status = cli.main(["--profile", "--shape", "16", "--kernel", "5", "--dtype", "fp32", "--heads", "1",
                       "--head-dim", "8", "--entries", "naive_torch"])
    assert status == 0
    out = capsys.readouterr().out
    assert "profile of 1D 16 k=5" in out and "bench:naive_torch" in out and "aten::einsum" in out


# ---------------------------------------------------------------- bad command lines


@pytest.mark.parametrize("argv, message", [
    (["--shape", "12x", "--kernel", "3"], "--shape must be an integer or one per axis"),
    (["--shape", "16"], "--shape needs --kernel"),
    (["--kernel", "3"], "a free-form problem needs --shape"),
    (["--shape", "8", "--kernel", "9"], "kernel_size * dilation must not exceed the input size"),
    (["--shape", "16x16", "--kernel", "3x3x3"], "--kernel has 3 values but --shape has 2 axes"),
    (["--shape", "8x8x8x8", "--kernel", "3"], "--shape must have 1, 2 or 3 axes"),
    (["--shape", "16", "--kernel", "5", "--stride", "6"], "stride must be between 1 and kernel_size"),
    (["--shape", "16", "--kernel", "5", "--causal", "2"], "--causal takes no value"),
    (["--shape", "16", "--kernel", "5", "--heads", "0"], "--heads must be at least 1"),
    (["--preset", "quick", "--shape", "16", "--kernel", "5"], "not both"),
    (["--preset", "quick", "--entries", "fused,nope"], "unknown entries nope"),
    (["--preset", "quick", "--problem", "99"], f"--problem 99: the plan has {len(PRESETS['quick'])} problems"),
    (["--preset", "quick", "--repeat", "0"], "--repeat must be positive"),
    (["--readme-table", "/nonexistent/results.json"], "cannot read /nonexistent/results.json"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_arguments_give_a_clear_error(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m na_rtc bench: error: ") and message in err, err


def test_argparse_choices_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--dtype", "fp64"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp64'" in capsys.readouterr().err


def test_not_a_results_file(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    assert cli.main(["--from-json", str(path)]) == 2
    assert "not a na_rtc bench results file" in capsys.readouterr().err


def test_bench_is_a_subcommand(capsys):
    from na_rtc.__main__ import main

    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "targets" in out and "2D 128x128 k=13 b2 h8 D64 fp16" in out and "flex_tiled" in out


def test_compile_and_cached_load_are_timed_apart():
    from na_rtc.bench.compile import measure_families

    [(name, row)] = measure_families(["naive"], "emulator").items()
    assert name == "naive" and "error" not in row, row
    # an empty cache folder: the first load compiles; the second, with memory cleared, reads the disk entry
    assert row["first_origin"] == "compiled" and row["cached_origin"] == "disk"
    assert 0 < row["cached_load_s"] < row["compile_s"]
    assert row["kernels"] > 0


def _gpu_like_results() -> dict:
    """A results file as a GPU run writes it (numbers made up, shaped like the real thing)."""
    def timed(ms, peak):
        return {"median_ms": ms, "min_ms": ms * 0.9, "max_ms": ms * 1.2, "q1_ms": ms, "q3_ms": ms, "repeats": 10,
                "tflops": 1.0, "first_call_ms": ms * 100, "peak_extra_mb": peak}

    def entry(label, forward, backward, peak=10.0):
        return {"label": label, "status": "ok", "forward": timed(forward, peak),
                "forward_backward": timed(backward, peak * 3)}

    problem = spec((128, 128), 13, batch=2, heads=8, head_dim=64, dtype="fp16")
    record = {**problem.to_json(), "flops_forward": flops.forward_flops(problem), "output_mb": 32.0, "entries": {
        "fused": entry("na_rtc fused (cuda)", 2.0, 8.0),
        "naive_torch": {"label": "naive torch NA", "status": "oom", "reason": "out of memory: CUDA out of memory"},
        "flex_natural": entry("FlexAttention, natural order", 4.0, 20.0),
        "flex_tiled": entry("FlexAttention, tiled order", 3.0, 24.0),
        "sdpa": entry("torch SDPA", 10.0, 40.0),
    }}
    environment = {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "capability": "sm_90",
                   "driver": "driver 570.1 (CUDA 12.8)", "cuda": "torch built with CUDA 12.8", "nvrtc": "12.8",
                   "torch": "2.13.0", "na_rtc": "0.1.0", "commit": "0123456789abcdef", "utc": "2026-01-01T00:00:00Z",
                   "command": "python -m na_rtc bench --preset targets"}
    return {"schema": runner.SCHEMA, "preset": "targets", "environment": environment,
            "settings": {"clock": "CUDA events", "memory": "torch CUDA allocator peak"}, "notes": [],
            "problems": [record]}


def test_readme_table_goes_between_the_markers_of_the_performance_page(capsys):
    """The table ``--readme-table`` prints belongs between the ``bench-table`` markers of
    docs/performance.md (the README is only the front door now); the help says where it goes."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "performance.md").read_text()
    start = "<!-- bench-table: python -m na_rtc bench --readme-table FILE.json -->"
    assert page.count(start) == 1 and page.count("<!-- /bench-table -->") == 1
    between = page[page.index(start) + len(start):page.index("<!-- /bench-table -->")]
    assert between.strip().startswith("Measured on ") and "| problem | fused fwd ms (TFLOP/s) |" in between
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "docs/performance.md" in " ".join(capsys.readouterr().out.split())


def test_readme_table_speedups():
    table = report.readme_table(_gpu_like_results())
    assert "Measured on NVIDIA H100 80GB HBM3 (sm_90; driver 570.1 (CUDA 12.8)" in table
    assert "CPU only" not in table
    row = next(line for line in table.splitlines() if line.startswith("| 2D 128x128 k=13"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # naive torch ran out of memory: no speedup, and the memory cell says so
    assert cells[3] == "- / -" and cells[6] == "30 / out of memory"
    # FlexAttention: the faster order per mode, tiled 3 ms forward and natural 20 ms forward+backward
    assert cells[4] == "1.50x / 2.50x"
    assert cells[5] == "5.00x / 5.00x"


def test_chart_with_flex_figures(tmp_path):
    out = plot.draw(_gpu_like_results(), tmp_path / "gpu.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_out_of_memory_and_errors_are_reported_and_the_run_goes_on():
    from na_rtc.bench.entries import Entry, Prepared

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 137.00 GiB")

    def broken(spec, inputs):
        raise RuntimeError("no kernel for this\nsecond line")

    selection = runner.Selection(run=[
        Entry("hungry", "hungry entry", lambda spec, inputs: Prepared(out_of_memory, out_of_memory)),
        Entry("broken", "broken entry", broken),
        *runner.select_entries(["naive_torch"], runner.Machine("cpu", "emulator")).run,
    ])
    problem = spec(16, 5, dtype="fp32", heads=1, head_dim=8)
    record = runner.run_problem(problem, selection, runner.Machine("cpu", "emulator"), timing.Settings(0, 2, 2, 0.0),
                                log=lambda _: None)
    hungry, failed, fine = (record["entries"][name] for name in ("hungry", "broken", "naive_torch"))
    assert hungry["status"] == "oom" and "137.00 GiB" in hungry["reason"]
    assert hungry["forward_backward"]["reason"] == "not tried: the forward alone ran out of memory"
    assert failed == {"label": "broken entry", "status": "error", "reason": "RuntimeError: no kernel for this"}
    assert fine["status"] == "ok"


@pytest.mark.parametrize("head_dim, picks", [(64, "na_fused_tc_fwd<bf16_t, 64, 64, 1, 64, 1>"), (128, None)])
def test_sixteen_warp_rows_entry_runs_only_where_it_changes_the_kernel(head_dim, picks):
    """fused_tc_rows16 times the one-mma-tile forward; where the table already picks it (HD 128) the entry
    says so instead of timing the fused entry's kernel twice."""
    from na_rtc.bench.entries import Unavailable, _prepare_sixteen_warp_rows, make_inputs
    from na_rtc.bench.presets import Spec

    problem = Spec((40,), (7,), (1,), (1,), (False,), 1, 1, head_dim, "bfloat16")
    inputs = make_inputs(problem, "cpu", "emulator")
    if picks is None:
        with pytest.raises(Unavailable, match="16 query rows per warp"):
            _prepare_sixteen_warp_rows(problem, inputs)
    else:
        assert _prepare_sixteen_warp_rows(problem, inputs).notes["forward_kernels"] == picks


@pytest.mark.parametrize("ndim, picks", [(1, "na_fused_wg_fwd<bf16_t, 64, 64, 1, 64, 0, 1>"),
                                         (2, "na_fused_wg_fwd<bf16_t, 64, 8, 8, 64, 0, 1>")])
def test_one_warpgroup_entry_times_the_other_forward(ndim, picks):
    """fused_wgmma_1wg: the wgmma forward with one warpgroup per block (64 queries, 8 x 8 in 2D), another
    forward than fused_wgmma's two (128 queries, 16 x 8 in 2D)."""
    from na_rtc.bench.entries import _prepare_wgmma, _prepare_wgmma_one_warpgroup, make_inputs
    from na_rtc.bench.presets import Spec

    problem = Spec((40,) * ndim, (7,) * ndim, (1,) * ndim, (1,) * ndim, (False,) * ndim, 1, 1, 64, "bfloat16")
    inputs = make_inputs(problem, "cpu", "emulator")
    assert _prepare_wgmma_one_warpgroup(problem, inputs).notes["forward_kernels"] == picks
    assert _prepare_wgmma(problem, inputs).notes["forward_kernels"].endswith(", 2>")


@pytest.mark.parametrize("ndim, picks", [(1, "na_fused_wg_fwd<bf16_t, 128, 128, 1, 32, 0, 2>"),
                                         (2, "na_fused_wg_fwd<bf16_t, 128, 16, 8, 32, 0, 2>")])
def test_32_key_chunk_entry_times_the_other_forward(ndim, picks):
    """fused_wgmma_kc32: the wgmma forward with chunks of 32 keys, another forward than fused_wgmma's (64)."""
    from na_rtc.bench.entries import _prepare_wgmma, _prepare_wgmma_32_key_chunks, make_inputs
    from na_rtc.bench.presets import Spec

    problem = Spec((40,) * ndim, (7,) * ndim, (1,) * ndim, (1,) * ndim, (False,) * ndim, 1, 1, 128, "bfloat16")
    inputs = make_inputs(problem, "cpu", "emulator")
    assert _prepare_wgmma_32_key_chunks(problem, inputs).notes["forward_kernels"] == picks
    assert ", 64, 1, 2>" in _prepare_wgmma(problem, inputs).notes["forward_kernels"]


def test_32_key_chunk_entry_says_why_when_the_table_has_them(monkeypatch):
    from na_rtc.bench.entries import Unavailable, _prepare_wgmma_32_key_chunks, make_inputs
    from na_rtc.bench.presets import Spec
    from na_rtc.runtime.families import fused_wg

    monkeypatch.setitem(fused_wg.CHUNK_KEYS, 64, 32)
    problem = Spec((40,), (7,), (1,), (1,), (False,), 1, 1, 64, "bfloat16")
    with pytest.raises(Unavailable, match="chunks of 32 keys"):
        _prepare_wgmma_32_key_chunks(problem, make_inputs(problem, "cpu", "emulator"))


def test_one_warpgroup_entry_says_why_when_the_table_has_one(monkeypatch):
    """Where the table's forward already has one warpgroup a block, fused_wgmma_1wg is unavailable and says
    so instead of timing fused_wgmma's forward twice."""
    from na_rtc.bench.entries import Unavailable, _prepare_wgmma_one_warpgroup, make_inputs
    from na_rtc.bench.presets import Spec
    from na_rtc.runtime.families import fused_wg

    monkeypatch.setitem(fused_wg.WARPGROUPS, 2, 1)
    problem = Spec((40, 40), (7, 7), (1, 1), (1, 1), (False, False), 1, 1, 64, "bfloat16")
    with pytest.raises(Unavailable, match="one warpgroup per block"):
        _prepare_wgmma_one_warpgroup(problem, make_inputs(problem, "cpu", "emulator"))


@pytest.mark.parametrize("dtype, picks", [("bfloat16", "na_fused_wg_fwd<bf16_t, 64, 128, 1, 64, 0, 2>"), ("float32", None)])
def test_wgmma_entry_times_the_hopper_forward_or_says_why_not(dtype, picks):
    """fused_wgmma runs the fused op with NA_RTC_WGMMA=1 (the emulator takes it like an sm_90 GPU); where the
    wgmma forward does not serve the problem (fp32 here) the entry is unavailable instead of timing another."""
    from na_rtc.bench.entries import Unavailable, _prepare_wgmma, make_inputs
    from na_rtc.bench.presets import Spec

    problem = Spec((40,), (7,), (1,), (1,), (False,), 1, 1, 64, dtype)
    inputs = make_inputs(problem, "cpu", "emulator")
    if picks is None:
        with pytest.raises(Unavailable, match="wgmma forward does not serve"):
            _prepare_wgmma(problem, inputs)
    else:
        assert _prepare_wgmma(problem, inputs).notes["forward_kernels"] == picks


def _measured(forward_ms, backward_ms, tflops=None):
    return {"status": "ok", "forward": {"median_ms": forward_ms, "tflops": tflops},
            "forward_backward": {"median_ms": backward_ms}}


def _target_results(fused, wgmma, flex_natural, flex_tiled):
    """A results file with the fused-vs-FlexAttention target problems and the given (forward ms, fwd+bwd ms[, TFLOP/s]) entries."""
    from na_rtc.bench import targets

    keys = dict.fromkeys(t.key for t in targets.flex_targets())
    entries = {"fused": fused, "fused_wgmma": wgmma, "flex_natural": flex_natural, "flex_tiled": flex_tiled}
    return {"environment": {"device": "test GPU", "device_type": "cuda"},
            "problems": [{"key": key, "label": key, "entries": {name: _measured(*figures)
                                                               for name, figures in entries.items() if figures}}
                         for key in keys]}


def test_targets_are_judged_for_the_default_and_the_fastest_entry():
    from na_rtc.bench import targets

    # fused: 2x natural flex and 1.25x tiled forward, fwd+bwd as fast as flex; 160 TFLOP/s; wgmma faster still
    results = _target_results((1.0, 4.0, 160.0), (0.5, 3.0, 320.0), (2.0, 5.0), (1.25, 4.0))
    text, all_met = targets.table(results)
    assert all_met and "MISSED" not in text and "not measured" not in text
    assert "2x met" in text and "1.25x met" in text and "160 met" in text and "(fused_wgmma)" in text
    assert len(text.strip().splitlines()) == 2 + len(targets.flex_targets())


def test_targets_missed_or_missing_are_said():
    from na_rtc.bench import targets

    # 1.4x natural flex (needs 1.5x), 120 TFLOP/s (needs 150), fwd+bwd slower than flex; no wgmma figures
    results = _target_results((1.0, 6.0, 120.0), None, (1.4, 5.0), (0.9, 5.5))
    text, all_met = targets.table(results)
    assert not all_met
    assert "1.4x MISSED" in text and "120 MISSED" in text and "0.833x MISSED" in text
    assert "0.9x MISSED" in text
    results["problems"] = results["problems"][:1]  # the 1D problem never ran
    text, all_met = targets.table(results)
    assert not all_met and "| not measured | not measured |" in text


def test_bench_targets_prints_the_table_of_a_results_file(tmp_path, capsys):
    import json

    from na_rtc.bench.cli import main as bench_main

    path = tmp_path / "results.json"
    path.write_text(json.dumps(_target_results((1.0, 4.0, 160.0), None, (2.0, 5.0), (1.25, 4.0))))
    assert bench_main(["--targets", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Performance targets of the fused kernels") and "test GPU" in out and "every target met" in out


def test_gpu_check_measures_one_3d_problem_after_the_flex_targets(monkeypatch, tmp_path):
    """make gpu-check's slice: the FlexAttention targets first, then one 3D problem, then the other targets."""
    from na_rtc import gpu_check
    from na_rtc.bench.presets import FLEX_TARGET

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda device: {"device": "test GPU"})
    monkeypatch.setattr(gpu_check, "_precompile", lambda jobs, limit=None: {"returncode": 0})
    monkeypatch.setattr(gpu_check, "_selftest", lambda results, stamp, limit=None: {"returncode": 0})
    monkeypatch.setattr(gpu_check, "_pytest", lambda args, junit, limit=None: {"returncode": 0})
    monkeypatch.setattr(gpu_check, "_bench", lambda results, stamp, preset, *args, **kwargs: asked.append(preset) or
                        {"returncode": 0})
    assert gpu_check.main(["--results", str(tmp_path)]) == 0
    runner.select_entries(list(gpu_check.BENCH_ENTRIES), runner.Machine("cuda:0", "cuda"))  # every name exists
    plan = PRESETS[asked[0]]
    assert [problem.ndim for problem in plan].count(3) == 1
    flex = [problem.key for problem in PRESETS["targets"] if problem.note == FLEX_TARGET]
    assert [problem.key for problem in plan[:len(flex) + 1]] == [*flex, PRESETS["3d"][0].key]
    assert {problem.key for problem in plan} == {problem.key for problem in PRESETS["targets"]} | {plan[len(flex)].key}


def test_the_earlier_preset_name_still_selects_the_target_shapes():
    """``--preset issues`` (scripts and older make targets) runs the ``targets`` preset; --list shows one name."""
    preset, plan = cli.plan_from_args(cli.build_parser().parse_args(["--preset", "issues"]), None)
    assert preset == "targets" and plan == list(PRESETS["targets"])
    assert "issues" not in cli._list() and "issues" not in cli.build_parser().format_help()


# ---------------------------------------------------------------- the blocked backend's entry

# dilation, causal and a window shifted at the borders; a partial tile (10 is not a multiple of 8)
TINY_BLOCKED = spec((10, 12), (3, 5), dilation=(1, 2), causal=(True, False), batch=2, heads=2, head_dim=8,
                    dtype="fp32")


def test_blocked_runs_by_default_on_a_cpu_beside_the_reference_and_the_naive_gather():
    names = [entry.name for entry in runner.select_entries(None, runner.Machine("cpu", "emulator")).run]
    assert {"blocked", "reference", "naive_torch", "sdpa"} <= set(names)
    gpu = [entry.name for entry in runner.select_entries(None, runner.Machine("cuda:0", "cuda")).run]
    assert "blocked" not in gpu and "reference" not in gpu  # --entries blocked runs it on a GPU


@pytest.mark.parametrize("problem", [TINY_BLOCKED, TINY_3D, QUICK_GQA, QUICK_EXTRA], ids=lambda p: p.key)
def test_blocked_entry_runs_the_blocked_backend_and_agrees_with_the_naive_gather(monkeypatch, problem):
    """The entry's forward and forward+backward are the blocked backend's fused op (its op table is called),
    and they agree with the naive torch gather's, gradients included (extra tokens' too)."""
    from na_rtc import backends
    from na_rtc.bench.entries import _prepare_blocked, make_inputs

    calls = []
    ops = backends.get("blocked").ops
    for name in ("fused_forward", "fused_backward"):
        monkeypatch.setitem(ops, name, lambda *args, _op=ops[name], _name=name, **kwargs:
                            calls.append(_name) or _op(*args, **kwargs))
    inputs = make_inputs(problem, "cpu", "emulator")
    blocked = _prepare_blocked(problem, inputs)
    naive = peers._prepare_naive_torch(problem, inputs)
    torch.testing.assert_close(blocked.forward(), naive.forward(), atol=1e-4, rtol=1e-4)
    assert calls == ["fused_forward"]
    got, expected = blocked.forward_backward(), naive.forward_backward()
    assert calls == ["fused_forward", "fused_forward", "fused_backward"]
    assert len(got) == len(expected) == len(inputs.leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert blocked.notes["backend"] == "blocked" and "forward_kernels" not in blocked.notes


def test_blocked_entry_notes_say_what_the_boxes_cost():
    """The notes give the tiles and the products of the key boxes against the neighborhoods': a 2D 8x8 tile of
    13x13 windows sees a 20x20 box away from the borders."""
    from na_rtc.bench.entries import _prepare_blocked, make_inputs

    problem = spec((32, 32), 13, heads=1, head_dim=8, dtype="fp32")
    notes = _prepare_blocked(problem, make_inputs(problem, "cpu", "emulator")).notes
    assert (notes["tile"], notes["tiles"], notes["box_keys"]) == ("8x8", 16, 400)
    assert notes["box_vs_window_products"] == round(16 * 64 * 400 / (32 * 32 * 169), 2)


def test_a_cpu_run_without_kernel_entries_is_not_called_an_emulator_check():
    machine, settings = runner.Machine("cpu", "emulator"), timing.Settings(0, 2, 2, 0.0)
    [note] = runner.new_results("portable", [], ["blocked", "reference", "naive_torch", "sdpa"], machine,
                                settings)["notes"]
    assert note.startswith("CPU-only machine, no na_rtc kernels") and "emulator" not in note
    [note] = runner.new_results("quick", [], ["blocked", "fused"], machine, settings)["notes"]
    assert note == runner.GPU_NOTE
    assert runner.new_results("quick", [], ["blocked"], runner.Machine("cuda:0", "cuda"), settings)["notes"] == []


def test_blocked_entry_needs_no_kernels():
    """The blocked backend runs where na_rtc's kernel backend cannot: its entry does not ask for it."""
    from na_rtc.bench.entries import _prepare_blocked, _prepare_fused, make_inputs

    problem = spec(16, 5, heads=1, head_dim=8, dtype="fp32")
    inputs = make_inputs(problem, "cpu", "emulator", kernel_backend_missing="no compiler here")
    with pytest.raises(runner.Unavailable, match="no compiler here"):
        _prepare_fused(problem, inputs)
    assert _prepare_blocked(problem, inputs).forward().shape == problem.qkv_shape
