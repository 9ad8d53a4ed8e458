"""The coord-check example runs and shows the property it plots: flat in width under the derived rules,
drifting under naive copying with a plain optimizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_coord_check_example_quick(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("coord_check_example", ROOT / "examples" / "coord_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--quick", "--out", str(tmp_path)])
    assert summary["spread_mup"] < 1e-2 < 0.5 < summary["spread_naive"]
    data = json.loads((tmp_path / "coord_check.json").read_text())
    assert data and (tmp_path / "coord_check.png").stat().st_size > 10_000
