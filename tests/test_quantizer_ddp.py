"""Two CPU processes (gloo): codebooks and EMA statistics stay identical across ranks."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evotok.config import QuantizerConfig
from evotok.models.quantizer import ResidualQuantizer

STEPS = 6
DECAY = 0.9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(100 + rank)  # different data (and different local RNG) per rank
        cfg = QuantizerConfig(codebook_size=24, dim=4, ema_decay=DECAY, ema_warmup=1, restart_threshold=1.0,
                              impl="auto")
        q = ResidualQuantizer(cfg, depth=3).train()
        restarts = 0
        n_local = 40 if rank == 0 else 56  # unequal batch sizes across ranks
        for step in range(STEPS):
            x = torch.randn(1, n_local, 4) * (1 + rank) + rank
            q(x)
            restarts += int(q.last_restarts_L.sum())
        # statistics are global: one step with no restarts, total EMA count = decay * old + (1-decay) * N_all
        q2 = ResidualQuantizer(QuantizerConfig(codebook_size=8, dim=4, ema_decay=DECAY, restart_threshold=0.0,
                                               impl="ref"), depth=2).train()
        q2(torch.randn(1, n_local, 4))
        torch.save(
            {
                "state": {k: v.clone() for k, v in q.state_dict().items()},
                "restarts": restarts,
                "q2_total_L": q2.ema_size_LK.sum(dim=1),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_identical_codebooks(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["restarts"] > 0 and r0["restarts"] == r1["restarts"], "restarts must happen, on both ranks alike"
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"buffer {k} differs between ranks"
    assert int(r0["state"]["step"]) == STEPS
    n_all = 40 + 56
    want = DECAY * 8 + (1 - DECAY) * n_all
    torch.testing.assert_close(r0["q2_total_L"], torch.full((2,), want))
    torch.testing.assert_close(r1["q2_total_L"], torch.full((2,), want))
