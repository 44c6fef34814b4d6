"""The command that installs one of na_rtc's extras, for the way this copy of na_rtc was installed.

na_rtc is installed from a checkout (``pip install .``, ``pip install -e .``, or
run from the folder itself) or from a wheel built from one; it is not on a
package index, so ``pip install 'na_rtc[cuda13]'`` finds nothing. From a
checkout, the extra is installed from that folder (editable when the install
is); otherwise (a wheel) the hint names the extra's packages.

How a copy was installed is read from where it is imported from (a checkout
has ``pyproject.toml`` and ``cuda_src/`` beside the package) and from pip's
record of the install (``direct_url.json``, PEP 610: a folder, editable or
not, or an archive).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlparse

__all__ = ["EXTRAS", "Source", "install_command", "source"]

#: the packages of pyproject.toml's extras that install hints name (tests hold the two equal)
EXTRAS: dict[str, tuple[str, ...]] = {
    "cuda12": ("cupy-cuda12x>=13", "nvidia-cuda-nvrtc-cu12>=12.4", "cuda-bindings>=12.6,<13"),
    "cuda13": ("cupy-cuda13x>=14", "nvidia-cuda-nvrtc>=13", "cuda-bindings>=13,<14"),
    "nvrtc": ("nvidia-cuda-nvrtc>=13", "cuda-bindings>=13,<14"),
}

#: the folder of the na_rtc package that is running
PACKAGE = Path(__file__).resolve().parent


class Source(NamedTuple):
    """Where this na_rtc comes from: a checkout folder (``editable`` or not), or None for a wheel."""

    checkout: Path | None
    editable: bool = False


def is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is a source checkout of na_rtc (its pyproject.toml, package and kernel sources)."""
    try:
        text = (folder / "pyproject.toml").read_text()
    except OSError:
        return False
    return ('name = "na_rtc"' in text and (folder / "na_rtc" / "__init__.py").is_file()
            and (folder / "cuda_src").is_dir())


def installed_from() -> dict | None:
    """pip's record of where the installed na_rtc came from (``direct_url.json``), None when there is none."""
    try:
        from importlib import metadata

        # the first distribution found may be a checkout's own na_rtc.egg-info (the current folder is on the
        # path), which has no record: take the first that has one
        for distribution in metadata.distributions(name="na_rtc"):
            text = distribution.read_text("direct_url.json")
            if text:
                return json.loads(text)
    except Exception:  # noqa: BLE001 - unreadable: the package's folder decides
        pass
    return None


def _recorded_folder(record: dict | None) -> tuple[Path | None, bool]:
    if not record or "dir_info" not in record or not str(record.get("url", "")).startswith("file:"):
        return None, False
    return Path(unquote(urlparse(record["url"]).path)), bool(record["dir_info"].get("editable"))


def _same(a: Path | None, b: Path) -> bool:
    try:
        return a is not None and a.resolve() == b.resolve()
    except OSError:
        return False


def source(package: Path = PACKAGE, record: dict | None = None, *, read_record: bool = True) -> Source:
    """Where the na_rtc in ``package`` comes from, from its location and pip's ``record`` of the install."""
    if record is None and read_record:
        record = installed_from()
    recorded, editable = _recorded_folder(record)
    root = package.parent
    if is_checkout(root):  # run from a checkout: an editable install, PYTHONPATH or the current folder
        return Source(root, editable and _same(recorded, root))
    if recorded is not None and is_checkout(recorded):  # `pip install .`: a copy whose checkout is still there
        return Source(recorded, editable)
    return Source(None)


def install_command(extra: str, where: Source | None = None) -> str:
    """``pip install ...`` that adds ``extra``'s packages to this installation (``where``: :func:`source`)."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {', '.join(EXTRAS)}, got {extra!r}")
    where = source() if where is None else where
    if where.checkout is None:
        return "pip install " + " ".join(shlex.quote(requirement) for requirement in EXTRAS[extra])
    return "pip install " + ("-e " if where.editable else "") + shlex.quote(f"{where.checkout}[{extra}]")
