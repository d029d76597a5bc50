"""SGS and DynamicSGS under torch.distributed: 2 spawned CPU processes, gloo, float64.

One spawn runs every scenario (process start-up dominates the cost); each test reads its part.
"""
import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 4


def _data(step: int, rank: int, batch: int = 4):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(batch, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(3, (batch,), generator=gen)


def _train(model, opt, rank, steps=STEPS):
    for step in range(steps):
        x, y = _data(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _models():
    from reparam import ACBlock

    torch.manual_seed(0)
    block = ACBlock(3, 4, 3, bn="none").double()
    tail = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3).double())
    branched = nn.Sequential(block, copy.deepcopy(tail))
    plain = nn.Sequential(block.sgs_counterpart(), copy.deepcopy(tail))
    return branched, plain, block.sgs_mask()


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _branched_vs_sgs(rank, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from reparam import attach_sgs

    branched, plain, mask = _models()
    control = copy.deepcopy(plain)
    ddp_b, ddp_s, ddp_c = DDP(branched), DDP(plain), DDP(control)
    opt_s = _sgd(ddp_s)
    attach_sgs(opt_s, {plain[0].weight: mask})
    for model, opt in ((ddp_b, _sgd(ddp_b)), (ddp_s, opt_s), (ddp_c, _sgd(ddp_c))):
        _train(model, opt, rank)
    out.update(merged=branched[0].merged_kernel()[0].detach(), sgs=plain[0].weight.detach(),
               control=control[0].weight.detach())


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def _loader(rank):
    return [_data(100 + i, rank) for i in range(2)]  # each rank its own batches


def _dynamic(rank, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from reparam import DynamicSGS

    model = _cnn()
    ddp = DDP(model)
    opt = _sgd(ddp)
    dyn = DynamicSGS(ddp, opt, _loader(rank), warmup=1, every=1, num_batches=2)
    out.update({f"first/{n}": g for n, g in dyn.refresh().items()})  # before training: comparable to one process
    for epoch in range(3):
        dyn.epoch_start(epoch)
        _train(ddp, opt, rank, steps=2)
    out.update({f"G/{n}": g for n, g in dyn.masks.items()})
    out["dyn_weights"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4-2.5
        except ImportError:
            return None
    return fully_shard


def _sgs_setup(model, preconditioner=False):
    """Masks of every kind on ``_cnn()``: a full-shape G on the first conv (sliced per shard), or
    a non-diagonal SpatialPreconditioner; RepVGG's (kh, kw) G and its constant kernel C (sliced
    per shard) on the second."""
    from reparam import RepVGGBlock
    from reparam.sgs.preconditioner import SpatialPreconditioner

    gen = torch.Generator().manual_seed(1)
    block = RepVGGBlock(4, 4, 3, bn="none").double()
    if preconditioner:
        b = torch.randn(9, 9, generator=gen, dtype=torch.float64)
        first = SpatialPreconditioner(torch.eye(9, dtype=torch.float64) + 0.1 * b @ b.T)
    else:
        first = 1.0 + torch.rand(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    return {model[0].weight: first, model[2].weight: block.sgs_mask()}, {model[2].weight: block.constant_kernel()}


_SCENARIOS = {  # name: (attach mode, optimizer, preconditioner on the first conv)
    "grad": ("grad", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2), False),
    "update": ("update", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), False),
    "preconditioner": ("grad", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2), True),
}


def _sharded_run(rank, scenario, wrap, masks=True):
    """``_cnn()`` wrapped (DDP or FSDP2), trained with SGS as in ``scenario`` (plain without ``masks``)."""
    from reparam import attach_sgs

    mode, make_opt, preconditioner = _SCENARIOS[scenario]
    model = _cnn()
    wrapped = wrap(model)  # fully_shard replaces the parameters: take them after wrapping
    g, c = _sgs_setup(model, preconditioner)
    opt = make_opt(wrapped.parameters())
    handle = attach_sgs(opt, g, mode=mode, constant_kernels=c) if masks else None
    _train(wrapped, opt, rank)
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full]), handle


def _fsdp2(rank, out, notes):
    """FSDP2 (DTensor parameters sharded on dim 0) against DDP: grad and update mode, a preconditioner; DynamicSGS."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from reparam import DynamicSGS

    fully_shard = _fully_shard()
    if fully_shard is None:
        notes["fsdp2"] = "unavailable"
        return
    for mode in _SCENARIOS:
        out[f"ddp/{mode}"], _ = _sharded_run(rank, mode, DDP)
        out[f"fsdp2/{mode}"], handle = _sharded_run(rank, mode, fully_shard)
        out[f"fsdp2_control/{mode}"], _ = _sharded_run(rank, mode, fully_shard, masks=False)
        notes[f"state_bytes/{mode}"] = handle.state_bytes
    model = fully_shard(_cnn())
    opt = _sgd(model)
    dyn = DynamicSGS(model, opt, _loader(rank), warmup=1, every=1, num_batches=2)
    out.update({f"fsdp2_first/{n}": g for n, g in dyn.refresh().items()})
    for epoch in range(3):
        dyn.epoch_start(epoch)
        _train(model, opt, rank, steps=2)
    out.update({f"fsdp2_G/{n}": g for n, g in dyn.masks.items()})
    out["fsdp2_dyn_weights"] = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out, notes = {}, {}
    try:
        _branched_vs_sgs(rank, out)
        _dynamic(rank, out)
        _fsdp2(rank, out, notes)
    finally:
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        (out_dir / f"rank{rank}.json").write_text(json.dumps(notes))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), tmp), nprocs=WORLD, join=True)
    return [(torch.load(tmp / f"rank{r}.pt", weights_only=True), json.loads((tmp / f"rank{r}.json").read_text()))
            for r in range(WORLD)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_branched_and_sgs_stay_identical_under_ddp(ranks):
    (r0, _), (r1, _) = ranks
    assert torch.equal(r0["sgs"], r1["sgs"])  # DDP keeps the ranks in step
    assert _rel(r0["sgs"], r0["merged"]) <= 1e-10
    assert _rel(r0["control"], r0["merged"]) > 1e-4  # without G the trajectories part: the check can fail


def test_dynamic_sgs_refreshes_identically_on_every_rank(ranks):
    (r0, _), (r1, _) = ranks
    names = [k for k in r0 if k.startswith("G/")]
    assert len(names) == 2
    assert all(torch.equal(r0[n], r1[n]) for n in names)
    assert torch.equal(r0["dyn_weights"], r1["dyn_weights"])


def test_dynamic_sgs_under_ddp_computes_g_on_the_union_of_the_ranks_batches(ranks):
    from reparam.sgs.streaming import masks_from_data

    (r0, _), _ = ranks
    union = [x for r in range(WORLD) for x, _ in _loader(r)]
    single, one_rank = masks_from_data(_cnn(), union), masks_from_data(_cnn(), union[:2])
    assert set(single) == {"0.weight", "2.weight"}
    assert all(torch.equal(r0[f"first/{n}"], g) for n, g in single.items())
    assert any(not torch.allclose(r0[f"first/{n}"], g) for n, g in one_rank.items())  # a rank's own data differs


def _skip_without_fsdp2(notes):
    if notes.get("fsdp2") == "unavailable":
        pytest.skip("this torch has no FSDP2 (fully_shard)")


@pytest.mark.parametrize("mode", ["grad", "update", "preconditioner"])
def test_fsdp2_sgs_follows_the_ddp_trajectory(ranks, mode):
    (r0, n0), (r1, _) = ranks
    _skip_without_fsdp2(n0)
    assert torch.equal(r0[f"fsdp2/{mode}"], r1[f"fsdp2/{mode}"])
    assert _rel(r0[f"fsdp2/{mode}"], r0[f"ddp/{mode}"]) <= 1e-10
    assert _rel(r0[f"fsdp2_control/{mode}"], r0[f"ddp/{mode}"]) > 1e-4  # without G it differs: the check can fail


def test_fsdp2_dynamic_sgs_matches_ddp(ranks):
    (r0, n0), (r1, _) = ranks
    _skip_without_fsdp2(n0)
    names = [k[len("G/"):] for k in r0 if k.startswith("G/")]
    assert names and all(torch.equal(r0[f"fsdp2_first/{n}"], r0[f"first/{n}"]) for n in names)  # FSDP2 forward
    assert all(torch.equal(r0[f"fsdp2_G/{n}"], r0[f"G/{n}"]) for n in names)
    assert all(not torch.allclose(r0[f"fsdp2_G/{n}"], torch.ones(3, 3, dtype=torch.float64)) for n in names)  # G moved
    assert torch.equal(r0["fsdp2_dyn_weights"], r1["fsdp2_dyn_weights"])
    assert _rel(r0["fsdp2_dyn_weights"], r0["dyn_weights"]) <= 1e-10


def test_fsdp2_handle_keeps_only_this_ranks_share(ranks):
    """The masks as given (full (4, 3, 3, 3) and (3, 3)); C and the snapshot only for the local
    shard (2 of 4 output channels), float64."""
    (_, n0), _ = ranks
    _skip_without_fsdp2(n0)
    masks, constant_shard, snapshot_shard = (4 * 3 * 9 + 9) * 8, 2 * 4 * 9 * 8, (2 * 3 * 9 + 2 * 4 * 9) * 8
    assert n0["state_bytes/grad"] == masks + constant_shard
    assert n0["state_bytes/update"] == masks + constant_shard + snapshot_shard
