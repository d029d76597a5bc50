"""Distributed statistics: 2 forked gloo processes on CPU, each with its own batches, get the same
integer counts and the same G as one process on the union of their batches (bit-identical)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from reparam.sgs.streaming import collect_statistics, masks_from_data

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")


class Gate(nn.Module):
    """Runs its conv only on batches of 3 or more images: on rank 0 only (rank 1 gets pairs)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.extra(x) if x.shape[0] >= 3 else x


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Gate(), nn.Conv2d(4, 4, (3, 5), padding="same"),
                         nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"))


def data() -> list[torch.Tensor]:
    """Rank 0 (even positions): 3 images per batch; rank 1: 2."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3 - i % 2, 3, 9, 9, generator=g) for i in range(4)]


def results(batches, **kw) -> dict:
    net = model()
    out = {"G": masks_from_data(net, batches, **kw)}
    out["counts"] = {n: s.counts for n, s in collect_statistics(net, batches, **kw).items()}
    return out


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = data()[rank::world]  # each rank its own batches; no feature map moves
        torch.save({diag: results(mine, diagonal_removal=diag) for diag in (False, True)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_statistics_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    # fork: the children skip re-importing torch (seconds on a busy machine); spawn works the same
    mp.start_processes(worker, args=(world, f"file://{tmp_path}/init", str(tmp_path / "res")), nprocs=world,
                       join=True, start_method="fork")
    got = [torch.load(tmp_path / f"res.{r}") for r in range(world)]
    union = [b for r in range(world) for b in data()[r::world]]
    for diag in (False, True):
        single = results(union, diagonal_removal=diag)
        for rank in range(world):
            assert single["G"].keys() == got[rank][diag]["G"].keys()
            assert "2.extra.weight" in single["G"]  # run by rank 0 only: identity elements on rank 1
            for name in single["G"]:
                assert torch.equal(got[rank][diag]["counts"][name], single["counts"][name])
                assert torch.equal(got[rank][diag]["G"][name], single["G"][name])
    # negative control: one rank's batches alone give other counts
    alone = results(data()[0::world])
    assert not torch.equal(alone["counts"]["0.weight"], results(union)["counts"]["0.weight"])
