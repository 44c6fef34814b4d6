"""NVRTC compile layer (``na_rtc.runtime.nvrtc``), ptxas resource checks and the
``precompile`` / ``check`` commands (``na_rtc.runtime.check``).

Compiles the test kernels in ``tests/nvrtc_kernels/`` (no GPU or driver
needed); tests that compile skip when ``cuda.bindings`` / libnvrtc are absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from helpers import requires_nvrtc

from na_rtc.__main__ import main
from na_rtc._install import install_command
from na_rtc.runtime import cache, check, nvrtc

KERNELS = Path(__file__).resolve().parent / "nvrtc_kernels"
REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATED = {
    # name expression -> lowered name (Itanium mangling, fixed by the C++ ABI)
    "scale<float, 2>": "_Z5scaleIfLi2EEvPT_PKS0_x",
    "scale<double, 3>": "_Z5scaleIdLi3EEvPT_PKS0_x",
    "na_test::block_sum<float>": "_ZN7na_test9block_sumIfEEvPT_PKS1_",
    "plain_copy": "plain_copy",
}




def _family(source, names, threads=128, shared=0):
    names = tuple(names)
    return types.SimpleNamespace(
        source=str(source),
        names=names,
        launch_threads={n: threads for n in names},
        launch_shared_bytes={n: shared for n in names},
    )


def _family_module(path: Path, families: dict) -> Path:
    """A ``.py`` file defining FAMILIES, for ``--family-module``."""
    lines = ["import types", "FAMILIES = {"]
    for name, family in families.items():
        lines.append(
            f"    {name!r}: types.SimpleNamespace(source={family.source!r}, names={family.names!r}, "
            f"launch_threads={family.launch_threads!r}, launch_shared_bytes={family.launch_shared_bytes!r}),"
        )
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- pure Python parts


def test_parse_arch():
    assert nvrtc.parse_arch("sm_90") == 90
    assert nvrtc.parse_arch("compute_120") == 120
    assert nvrtc.parse_arch("8.6") == 86
    assert nvrtc.parse_arch(" 80 ") == 80
    assert nvrtc.parse_arch("sm_90a") == 90
    assert nvrtc.parse_arch(75) == 75
    for bad in ("sm90x", "gfx90a", "", "sm_1"):
        with pytest.raises(ValueError, match="not a GPU architecture"):
            nvrtc.parse_arch(bad)
    assert check.parse_arch_list("sm_80,sm_90") == [80, 90]
    assert check.parse_arch_list("80 90, sm_80") == [80, 90]


def test_target_for_picks_cubin_ptx_or_refuses():
    archs = [75, 80, 86, 89, 90, 100, 120]
    assert nvrtc.target_for(90, archs) == ("cubin", "sm_90")
    assert nvrtc.target_for(200, archs) == ("ptx", "compute_120")  # newer than NVRTC knows
    assert nvrtc.target_for(87, archs) == ("ptx", "compute_86")  # a gap in its list
    with pytest.raises(nvrtc.ArchUnsupported, match=re.escape(install_command("cuda12"))) as info:
        nvrtc.target_for(70, archs)
    assert "sm_70" in str(info.value) and "sm_75" in str(info.value)
    assert isinstance(info.value, nvrtc.NvrtcUnavailable)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooILi1EEvPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooILi1EEvPf
ptxas         .     792 bytes stack frame, 1628 bytes spill stores, 1256 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 792 bytes cumulative stack size
ptxas info    : Compile time = 59.484 ms
ptxas info    : Function properties for _Z6helperv
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function 'plain' for 'sm_80'
ptxas info    : Function properties for plain
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function 'old_format' for 'sm_80'
ptxas info    : Function properties for old_format
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, 360 bytes cmem[0]
"""


def test_parse_ptxas_log():
    found = check.parse_ptxas_log(PTXAS_LOG)
    spilling = found["_Z3fooILi1EEvPf"]
    assert spilling.entry and spilling.registers == 32 and spilling.barriers == 0
    assert (spilling.stack_frame, spilling.spill_stores, spilling.spill_loads) == (792, 1628, 1256)
    assert spilling.static_shared == 0
    helper = found["_Z6helperv"]
    assert not helper.entry and helper.registers is None and helper.spill_stores == 8
    plain = found["plain"]
    assert (plain.registers, plain.barriers, plain.static_shared, plain.spill_stores) == (10, 1, 1024, 0)
    old = found["old_format"]
    assert (old.registers, old.barriers, old.static_shared) == (30, None, 0)


def test_serialized_wgmma_warnings_are_found():
    log = PTXAS_LOG + ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
                       "serialized due to insufficient register resources for the wgmma pipeline in the function "
                       "'_Z3fooILi1EEvPf'\n")
    found = check._serialized_wgmma(log)
    assert len(found) == 1 and "_Z3fooILi1EEvPf" in found[0] and "serialized" in found[0]
    assert check._serialized_wgmma(PTXAS_LOG) == []


def test_arch_specific_compile_targets_sm_90a(tmp_path):
    """A wgmma instruction assembles for sm_90a only; the cache keeps sm_90a programs apart from sm_90's."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from na_rtc.runtime import cache

    source = tmp_path / "k.cu"
    source.write_text('extern "C" __global__ void k() { asm volatile("wgmma.fence.sync.aligned;"); }\n')
    program = nvrtc.compile_program(source, ("k",), 90, arch_specific=True)
    assert program.target == "sm_90a" and program.kind == "cubin"
    with pytest.raises(nvrtc.KernelCompileError):
        nvrtc.compile_program(source, ("k",), 90)
    assert cache.cache_key(source, ("k",), 90, arch_specific=True) != cache.cache_key(source, ("k",), 90)
    assert cache.entry_path("0" * 64, 90, "k.cu", tmp_path, arch_specific=True).parent.name == "sm_90a"
    got = cache.get_program(source, ("k",), 90, cache_root=tmp_path, arch_specific=True)
    assert got.target == "sm_90a" and (tmp_path / "sm_90a").is_dir()


def test_max_threads_follows_register_allocation_units():
    limits = check.limits_for(90)
    assert check.max_threads(32, limits) == 1024
    assert check.max_threads(64, limits) == 1024
    assert check.max_threads(65, limits) == 896  # 65 regs -> 72 per thread after rounding: 28 warps
    assert check.max_threads(72, limits) == 896
    assert check.max_threads(80, limits) == 800
    assert check.max_threads(128, limits) == 512
    assert check.max_threads(255, limits) == 256
    assert check.limits_for(80).max_shared_per_block == 163 * 1024
    assert check.limits_for(90).max_shared_per_block == 227 * 1024
    assert not check.limits_for(999).known


def _block_nvrtc_imports(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.nvrtc"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def fresh_library_state():
    """Forget the loaded bindings and versions before and after the test."""
    for function in (nvrtc._module, nvrtc.nvrtc_version, nvrtc._supported_archs):
        function.cache_clear()
    yield
    for function in (nvrtc._module, nvrtc.nvrtc_version, nvrtc._supported_archs):
        function.cache_clear()


def test_missing_bindings_raise_nvrtc_unavailable_with_install_command(monkeypatch, fresh_library_state):
    _block_nvrtc_imports(monkeypatch)
    with pytest.raises(nvrtc.NvrtcUnavailable, match=re.escape(install_command("cuda13"))) as info:
        nvrtc.compile_program(KERNELS / "kernels.cu", ["plain_copy"], 90)
    assert isinstance(info.value, RuntimeError)
    assert "cuda12" in str(info.value)


def test_missing_library_raises_nvrtc_unavailable(monkeypatch, fresh_library_state):
    module = types.ModuleType("cuda.bindings.nvrtc")

    def broken():
        raise RuntimeError("Failed to dlopen libnvrtc.so.13")

    module.nvrtcVersion = broken
    bindings = types.ModuleType("cuda.bindings")
    bindings.nvrtc = module
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", module)
    with pytest.raises(nvrtc.NvrtcUnavailable, match="libnvrtc"):
        nvrtc.nvrtc_version()


def test_check_cli_without_nvrtc_says_how_to_install(monkeypatch, fresh_library_state, capsys, tmp_path):
    _block_nvrtc_imports(monkeypatch)
    module = _family_module(tmp_path / "fams.py", {"t": _family(KERNELS / "kernels.cu", ["plain_copy"])})
    assert main(["check", "--arch", "sm_90", "--family-module", str(module)]) == 1
    assert install_command("cuda13") in capsys.readouterr().err


# ---------------------------------------------------------------- compiling


@requires_nvrtc
def test_version_and_supported_archs():
    major, minor = nvrtc.nvrtc_version()
    assert isinstance(major, int) and major >= 12 and isinstance(minor, int)
    archs = nvrtc.supported_archs()
    assert archs == sorted(archs) and 80 in archs and 90 in archs


@requires_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_templated_kernels_compile_to_cubin(arch):
    program = nvrtc.compile_program(KERNELS / "kernels.cu", list(TEMPLATED), arch)
    assert program.kind == "cubin" and program.target == f"sm_{arch}" and program.arch == arch
    assert program.binary[:4] == b"\x7fELF"
    assert program.lowered == TEMPLATED
    assert program.function_name("scale<float, 2>") == TEMPLATED["scale<float, 2>"]
    with pytest.raises(KeyError, match="was not compiled"):
        program.function_name("scale<int, 1>")
    assert f"-arch=sm_{arch}" in program.options and "-DNA_RTC_NVRTC=1" in program.options
    assert "--use_fast_math" not in program.options
    assert f"for 'sm_{arch}'" in program.log  # the ptxas report
    assert program.compile_seconds > 0 and program.source == "kernels.cu"


@requires_nvrtc
def test_headers_come_from_the_source_folder_not_the_working_directory(tmp_path, monkeypatch):
    # kernels.cu includes common.cuh; a different common.cuh in the current
    # directory must not be picked up
    (tmp_path / "common.cuh").write_text("#error wrong header picked up from the working directory\n")
    monkeypatch.chdir(tmp_path)
    program = nvrtc.compile_program(KERNELS / "kernels.cu", ["scale<float, 2>"], 90)
    assert program.lowered == {"scale<float, 2>": TEMPLATED["scale<float, 2>"]}


@requires_nvrtc
def test_include_dir_can_be_another_folder(tmp_path):
    shutil.copy(KERNELS / "common.cuh", tmp_path / "common.cuh")
    source = tmp_path / "src" / "main.cu"
    source.parent.mkdir()
    source.write_text('#include "common.cuh"\n__global__ void k(float* x) { x[0] = twice(x[0]); }\n')
    program = nvrtc.compile_program(source, ["k"], 90, include_dir=tmp_path)
    assert program.lowered == {"k": "_Z1kPf"}


def _broken_copy(tmp_path: Path) -> Path:
    shutil.copy(KERNELS / "common.cuh", tmp_path / "common.cuh")
    source = tmp_path / "broken.cu"
    source.write_text(
        textwrap.dedent(
            """\
            #include "common.cuh"

            template <class T>
            __global__ void k(T* x) {
                T y = twice(x[0])
                x[1] = y;
            }
            """
        )
    )
    return source


@requires_nvrtc
def test_syntax_error_names_file_and_line_with_context(tmp_path):
    source = _broken_copy(tmp_path)
    with pytest.raises(nvrtc.KernelCompileError) as info:
        nvrtc.compile_program(source, ["k<float>"], 90)
    error = info.value
    message = str(error)
    assert error.file == "broken.cu" and error.line in (5, 6)  # the missing ';' is reported at 5 or 6
    assert re.search(rf"broken\.cu\({error.line}\): error", message)
    assert "error in broken.cu" in message and "sm_90" in message
    assert f"> {error.line} |" in message  # source context marks the line
    assert "T y = twice(x[0])" in message
    assert str(tmp_path) not in error.log  # names relative to the source folder


@requires_nvrtc
def test_error_in_a_header_names_the_header(tmp_path):
    (tmp_path / "bad.cuh").write_text("#pragma once\n__device__ float f(float x) { return x + undefined_name; }\n")
    source = tmp_path / "uses_bad.cu"
    source.write_text('#include "bad.cuh"\n__global__ void k(float* x) { x[0] = f(x[0]); }\n')
    with pytest.raises(nvrtc.KernelCompileError) as info:
        nvrtc.compile_program(source, ["k"], 80)
    assert (info.value.file, info.value.line) == ("bad.cuh", 2)
    assert 'bad.cuh(2): error: identifier "undefined_name" is undefined' in str(info.value)


@requires_nvrtc
def test_unknown_name_expression_is_a_compile_error():
    with pytest.raises(nvrtc.KernelCompileError, match="name expression") as info:
        nvrtc.compile_program(KERNELS / "kernels.cu", ["no_such_kernel<float>"], 90)
    assert "no_such_kernel" in str(info.value)


@requires_nvrtc
def test_ptx_for_an_arch_newer_than_nvrtc_knows():
    newest = nvrtc.supported_archs()[-1]
    program = nvrtc.compile_program(KERNELS / "kernels.cu", ["scale<float, 2>", "plain_copy"], 200)
    assert program.kind == "ptx" and program.arch == 200 and program.target == f"compute_{newest}"
    text = program.binary.decode()
    assert f".target sm_{newest}" in text and TEMPLATED["scale<float, 2>"] in text
    assert program.lowered["plain_copy"] == "plain_copy"
    assert not program.binary.endswith(b"\x00")


@requires_nvrtc
def test_an_empty_log_does_not_corrupt_shared_bytes_objects():
    """NVRTC writes a lone NUL for an empty log (PTX targets run no ptxas): into a fresh
    buffer, never into CPython's shared 1-byte bytes objects (``b" " * 1`` is one of them)."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from na_rtc.runtime import nvrtc
        program = nvrtc.compile_program(Path({str(KERNELS / "kernels.cu")!r}), ["plain_copy"], 200)
        assert program.kind == "ptx" and program.log == ""
        assert (b" " * 1)[0] == 32 and bytes([32]).decode() == " ", "b' ' was overwritten"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # a fresh, clean process
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@requires_nvrtc
def test_arch_older_than_nvrtc_supports_points_to_cuda12():
    oldest = nvrtc.supported_archs()[0]
    with pytest.raises(nvrtc.ArchUnsupported, match=r"cuda12"):
        nvrtc.compile_program(KERNELS / "kernels.cu", ["plain_copy"], oldest - 1)


@requires_nvrtc
def test_user_options_are_passed():
    source = KERNELS / "kernels.cu"
    program = nvrtc.compile_program(source, ["plain_copy"], 90, options=["-DEXTRA=1", "-maxrregcount=32"])
    assert "-DEXTRA=1" in program.options and program.options[-1] == "-arch=sm_90"


# ---------------------------------------------------------------- resources and fit


SPILLS = KERNELS / "spills.cu"


@requires_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_spilling_kernel_is_detected(kernel_cache, arch):
    families = {"spills": _family(SPILLS, ["pressure<8>", "pressure<96>"], threads=256)}
    (report,) = check.check_families(families, [arch])
    by_name = {k.name: k for k in report.kernels}
    assert by_name["pressure<8>"].ok and by_name["pressure<8>"].spill_stores == 0
    bad = by_name["pressure<96>"]
    assert bad.spill_stores > 0 and bad.spill_loads > 0 and bad.registers <= 32
    assert not bad.ok and any("spills" in p for p in bad.problems)
    assert not report.ok


@requires_nvrtc
def test_register_and_shared_memory_fit(kernel_cache):
    family = _family(SPILLS, ["heavy<32>", "pressure<8>"], threads=1024)
    family.launch_threads["pressure<8>"] = 256
    family.launch_shared_bytes["pressure<8>"] = 200 * 1024  # fits sm_90's 227 KiB, not sm_80's 163 KiB
    reports = check.check_families({"fit": family}, [80, 90])
    for report in reports:
        heavy = next(k for k in report.kernels if k.name == "heavy<32>")
        assert heavy.registers > 64, "test kernel should need more than 64 registers"
        assert heavy.max_threads < 1024 and heavy.fits is False
        assert any("registers" in p for p in heavy.problems)
        small = next(k for k in report.kernels if k.name == "pressure<8>")
        assert small.fits is (report.arch == 90)
        if report.arch == 90:
            assert any("opt in" in note for note in small.notes)
    text = check.render_table(reports)
    assert "NO" in text and "FAILED" in text


@requires_nvrtc
def test_check_and_precompile_commands(kernel_cache, tmp_path, capsys):
    good = _family(KERNELS / "kernels.cu", TEMPLATED, threads=256, shared=0)
    module = _family_module(tmp_path / "good_families.py", {"demo": good})
    json_path = tmp_path / "out" / "check.json"

    assert main(["precompile", "--arch", "sm_80,sm_90", "--family-module", str(module)]) == 0
    out = capsys.readouterr().out
    assert out.count("compiled to cubin") == 2
    assert len(list(kernel_cache.glob("sm_*/kernels-*.bin"))) == 2
    cache.clear_memory_cache()
    assert main(["precompile", "--arch", "sm_80,sm_90", "--family-module", str(module), "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("already cached") == 2

    assert main(["check", "--arch", "sm_80,sm_90", "--family-module", str(module), "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "sm_80: limits" in out and "sm_90: limits" in out and "ok: 8 instantiation(s)" in out
    assert "na_test::block_sum<float>" in out and "(cached)" in out
    data = json.loads(json_path.read_text())
    assert data["ok"] is True and len(data["families"]) == 2
    kernels = {(k["arch"], k["name"]): k for f in data["families"] for k in f["kernels"]}
    block_sum = kernels[("sm_90", "na_test::block_sum<float>")]
    assert block_sum["static_shared"] == 1024 and block_sum["fits"] is True and block_sum["spill_stores"] == 0
    assert block_sum["mangled"] == TEMPLATED["na_test::block_sum<float>"]


@requires_nvrtc
def test_check_command_fails_on_spills_and_compile_errors(kernel_cache, tmp_path, capsys):
    broken = _broken_copy(tmp_path)
    families = {
        "spills": _family(SPILLS, ["pressure<96>"], threads=128),
        "broken": _family(broken, ["k<float>"]),
    }
    module = _family_module(tmp_path / "bad_families.py", families)
    json_path = tmp_path / "bad.json"
    assert main(["check", "--arch", "sm_90", "--family-module", str(module), "--json", str(json_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL pressure<96>: spills registers" in out
    assert "KernelCompileError" in out and "broken.cu" in out
    data = json.loads(json_path.read_text())
    assert data["ok"] is False
    assert {f["family"]: f["ok"] for f in data["families"]} == {"spills": False, "broken": False}
    assert main(["precompile", "--arch", "sm_90", "--family-module", str(module), "--family", "broken"]) == 1
    assert main(["check", "--arch", "sm_90", "--family-module", str(module), "--family", "nope"]) == 2


def test_command_argument_errors(capsys, tmp_path):
    module = _family_module(tmp_path / "f.py", {"t": _family(KERNELS / "kernels.cu", ["plain_copy"])})
    assert main(["check", "--arch", "gfx90a", "--family-module", str(module)]) == 2
    assert "not a GPU architecture" in capsys.readouterr().err
    assert main(["check", "--family-module", str(tmp_path / "missing.py")]) == 2


@requires_nvrtc
def test_check_runs_as_a_module(kernel_cache, tmp_path):
    module = _family_module(tmp_path / "fams.py", {"demo": _family(KERNELS / "kernels.cu", ["plain_copy"])})
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "na_rtc", "check", "--arch", "sm_90", "--family-module", str(module)],
        capture_output=True, text=True, env=environment, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"plain_copy\s+\d+\s+0/0", result.stdout)


def test_precompile_without_gpu_asks_for_archs(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(check, "_default_archs_from_gpus", lambda: [])
    module = _family_module(tmp_path / "f.py", {"t": _family(KERNELS / "kernels.cu", ["plain_copy"])})
    assert main(["precompile", "--family-module", str(module)]) == 2
    assert "--arch sm_80,sm_90" in capsys.readouterr().err


@requires_nvrtc
def test_compile_error_survives_pickling(tmp_path):
    import pickle

    with pytest.raises(nvrtc.KernelCompileError) as info:
        nvrtc.compile_program(_broken_copy(tmp_path), ["k<float>"], 90)
    copy = pickle.loads(pickle.dumps(info.value))
    assert (str(copy), copy.file, copy.line, copy.log) == (str(info.value), info.value.file, info.value.line, info.value.log)


def _ptx_entries(text: str) -> dict[str, str]:
    """mangled kernel name -> its PTX body."""
    entries = {}
    for match in re.finditer(r"\.entry (\S+)\(", text):
        start = match.end()
        nxt = text.find(".entry ", start)
        entries[match.group(1)] = text[start: nxt if nxt >= 0 else len(text)]
    return entries


def _in_loops(body: str) -> list[tuple[str, bool]]:
    """Each PTX line of a kernel body, and whether it lies in a loop: between a label and a later branch
    back to it (the key-chunk loops are not unrolled: their trip count is the problem's)."""
    lines = body.splitlines()
    label_at = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\w+):", line))}
    inside = [False] * len(lines)
    for i, line in enumerate(lines):
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);", line)
        if branch and label_at.get(branch.group(1), i + 1) <= i:
            inside[label_at[branch.group(1)]:i + 1] = [True] * (i + 1 - label_at[branch.group(1)])
    return list(zip(lines, inside))


def test_the_loop_finder_tells_loop_bodies_apart():
    body = "\n".join(["\tmma.sync.aligned a;", "$L__BB0_1:", "\twgmma.mma_async b;", "\t@%p1 bra \t$L__BB0_1;",
                      "\tbra.uni \t$L__BB0_2;", "\tmma.sync.aligned c;", "$L__BB0_2:", "\tret;"])
    assert [line.strip() for line, inside in _in_loops(body) if inside] == [
        "$L__BB0_1:", "wgmma.mma_async b;", "@%p1 bra \t$L__BB0_1;"]


@pytest.mark.parametrize("family_name, arch, product, needed", [
    ("fused_tc", 80, "mma.sync.aligned.m16n8k16", ("ldmatrix.sync.aligned", "cp.async.cg.shared.global")),
    ("fused_tc_bwd", 80, "mma.sync.aligned.m16n8k16", ("ldmatrix.sync.aligned", "cp.async.cg.shared.global")),
    ("fused_wg", 90, "wgmma.mma_async.sync.aligned", ("wgmma.wait_group", "fence.proxy.async", "cp.async.cg")),
    ("fused_wg_bwd", 90, "wgmma.mma_async.sync.aligned", ("wgmma.wait_group", "fence.proxy.async", "cp.async.cg")),
])
def test_tensor_core_kernels_compile_to_tensor_core_instructions(family_name, arch, product, needed):
    """Every tensor-core kernel's PTX holds its tensor-core and async-copy instructions and no trap (the
    fallback the primitives compile to on a target without them, e.g. wgmma outside sm_90a); every
    tensor-core product is on the hot path, inside the loops over chunks, and so are async copies (the next
    chunk loading while this one is multiplied)."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from na_rtc._resources import cuda_src_dir
    from na_rtc.runtime.families import FAMILIES

    family = FAMILIES[family_name]
    program = nvrtc.compile_program(cuda_src_dir() / family.source, family.names, arch,
                                    arch_specific=family.arch_specific, ptx=True)
    assert program.kind == "ptx" and program.target == f"compute_{arch}{'a' if family.arch_specific else ''}"
    entries = _ptx_entries(program.binary.decode())
    for name in family.names:
        body = entries[program.lowered[name]]
        missing = [instruction for instruction in (product, *needed) if instruction not in body]
        assert not missing, f"{name}: no {missing} in its PTX"
        lines = _in_loops(body)
        outside = sum(product in line for line, inside in lines if not inside)
        assert outside == 0, f"{name}: {outside} {product} outside every loop"
        assert any("cp.async" in line for line, inside in lines if inside), f"{name}: no cp.async in a loop"
        assert "trap;" not in body, f"{name}: compiles to a trap"
        if name.startswith("na_fused_wg_fwd<"):
            assert _softmax_runs_beside_a_wgmma(body), f"{name}: no ex2 between a wgmma commit and its wait"


def _softmax_runs_beside_a_wgmma(ptx: str) -> bool:
    """Whether some committed wgmma group is still unwaited while ex2 (the softmax) runs: the wgmma forward
    issues the next chunk's Q K^T before this chunk's softmax, and a wait moved before the softmax (or the
    compiler hoisting it there) would serialize the two again."""
    pending = False
    for line in ptx.splitlines():
        if "wgmma.commit_group" in line:
            pending = True
        elif "wgmma.wait_group" in line:
            pending = False
        elif pending and "ex2.approx" in line:
            return True
    return False
