"""The CPU image (deploy/Dockerfile.cpu) builds from a local Debian base and answers a completion over HTTP.

Opt-in, MARSERVE_TEST_IMAGE=1: the first build took 41 minutes and a few GB of disk on a busy 2-core host of
ours (debootstrap, then every layer copied whole by the vfs storage driver), too much for CI's budget.
It uses the docker daemon at DOCKER_HOST (or the default socket) when one answers; otherwise, as root, it
starts its own on a private socket with its data under MARSERVE_TEST_DOCKER_ROOT (default
/tmp/marserve-docker, kept between runs, so later builds reuse the cached base and layers) and stops it
afterwards. The base image marserve-base:bookworm is built by deploy/build_local_base.sh when missing. A torch
wheel of the pinned version from pip's find-links (PIP_FIND_LINKS, or MARSERVE_TORCH_WHEEL naming the
file) goes into the build context as deploy/wheels/, so torch is not downloaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.server.live_server import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BASE = "marserve-base:bookworm"
IMAGE = "marserve:cpu-test"


def _docker(*args, timeout=120, check=True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} failed ({out.returncode}):\n"
                             f"{out.stdout.decode(errors='replace')[-4000:]}{out.stderr.decode(errors='replace')[-4000:]}")
    return out


def _daemon_answers() -> bool:
    try:
        return _docker("version", "--format", "{{.Server.Version}}", timeout=20, check=False).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


@contextlib.contextmanager
def _private_daemon(root: Path):
    """A dockerd of our own on root/docker.sock (vfs, no iptables, no bridge: containers use the host's network)."""
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "ab")
    proc = subprocess.Popen(["dockerd", "-H", f"unix://{sock}", "--data-root", str(root / "data"),
                             "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"),
                             "--storage-driver=vfs", "--iptables=false", "--bridge=none"],
                            stdout=log, stderr=subprocess.STDOUT)
    os.environ["DOCKER_HOST"] = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 60
        while not _daemon_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start (see {root / 'dockerd.log'})")
            time.sleep(1)
        yield
    finally:
        del os.environ["DOCKER_HOST"]
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _torch_wheel() -> Path | None:
    """A wheel of pyproject's torch pin from MARSERVE_TORCH_WHEEL or pip's find-links, if there is one."""
    if os.environ.get("MARSERVE_TORCH_WHEEL"):
        return Path(os.environ["MARSERVE_TORCH_WHEEL"])
    (pin,) = re.findall(r'^\s*"torch==([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        found = sorted(Path(folder).glob(f"torch-{pin}[+-]*-cp311-*linux*x86_64.whl"))
        if found:
            return found[0]
    return None


def _context_tar(wheel: Path | None) -> bytes:
    """The repository's files (git's view: tracked and untracked but not ignored) plus the torch wheel as
    deploy/wheels/<name>; docker then applies .dockerignore to it as to any context."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    buf = io.BytesIO()
    # GNU format: a PAX header first would hide from docker (which reads 512 bytes) that stdin is an archive
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in filter(None, names):
            if (REPO / name).is_file():
                tar.add(REPO / name, arcname=name)
        if wheel is not None:
            tar.add(wheel, arcname=f"deploy/wheels/{wheel.name}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def docker_daemon():
    if os.environ.get("MARSERVE_TEST_IMAGE") != "1":
        pytest.skip("opt-in: set MARSERVE_TEST_IMAGE=1 to build and run the CPU image (40 min the first time on a busy 2-core host; docs/deploy.md)")
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH (apt-get install docker.io)")
    if _daemon_answers():
        yield
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("no docker daemon answers, and none can be started here (needs dockerd, from docker.io, and root)")
    with _private_daemon(Path(os.environ.get("MARSERVE_TEST_DOCKER_ROOT", "/tmp/marserve-docker"))):
        yield


@pytest.fixture(scope="module")
def cpu_image(docker_daemon):
    if _docker("image", "inspect", BASE, check=False).returncode != 0:
        if shutil.which("debootstrap") is None or os.geteuid() != 0:
            pytest.skip(f"no {BASE} image, and deploy/build_local_base.sh needs debootstrap and root to build it")
        out = subprocess.run(["nice", "-n", "10", "bash", str(REPO / "deploy" / "build_local_base.sh"), BASE],
                             capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-4000:]
    _docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-f", "deploy/Dockerfile.cpu",
            "-t", IMAGE, "-", input=_context_tar(_torch_wheel()), timeout=3600,
            env={**os.environ, "DOCKER_BUILDKIT": "0"})  # the legacy builder: no buildx plugin needed
    return IMAGE


def test_cpu_image_serves_a_completion_over_http(cpu_image):
    config = _docker("image", "inspect", "-f", "{{.Config.User}} {{json .Config.Healthcheck.Test}}", cpu_image)
    user, healthcheck = config.stdout.decode().split(" ", 1)
    assert user == "10001" and "/health" in healthcheck
    port, key, name = free_port(), uuid.uuid4().hex, f"marserve-test-{uuid.uuid4().hex[:8]}"
    # Flags as variables, the API key given at run time; the host's network, listening on loopback only.
    _docker("run", "-d", "--rm", "--name", name, "--network", "host", "-e", "MARSERVE_HOST=127.0.0.1",
            "-e", f"MARSERVE_PORT={port}", "-e", f"MARSERVE_API_KEY={key}", "-e", "MARSERVE_KV_CACHE_GB=0.25",
            cpu_image, timeout=900)  # vfs copies the image's 1.7 GB for the container: minutes on a busy host
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # model load and the native kernels' first compile
        while True:
            assert time.monotonic() < deadline, _docker("logs", name, check=False).stderr.decode()[-4000:]
            running = _docker("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.decode().strip()
            assert running == "true", "the container exited:\n" + _docker("logs", name, check=False).stderr.decode()[-4000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(2)
        body = {"model": "marserve-default", "prompt": "def read_config(path):", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 401
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]
        assert _docker("exec", name, "id", "-u").stdout.decode().strip() == "10001"
        deadline = time.monotonic() + 90  # the image's HEALTHCHECK (every 15 s) finds it healthy
        while (status := _docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.decode().strip()) != "healthy":
            assert status == "starting" and time.monotonic() < deadline, status
            time.sleep(3)
    finally:
        _docker("rm", "-f", name, check=False)
