"""Compiles one of marserve_kernels' C sources for this machine at first use and loads it with ctypes.

Each source is built with the system C compiler (`cc -O3 -march=native -fopenmp`), once per variant
(e.g. per weight dtype), into a per-machine cache (MARSERVE_KERNEL_CACHE, default ~/.cache/marserve/kernels)
keyed by the source, the local files it includes (cpu_simd.h; cpu_decode_layer.c includes two
other kernels' sources), the flags and this CPU's feature flags, so a shared cache never hands one CPU
another's build. Without a compiler, off Linux, or with MARSERVE_NATIVE=0 (or the kernel's own switch)
`load` returns None and callers use torch. Each kernel's Python side holds one `Kernel`, which loads
each variant once and keeps it. The libraries link libgomp by soname, so they share the
OpenMP runtime torch already loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]


def _cpu_signature() -> str:
    """What -march=native depends on."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()


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


def _compile(source: Path, variant: str, defines: list[str]) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not source.exists():
        return None
    flags = [*FLAGS, *defines]
    headers = b"".join(h.read_bytes() for h in _local_includes(source))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode() + _cpu_signature().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MARSERVE_KERNEL_CACHE", Path.home() / ".cache" / "marserve" / "kernels"))
    stem = f"{source.stem}-{variant}"
    target = cache / f"{stem}-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # build aside, rename: concurrent builders are safe
        os.close(fd)
        done = subprocess.run([compiler, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            logger.warning("building %s failed, using torch: %s", source.name, done.stderr.strip()[:500])
            return None
        os.replace(tmp, target)
        for old in cache.glob(f"{stem}-*.so"):  # older sources; unlinking a loaded .so is safe
            if old != target:
                old.unlink(missing_ok=True)
    return ctypes.CDLL(str(target))


def load(source: Path, variant: str, defines: list[str], switch: str | None = None) -> ctypes.CDLL | None:
    """The built library for (source, variant), building it if the cache lacks it; None when unavailable.
    `switch` names an environment variable that turns this kernel off when set to 0."""
    off = os.environ.get("MARSERVE_NATIVE", "1") == "0" or (switch and os.environ.get(switch, "1") == "0")
    if off or platform.system() != "Linux":
        return None
    try:
        return _compile(source, variant, defines)
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("native kernel %s unavailable, using torch: %s", source.name, e)
        return None


class Kernel:
    """One C source of marserve_kernels, built once per variant on first ask and kept loaded.

    variants: key (a torch dtype) -> its extra compiler flags; declare(lib) sets the entry points'
    ctypes signatures once a build is loaded. `lib(key)` is the library, or None when unavailable."""

    def __init__(self, source: Path, variants: dict, switch: str, declare: Callable[[ctypes.CDLL], None]):
        self.source, self.variants, self.switch, self.declare = source, variants, switch, declare
        self._libs: dict = {}

    def lib(self, key) -> ctypes.CDLL | None:
        if key not in self._libs:
            lib = None
            if key in self.variants:
                lib = load(self.source, str(key).replace("torch.", ""), self.variants[key], self.switch)
                if lib is not None:
                    self.declare(lib)
            self._libs[key] = lib
        return self._libs[key]
