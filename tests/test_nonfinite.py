"""Non-finite inputs poison exactly the queries that see them (docs/design/testing.md#non-finite-inputs).

A NaN or Inf in a key or value makes the output of every query whose
neighborhood holds it non-finite, and leaves every other query finite,
including causal queries whose out-of-window slots lie next to it. Checked on
the reference and on the kernels (emulator: fused and split kernels; float32
so the fused kernels serve), forward and backward. The backward follows the
dependencies: dq of a query that sees the NaN key, dk of every key such a
query sees (through its non-finite softmax statistics), and dv of those keys
for a NaN key (a NaN value leaves the probabilities, hence dv, finite).
"""

from __future__ import annotations

import numpy as np
import pytest

import na_rtc
from na_rtc.window import Axis, is_neighbor

BACKENDS = ["reference", pytest.param("emulator", marks=pytest.mark.skipif(
    not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler"))]

CONFIGS = {
    "1d-causal": dict(spatial=(12,), kernel_size=(4,), dilation=(1,), is_causal=(True,)),
    "1d-causal-dilated": dict(spatial=(13,), kernel_size=(3,), dilation=(2,), is_causal=(True,)),
    "1d-centered": dict(spatial=(12,), kernel_size=(5,), dilation=(1,), is_causal=(False,)),
    "2d-causal-rows": dict(spatial=(6, 7), kernel_size=(3, 3), dilation=(1, 2), is_causal=(True, False)),
    "3d-causal-time": dict(spatial=(5, 6, 5), kernel_size=(3, 3, 2), dilation=(1, 2, 1),
                           is_causal=(True, False, False)),
}
#: rank -> (fused op, its backward, qk, av)
FUNCTIONS = {n: tuple(getattr(na_rtc, f"na{n}d{suffix}") for suffix in ("", "_backward", "_qk", "_av"))
             for n in (1, 2, 3)}


def _seen_by(config, token):
    """Boolean [*spatial] map of the queries whose neighborhood holds ``token``."""
    grids = np.meshgrid(*(np.arange(n) for n in config["spatial"]), indexing="ij")
    seen = np.ones(config["spatial"], bool)
    for axis, (grid, n, k, d, c) in enumerate(zip(grids, config["spatial"], config["kernel_size"],
                                                   config["dilation"], config["is_causal"])):
        seen &= is_neighbor(Axis(n, k, 1, d, c), grid, token[axis])
    return seen


def _seen_by_any(config, queries):
    """Boolean [*spatial] map of the keys some query of the boolean map ``queries`` sees."""
    keys = np.zeros(config["spatial"], bool)
    for token in zip(*np.nonzero(queries)):  # neighbor relation is per axis: j in N(i) <=> i sees j
        grids = np.meshgrid(*(np.arange(n) for n in config["spatial"]), indexing="ij")
        sees = np.ones(config["spatial"], bool)
        for axis, (grid, n, k, d, c) in enumerate(zip(grids, config["spatial"], config["kernel_size"],
                                                       config["dilation"], config["is_causal"])):
            sees &= is_neighbor(Axis(n, k, 1, d, c), token[axis], grid)
        keys |= sees
    return keys


def _poisoned_inputs(config, bad, poisoned):
    """float32 q, k, v with ``bad`` at one token of head 1, and that token."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, *config["spatial"], 2, 4)).astype(np.float32) for _ in range(3))
    # on causal axes, near the start: there short windows have out-of-window
    # slots, and the token lies right after some of their queries
    token = tuple(2 if c else n // 2 for n, c in zip(config["spatial"], config["is_causal"]))
    (k if poisoned == "key" else v)[(0, *token, 1)] = bad
    # an Inf key gives a logit of +-inf; -inf is a legitimate zero weight, so
    # make every query's dot product with it +inf (the "non-finite" rule of docs/design/testing.md
    # holds for NaN anywhere, Inf values, and +inf logits)
    q[..., 1, :] = np.abs(q[..., 1, :]) + 0.1
    return (q, k, v), token


def _window(config):
    return dict(kernel_size=config["kernel_size"], dilation=config["dilation"], is_causal=config["is_causal"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned", ["key", "value"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_and_split_poison_exactly_the_queries_that_see_it(name, bad, poisoned, backend):
    config = CONFIGS[name]
    ndim = len(config["spatial"])
    (q, k, v), token = _poisoned_inputs(config, bad, poisoned)
    window = _window(config)
    fused_op, _, qk, av = FUNCTIONS[ndim]
    fused = fused_op(q, k, v, **window, backend=backend)
    logits = qk(q * 0.5, k, **window, backend=backend)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    split = av(weights / weights.sum(-1, keepdims=True), v, **window, backend=backend)
    expected = _seen_by(config, token)
    assert expected.any() and not expected.all()
    for out in (fused, split):
        poisoned_queries = ~np.isfinite(out[0, ..., 1, :]).all(-1)
        np.testing.assert_array_equal(poisoned_queries, expected)
        assert np.isfinite(out[0, ..., 0, :]).all()  # the other head never sees it


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned", ["key", "value"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_backward_poisons_exactly_what_depends_on_the_nan(name, poisoned, backend):
    config = CONFIGS[name]
    ndim = len(config["spatial"])
    (q, k, v), token = _poisoned_inputs(config, np.nan, poisoned)
    grad_out = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
    backward = FUNCTIONS[ndim][1]
    dq, dk, dv, _ = backward(grad_out, q, k, v, **_window(config), backend=backend)
    queries = _seen_by(config, token)
    keys = _seen_by_any(config, queries)
    assert queries.any() and not keys.all()
    expected = {"dq": queries, "dk": keys, "dv": keys if poisoned == "key" else np.zeros_like(keys)}
    for name_, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        poisoned_rows = ~np.isfinite(grad[0, ..., 1, :]).all(-1)
        np.testing.assert_array_equal(poisoned_rows, expected[name_], err_msg=name_)
        assert np.isfinite(grad[0, ..., 0, :]).all(), name_  # the other head never sees it
