"""MARSERVE_<FLAG> variables as the defaults of `marserve serve`'s flags (what the container images rely on)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from marserve.cli import build_parser
from marserve.commands.env_flags import env_name


def _serve_args(monkeypatch, env: dict, argv=()):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(["serve", *argv])


def test_every_kind_of_flag_reads_its_variable(monkeypatch):
    args = _serve_args(monkeypatch, {"MARSERVE_PORT": "9001", "MARSERVE_KV_CACHE_GB": "0.5", "MARSERVE_DTYPE": "float32",
                                     "MARSERVE_ENABLE_PREFIX_CACHING": "off", "MARSERVE_QUIET": "yes",
                                     "MARSERVE_MODEL_DIR": "/models/x", "MARSERVE_API_KEY": "k",
                                     "MARSERVE_SERVED_MODEL_NAME": "m"})
    assert (args.port, args.kv_cache_gb, args.dtype, args.enable_prefix_caching, args.quiet) == \
        (9001, 0.5, "float32", False, True)
    assert (args.model_dir, args.api_key, args.served_model_name) == ("/models/x", "k", "m")


def test_the_command_line_wins_and_empty_means_unset(monkeypatch):
    args = _serve_args(monkeypatch, {"MARSERVE_PORT": "9001", "MARSERVE_ENABLE_PREFIX_CACHING": "0",
                                     "MARSERVE_MAX_MODEL_LEN": ""},
                       ["--port", "7000", "--enable-prefix-caching"])
    assert (args.port, args.enable_prefix_caching, args.max_model_len) == (7000, True, None)


def test_every_serve_flag_names_its_variable_in_help():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = [a for a in serve._actions if a.dest != "help"]
    assert len(flags) > 20
    text = serve.format_help()
    for action in flags:
        assert f"[env {env_name(action)}]" in " ".join(text.split()), action.dest


@pytest.mark.parametrize("env, said", [({"MARSERVE_PORT": "eighty"}, "MARSERVE_PORT='eighty'"),
                                       ({"MARSERVE_DTYPE": "int3"}, "MARSERVE_DTYPE='int3': must be one of auto"),
                                       ({"MARSERVE_ENABLE_PREFIX_CACHING": "maybe"}, "expected one of")])
def test_a_bad_value_is_one_line_and_exit_1(env, said, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = subprocess.run([sys.executable, "-m", "marserve.cli", "serve"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and said in out.stderr and "Traceback" not in out.stderr
