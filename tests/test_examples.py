"""The scripts in examples/ run and show what they claim."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_numpy_example_split_matches_fused():
    out = _run("numpy_na2d.py")
    difference = float(re.search(r"max \|difference\|: (\S+)", out).group(1))
    assert difference < 1e-10
    assert "(4, 13, 13)" in out  # drpb shape


def test_torch_example_loss_decreases():
    losses = [float(x) for x in re.findall(r"loss (\S+)", _run("torch_na2d_layer.py"))]
    assert len(losses) >= 2 and losses[-1] < 0.9 * losses[0]


# ---------------------------------------------------------------- nat_digits.py


def _load_nat_digits():
    """The example as a module (its training only runs under __main__)."""
    if "nat_digits" not in sys.modules:
        spec = importlib.util.spec_from_file_location("nat_digits", EXAMPLES / "nat_digits.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["nat_digits"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["nat_digits"]


@pytest.mark.parametrize("variant", ["nat", "dinat"])
@pytest.mark.parametrize("model_size", ["quick", "full"])
def test_nat_digits_architecture(variant, model_size):
    torch = pytest.importorskip("torch")
    nd = _load_nat_digits()
    config = nd.QUICK if model_size == "quick" else nd.FULL
    torch.manual_seed(0)
    model = nd.NATClassifier(config, variant).eval()
    k = config.kernel_size

    # Tokenizer: two overlapping 3x3 stride-2 convolutions.
    convs = [m for m in model.tokenizer.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3), (2, 2))] * 2
    # Downsamplers after levels 1-3: overlapping 3x3 stride 2, channels doubled.
    assert len(model.levels) == 4 and model.levels[-1].downsample is None
    for level, dim in zip(model.levels[:-1], config.dims):
        conv = level.downsample.reduction
        assert (conv.kernel_size, conv.stride) == ((3, 3), (2, 2))
        assert (conv.in_channels, conv.out_channels) == (dim, 2 * dim)

    # Shapes per level on a real forward pass; every NA layer keeps its input shape.
    seen = []
    hooks = [block.attn.register_forward_hook(lambda m, i, o: seen.append((m, i[0].shape, o.shape)))
             for level in model.levels for block in level.blocks]
    x = torch.randn(2, 1, config.image_size, config.image_size)
    with torch.no_grad():
        maps = model.features(x)
        for hook in hooks:
            hook.remove()
        logits = model(x)
    assert logits.shape == (2, 10)
    sizes = nd.level_sizes(config)
    assert sizes[0] == config.image_size // 4  # the tokenizer downsamples by 4
    for index, (features, size, dim) in enumerate(zip(maps, sizes, config.dims)):
        assert features.shape == (2, size, size, dim)
        if index:
            assert size == -(-sizes[index - 1] // 2) and dim == 2 * config.dims[index - 1]  # halved, doubled
    assert maps[-1].shape == (2, sizes[-1], sizes[-1], config.dims[-1])
    assert sizes == [12, 6, 3, 2]

    # Windows: L >= k * d everywhere except the last level (2x2 < 3x3), which the
    # layer zero-pads and crops back (documented in the example).
    layers = [(block.attn, size) for level, size in zip(model.levels, sizes) for block in level.blocks]
    assert len(seen) == len(layers) == sum(config.depths)
    for (layer, in_shape, out_shape), (expected_layer, size) in zip(seen, layers):
        assert layer is expected_layer and in_shape == out_shape and in_shape[1:3] == (size, size)
        assert layer.kernel_size == (k, k)
        d = layer.dilation[0]
        assert layer.dilation == (d, d)
        assert size >= k * d or (size == sizes[-1] and d == 1)
    assert sizes[-1] < k  # the padded level exists, so the padding path is exercised

    # NAT: local everywhere. DiNAT: local and dilated alternate, local first; the
    # dilated layers use the largest dilation that fits, > 1 wherever the level
    # holds two windows.
    per_level = [[block.attn.dilation[0] for block in level.blocks] for level in model.levels]
    assert per_level == nd.dilations(config, variant)
    if variant == "nat":
        assert all(d == 1 for level in per_level for d in level)
    else:
        assert per_level[:2] == [[1, 4], [1, 2]]
        for level, size in zip(per_level, sizes):
            assert level[0::2] == [1] * len(level[0::2])
            assert level[1::2] == [max(1, size // k)] * len(level[1::2])
            if size >= 2 * k:
                assert all(d > 1 for d in level[1::2])


def test_nat_digits_quick_training(tmp_path):
    if importlib.util.find_spec("sklearn") is None:
        if os.environ.get("CI"):
            pytest.fail('scikit-learn missing: make venv-examples installs the "examples" extra (.ci/run does)')
        pytest.skip('needs scikit-learn: pip install -e ".[examples]"')
    png = tmp_path / "curve.png"
    # DiNAT exercises both dilated and padded layers; one thread because the
    # model is tiny (a second thread only adds synchronization).
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "nat_digits.py"), "--quick", "--variant", "dinat", "--threads", "1",
         "--plot", str(png)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "dilations [1, 4]" in out and "padded 2 -> 3" in out
    losses = [float(x) for x in re.findall(r"train loss (\S+)", out)]
    assert len(losses) == 3 and losses[-1] < 0.85 * losses[0], out
    accuracy = float(re.search(r"test accuracy (\S+)%", out).group(1))
    assert accuracy > 20.0, out  # above chance (10%) after a few batches
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- context_parallel.py


def test_context_parallel_example_matches_one_process():
    """Two gloo CPU processes under torchrun: the script checks its slabs against one process itself."""
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend (this torch build has none)")
    environment = dict(os.environ, OMP_NUM_THREADS="1", NA_RTC_EMULATOR_THREADS="1")
    # the checkout's na_rtc, as the test process imports it (the script's own folder is examples/)
    root = str(EXAMPLES.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(EXAMPLES / "context_parallel.py")],
        check=False, cwd=root, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ok: context-parallel output and gradients match one process (2 ranks)" in out, out
    lines = re.findall(r"^rank (\d)/2: .*halo sent (\d+) B", out, re.MULTILINE)
    sent = {int(rank): int(count) for rank, count in lines}
    assert sorted(sent) == [0, 1], out
    assert all(count > 0 for count in sent.values()), out
