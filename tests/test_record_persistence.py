"""The widening record survives what users do with models (issue 17, item 16).

``wide.graphscale`` must survive ``copy.deepcopy``, ``torch.save``/``torch.load`` and pickle; the
train-time pieces must see it through ``torch.compile`` and DDP; and it must be saveable beside a state
dict so that a new process can rebuild the μP optimizer and carry a saved narrow optimizer state.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphscale
from graphscale import zoo
from graphscale.record import (
    RecordFileError,
    UnpicklableModelError,
    WideningRecord,
    load_record,
    record_metadata,
    save_record,
)
from graphscale.train import clip_grad_norm_, mup_optimizer, transfer_optimizer_state
from graphscale.train._common import RecordError

BUILDERS = {
    "mlp": lambda: zoo.mlp(widths=(8, 16), d_in=4, d_out=3),
    "cnn": lambda: zoo.resnet_cnn(channels=4, blocks=1, image=4),
    "gpt": lambda: zoo.gpt(vocab=11, block_size=8, n_layer=1, n_head=2, n_embd=16),
}
REPO = Path(__file__).resolve().parents[1]


def _widened(kind: str):
    with _float64():
        narrow, inputs = BUILDERS[kind]()
        wide = graphscale.widen(narrow, inputs, multiplier=2)
    return narrow, wide, inputs


class _float64:
    def __enter__(self):
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.before)


def _groups(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, tuple]:
    """Per parameter name: the hyperparameters of its group (what a μP optimizer decides)."""
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            factors = tuple(sorted(g["graphscale"].items()))
            out[names[id(p)]] = (g["lr"], g.get("eps"), g.get("weight_decay"), factors)
    return out


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_deepcopy_keeps_record(kind: str) -> None:
    _, wide, inputs = _widened(kind)
    dup = copy.deepcopy(wide)
    assert isinstance(getattr(dup, "graphscale", None), WideningRecord)
    assert dup.graphscale == wide.graphscale
    assert dup.graphscale is not wide.graphscale  # a copy, as deepcopy promises
    assert copy.deepcopy(dup).graphscale == wide.graphscale  # and again
    assert torch.equal(dup(*inputs), wide(*inputs))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_and_pickle_round_trip(kind: str, how: str) -> None:
    _, wide, inputs = _widened(kind)
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(wide, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
    else:
        back = pickle.loads(pickle.dumps(wide))
    assert back.graphscale == wide.graphscale
    assert torch.equal(back(*inputs), wide(*inputs))
    # the loaded model is a full citizen: copies keep the record, the optimizer accepts it
    assert copy.deepcopy(back).graphscale == wide.graphscale
    names = {id(p): n for n, p in back.named_parameters()}
    wide_names = {id(p): n for n, p in wide.named_parameters()}
    assert (_groups(mup_optimizer(back, torch.optim.AdamW, lr=1e-3, weight_decay=0.1), names)
            == _groups(mup_optimizer(wide, torch.optim.AdamW, lr=1e-3, weight_decay=0.1), wide_names))


EXPORT_BUILDERS = {  # the built-in models graphscale captures with torch.export (tiny sizes)
    "mha": lambda: zoo.mha_model(d=16, heads=2, vocab=11),
    "hf-gpt2": lambda: zoo.hf_gpt2(n_embd=16, n_head=2, n_layer=1, vocab=32, n_positions=16),
    "hf-llama": lambda: zoo.hf_llama(hidden=16, intermediate=32, heads=2, kv_heads=1, layers=1, vocab=32),
    "hf-bert": lambda: zoo.hf_bert(hidden=16, intermediate=32, heads=2, layers=1, vocab=32),
}

EXPORT_CHILD = textwrap.dedent("""
    import copy, json, sys, torch
    import graphscale
    from graphscale.train import mup_optimizer
    run, names = sys.argv[1], sys.argv[2:]
    out = {}
    for name in names:
        saved = torch.load(f"{run}/{name}.pt", weights_only=False)
        wide, inputs, want = saved["wide"], saved["inputs"], saved["outputs"]
        record = graphscale.WideningRecord.from_json(saved["record"])
        got = wide(*inputs)
        dup = copy.deepcopy(wide)
        opt = mup_optimizer(wide, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
        lrs = {n: g["lr"] for g in opt.param_groups for p in g["params"]
               for n, q in wide.named_parameters() if q is p}
        before = [p.detach().clone() for p in wide.parameters()]
        got.float().square().mean().backward()
        opt.step()
        out[name] = {"bitwise": torch.equal(got, want), "record": wide.graphscale == record,
                     "frontend": wide.graphscale.frontend, "lrs": lrs,
                     "copy": dup.graphscale == record and torch.equal(dup(*inputs), want),
                     "stepped": any(not torch.equal(a, p) for a, p in zip(before, wide.parameters()))}
    print(json.dumps(out))
""")


def test_export_captured_widenings_pickle_and_load_in_a_new_process(tmp_path: Path) -> None:
    """torch.save of a torch.export-captured widening (built-in mha, hf-gpt2, hf-llama, hf-bert) loads in a
    fresh process as a module with bitwise the same outputs, its record, and a working μP optimizer."""
    want_lrs = {}
    for name, build in EXPORT_BUILDERS.items():
        with _float64():
            narrow, inputs = build()
            wide = graphscale.widen(narrow, inputs, multiplier=2, tracer="export")
        assert wide.graphscale.frontend == "export"
        with torch.no_grad():
            outputs = wide(*inputs)
        torch.save({"wide": wide, "inputs": inputs, "outputs": outputs, "record": wide.graphscale.to_json()},
                   tmp_path / f"{name}.pt")
        opt = mup_optimizer(wide, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
        want_lrs[name] = {n: g["lr"] for g in opt.param_groups for p in g["params"]
                          for n, q in wide.named_parameters() if q is p}
        assert len(set(want_lrs[name].values())) > 1  # the factors differ: the comparison below can fail
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(tmp_path), *EXPORT_BUILDERS],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in EXPORT_BUILDERS:
        got = child[name]
        assert got["bitwise"] and got["record"] and got["copy"] and got["stepped"], (name, got)
        assert got["frontend"] == "export"
        assert got["lrs"] == want_lrs[name], name


def test_export_graph_keeps_its_input_guards_through_pickle() -> None:
    """The loaded module still refuses inputs of another shape, with torch.export's own message, and a
    deep copy keeps the record."""
    with _float64():
        narrow, inputs = zoo.mha_model(d=16, heads=2, vocab=11)
        wide = graphscale.widen(narrow, inputs, multiplier=2, tracer="export")
    dup = copy.deepcopy(wide)
    assert dup.graphscale == wide.graphscale and torch.equal(dup(*inputs), wide(*inputs))
    back = pickle.loads(pickle.dumps(wide))
    assert torch.equal(back(*inputs), wide(*inputs)) and back.graphscale == wide.graphscale
    short = inputs[0][:, :4]
    for module in (wide, back):
        with pytest.raises(AssertionError, match=r"Guard failed: idx.size\(\)\[1\] == 8"):
            module(short)


def test_export_guards_that_are_not_size_checks_are_refused_clearly() -> None:
    """A generated guard function that does more than assert input sizes cannot be written as data: the
    pickle is refused up front, naming the submodule, instead of dropping the check."""
    with _float64():
        narrow, inputs = zoo.mha_model(d=16, heads=2, vocab=11)
        wide = graphscale.widen(narrow, inputs, multiplier=2, tracer="export")

    def generated():
        def _(*args):
            torch._assert(args[0].min() >= 0, "Guard failed: idx >= 0")
        return _

    wide._guards_fn.forward = generated()
    with pytest.raises(UnpicklableModelError, match="_guards_fn.*Save its state_dict and record"):
        pickle.dumps(wide)
    with pytest.raises(UnpicklableModelError, match="_guards_fn"):
        torch.save(wide, io.BytesIO())


def _check_wrapped(wide: torch.nn.Module, wrapped: torch.nn.Module, narrow, inputs) -> None:
    names = {id(p): n for n, p in wide.named_parameters()}  # identity: the wrapper shares the tensors
    for cls, kw in ((torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1}), (torch.optim.SGD, {"lr": 0.1})):
        want = _groups(mup_optimizer(wide, cls, **kw), names)
        assert _groups(mup_optimizer(wrapped, cls, **kw), names) == want
    # clipping: the wrapper's norm is the bare model's
    wide.zero_grad()
    wide(*inputs).square().sum().backward()
    grads = [p.grad.clone() for p in wide.parameters()]
    bare = clip_grad_norm_(wide, 1e-3)
    clipped = [p.grad.clone() for p in wide.parameters()]
    for p, g in zip(wide.parameters(), grads):
        p.grad = g.clone()
    through = clip_grad_norm_(wrapped, 1e-3)
    assert torch.equal(bare, through)
    assert all(torch.equal(p.grad, c) for p, c in zip(wide.parameters(), clipped))
    # state transfer into an optimizer over the wrapper, from a wrapped narrow model
    small_opt = torch.optim.Adam(narrow.parameters(), lr=1e-3)
    narrow(*inputs).square().sum().backward()
    small_opt.step()
    want = mup_optimizer(wide, torch.optim.Adam, lr=1e-3)
    transfer_optimizer_state(narrow, small_opt, wide, want)
    got = mup_optimizer(wrapped, torch.optim.Adam, lr=1e-3)
    transfer_optimizer_state(torch.compile(narrow, backend="eager"), small_opt, wrapped, got)
    for p in wide.parameters():
        assert torch.equal(got.state[p]["exp_avg_sq"], want.state[p]["exp_avg_sq"])


def test_compiled_model_gets_the_bare_models_groups() -> None:
    narrow, wide, inputs = _widened("mlp")
    _check_wrapped(wide, torch.compile(wide, backend="eager"), narrow, inputs)


def test_noise_through_a_wrapper_is_the_bare_models() -> None:
    _, wide, _ = _widened("mlp")
    twin = copy.deepcopy(wide)
    scheme = graphscale.noise.symmetric(0.5)
    scheme.apply(torch.compile(wide, backend="eager"), wide.graphscale, torch.Generator().manual_seed(3))
    scheme.apply(twin, twin.graphscale, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(wide.parameters(), twin.parameters()))


def test_ddp_model_gets_the_bare_models_groups(tmp_path: Path) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        narrow, wide, inputs = _widened("mlp")
        _check_wrapped(wide, torch.nn.parallel.DistributedDataParallel(wide), narrow, inputs)
    finally:
        dist.destroy_process_group()


def test_a_child_named_module_is_not_a_wrapper() -> None:
    """Only DDP/DataParallel's ``module`` is seen through: a user's child called ``module`` is a layer."""
    outer = torch.nn.Module()
    outer.module = torch.nn.Linear(2, 2)
    with pytest.raises(RecordError, match="carries no widening record"):
        mup_optimizer(outer, torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_record_json_round_trip(kind: str, tmp_path: Path) -> None:
    _, wide, _ = _widened(kind)
    rec = wide.graphscale
    assert WideningRecord.from_json(rec.to_json()) == rec
    assert load_record(save_record(wide, tmp_path)) == rec  # directory -> graphscale.json
    assert (tmp_path / "graphscale.json").is_file()
    assert load_record(save_record(rec, tmp_path / "r.json")) == rec
    from safetensors.torch import save_model

    save_model(wide, str(tmp_path / "w.safetensors"), metadata=record_metadata(rec))  # handles tied weights
    assert load_record(tmp_path / "w.safetensors") == rec


def test_bad_record_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RecordFileError, match="holds no graphscale.json"):
        load_record(tmp_path)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(RecordFileError, match="not valid JSON"):
        load_record(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(RecordFileError, match="not a graphscale widening record"):
        load_record(tmp_path / "y.json")
    _, wide, _ = _widened("mlp")
    d = wide.graphscale.to_dict()
    d["version"] = 99
    (tmp_path / "z.json").write_text(json.dumps(d))
    with pytest.raises(RecordFileError, match="version 99"):
        load_record(tmp_path / "z.json")
    # every field to_dict writes is required: a lost "role" must not quietly read as "fixed" (which would
    # turn off noise and mup_init_ for that tensor), nor a lost "frontend" as "fx"
    for drop in ("role", "fan_in_axes", "is_buffer", "notes"):
        d = wide.graphscale.to_dict()
        del d["params"]["0.weight"][drop]
        with pytest.raises(RecordFileError, match=f"damaged.*{drop}"):
            WideningRecord.from_dict(d)
    for drop in ("frontend", "notes", "info"):
        d = wide.graphscale.to_dict()
        del d[drop]
        with pytest.raises(RecordFileError, match=f"damaged.*{drop}"):
            WideningRecord.from_dict(d)


def test_saved_state_dict_without_an_order_is_refused() -> None:
    narrow, wide, inputs = _widened("mlp")
    params = list(narrow.parameters())
    opt = torch.optim.Adam([{"params": params[1::2]}, {"params": params[0::2]}], lr=1e-3)  # reordered
    narrow(*inputs).sum().backward()
    opt.step()
    with pytest.raises(RecordError, match="cannot tell which saved optimizer entry"):
        wide_opt = mup_optimizer(wide, torch.optim.Adam, lr=1e-3)
        transfer_optimizer_state(narrow, opt.state_dict(), wide, wide_opt)


CHILD = textwrap.dedent("""
    import json, sys, torch
    from graphscale import zoo
    from graphscale.train import mup_optimizer, transfer_optimizer_state
    torch.set_default_dtype(torch.float64)
    run = sys.argv[1]
    narrow, _ = zoo.gpt(vocab=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    narrow.load_state_dict(torch.load(run + "/narrow.pt"))
    model, _ = zoo.gpt(vocab=11, block_size=8, n_layer=1, n_head=2, n_embd=32)  # the user's own class
    model.load_state_dict(torch.load(run + "/wide.pt"), strict=True)
    opt = mup_optimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1, record=run)
    transfer_optimizer_state(narrow, torch.load(run + "/narrow_opt.pt"), model, opt, record=run)
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):  # a tied weight under each of its names
        names.setdefault(id(p), []).append(n)
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state[p]
            out["|".join(sorted(names[id(p)]))] = [g["lr"], g["eps"], g["weight_decay"],
                                                   st["exp_avg"].tolist(), st["exp_avg_sq"].tolist()]
    print(json.dumps(out))
""")


def test_new_process_rebuilds_the_optimizer_from_the_saved_record(tmp_path: Path) -> None:
    narrow, wide, inputs = _widened("gpt")
    small_opt = torch.optim.AdamW(narrow.named_parameters(), lr=1e-3, weight_decay=0.1)  # saves param_names
    for _ in range(2):
        small_opt.zero_grad()
        narrow(*inputs).square().mean().backward()
        small_opt.step()
    wide = graphscale.widen(narrow, inputs, multiplier=2)
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    torch.save(small_opt.state_dict(), tmp_path / "narrow_opt.pt")
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    save_record(wide, tmp_path)
    wide_opt = mup_optimizer(wide, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    transfer_optimizer_state(narrow, small_opt, wide, wide_opt)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    names: dict[int, list[str]] = {}
    for n, p in wide.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    assert len(child) == len(names)
    for g in wide_opt.param_groups:
        for p in g["params"]:
            lr, eps, wd, exp_avg, exp_avg_sq = child["|".join(sorted(names[id(p)]))]
            assert (lr, eps, wd) == (g["lr"], g["eps"], g["weight_decay"])
            assert torch.equal(torch.tensor(exp_avg, dtype=torch.float64), wide_opt.state[p]["exp_avg"])
            assert torch.equal(torch.tensor(exp_avg_sq, dtype=torch.float64), wide_opt.state[p]["exp_avg_sq"])
    # the factors really differ between groups (else the check above would be weak)
    assert len({(g["lr"], g["eps"]) for g in wide_opt.param_groups}) > 1


def test_record_of_a_plain_module_matches_by_name(tmp_path: Path) -> None:
    """A record for other names is refused, naming the tensors, rather than applied by position."""
    _, wide, _ = _widened("mlp")
    save_record(wide, tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with pytest.raises(RecordError, match="not in the widening record|shape disagrees"):
        mup_optimizer(other, torch.optim.SGD, lr=0.1, record=tmp_path)
