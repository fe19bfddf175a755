"""Loading is memory-mapped onto a meta-built model: peak RSS grows by at most 1.3x the weights' size."""

import json
import subprocess
import sys

from tests.baby_models import make_baby_checkpoint

CHILD = r"""
import resource, sys, json
import torch, safetensors  # imports first: the baseline excludes them
from marserve.loader import load_model
load_model(sys.argv[2])  # warm-up on a tiny checkpoint: torch's lazy initialisation is not the loader's memory


def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


# Reset the high-water mark (VmHWM) to the current RSS so import-time peaks do not hide the loader's.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kb("VmRSS")
model, _ = load_model(sys.argv[1], dtype="float32")
after = kb("VmHWM")
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"delta_kb": after - before, "weights_kb": nbytes / 1024}))
"""


def test_peak_rss_while_loading(tmp_path):
    # ~60 MB of fp32 weights: hidden 512, 4 experts of 3 x 512 x 1024 per layer, 2 layers, vocab 320.
    path = make_baby_checkpoint(tmp_path / "big", "mixtral", hidden_size=512, sharded=False)
    tiny = make_baby_checkpoint(tmp_path / "tiny", "mixtral")
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tiny)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"weights {m['weights_kb'] / 1024:.1f} MiB, peak RSS growth {m['delta_kb'] / 1024:.1f} MiB")
    assert m["weights_kb"] > 40 * 1024
    assert m["delta_kb"] <= 1.3 * m["weights_kb"]
