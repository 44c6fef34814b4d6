"""``bench --targets FILE.json``: the fused-vs-FlexAttention performance targets, met or not, from a results file.

The tensor-core fused kernels have targets on exact shapes (the ``targets`` preset), bf16 on an H100:

* 2D 128x128, batch 2, 8 heads, head_dim 64 and 128, k=13: the forward at least 1.5x faster than
  FlexAttention in natural token order and at least as fast as FlexAttention in a tiled order;
* 1D 32768 tokens, 8 heads, head_dim 128, k=2047: the forward at least as fast as FlexAttention
  and at least 150 TFLOP/s effective;
* forward+backward at least as fast as FlexAttention on all of them.

Each target is judged twice: for ``fused``, what the dispatcher runs by default, and for the fastest
na_rtc fused entry measured (``fused_wgmma`` and the other GPU variants), because the run that
measures them also decides which one should be the default. A target whose figures are missing
says so instead of passing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .presets import FLEX_TARGET, TARGETS
from .report import FLEX, _median

#: the na_rtc entries that compete for the default (the dispatcher's own first)
NA_RTC_FUSED = ("fused", "fused_wgmma", "fused_wgmma_1wg", "fused_wgmma_kc32", "fused_tc_rows16")


@dataclass(frozen=True)
class Target:
    """``entry``'s ``mode`` against a baseline: ``baseline`` time / entry time >= ``at_least``, or, with
    ``baseline`` ``"tflops"``, its effective TFLOP/s >= ``at_least``."""

    key: str
    label: str
    mode: str
    baseline: str
    at_least: float

    @property
    def text(self) -> str:
        mode = "fwd" if self.mode == "forward" else "fwd+bwd"
        if self.baseline == "tflops":
            return f"{mode} >= {self.at_least:g} TFLOP/s"
        against = {"flex_natural": "FlexAttention natural order", "flex_tiled": "FlexAttention tiled order",
                   "flex": "FlexAttention (faster order)"}[self.baseline]
        return f"{mode} >= {self.at_least:g}x {against}"


def flex_targets() -> list[Target]:
    """The targets, one per (problem, figure), on the ``targets`` preset's FlexAttention problems."""
    targets = []
    for spec in (s for s in TARGETS if s.note == FLEX_TARGET):
        on = (spec.key, spec.label)
        if spec.ndim == 2:
            targets += [Target(*on, "forward", "flex_natural", 1.5), Target(*on, "forward", "flex_tiled", 1.0)]
        else:
            targets += [Target(*on, "forward", "flex", 1.0), Target(*on, "forward", "tflops", 150.0)]
        targets.append(Target(*on, "forward_backward", "flex", 1.0))
    return targets


def figure(problem: dict, entry: str, target: Target) -> float | None:
    """The target's figure for ``entry`` (a speedup, or TFLOP/s), None where it was not measured."""
    measured = (problem["entries"].get(entry) or {}).get(target.mode) or {}
    if target.baseline == "tflops":
        return measured.get("tflops")
    ours = measured.get("median_ms")
    names = FLEX if target.baseline == "flex" else (target.baseline,)
    theirs = [ms for ms in (_median(problem["entries"].get(name), target.mode) for name in names) if ms]
    return min(theirs) / ours if ours and theirs else None


def _cell(value: float | None, target: Target) -> str:
    if value is None:
        return "not measured"
    shown = f"{value:.3g}" + ("" if target.baseline == "tflops" else "x")
    return f"{shown} {'met' if value >= target.at_least else 'MISSED'}"


def table(results: dict) -> tuple[str, bool]:
    """The markdown table of every target, and whether the default ``fused`` meets them all."""
    problems = {problem["key"]: problem for problem in results.get("problems", [])}
    lines = ["| problem | target | fused (default) | fastest na_rtc fused entry |", "|---|---|---|---|"]
    all_met = True
    for target in flex_targets():
        problem = problems.get(target.key)
        if problem is None:
            lines.append(f"| {target.label} | {target.text} | not measured | not measured |")
            all_met = False
            continue
        default = figure(problem, "fused", target)
        scored = [(value, name) for name in NA_RTC_FUSED if (value := figure(problem, name, target)) is not None]
        best_value, best_name = max(scored) if scored else (None, None)
        best = _cell(best_value, target) + (f" ({best_name})" if best_name else "")
        lines.append(f"| {target.label} | {target.text} | {_cell(default, target)} | {best} |")
        all_met = all_met and default is not None and default >= target.at_least
    return "\n".join(lines) + "\n", all_met
