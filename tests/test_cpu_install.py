"""A plain CPU install has no Triton (it is in the `gpu` and `test` extras): marserve must load and generate without it."""

from __future__ import annotations

import subprocess
import sys

# Runs as if Triton were not installed: a finder first on sys.meta_path refuses `triton` (as a missing
# package would) and records which module asked. torch itself tries `import triton` when it compiles
# internal helpers and gets on without it; what must never happen is marserve's own code asking for it
# on the CPU path, or the CPU path failing because it is absent.
_GENERATE_WITHOUT_TRITON = """
import sys

asked = []

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            frame = sys._getframe(1)
            while frame.f_code.co_filename.startswith("<frozen"):  # importlib's own frames
                frame = frame.f_back
            asked.append(frame.f_globals.get("__name__", "?"))
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
from marserve import LLM, SamplingParams
out = LLM(sys.argv[1]).generate(["The quick brown"], SamplingParams(max_tokens=4, temperature=0))
assert len(out[0].outputs[0].token_ids) == 4, out
print("triton in sys.modules:", "triton" in sys.modules)
print("asked by marserve:", sorted({m for m in asked if m.startswith("marserve")}))
"""


def test_a_cpu_install_loads_and_generates_without_triton(baby_checkpoint):
    path = baby_checkpoint("mixtral")
    r = subprocess.run([sys.executable, "-c", _GENERATE_WITHOUT_TRITON, str(path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "triton in sys.modules: False" in r.stdout
    assert "asked by marserve: []" in r.stdout
