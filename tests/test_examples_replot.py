"""The per-row plots that are not committed (examples/results/**/val_loss.png below an experiment's top
folder) are redrawn byte for byte from the committed results.json by examples/replot.py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_replot_redraws_the_committed_plot_byte_for_byte(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import replot
    finally:
        sys.path.remove(str(EXAMPLES))
    committed = EXAMPLES / "results" / "mlp_digits"
    shutil.copy(committed / "results.json", tmp_path / "results.json")
    drawn = replot.replot(tmp_path)
    assert drawn is not None and drawn.read_bytes() == (committed / "val_loss.png").read_bytes()
    shutil.copy(EXAMPLES / "results" / "noise_scale" / "results.json", tmp_path / "results.json")
    assert replot.replot(tmp_path) is None  # not an upscaling row: left to its own script
