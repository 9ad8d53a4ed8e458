"""The widened model trains on torch.distributed exactly as the narrow one trains alone (issue 19, item 4).

Two processes (gloo, CPU, float64) each train the widened GPT on one half of every batch -- under DDP,
then under FSDP2 (``fully_shard``: every parameter, gradient and optimizer state a sharded DTensor) --
with ``mup_optimizer`` over the wrapper, the narrow optimizer's state carried in by
``transfer_optimizer_state`` and ``clip_grad_norm_`` clipping by the base-equivalent norm reduced across
shards. For 20 steps the wide run must match the narrow model trained in one process on the whole batches
to 1e-9: its parameters (collapsed, divided by their copy scale), its losses and its clipping norms.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

STEPS = 20
TOL = 1e-9


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dist")
    out = tmp / "results.json"
    mp.spawn(dist_worker.run, args=(2, str(tmp / "store"), ["ddp", "fsdp"], STEPS, str(out)), nprocs=2)
    return json.loads(out.read_text())


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_two_processes_on_half_batches_equal_the_narrow_model(results: dict, how: str) -> None:
    r = results[how]
    assert r["moved"] > 1e-3  # the narrow model really trained: equal parameters are not a trivial match
    assert r["worst"] <= TOL, f"{how}: wide parameters differ from the narrow ones by {r['worst']:.3g}"
    assert len(r["wide_losses"]) == STEPS
    for step, (w, n) in enumerate(zip(r["wide_losses"], r["narrow_losses"])):
        assert abs(w - n) <= TOL * abs(n), (how, step, w, n)


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_clipping_uses_the_narrow_norm_reduced_across_processes(results: dict, how: str) -> None:
    r = results[how]
    assert sum(n > dist_worker.MAX_NORM for _, n in r["norms"]) >= STEPS // 2  # clipping acts
    for step, (wide, narrow) in enumerate(r["norms"]):
        # each process holds half a batch (DDP) or half of every tensor (FSDP2): a norm not reduced
        # across them would differ from the narrow model's by a large factor
        assert abs(wide - narrow) <= TOL * narrow, (how, step, wide, narrow)


def test_fsdp2_parameters_are_sharded(results: dict) -> None:
    assert results["fsdp"]["sharded"] and not results["ddp"]["sharded"]


def test_state_transfer_into_a_sharded_optimizer_keeps_the_parameters_placement() -> None:
    """One process, world size 1 (a 1-device mesh): the carried state is a DTensor placed like its
    parameter, so the sharded optimizer can step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import graphscale
    from graphscale import zoo
    from graphscale.train import mup_optimizer, transfer_optimizer_state

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        narrow, inputs = zoo.mlp(widths=(8, 16), d_in=4, d_out=3)
        small_opt = torch.optim.Adam(narrow.parameters(), lr=1e-3)
        narrow(*inputs).square().sum().backward()
        small_opt.step()
        wide = fully_shard(graphscale.widen(narrow, inputs, multiplier=2), mesh=init_device_mesh("cpu", (1,)))
        opt = mup_optimizer(wide, torch.optim.Adam, lr=1e-3)
        transfer_optimizer_state(narrow, small_opt, wide, opt)
        for p in wide.parameters():
            st = opt.state[p]["exp_avg"]
            assert type(st) is type(p) and st.placements == p.placements
        wide(*inputs).square().sum().backward()
        opt.step()  # mixing plain state with DTensor parameters would raise here
    finally:
        dist.destroy_process_group()
