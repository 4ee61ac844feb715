"""Two CPU processes (gloo): codebooks and EMA statistics stay identical across ranks; the first-batch
initialisation draws from the data of both ranks."""

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


INIT_K = 16
INIT_N = (10, 12)  # rows per rank: each < K <= their sum, and unequal


def _init_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(200 + rank)  # different data and a different local RNG per rank
        # warm-up and no restarts: ema_sum_LKd keeps the initial codebooks exactly as drawn
        cfg = QuantizerConfig(codebook_size=INIT_K, dim=4, ema_warmup=5, restart_threshold=0.0, impl="ref")
        q = ResidualQuantizer(cfg, depth=2).train()
        sign = 1.0 if rank == 0 else -1.0
        x = sign * 100.0 + torch.randn(1, INIT_N[rank], 4)  # rank 0 near +100, rank 1 near -100
        q(x)
        torch.save({"x": x[0], "init_LKd": q.ema_sum_LKd.clone(),
                    "state": {k: v.clone() for k, v in q.state_dict().items()}}, f"{out_dir}/init{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_first_batch_init_draws_distinct_rows_from_both_ranks(tmp_path):
    world = 2
    mp.spawn(_init_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "init0.pt")
    r1 = torch.load(tmp_path / "init1.pt")
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"buffer {k} differs between ranks"
    pool = torch.cat([r0["x"], r1["x"]])  # (22, 4): the pooled first batch
    cb1 = r0["init_LKd"][0]
    # every depth-1 code is exactly one pooled row (no noise: pooled N >= K), K distinct rows
    d_min = (cb1[:, None] - pool[None]).abs().amax(-1).min(dim=1).values
    assert (d_min == 0).all(), "depth-1 codes must be exact rows of the pooled batch"
    assert torch.unique(cb1, dim=0).shape[0] == INIT_K
    # rows from both ranks: neither rank alone has K rows, so this needs the gather
    n_pos, n_neg = int((cb1[:, 0] > 50).sum()), int((cb1[:, 0] < -50).sum())
    assert n_pos > 0 and n_neg > 0 and n_pos + n_neg == INIT_K, (n_pos, n_neg)
    # depth 2 from the pooled depth-2 residuals (pooled rows minus their nearest depth-1 code)
    r2 = pool - cb1[torch.cdist(pool, cb1).argmin(dim=1)]
    d2_min = (r0["init_LKd"][1][:, None] - r2[None]).abs().amax(-1).min(dim=1).values
    assert (d2_min < 1e-4).all(), "depth-2 codes must be rows of the pooled depth-2 residuals"
