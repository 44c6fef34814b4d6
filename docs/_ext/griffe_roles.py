"""A griffe extension for the API reference (mkdocs.yml loads it; it is not a page).

na_rtc's docstrings are plain text with a few reStructuredText habits, which Markdown shows verbatim:
roles such as ``:func:`na_rtc.use_backend``` become code spans, and a paragraph ending in ``::`` (the
literal block after it is already indented code in Markdown) ends in ``:``. Nothing else changes."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::$", re.MULTILINE)


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(r"`\1`", obj.docstring.value)
            obj.docstring.value = _LITERAL.sub(r"\1:", text)
