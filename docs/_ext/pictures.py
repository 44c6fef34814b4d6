"""An MkDocs hook (mkdocs.yml ``hooks:``): draws the guide's pictures before every build.

The pictures come from the same code as ``make demo``'s (``na_rtc.demo.draw_neighborhoods``), so they
always show the window math the library computes; they are written to ``docs/assets/generated/``
(ignored by git) and never committed.
"""

from __future__ import annotations

from pathlib import Path


def on_pre_build(config, **kwargs) -> None:
    from mkdocs.exceptions import PluginError

    from na_rtc.demo import draw_neighborhoods

    target = Path(config["docs_dir"]) / "assets" / "generated" / "neighborhoods.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_neighborhoods(str(target), stream=_Quiet())
    if drawn is None:
        raise PluginError("make docs draws the guide's pictures with matplotlib: pip install matplotlib "
                          "(the [docs] extra has it)")


class _Quiet:
    """A stream for the drawing's progress lines: the build log stays the build's."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
