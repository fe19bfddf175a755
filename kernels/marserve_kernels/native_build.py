"""Compiles one of marserve_kernels' C sources for this machine at first use and loads it with ctypes.

Each source is built with the system C compiler, once per variant (e.g. per weight dtype), for the ISA
`cpu_features.isa()` names (AVX-512, AVX2 + FMA, or portable C; MARSERVE_NATIVE_ISA forces a lesser one),
into a per-machine cache (MARSERVE_KERNEL_CACHE, default ~/.cache/marserve/kernels) keyed by the source, the
local files it includes (cpu_simd.h; cpu_decode_layer.c includes two other kernels' sources), the compiler,
the flags and this CPU's feature flags, so a shared cache never hands one CPU another's build. A build that
fails is remembered under the same key (its compiler error kept beside the cache), so later processes skip it
with one logged line instead of compiling again. Without a compiler, off Linux, or with MARSERVE_NATIVE=0 (or
the kernel's own switch) `load` returns None and callers use torch; `Kernel.reason` says why. Each kernel's
Python side holds one `Kernel`, which loads each variant once and keeps it. The libraries link libgomp by
soname, so they share the OpenMP runtime torch already loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from marserve_kernels import cpu_features

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wno-unused-function"]


def isa_flags(isa: str, host_isa: str, machine: str | None = None) -> list[str]:
    """Compiler flags that target `isa` (cpu_simd.h picks its vector width from the macros they define).
    The host's own ISA gets -march=native (its exact tuning); a lesser one the matching x86-64 level."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return []  # the compiler's baseline: NEON on aarch64
    if isa == host_isa:
        return ["-march=native"]
    return {"avx512": ["-march=x86-64-v4", "-mtune=native"], "avx2": ["-march=x86-64-v3", "-mtune=native"],
            "generic": ["-march=x86-64", "-mtune=generic"]}[isa]


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    return Path(os.environ.get("MARSERVE_KERNEL_CACHE", Path.home() / ".cache" / "marserve" / "kernels"))


def _cpu_signature() -> str:
    """What -march=native depends on."""
    return " ".join(sorted(cpu_features.cpu_flags())) or platform.processor()


def _local_includes(source: Path) -> list[Path]:
    """The files beside `source` that it includes with #include "..." (recursively): a build's key hashes them."""
    found: list[Path] = []
    todo = [source]
    while todo:
        for line in todo.pop().read_text().splitlines():
            line = line.strip()
            if line.startswith("#include") and '"' in line:
                dep = source.parent / line.split('"')[1]
                if dep.exists() and dep not in found and dep != source:
                    found.append(dep)
                    todo.append(dep)
    return sorted(found)


def compile_command(source: Path, defines: list[str], isa: str, output: str, cc: str) -> list[str]:
    return [cc, *FLAGS, *isa_flags(isa, cpu_features.host_isa()), *defines, "-o", output, str(source), "-lm"]


class BuildError(RuntimeError):
    """A kernel's compile failed; the message is the compiler's first error."""


def _first_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return next((ln.strip() for ln in lines if "error" in ln), lines[0].strip() if lines else "no output")


def build(source: Path, variant: str, defines: list[str], isa: str | None = None) -> Path:
    """The path of the built library for (source, variant, isa), compiling it if the cache lacks it.
    Raises BuildError (the compiler's first error) when it does not compile, now or in an earlier process."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    isa = isa or cpu_features.isa()
    command = compile_command(source, defines, isa, "OUT", cc)
    headers = b"".join(h.read_bytes() for h in _local_includes(source))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(command).encode() + _cpu_signature().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    cache = cache_dir()
    stem = f"{source.stem}-{variant}-{isa}"
    target = cache / f"{stem}-{key}.so"
    failed = cache / f"{stem}-{key}.failed"
    if target.exists() and target.stat().st_size > 0:  # a 0-byte file is no build: built again
        return target
    if failed.exists():
        first_error = failed.read_text().split("\n", 1)[0]  # the full compiler output stays in the file
        raise BuildError(f"{first_error} (an earlier build failed; remove {failed} to retry)")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # build aside, rename: concurrent builders are safe
    os.close(fd)
    try:
        done = subprocess.run(compile_command(source, defines, isa, tmp, cc), capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or os.path.getsize(tmp) == 0:
            error = _first_error(done.stderr)
            failed.write_text(error + "\n\n" + done.stderr)
            raise BuildError(error)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in cache.glob(f"{stem}-*"):  # older sources' builds and failures; unlinking a loaded .so is safe
        if old not in (target, failed):
            old.unlink(missing_ok=True)
    return target


def switched_off(switch: str | None = None) -> str | None:
    """Why native kernels are off in this process (MARSERVE_NATIVE=0, the kernel's own switch, not Linux), or None."""
    if os.environ.get("MARSERVE_NATIVE", "1") == "0":
        return "native kernels switched off (MARSERVE_NATIVE=0)"
    if switch and os.environ.get(switch, "1") == "0":
        return f"switched off ({switch}=0)"
    if platform.system() != "Linux":
        return f"native kernels are built on Linux only (this is {platform.system()})"
    return None


class Kernel:
    """One C source of marserve_kernels, built once per variant on first ask and kept loaded.

    variants: key (a torch dtype) -> its extra compiler flags; declare(lib) sets the entry points'
    ctypes signatures once a build is loaded. `lib(key)` is the library, or None when unavailable, and
    then `reason(key)` says why in one line."""

    def __init__(self, source: Path, variants: dict, switch: str, declare: Callable[[ctypes.CDLL], None]):
        self.source, self.variants, self.switch, self.declare = source, variants, switch, declare
        self._libs: dict = {}
        self._reasons: dict = {}

    def lib(self, key) -> ctypes.CDLL | None:
        if key not in self._libs:
            self._libs[key] = self._load(key)
        return self._libs[key]

    def reason(self, key) -> str | None:
        """Why lib(key) is None (asking lib first), or None when it is built."""
        return None if self.lib(key) is not None else self._reasons.get(key)

    def _load(self, key) -> ctypes.CDLL | None:
        if key not in self.variants:
            self._reasons[key] = f"{self.source.name} has no {key} variant"
            return None
        off = switched_off(self.switch)
        if off:
            self._reasons[key] = off
            return None
        variant = str(key).replace("torch.", "")
        try:
            isa = cpu_features.isa()
        except ValueError as e:  # MARSERVE_NATIVE_ISA names no ISA, or one above this host's
            self._reasons[key] = f"{self.source.name} ({variant}) not built: {e}"
            logger.warning("native kernel unavailable, using torch: %s", self._reasons[key])
            return None
        try:
            lib = ctypes.CDLL(str(build(self.source, variant, self.variants[key], isa)))
        except (BuildError, OSError, subprocess.SubprocessError) as e:
            self._reasons[key] = f"{self.source.name} ({variant}, {isa}) did not build: {e}"
            logger.warning("native kernel unavailable, using torch: %s", self._reasons[key])
            return None
        self.declare(lib)
        return lib


# The modules of marserve_kernels that each hold one Kernel as _KERNEL (imported on request: they import this one).
KERNEL_MODULES = ("cpu_moe_native", "cpu_dense_native", "cpu_attention_native", "cpu_norm_native",
                  "cpu_decode_layer_native")


def kernels() -> dict[str, Kernel]:
    """Every native kernel, by the name of its module: what `marserve doctor` reports and the build tests compile."""
    return {name: importlib.import_module(f"marserve_kernels.{name}")._KERNEL for name in KERNEL_MODULES}



def build_all(dtype) -> dict[str, str | None]:
    """Every kernel's variant for `dtype` built (or found in the cache) and loaded now, the compilers running side
    by side: {kernel module: why it is unavailable, or None}. The engine calls it at start, so that no request
    waits seconds for a compiler (the first one did, after any change to a kernel's source)."""
    from concurrent.futures import ThreadPoolExecutor
    wanted = {name: k for name, k in kernels().items() if dtype in k.variants}
    with ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:  # each Kernel on one thread: no shared state
        reasons = pool.map(lambda k: k.reason(dtype), wanted.values())
        return dict(zip(wanted, reasons))
