import subprocess
import sys


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "marserve.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("generate", "inspect", "serve", "train", "bench"):
        assert name in out.stdout
