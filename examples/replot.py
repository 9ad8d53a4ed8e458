"""Redraw the per-row plots (``val_loss.png``) of the upscaling experiments from their ``results.json``.

Only each experiment's default plot (``results/<name>/val_loss.png``) is committed; every other row's
plot is drawn from the ``results.json`` next to it, which holds every curve, so it is not kept in git
(``.gitignore``). The drawing is deterministic: a redrawn plot is byte-identical to the one the run wrote.

    python examples/replot.py                                  # every results/**/results.json
    python examples/replot.py examples/results/mlp_digits/seed1  # some row folders
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the examples' shared module sits next to this script


def replot(folder: Path) -> Path | None:
    """Draw ``folder/val_loss.png`` from ``folder/results.json``; ``None`` if it is not an upscaling row."""
    report = json.loads((folder / "results.json").read_text())
    if not all(k in report for k in ("base", "upscaled", "scratch", "scratch_grid")):
        return None  # hp_transfer, noise_cliff, noise_scale, coord_check draw their own figures
    C.plot_upscaling(report, folder)
    return folder / "val_loss.png"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    folders = [Path(a) for a in args] or sorted(p.parent for p in C.RESULTS_DIR.rglob("results.json"))
    drawn = [p for p in map(replot, folders) if p is not None]
    print(f"drew {len(drawn)} plots")


if __name__ == "__main__":
    main()
