"""Mutation check: plausible one-line mistakes in graphscale, each of which the test suite must catch.

Every entry of :data:`MUTATIONS` replaces one exact text (it must occur exactly once in its file) with a
wrong one, in a scratch copy of the repository; the tests that guard that area then run there
(``python -m pytest -x -q`` with ``PYTHONPATH`` set to the copy). The mutation is *killed* if they fail
and *survives* if they pass. The check fails (exit 1) if any mutation survives, if an old text does not
occur exactly once (a refactor moved the code: update the entry), or if the guarding tests already fail
on the unmutated copy (then "killed" would mean nothing). The working tree is never modified.

Usage::

    python benchmarks/mutations.py             # all mutations; prints "killed N/N" and the wall time
    python benchmarks/mutations.py --list      # names, files and guarding tests
    python benchmarks/mutations.py --only derive-coupled-wd --only verify-tolerance
    python benchmarks/mutations.py --jobs 2    # two mutations at a time (default 1)

Add an entry whenever you add a law, a rule kind or a guarantee: the mistake a future change could make,
and the test that catches it. ``tests/test_mutations_list.py`` checks in CI that the list is well formed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # per mutation; a guard that hangs on a mutant counts as killed (and is reported)
BASELINE_TIMEOUT_S = 2400  # the baseline runs every guard at once


@dataclass(frozen=True)
class Mutation:
    """One mistake: replace ``old`` (exactly once in ``file``) with ``new``; ``tests`` must then fail.

    ``tests`` are pytest paths relative to the repository (``tests/x.py`` or ``tests/x.py::test_name``),
    fastest killer first: pytest runs with ``-x``, so a killed mutant costs only the first failure.
    """

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


M = Mutation
MUTATIONS: list[Mutation] = [
    # -- capture ------------------------------------------------------------------------------------------
    M("capture-buffers-not-restored", "graphscale/capture/frontend.py",
      "                b.copy_(value)", "                b.copy_(b)",
      ("tests/test_widen_property.py::test_widen_cnn_batchnorm_train_exact",),
      "analysis runs train-mode BatchNorm: its running statistics must be restored, the user's model is "
      "never modified"),
    M("capture-no-export-fallback", "graphscale/capture/__init__.py",
      "            if not uncovered and not calls:", "            if True:",
      ("tests/test_infer_property.py::test_mha_model_width_axes",
       "tests/test_causal_ops.py::test_auto_falls_back_to_export_when_fx_calls_a_function_with_no_rule"),
      "tracer='auto' must fall back to torch.export when fx keeps a module or calls a function no rule "
      "covers (nn.MultiheadAttention, stochastic_depth)"),
    M("capture-shared-weights-renormalized", "graphscale/capture/__init__.py",
      "    if writes_parameters_in_kernels(cap.gm):", "    if False:",
      ("tests/test_model_safety.py::test_embedding_max_norm_is_refused",),
      "the traced copy shares the model's weights: a graph whose kernels write one (an embedding with "
      "max_norm) must get its own, or running it (verify) renormalizes the user's embedding"),
    # -- rules --------------------------------------------------------------------------------------------
    M("rules-var-as-mean", "rules/reductions.toml",
      'mode = "variance"', 'mode = "mean"',
      ("tests/test_refusals.py",),
      "issue #22 survivor 3: torch.var/std treated as a mean; unbiased variance over width must be refused"),
    M("rules-sum-as-mean", "rules/reductions.toml",
      'name = "sum"\nkind = "reduce"\nmode = "sum"', 'name = "sum"\nkind = "reduce"\nmode = "mean"',
      ("tests/test_widen_edge_cases.py::test_sum_over_a_width_axis_gets_an_inserted_multiplier",),
      "a sum over a width axis grows k times: it needs the inserted 1/k"),
    M("rules-argmax-invariant", "rules/reductions.toml",
      'mode = "index"', 'mode = "mean"',
      ("tests/test_refusals.py",),
      "argmax returns positions, which change when units are copied: refused over width"),
    M("rules-logsumexp-invariant", "rules/reductions.toml",
      'mode = "forbid"', 'mode = "mean"',
      ("tests/test_refusals.py",),
      "logsumexp/norm/prod over width are not replication-invariant: refused"),
    M("rules-softmax-elementwise", "rules/reductions.toml",
      'name = "softmax"\nkind = "along"', 'name = "softmax"\nkind = "elementwise"',
      ("tests/test_refusals.py",),
      "softmax/cumsum along a width axis change with copying: refused"),
    # -- inference ----------------------------------------------------------------------------------------
    M("infer-default-var-biased", "graphscale/infer/kinds/reductions.py",
      "exact = corr == 0 or unbiased is False", "exact = not corr or unbiased is False",
      ("tests/test_refusals.py",),
      "torch.var's default (no correction given) is unbiased, hence refused; only correction=0 or "
      "unbiased=False is exact"),
    M("infer-along-never-refuses", "graphscale/infer/kinds/reductions.py",
      '    if ctx.spec("mode") == "forbid":\n        everything',
      '    if ctx.spec("mode") == "never":\n        everything',
      ("tests/test_refusals.py",),
      "kind 'along' (softmax, cumsum) must refuse its width axis"),
    M("infer-index-mode-ignored", "graphscale/infer/kinds/reductions.py",
      '    elif mode == "index":  # argmax', '    elif mode == "never":  # argmax',
      ("tests/test_refusals.py",),
      "reduce mode 'index' (argmax) must refuse its width axis"),
    M("infer-single-position-not-fixed", "graphscale/infer/kinds/indexing.py",
      '            ctx.ds.fix(info.dims[axis], "an axis indexed at one position")', "            pass",
      ("tests/test_refusals.py::test_single_position_index_keeps_the_axis_fixed",),
      "h[:, 0] picks one unit: that axis must stay fixed (README Limits)"),
    M("infer-stepped-slice-free", "graphscale/infer/kinds/indexing.py",
      '    ctx.ds.fix(d, "an axis made by a slice with a step")', "    pass",
      ("tests/test_vision_layouts.py::test_stepped_slices_keep_their_axes_fixed",),
      "x[..., 0::2] makes an axis sized off a fixed one: it must stay fixed, or it widens alone"),
    M("infer-whole-slice-bounds-kept", "graphscale/infer/kinds/indexing.py",
      "        return dim, None, dim\n", "        return None\n",
      ("tests/test_vision_layouts.py::test_concat_sliced_back_by_a_literal_bound_widens_exactly",),
      "a whole-axis slice with literal bounds must get the wide bounds"),
    M("infer-shuffle-part-not-sliced", "graphscale/infer/dims.py",
      '                self.prod(p, [piece, *inner], "a slice of a reshaped concatenation")',
      "                pass",
      ("tests/test_vision_layouts.py::test_channel_shuffle_widens_exactly",),
      "a part of outer x inner is o_i x inner (channel shuffle then chunk)"),
    M("infer-refusals-ignored", "graphscale/plan.py",
      "        if hit:", "        if False:",
      ("tests/test_refusals.py",),
      "a refusal over a width class must raise UnsupportedOpError naming the node"),
    M("infer-meta-stand-in-names-dtype", "graphscale/infer/engine.py",
      '    m = torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)',
      '    m = torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)',
      ("tests/test_census_quick.py::test_a_model_failing_the_float32_bounds_is_ok_only_if_the_float64_rerun_passes",),
      "the meta walk's stand-ins keep each tensor's dtype under a caller's torch-function mode (the census's "
      "float32 promotion would otherwise hide a float32 buffer)"),
    # -- derive: the one table of laws (graphscale/laws.py) that derive, plan and the optimizer all read ----
    # A law mutated here changes the plan and the optimizer alike, so the guards are tests that hold the
    # factors to hand-derived values or train narrow and wide side by side.
    M("laws-coupled-wd", "graphscale/laws.py",
      "return 1 / (c * c * M)", "return 1 / (c * M)",
      ("tests/test_train_optim.py::test_factor_table_matches_mup_for_each_role",),
      "issue #22 survivor 5: the coupled weight-decay law is 1/(c^2 M)"),
    M("laws-adam-eps", "graphscale/laws.py",
      "eps' = eps / (c M)``.\"\"\"\n    return 1 / (c * M)", "eps' = eps / (c M)``.\"\"\"\n    return 1 / M",
      ("tests/test_train_optim.py::test_factor_table_matches_mup_for_each_role",),
      "Adam's eps law is 1/(c M) (microsoft/mup's MuAdam leaves it out)"),
    M("laws-sgd-lr", "graphscale/laws.py",
      "return c * c * M", "return c * M",
      ("tests/test_train_optim.py::test_factor_table_matches_mup_for_each_role",),
      "SGD's lr law is c^2 M"),
    M("laws-decoupled-wd", "graphscale/laws.py",
      "    return 1 / c\n", "    return 1 / (c * c)\n",
      ("tests/test_train_optim.py::test_factor_table_matches_mup_for_each_role",),
      "AdamW's decoupled weight-decay law is 1/c"),
    M("laws-second-moment", "graphscale/laws.py",
      "return 1 / (c * M * c * M)", "return 1 / (c * M)",
      ("tests/test_train_state.py::test_state_is_scaled_by_its_law",),
      "second moments scale with the square of the gradient law"),
    M("laws-rmsprop-momentum", "graphscale/laws.py",
      '"momentum_buffer": unchanged}', '"momentum_buffer": gradient}',
      ("tests/test_dynamic_equivalence.py::test_new_families_with_transferred_state",),
      "RMSprop's momentum buffer holds normalised updates: carried unscaled"),
    M("derive-tied-use-multiplier", "graphscale/derive.py",
      "            if extra != 1:", "            if extra == 0:",
      ("tests/test_verify_can_fail.py::test_dropped_inserted_multiplier_of_a_tied_readout_fails",),
      "a tied embedding/readout needs an inserted multiplier at the use with the larger fan-in"),
    # -- widen --------------------------------------------------------------------------------------------
    M("widen-sum-multiplier-dropped", "graphscale/edits.py",
      "ctx.frontend.insert_multiply_after(ctx.graph, node, 1.0 / m)",
      "ctx.frontend.insert_multiply_after(ctx.graph, node, 1.0)",
      ("tests/test_widen_edge_cases.py::test_sum_over_a_width_axis_gets_an_inserted_multiplier",),
      "the inserted 1/k after a sum over a width axis"),
    M("widen-sdpa-scale", "graphscale/edits.py",
      "ctx.frontend.set_attention_scale(node, base / m)", "ctx.frontend.set_attention_scale(node, base)",
      ("tests/test_widen_property.py::test_attention_scalings_both_exact",),
      "SDPA's scale must be divided by head_dim's multiplier"),
    M("widen-size-reads-wide", "graphscale/edits.py",
      "            node.replace_all_uses_with(self.value)  # type: ignore[arg-type]", "            pass",
      ("tests/test_widen_edge_cases.py::test_sizes_read_off_a_width_axis_keep_their_narrow_value_in_arithmetic",),
      "an int read off a width axis keeps its narrow value (a computed 1/sqrt(head_dim))"),
    M("widen-no-copy-scale", "graphscale/widen.py",
      "copy_scale=plan.substitute(rule.copy_scale, mults),", "copy_scale=1.0,",
      ("tests/test_verify_can_fail.py::test_exact_widening_passes_at_rounding_level",),
      "P' = c E(P): without c the copies sum k times too much"),
    M("widen-into-query-fold-not-recorded", "graphscale/fill.py",
      "record.params[key] = replace(t, copy_scale=t.copy_scale * f,\n" + " " * 57
      + "shift=t.shift * f + (f - 1) * offset)", "pass",
      ("tests/test_fold_training.py::test_whole_tensor_query_fold_is_in_the_copy_scale_and_trains_exactly",),
      "a whole-tensor fold is a change of copy scale: the laws need it in c (docs/math.md §7)"),
    M("widen-into-qnorm-gain-ignored", "graphscale/fill.py",
      "        out.extend(found)\n    # a projection shared", "        pass\n    # a projection shared",
      ("tests/test_widen_into_query_norm.py::test_query_factor_lands_in_the_norm_gain_and_trains_alike",),
      "a q-norm erases a factor in W_q: the attention's factor goes into the norm's gain (docs/math.md §8)"),
    M("widen-into-blocked-query-not-confirmed", "graphscale/fill.py",
      "or (blocked and passing):", ":",
      ("tests/test_widen_into_query_norm.py::"
       "test_blocked_query_is_not_accepted_on_weights_that_cannot_tell_attention_scales_apart",),
      "a blocked query's 'mup' may hold only because attention is uniform: confirm it on random weights"),
    M("widen-into-unsaved-scalar-filled", "graphscale/fill.py",
      "    for name in unsaved:\n        record.params.pop(name)", "    for name in unsaved:\n        pass",
      ("tests/test_widen_into_constants.py",),
      "a buffer no checkpoint carries keeps the larger model's value; a filled one is lost on reload"),
    M("record-shift-not-applied", "graphscale/record.py",
      "return wide.add_(self.shift) if self.shift and wide.is_floating_point() else wide", "return wide",
      ("tests/test_widen_into_query_norm.py::test_tied_readout_factor_moves_into_a_shifted_gain_with_a_shift",),
      "a gain written as 1 + w takes f as w' = f w + (f - 1): the shift is part of the wide value"),
    M("widen-into-fixed-scale-as-standard", "graphscale/fill.py",
      '"mup": 0.0, "fixed": -1.0}', '"mup": 0.0, "fixed": -0.5}',
      ("tests/test_widen_into_query_norm.py::test_query_factor_lands_in_the_norm_gain_and_trains_alike",),
      "an attention scale that does not follow head_dim needs k**-1 on the query, not k**-0.5"),
    # -- train --------------------------------------------------------------------------------------------
    M("train-factor-not-applied", "graphscale/train/optim.py",
      "sub[hp] = value * f", "sub[hp] = value",
      ("tests/test_train_optim.py::test_factor_table_matches_mup_for_each_role",),
      "mup_optimizer must apply each hyperparameter's factor to its group"),
    M("train-state-not-scaled", "graphscale/train/state.py",
      "        out.mul_(factor)\n", "        pass\n",
      ("tests/test_train_state.py::test_state_is_scaled_by_its_law",),
      "transferred exp_avg/exp_avg_sq are E(buf)/(c M) and E(buf)/(c M)^2"),
    M("train-blocks-one-factor", "graphscale/train/optim.py",
      "            if not s.is_blockwise():", "            if True:",
      ("tests/test_mixed_growth_parts.py::test_blocks_train_like_the_narrow_model_and_one_factor_per_tensor_does_not",
       "tests/test_fold_training.py::test_fused_query_fold_is_marked_warned_and_trained_block_by_block"),
      "blocks of one tensor with different (c, M) need their own factors (docs/math.md §8)"),
    M("train-clip-raw-norm", "graphscale/train/clip.py",
      "weight = cm if math.isinf(p_) else cm * m ** (-1.0 / p_)", "weight = cm",
      ("tests/test_laws_match_train.py::test_clipping_uses_the_base_norm",),
      "the base-equivalent norm weights each parameter by c M M^(-1/p)"),
    # -- verify -------------------------------------------------------------------------------------------
    M("verify-training-self-compare", "graphscale/verify.py",
      "with torch.no_grad():\n            n_out, w_out = narrow(*batch, **kwargs), wide(*batch, **kwargs)",
      "with torch.no_grad():\n            n_out, w_out = wide(*batch, **kwargs), wide(*batch, **kwargs)",
      ("tests/test_verify_can_fail.py::test_verify_training_fails_when_the_wide_model_trains_differently",),
      "issue #22 survivor 1: verify compared the wide model with itself"),
    M("verify-tolerance-loosened", "graphscale/verify.py",
      "DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}",
      "DEFAULT_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-2}",
      ("tests/test_verify_can_fail.py::test_default_tolerance_sees_a_small_error",),
      "issue #22 survivor 2: the default tolerances loosened 1000x"),
    M("verify-training-threshold", "graphscale/verify.py",
      "if worst > tol[torch.float64] * 10:", "if worst > tol[torch.float64] * 1e12:",
      ("tests/test_verify_can_fail.py::test_verify_training_fails_when_the_wide_model_trains_differently",),
      "training divergence must be held to the float64 tolerance"),
    M("verify-never-fails", "graphscale/verify.py",
      "            worst_rel = max(worst_rel, e.relative)", "            worst_rel = max(worst_rel, 0.0)",
      ("tests/test_verify_can_fail.py::test_wrong_copy_scale_fails",),
      "verify must be able to fail"),
    # -- cli ----------------------------------------------------------------------------------------------
    # Issue #22's survivor 4 replaced the call with safetensors.torch.save_model(wide, out): with
    # safetensors >= 0.8 that is itself a temp-file-and-rename write (an equivalent mutant, which no test
    # can kill), so the direct write here goes through open(out, "wb") as older safetensors did (clone():
    # tied tensors would make safetensors.torch.save refuse, which is not the bug under test).
    M("cli-direct-write", "graphscale/cli/files.py",
      "        safetensors.torch.save_model(module, tmp, metadata=metadata)",
      "        out.write_bytes(safetensors.torch.save("
      "{k: v.clone() for k, v in module.state_dict().items()}, metadata=metadata))\n        return",
      ("tests/test_atomic_write.py",),
      "issue #22 survivor 4: --out is written atomically (temp file, fsync, rename)"),
    M("cli-overwrites-inputs", "graphscale/cli/files.py",
      "            if _file_id(Path(path)) == out_id:", "            if False:",
      ("tests/test_cli.py::test_widen_refuses_to_overwrite_checkpoint",
       "tests/test_cli_faults.py::test_out_refuses_every_input"),
      "--out may not name the checkpoint: the user's files are never modified"),
    # -- streamed upscale (graphscale/hf_stream.py) ------------------------------------------------------
    M("stream-query-fold-dropped", "graphscale/hf_stream.py",
      "        rows = wide.narrow(axis, lo, hi - lo).mul_(m ** power)",
      "        rows = wide.narrow(axis, lo, hi - lo)",
      ("tests/test_hf_upscale.py::test_streamed_run_killed_mid_write_leaves_no_corrupt_out_and_restarts",),
      "streamed recipes carry widen_into's folds: the query rows' k**-0.5 of fused q|k|v (GPT-2)"),
    M("stream-writes-into-out", "graphscale/hf_stream.py",
      "    tmp = hf._temp_dir(out_dir)", "    tmp = out_dir",
      ("tests/test_hf_upscale.py::test_streamed_run_killed_mid_write_leaves_no_corrupt_out_and_restarts",),
      "streamed output is atomic: a temporary directory beside DST_DIR, renamed at the end"),
    M("stream-noise-order", "graphscale/hf_stream.py",
      "    order = [n for n, _ in meta.named_parameters()] + [n for n, _ in meta.named_buffers()]",
      "    order = sorted(n for n, _ in [*meta.named_parameters(), *meta.named_buffers()])",
      ("tests/test_hf_upscale.py::test_noise_is_reproducible_from_the_seed",),
      "streamed noise draws in the class's parameter order, as the in-memory path (same seed, same bytes)"),
    M("stream-writer-ungated", "graphscale/hf_stream.py",
      "        budget = max((_work_nbytes(i) for i in items), default=0)", "        budget = 1 << 62",
      ("tests/test_hf_upscale.py::test_streamed_writing_overlaps_within_one_tensors_memory",),
      "the writer thread may run behind widening only within the largest tensor's memory"),
]


def check_list(mutations: list[Mutation], root: Path = REPO) -> list[str]:
    """Problems with the list: duplicate names, an old text not found exactly once, a missing test."""
    problems = []
    seen: set[str] = set()
    for m in mutations:
        if m.name in seen:
            problems.append(f"{m.name}: duplicate name")
        seen.add(m.name)
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: no file {m.file}")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: old text occurs {count} times in {m.file} (must be exactly once; "
                            "update the entry after a refactor)")
        if m.old == m.new:
            problems.append(f"{m.name}: new text equals old text")
        if not m.tests:
            problems.append(f"{m.name}: no guarding tests")
        for t in m.tests:
            file, _, func = t.partition("::")
            tpath = root / file
            if not tpath.is_file():
                problems.append(f"{m.name}: no test file {file}")
            elif func and f"def {func.split('[')[0]}(" not in tpath.read_text():
                problems.append(f"{m.name}: no test {func} in {file}")
    return problems


def _repo_files(root: Path) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (new tests under review count too)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f]


def make_copy(root: Path, dest: Path) -> None:
    """Copy the repository's files (not .git) into ``dest``; symlinks stay symlinks."""
    for rel in _repo_files(root):
        src, dst = root / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree but not yet in the index
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)


def run_tests(copy: Path, tests: tuple[str, ...],
              timeout: float = TIMEOUT_S) -> tuple[int | None, float, str]:
    """``(exit status or None on timeout, seconds, output tail)`` of pytest on ``tests`` in ``copy``."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - start, "timeout"
    return proc.returncode, time.monotonic() - start, (proc.stdout + proc.stderr)[-1500:]


def run_mutation(copy: Path, m: Mutation) -> tuple[str, float, str]:
    """Apply ``m`` in ``copy``, run its tests, restore the file; returns (verdict, seconds, output)."""
    path = copy / m.file
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new, 1))
    try:
        status, secs, out = run_tests(copy, m.tests)
    finally:
        path.write_text(original)
    if status == 0:
        return "SURVIVED", secs, out
    if status == 1:
        return "killed", secs, out
    if status is None:
        return "killed (timeout)", secs, out
    return f"ERROR (pytest exit {status})", secs, out  # collection/usage error: not a real kill


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at a time (default 1)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the guarding tests on the unmutated copy first")
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            print(f"unknown mutation(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<34} {m.file:<28} {' '.join(m.tests)}\n{'':<34} why: {m.why}")
        print(f"{len(chosen)} mutations")
        return 0
    problems = check_list(chosen)
    if problems:
        print("the mutation list is out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1

    start = time.monotonic()
    jobs = max(1, min(args.jobs, len(chosen)))
    with tempfile.TemporaryDirectory(prefix="graphscale-mutations-") as tmp:
        copies = [Path(tmp) / f"copy{i}" for i in range(jobs)]
        for c in copies:
            make_copy(REPO, c)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            status, secs, out = run_tests(copies[0], tests, BASELINE_TIMEOUT_S)
            print(f"baseline: guarding tests on the unmutated copy: exit {status} ({secs:.0f} s)", flush=True)
            if status != 0:
                print(out, file=sys.stderr)
                print("the guarding tests fail without any mutation; fix them first", file=sys.stderr)
                return 1
        free = list(copies)
        results: dict[str, str] = {}

        def work(m: Mutation) -> None:
            copy = free.pop()
            try:
                verdict, secs, out = run_mutation(copy, m)
            finally:
                free.append(copy)
            results[m.name] = verdict
            print(f"{verdict:<18} {m.name:<34} {secs:6.0f} s  ({m.file})", flush=True)
            if verdict == "SURVIVED" or verdict.startswith("ERROR"):
                print("    " + out.strip().replace("\n", "\n    ")[-800:], flush=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(work, chosen))
    killed = sum(v.startswith("killed") for v in results.values())
    wall = time.monotonic() - start
    print(f"killed {killed}/{len(chosen)} in {wall / 60:.1f} min wall ({jobs} at a time)")
    bad = [n for n, v in results.items() if not v.startswith("killed")]
    if bad:
        print(f"not killed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
