"""Every native kernel builds wherever a C compiler exists, for every ISA, without a warning; each build is for
the ISA it was asked for; a failed build is remembered, an empty one rebuilt; an unavailable kernel says why.
(The kernel tests skip when a kernel is unavailable, so a source that stopped compiling must fail here instead
of turning those tests into skips.)"""

from __future__ import annotations

import ctypes
import importlib
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from marserve_kernels import (cpu_attention_native, cpu_decode_layer_native, cpu_dense_native, cpu_features,
                              cpu_moe_native, cpu_norm_native, native_build)

HAVE_CC = native_build.compiler() is not None
X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine (set CC, or install gcc)")
KERNELS = native_build.kernels()
# What this host can run: every ISA up to its own (a build above it compiles, but would not load and run).
RUNNABLE = cpu_features.ISAS[:cpu_features.ISAS.index(cpu_features.host_isa()) + 1]


def _simd_isa(path: Path | str) -> str:
    lib = ctypes.CDLL(str(path))
    lib.simd_isa.restype = ctypes.c_char_p
    return lib.simd_isa().decode()


@needs_cc
@pytest.mark.skipif(os.environ.get("MARSERVE_NATIVE") == "0", reason="native kernels switched off (MARSERVE_NATIVE=0)")
def test_every_native_kernel_builds_here():
    built = {
        "cpu_moe_small fp32": cpu_moe_native.available(torch.float32),
        "cpu_moe_small bf16": cpu_moe_native.available(torch.bfloat16),
        "cpu_decode_attention fp32": cpu_attention_native.available(torch.float32),
        "cpu_decode_attention bf16": cpu_attention_native.available(torch.bfloat16),
        "cpu_rms_norm": cpu_norm_native.available(),
        "cpu_dense_small fp32": cpu_dense_native.available(torch.float32),
        "cpu_dense_small bf16": cpu_dense_native.available(torch.bfloat16),
        "cpu_decode_layer fp32": cpu_decode_layer_native.available(torch.float32),
        "cpu_decode_layer bf16": cpu_decode_layer_native.available(torch.bfloat16),
    }
    assert all(built.values()), f"failed to build (see the warning logged above): {built}"
    reasons = {f"{name} {key}": importlib.import_module(f"marserve_kernels.{name}").unavailable_reason(key)
               for name, kernel in KERNELS.items() for key in kernel.variants}
    assert not any(reasons.values()), reasons  # built, so no module gives a reason for a skip


@pytest.mark.parametrize("name", native_build.KERNEL_MODULES)
def test_each_module_says_its_own_switch_turned_it_off(monkeypatch, name):
    """What the kernel tests skip with: the real reason, here the module's own switch (not "no compiler")."""
    module = importlib.import_module(f"marserve_kernels.{name}")
    kernel = module._KERNEL
    monkeypatch.setattr(kernel, "_libs", {})  # as in a fresh process
    monkeypatch.setattr(kernel, "_reasons", {})
    monkeypatch.delenv("MARSERVE_NATIVE", raising=False)
    monkeypatch.setenv(kernel.switch, "0")
    if platform.system() != "Linux":
        pytest.skip(f"native kernels are built on Linux only (this is {platform.system()})")
    assert module.unavailable_reason(torch.float32) == f"switched off ({kernel.switch}=0)"
    assert module.unavailable_reason(torch.float16) == f"{kernel.source.name} has no torch.float16 variant"


def test_every_c_source_is_a_kernel():
    """The compile test below covers every source only if each is some module's Kernel."""
    sources = {kernel.source for kernel in KERNELS.values()}
    assert sources == set(Path(native_build.__file__).parent.glob("*.c"))


@needs_cc
@pytest.mark.skipif(not X86, reason="the ISAs other than generic are x86-64's")
@pytest.mark.parametrize("isa", cpu_features.ISAS)
@pytest.mark.parametrize("name, key", [(name, key) for name, kernel in KERNELS.items() for key in kernel.variants],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_each_kernel_variant_compiles_for_each_isa_without_warnings(tmp_path, name, key, isa):
    """Compile-only above the host's ISA (gcc targets x86-64-v4 anywhere); a build this host can run must
    also report the ISA it was built for, so the flags really chose that path of cpu_simd.h."""
    kernel = KERNELS[name]
    out = tmp_path / "kernel.so"
    command = native_build.compile_command(kernel.source, kernel.variants[key], isa, str(out),
                                           native_build.compiler())
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"compiler warnings for {' '.join(command)}:\n{done.stderr}"
    if isa in RUNNABLE:
        assert _simd_isa(out) == isa


@needs_cc
@pytest.mark.parametrize("isa", RUNNABLE)
def test_build_for_each_runnable_isa_reports_that_isa(tmp_path, monkeypatch, isa):
    """build() with the ISA given (as MARSERVE_NATIVE_ISA would choose it) yields a library for that ISA."""
    monkeypatch.setenv("MARSERVE_KERNEL_CACHE", str(tmp_path))
    path = native_build.build(KERNELS["cpu_norm_native"].source, "float32", [], isa=isa)
    assert path.parent == tmp_path and f"-{isa}-" in path.name
    assert _simd_isa(path) == isa


@needs_cc
@pytest.mark.parametrize("isa", RUNNABLE)
def test_the_cap_reaches_the_built_kernel(tmp_path, monkeypatch, isa):
    """MARSERVE_NATIVE_ISA picks the ISA a Kernel is built for when build() is not told one."""
    monkeypatch.setenv("MARSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("MARSERVE_NATIVE_ISA", isa)
    monkeypatch.delenv("MARSERVE_NATIVE", raising=False)
    monkeypatch.delenv("MARSERVE_NATIVE_NORM", raising=False)
    norm = KERNELS["cpu_norm_native"]
    kernel = native_build.Kernel(norm.source, norm.variants, "MARSERVE_NATIVE_NORM", norm.declare)
    lib = kernel.lib(torch.float32)
    assert lib is not None, kernel.reason(torch.float32)
    assert _simd_isa(lib._name) == isa


@pytest.fixture
def counted_compiles(tmp_path, monkeypatch):
    """A tmp kernel cache, and a list that grows by one per compiler run."""
    monkeypatch.setenv("MARSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    calls = []
    real_run = subprocess.run

    def run(*args, **kwargs):
        calls.append(args)
        return real_run(*args, **kwargs)
    monkeypatch.setattr(native_build.subprocess, "run", run)
    return calls


@needs_cc
def test_a_failed_build_is_remembered_not_compiled_again(tmp_path, counted_compiles):
    broken = tmp_path / "broken.c"
    broken.write_text("int broken(void) { return undeclared_name; }\n")
    with pytest.raises(native_build.BuildError, match="undeclared_name"):
        native_build.build(broken, "float32", [])
    assert len(counted_compiles) == 1
    [failed] = (tmp_path / "cache").glob("broken-float32-*.failed")
    with pytest.raises(native_build.BuildError, match="undeclared_name.*an earlier build failed") as again:
        native_build.build(broken, "float32", [])
    assert len(counted_compiles) == 1  # the compiler did not run again
    assert str(failed) in str(again.value)  # says what to remove to retry
    assert "\n" not in str(again.value)  # one line, as the first time; the compiler's notes stay in the file
    failed.unlink()
    with pytest.raises(native_build.BuildError):
        native_build.build(broken, "float32", [])
    assert len(counted_compiles) == 2  # and after removing it, it does


@needs_cc
def test_a_failed_build_makes_the_kernel_unavailable_with_the_compiler_error(tmp_path, counted_compiles,
                                                                             monkeypatch):
    monkeypatch.delenv("MARSERVE_NATIVE", raising=False)
    broken = tmp_path / "broken.c"
    broken.write_text("int broken(void) { return undeclared_name; }\n")
    kernel = native_build.Kernel(broken, {torch.float32: []}, "MARSERVE_NATIVE_TEST_BROKEN", lambda lib: None)
    assert kernel.lib(torch.float32) is None
    reason = kernel.reason(torch.float32)
    assert "broken.c" in reason and "did not build" in reason and "undeclared_name" in reason
    assert "no C compiler" not in reason


@needs_cc
def test_an_empty_library_in_the_cache_is_rebuilt(tmp_path, counted_compiles):
    source = tmp_path / "tiny.c"
    source.write_text("int tiny(void) { return 7; }\n")
    path = native_build.build(source, "float32", [])
    assert len(counted_compiles) == 1
    assert native_build.build(source, "float32", []) == path and len(counted_compiles) == 1  # cached
    path.write_bytes(b"")  # as a build killed mid-write, or a full disk, can leave it
    assert native_build.build(source, "float32", []) == path
    assert len(counted_compiles) == 2
    assert path.stat().st_size > 0 and ctypes.CDLL(str(path)).tiny() == 7


@pytest.mark.parametrize("env, switch_named", [
    ({"MARSERVE_NATIVE": "0"}, "MARSERVE_NATIVE=0"),
    ({"MARSERVE_NATIVE_TEST_TINY": "0"}, "MARSERVE_NATIVE_TEST_TINY=0"),
])
def test_reason_names_the_switch_that_turned_a_kernel_off(tmp_path, counted_compiles, monkeypatch, env,
                                                          switch_named):
    if platform.system() != "Linux":
        pytest.skip(f"native kernels are built on Linux only (this is {platform.system()})")
    monkeypatch.delenv("MARSERVE_NATIVE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    source = tmp_path / "tiny.c"
    source.write_text("int tiny(void) { return 7; }\n")
    kernel = native_build.Kernel(source, {torch.float32: []}, "MARSERVE_NATIVE_TEST_TINY", lambda lib: None)
    assert kernel.lib(torch.float32) is None
    assert switch_named in kernel.reason(torch.float32)
    assert counted_compiles == []  # switched off: not even compiled


def test_reason_for_a_missing_variant(tmp_path):
    kernel = native_build.Kernel(tmp_path / "tiny.c", {torch.float32: []}, "MARSERVE_NATIVE_TEST_TINY",
                                 lambda lib: None)
    assert kernel.reason(torch.float16) == "tiny.c has no torch.float16 variant"


@pytest.mark.parametrize("forced, says", [
    ("sse9", "MARSERVE_NATIVE_ISA='sse9': expected one of generic, avx2, avx512"),
    ("avx2", "MARSERVE_NATIVE_ISA=avx2: this CPU supports generic at most"),
])
def test_reason_when_marserve_native_isa_cannot_apply_says_so_once(tmp_path, counted_compiles, monkeypatch, forced,
                                                                   says):
    """An unknown ISA, or one above the host (here a generic host asked for avx2): one line, no compiler run."""
    if platform.system() != "Linux":
        pytest.skip(f"native kernels are built on Linux only (this is {platform.system()})")
    monkeypatch.delenv("MARSERVE_NATIVE", raising=False)
    monkeypatch.setattr(cpu_features, "host_isa", lambda: "generic")
    monkeypatch.setenv("MARSERVE_NATIVE_ISA", forced)
    source = tmp_path / "tiny.c"
    source.write_text("int tiny(void) { return 7; }\n")
    kernel = native_build.Kernel(source, {torch.float32: []}, "MARSERVE_NATIVE_TEST_TINY", lambda lib: None)
    assert kernel.lib(torch.float32) is None
    reason = kernel.reason(torch.float32)
    assert reason.startswith(f"tiny.c (float32) not built: {says}")
    assert reason.count("MARSERVE_NATIVE_ISA") == 1 and "\n" not in reason
    assert counted_compiles == []


@needs_cc
@pytest.mark.skipif(os.environ.get("MARSERVE_NATIVE") == "0", reason="native kernels switched off (MARSERVE_NATIVE=0)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_all_loads_every_kernel_of_a_dtype_at_once(monkeypatch, dtype):
    for kernel in KERNELS.values():  # as in a fresh process: nothing loaded yet
        monkeypatch.setattr(kernel, "_libs", {})
    reasons = native_build.build_all(dtype)
    assert set(reasons) == {name for name, k in KERNELS.items() if dtype in k.variants}
    for name in reasons:
        assert dtype in KERNELS[name]._libs, f"{name} was not loaded"
        if reasons[name] is None:
            assert KERNELS[name]._libs[dtype] is not None
