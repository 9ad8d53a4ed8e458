"""Average an upscaling experiment over seeds: the mean upscaled val curve against the mean of the
scratch finals, read the same way as one run (crossing step and FLOPs; for a decay schedule, the mean
final val per schedule length).

Usage: ``python examples/seed_summary.py DIR [DIR ...]`` with the ``results.json`` folders of one
experiment run with different ``--seed``s, e.g.
``python examples/seed_summary.py examples/results/gpt_shakespeare{,/seed1,/seed2}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def seed_summary(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The seed-mean comparison of several runs of one experiment (same settings but the seed).

    >>> runs = [json.loads((d / "results.json").read_text()) for d in dirs]  # one folder per --seed
    >>> seed_summary(runs)["upscaled_steps_fraction"]  # GPT, constant lr, seeds 0-2
    0.25

    Settings a run does not record (it predates them) are left out of the check that the runs differ only
    in their seed, and listed under ``settings_not_recorded_by_every_run``.
    """
    common = set.intersection(*(set(r["settings"]) for r in reports)) - {"seed"}
    differ = sorted(k for k in common if any(r["settings"][k] != reports[0]["settings"][k] for r in reports))
    if differ:
        raise ValueError(f"the runs differ in more than their seed ({', '.join(differ)}): average runs "
                         "of one protocol only")
    steps = reports[0]["upscaled"]["steps"]
    if any(r["upscaled"]["steps"] != steps for r in reports):
        raise ValueError("the upscaled runs were evaluated at different steps (one stopped early?)")
    window = reports[0]["comparison"]["final_window"]
    budget = reports[0]["settings"]["steps"]
    target = C.mean([r["comparison"]["scratch_final_val"] for r in reports])
    up_val = [C.mean(v) for v in zip(*[r["upscaled"]["val_loss"] for r in reports])]
    curve = C.Curve(label="seed mean", lr=0.0, steps=steps, val=up_val)
    reach = C.steps_to_reach(curve, target, window)
    base_flops = C.mean([r["comparison"]["base_training_flops"] for r in reports])
    scratch_flops = reports[0]["comparison"]["scratch_flops"]
    per_step = reports[0]["upscaled"]["flops_per_step"]

    def flops_fraction(s: int | None) -> float | None:
        return None if s is None else (base_flops + per_step * s) / scratch_flops

    by_horizon = {h: C.mean([r["comparison"]["upscaled_final_val_by_horizon"][h] for r in reports])
                  for h in reports[0]["comparison"].get("upscaled_final_val_by_horizon", {})}
    shortest = min((int(h) for h, v in by_horizon.items() if v <= target), default=None)
    return dict(
        seeds=[r["settings"]["seed"] for r in reports],
        settings_not_recorded_by_every_run=sorted(set.union(*(set(r["settings"]) for r in reports)) - common
                                                  - {"seed"}),
        scratch_final_val=target,
        upscaled_final_val=C.score(curve, window),
        upscaled_steps_to_scratch_final_val=reach,
        upscaled_steps_fraction=None if reach is None else reach / budget,
        upscaled_flops_fraction=flops_fraction(reach),
        upscaled_final_val_by_horizon=by_horizon,
        upscaled_shortest_horizon_to_scratch_final_val=shortest,
        upscaled_shortest_horizon_fraction=None if shortest is None else shortest / budget,
        upscaled_shortest_horizon_flops_fraction=flops_fraction(shortest),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Print (and return) the seed-mean summary of the result folders on the command line."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dirs", nargs="+", type=Path, help="result folders (each with a results.json)")
    args = p.parse_args(argv)
    summary = seed_summary([json.loads((d / "results.json").read_text()) for d in args.dirs])
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
