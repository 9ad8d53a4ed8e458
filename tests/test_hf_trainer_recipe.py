"""The Hugging Face ``Trainer`` recipe (issue 19, item 4): a widened model trains under ``Trainer`` exactly
like the narrow one, step for step.

The recipe (README, "Training the upscaled model with the Hugging Face Trainer"):

- ``optimizers=(opt, sched)`` with ``opt = graphscale.mup_optimizer(model, torch.optim.AdamW, lr=...,
  record=DST_DIR)`` and ``sched = graphscale.mup_scheduler(opt, SchedulerClass, **narrow_kwargs)``;
- ``max_grad_norm=0`` (the Trainer's own clipping uses the raw wide norm, which is not the narrow one) and
  the clipping done by a callback, :class:`MupClip`, with ``graphscale.clip_grad_norm_``.

A tiny float64 GPT-2 is upscaled x2 with ``graphscale.hf.upscale(..., heads="grow")`` (no noise); the
narrow model trains with plain ``AdamW``, ``OneCycleLR(max_lr=...)`` and the Trainer's clipping,
the wide one with the recipe.
After the steps every wide parameter, collapsed and divided by its copy scale, equals the narrow one to
1e-9, and at every step each wide param group's learning rate is its μP factor times the narrow one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import graphscale

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="the Trainer needs transformers and accelerate (the hf extra)")

STEPS, LR, WD, MAX_NORM, SEQ, VOCAB = 6, 3e-3, 0.1, 0.5, 12, 32


#: The narrow model's schedule: one cycle, with an absolute ``max_lr``, which a plain torch scheduler gives
#: every wide group alike (breaking μP's ratios; see the control below) and ``mup_scheduler`` keeps exact.
SCHEDULE = {"max_lr": LR, "total_steps": STEPS + 1, "pct_start": 0.3}


def make_callbacks():
    import transformers

    class MupClip(transformers.TrainerCallback):
        """Clip by the base-equivalent norm before each optimizer step (the recipe's clipping)."""

        def __init__(self, max_norm: float, record) -> None:
            self.max_norm, self.record, self.norms = max_norm, record, []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.norms.append(float(graphscale.clip_grad_norm_(model, self.max_norm, record=self.record)))

    class Lrs(transformers.TrainerCallback):
        """Every param group's learning rate and μP factor at every optimizer step."""

        def __init__(self) -> None:
            self.seen = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.seen.append([(g["lr"], g.get("graphscale", {}).get("lr", 1.0))
                              for g in optimizer.param_groups])

    return MupClip, Lrs


def _trainer(model, optimizers, out: Path, max_grad_norm: float, callbacks, data):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, max_grad_norm=max_grad_norm,
        report_to=[], use_cpu=True, seed=0, save_strategy="no", logging_strategy="no",
        dataloader_drop_last=True, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers,
                                callbacks=callbacks)


def test_trainer_recipe_trains_the_wide_model_like_the_narrow_one(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).double().save_pretrained(tmp_path / "narrow")
    # heads="grow": with heads fixed, upscale folds the query's k**-0.5 into the fused c_attn, which the
    # record's one copy scale per tensor cannot describe, and training is not equivalent (see the report)
    wide_dir = graphscale.hf.upscale(tmp_path / "narrow", multiplier=2, out=tmp_path / "wide", heads="grow")
    narrow = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", dtype=torch.float64)
    wide = transformers.AutoModelForCausalLM.from_pretrained(wide_dir, dtype=torch.float64)
    record = graphscale.load_record(wide_dir)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4 * STEPS, SEQ), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    MupClip, Lrs = make_callbacks()

    narrow_opt = torch.optim.AdamW(narrow.parameters(), lr=LR, weight_decay=WD)
    narrow_lrs = Lrs()
    narrow_sched = torch.optim.lr_scheduler.OneCycleLR(narrow_opt, **SCHEDULE)
    _trainer(narrow, (narrow_opt, narrow_sched), tmp_path / "n", MAX_NORM, [narrow_lrs], data).train()

    # the recipe
    opt = graphscale.mup_optimizer(wide, torch.optim.AdamW, lr=LR, weight_decay=WD, record=wide_dir)
    sched = graphscale.mup_scheduler(opt, torch.optim.lr_scheduler.OneCycleLR, **SCHEDULE)
    clip, wide_lrs = MupClip(MAX_NORM, record), Lrs()
    _trainer(wide, (opt, sched), tmp_path / "w", 0.0, [clip, wide_lrs], data).train()

    # learning rates: every wide group's lr is its factor times the narrow lr, at every step
    assert len(wide_lrs.seen) == len(narrow_lrs.seen) == STEPS
    assert len({lr for (lr, _), in narrow_lrs.seen}) >= 4  # the schedule really moves
    factors = {f for groups in wide_lrs.seen for _, f in groups}
    assert len(factors) > 1  # groups with different factors: a ratio that a plain scheduler would break
    for step, ((narrow_lr, _),), groups in zip(range(STEPS), narrow_lrs.seen, wide_lrs.seen):
        for lr, f in groups:
            assert lr == pytest.approx(f * narrow_lr, rel=1e-12), (step, lr, f, narrow_lr)
    assert max(clip.norms) > MAX_NORM  # clipping acted at least once
    # control: the same schedule as a plain torch scheduler of the wide optimizer breaks the ratios
    plain = graphscale.mup_optimizer(wide, torch.optim.AdamW, lr=LR, weight_decay=WD, record=wide_dir)
    torch.optim.lr_scheduler.OneCycleLR(plain, **SCHEDULE)
    assert len({g["lr"] for g in plain.param_groups}) == 1  # every group alike: the factors are lost

    # parameters: the wide model trained exactly like the narrow one
    small = dict(narrow.named_parameters(remove_duplicate=False))
    start = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", dtype=torch.float64)
    moved = max(float((p - q).abs().max()) for p, q in zip(narrow.parameters(), start.parameters()))
    assert moved > 1e-3
    for name, p in wide.named_parameters():
        s = record.params[name]
        got = s.collapse(p.detach()) / s.copy_scale
        want = small[s.source].detach()
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-9, name
