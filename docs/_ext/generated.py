"""An MkDocs hook (mkdocs.yml ``hooks:``): what the site shows that the code already knows is generated from
the code at every build, never written twice.

- the guide's picture of neighborhoods comes from the same drawing code as ``make demo``'s
  (``na_rtc.demo.draw_neighborhoods``), so it always shows the window math the library computes; it is
  written to ``docs/assets/generated/`` (ignored by git) and never committed;
- the settings page's table is ``na_rtc.config.SETTINGS``, written where the page holds
  :data:`SETTINGS_MARKER`.
"""

from __future__ import annotations

from pathlib import Path

SETTINGS_MARKER = "<!-- the table of na_rtc.config.SETTINGS: docs/_ext/generated.py writes it here at every build -->"


def settings_table() -> str:
    """``na_rtc.config.SETTINGS`` as a Markdown table."""
    from na_rtc.config import SETTINGS

    rows = [f"| `{name}` | {text.replace('|', '&#124;')} |" for name, text in SETTINGS.items()]
    return "\n".join(["| variable | effect |", "|---|---|", *rows])


def on_pre_build(config, **kwargs) -> None:
    from mkdocs.exceptions import PluginError

    from na_rtc.demo import draw_neighborhoods

    target = Path(config["docs_dir"]) / "assets" / "generated" / "neighborhoods.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    if draw_neighborhoods(str(target), stream=_Quiet()) is None:
        raise PluginError("make docs draws the guide's pictures with matplotlib: pip install matplotlib "
                          "(the [docs] extra has it)")


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if SETTINGS_MARKER in markdown:
        return markdown.replace(SETTINGS_MARKER, settings_table())
    return markdown


class _Quiet:
    """A stream for the drawing's progress lines: the build log stays the build's."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
