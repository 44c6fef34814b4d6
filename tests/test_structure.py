"""The package's structure: every module imports on its own, the import graph has no cycles, and the kernel
family registry is what the dispatcher, ``check`` and the executors share.

The import graph is read from the source (``ast``): every ``import`` and ``from ... import`` of an
``na_rtc`` module, at module level or inside a function (an import deferred into a function still makes
the two modules depend on each other). An import of an ancestor package's own names (``from .. import
__version__``) is left out: a package is initialized before any module inside it runs, so that edge cannot
take part in an import-order cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import na_rtc
from na_rtc.runtime import dispatch, registry
from na_rtc.runtime.families import FAMILIES

PACKAGE = Path(na_rtc.__file__).resolve().parent
#: imports that close a cycle but live in modules this restructuring leaves alone: the reference backend's
#: public functions pinned to it (``na_rtc.reference.na2d``) are the API's functions, resolved lazily in its
#: module ``__getattr__``, while the API reaches the reference ops through the backend table
KNOWN_LAZY_EDGES = {("na_rtc.reference", "na_rtc.functional")}
#: modules that are a part of another, imported by it once what they need exists: the torch ops' FLOP formulas
#: need the ops, which na_rtc._torch defines and then imports them (a module this restructuring leaves alone)
IMPORTED_BY = {"na_rtc._torch_flops": "na_rtc._torch"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) of every module of na_rtc."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(modules=None) -> dict[str, set[str]]:
    """module -> the na_rtc modules it imports (module level and inside functions alike)."""
    modules = modules or _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        base = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    edges.add(submodule if submodule in modules else target)
        graph[name] = {e for e in edges if e in modules and e != name and not name.startswith(e + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    for source, target in KNOWN_LAZY_EDGES:
        assert target in graph[source], f"{source} no longer imports {target}: drop it from KNOWN_LAZY_EDGES"
        graph[source].discard(target)
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_deferred_import(tmp_path):
    """The check itself: two modules importing each other, one of them inside a function, are a cycle."""
    package = tmp_path / "na_rtc"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .. import __version__\n")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    assert cycles(import_graph(modules)) == [["na_rtc.a", "na_rtc.sub.b"]]


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other na_rtc module was imported before it (the
    package's ``__init__`` runs first, as it always does; a part of another module, through that module)."""
    names = sorted(_modules())
    script = (
        "import importlib, json, sys, traceback\n"
        f"names = {names!r}\n"
        f"owners = {IMPORTED_BY!r}\n"
        "failed = {}\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'na_rtc' or m.startswith('na_rtc.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(owners.get(name, name))\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc(limit=3)\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


# ---------------------------------------------------------------- the registry


def test_the_wheel_lists_every_subpackage():
    """pyproject.toml names the packages one by one (cuda_src/ is mapped into the wheel, which automatic
    discovery cannot express): a new subpackage missing there leaves its modules out of the wheel, which the
    wheel check of .ci/run finds only after the whole test suite."""
    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    subpackages = {name for name, (_, is_package) in _modules().items() if is_package}
    missing = sorted(subpackages - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert "na_rtc.cuda_src" in listed and setuptools["package-dir"]["na_rtc.cuda_src"] == "cuda_src"


def test_the_registry_knows_every_family_and_every_kernel_once():
    assert list(FAMILIES) == list(registry.names())
    for name, family in FAMILIES.items():
        assert family.name == name and registry.get(name) is family
        for kernel in family.names:
            assert registry.family_of(kernel) is family
    with pytest.raises(KeyError, match="in no registered kernel family"):
        registry.family_of("na_not_a_kernel<float>")


def test_a_kernel_in_two_families_is_refused():
    naive = registry.get("naive")
    twin = registry.Family("elsewhere.cu", naive.names[:1], name="a_twin_of_naive")
    with pytest.raises(ValueError, match="is in two families: naive and a_twin_of_naive"):
        registry.register(twin)
    assert "a_twin_of_naive" not in FAMILIES


def test_the_registry_module_imports_no_family_module():
    assert not {edge for edge in import_graph()["na_rtc.runtime.registry"] if ".families" in edge}


def test_every_route_of_the_dispatch_tables_names_a_registered_role():
    routes = [*dispatch.FORWARD, *(route for pair in dispatch.BACKWARD for route in pair),
              *(route for routes in dispatch.SPLIT_KERNELS.values() for route in routes)]
    for route in routes:
        role = registry.get(route.family).roles[route.role]
        for family, required in role.requires:
            assert required in registry.get(family).roles, (route, family, required)
    # what each op launches: the fused forward's roles run themselves; the pairs run through the backward launcher
    assert all(registry.get(r.family).roles[r.role].run is not None for r in dispatch.FORWARD)


def test_every_3d_twin_mirrors_its_family():
    """A family's 3D twin (``<name>_3d``) shares its source file and offers the same roles, for 3D only, so the
    dispatcher's tables (which name the 1D/2D families) reach it for every route."""
    for name, twin in registry.FAMILIES.items():
        if not name.endswith(registry.RANK3_SUFFIX):
            assert 3 not in twin.ranks, f"{name} serves 3D but is no 3D twin"
            continue
        base = registry.get(name[: -len(registry.RANK3_SUFFIX)])
        assert twin.ranks == frozenset({3}) and twin.source == base.source, name
        assert set(twin.roles) == set(base.roles), name
        assert registry.for_rank(base.name, 3) is twin and registry.for_rank(base.name, 2) is base


def test_a_kernel_path_is_four_files_from_the_api():
    """API (functional.py), dispatch table (runtime/dispatch.py), launch plan (the family's module), kernel
    (its cuda_src file): for every route, the family module names its source, and that file exists."""
    from na_rtc._resources import cuda_src_dir

    routes = [*dispatch.FORWARD, *(route for pair in dispatch.BACKWARD for route in pair),
              *(route for routes in dispatch.SPLIT_KERNELS.values() for route in routes)]
    for route in routes:
        module = sys.modules[f"na_rtc.runtime.families.{route.family}"]
        assert module.SOURCE == registry.get(route.family).source
        assert (cuda_src_dir() / module.SOURCE).is_file()
