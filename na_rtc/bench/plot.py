"""The PNG chart, drawn from a results JSON (matplotlib; optional).

Three panels, one group of bars per problem: speedup over naive torch NA,
speedup over FlexAttention (the faster token order), and peak extra memory
of the forward+backward. Forward bars are solid, forward+backward hatched.
An entry that did not run simply has no bar; the JSON and the table say why.
"""

from __future__ import annotations

from pathlib import Path

from .report import FLEX, device_summary, speedup

#: entries drawn in the speedup panels (the baselines themselves are 1 by definition)
SPEEDUP_ENTRIES = ("fused", "split", "naive_kernels", "reference", "blocked", "flex_natural", "flex_tiled", "sdpa")
MEMORY_ENTRIES = ("fused", "split", "naive_kernels", "reference", "blocked", "naive_torch", "flex_natural",
                  "flex_tiled", "sdpa")
MODES = (("forward", "fwd", None), ("forward_backward", "fwd+bwd", "//"))
ALL_ENTRIES = ("fused", "split", "naive_kernels", "reference", "naive_torch", "flex_natural", "flex_tiled", "sdpa",
               "blocked")
#: one color per entry in every panel (matplotlib's tab10)
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


class PlotUnavailable(RuntimeError):
    """matplotlib is missing: the chart can be drawn later, anywhere, from the JSON."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: GPU machines have no display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise PlotUnavailable(f"matplotlib is not installed ({error}); draw the chart elsewhere with "
                              "`python -m na_rtc bench --from-json FILE --plot`") from error
    return plt


def _label(problems: list[dict], name: str) -> str:
    """The entry's label in the legend: with every backend it ran on where that differs between problems
    (``na_rtc fused (emulator / reference)``: a rank the kernels lack ran on the reference backend)."""
    measured = [problem["entries"][name] for problem in problems
                if (problem["entries"].get(name) or {}).get("status") in ("ok", "partial")]
    labels = list(dict.fromkeys(entry.get("label", name) for entry in measured)) or [name]
    backends = list(dict.fromkeys((entry.get("notes") or {}).get("backend") for entry in measured))
    if len(labels) > 1 and None not in backends and all(label.endswith(f" ({backend})")
                                                         for label, backend in zip(labels, backends)):
        return f"{labels[0].removesuffix(f' ({backends[0]})')} ({' / '.join(backends)})"
    return " / ".join(labels)


def _bars(ax, problems, names, value_of, title, ylabel, empty_text):
    def value(problem, name, mode):
        found = value_of(problem, name, mode)
        return found if found is not None and found > 0 else None

    # slots only for entries with a figure somewhere in this panel, so groups stay compact
    names = [n for n in names if any(value(p, n, mode) for p in problems for mode, _, _ in MODES)]
    width = 0.8 / max(1, len(names) * len(MODES))
    for index, name in enumerate(names):
        color = COLORS[ALL_ENTRIES.index(name) % len(COLORS)]
        for m, (mode, mode_label, hatch) in enumerate(MODES):
            xs, ys = [], []
            for p, problem in enumerate(problems):
                found = value(problem, name, mode)
                if found is not None:
                    xs.append(p + (index * len(MODES) + m) * width - 0.4 + width / 2)
                    ys.append(found)
            if xs:
                ax.bar(xs, ys, width, hatch=hatch, color=color, edgecolor="black", linewidth=0.3,
                       label=f"{_label(problems, name)} {mode_label}")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(problems)))
    ax.set_xticklabels([problem["label"] for problem in problems], rotation=20, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(problems) - 0.5)
    if names:
        ax.set_yscale("log")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    return bool(names)


def draw(results: dict, out: str | Path) -> Path:
    """Write the chart of ``results`` to ``out`` (PNG); raises :class:`PlotUnavailable` without matplotlib."""
    plt = _pyplot()
    problems = results.get("problems", [])
    out = Path(out)
    figure, axes = plt.subplots(3, 1, figsize=(max(10, 1.6 * len(problems) + 6), 13))

    def over(baseline):
        def value(problem, name, mode):
            return None if name == baseline or (baseline == "flex" and name in FLEX) else \
                speedup(problem, name, baseline, mode)
        return value

    _bars(axes[0], problems, SPEEDUP_ENTRIES, over("naive_torch"), "speedup over naive torch NA (gather + einsum)",
          "x faster", "no naive torch figures in this run")
    for ax in axes[:2]:
        ax.axhline(1.0, color="gray", linewidth=0.8)
    _bars(axes[1], problems, SPEEDUP_ENTRIES, over("flex"), "speedup over FlexAttention (faster token order)",
          "x faster", "no FlexAttention figures in this run (it is timed on a GPU only)")

    def memory(problem, name, mode):
        measured = (problem["entries"].get(name) or {}).get(mode) or {}
        return measured.get("peak_extra_mb")

    _bars(axes[2], problems, MEMORY_ENTRIES, memory, f"peak extra memory ({results['settings'].get('memory', '')})",
          "MB", "no memory figures in this run")
    figure.suptitle(f"na_rtc bench {results.get('preset') or ''}: {device_summary(results['environment'])}",
                    fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
