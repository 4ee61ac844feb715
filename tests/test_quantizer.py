"""ResidualQuantizer: straight-through, decode, EMA arithmetic, restarts (also in the warm-up), init, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from evotok.config import QuantizerConfig
from evotok.models.quantizer import LAPLACE_EPS, QuantizerOutput, ResidualQuantizer


def _q(K=16, d=4, L=3, **kw):
    kw.setdefault("impl", "ref")
    return ResidualQuantizer(QuantizerConfig(codebook_size=K, dim=d, **kw), depth=L)


def _set_codebooks(q, cb_LKd):
    q.codebooks_LKd.copy_(cb_LKd)
    q.ema_sum_LKd.copy_(cb_LKd)
    q.ema_size_LK.fill_(1.0)
    q.initialized.fill_(True)


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (3, 7, 4)])
@pytest.mark.parametrize("impl", ["ref", "auto"])
def test_output_shapes_and_straight_through_every_depth(shape, impl):
    torch.manual_seed(0)
    q = _q(impl=impl).train()
    q(torch.randn(*shape))  # initialise codebooks
    x = torch.randn(*shape, requires_grad=True)
    out = q(x)
    assert isinstance(out, QuantizerOutput)
    L = 3
    assert out.z_cum.shape == (L, *shape)
    B = shape[0]
    want_codes = (B, shape[2], shape[3], L) if len(shape) == 4 else (B, shape[1], L)
    assert out.codes.shape == want_codes and out.codes.dtype == torch.int64
    assert out.usage_L.shape == (L,) and out.perplexity_L.shape == (L,) and out.commit_loss.dim() == 0
    for l in range(L):
        (g,) = torch.autograd.grad(out.z_cum[l].sum(), x, retain_graph=True)
        assert torch.equal(g, torch.ones_like(x)), f"depth {l + 1}: gradient does not reach x"
    (g,) = torch.autograd.grad(out.commit_loss, x)
    assert g.abs().sum() > 0
    # z values are the cumulative quantised vectors, increasingly close to x
    errs = [(out.z_cum[l] - x).pow(2).mean().item() for l in range(L)]
    assert errs[-1] < errs[0]


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (3, 7, 4)])
def test_decode_codes_rebuilds_every_z_exactly(shape):
    torch.manual_seed(1)
    q = _q().train()
    for _ in range(3):
        q(torch.randn(*shape))
    q.eval()
    out = q(torch.randn(*shape))
    for l in range(1, 4):
        assert torch.equal(q.decode_codes(out.codes[..., :l]), out.z_cum[l - 1])
        assert torch.equal(q.decode_codes(out.codes, depth=l), out.z_cum[l - 1])
    assert torch.equal(q.decode_codes(out.codes), out.z_cum[-1])


def test_ema_matches_hand_computed_example():
    q = _q(K=3, d=2, L=1, ema_decay=0.5, restart_threshold=0.0, ema_warmup=0).train()
    old = torch.tensor([[[0.0, 0.0], [10.0, 10.0], [-10.0, -10.0]]])
    _set_codebooks(q, old)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 10.0], [11.0, 12.0], [10.0, 9.0]]])  # (B=1, N=5, d=2)
    out = q(x)
    assert out.codes[0, :, 0].tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(out.z_cum[0, 0], old[0][[0, 0, 1, 1, 1]])  # outputs use the pre-update codebook
    # by hand: counts (2, 3, 0); sums (1, 1), (30, 31), (0, 0); decay 0.5 from sizes 1 and sums = codes
    size = [0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 3, 0.5 * 1 + 0.0]  # 1.5, 2.0, 0.5
    sums = [[0.5 * 0 + 0.5 * 1, 0.5 * 0 + 0.5 * 1], [0.5 * 10 + 0.5 * 30, 0.5 * 10 + 0.5 * 31], [-5.0, -5.0]]
    n = sum(size)
    smooth = [(s + LAPLACE_EPS) / (n + 3 * LAPLACE_EPS) * n for s in size]
    want = [[v / max(sm, 1.0) for v in row] for row, sm in zip(sums, smooth)]
    # ~ (1/3, 1/3): moved toward its vectors' mean (0.5, 0.5); (10, 10.25); (-5, -5): size clamped to 1
    assert abs(want[0][0] - 1 / 3) < 1e-4 and abs(want[1][1] - 10.25) < 1e-4 and want[2] == [-5.0, -5.0]
    torch.testing.assert_close(q.ema_size_LK[0], torch.tensor(size))
    torch.testing.assert_close(q.ema_sum_LKd[0], torch.tensor(sums))
    torch.testing.assert_close(q.codebooks_LKd[0], torch.tensor(want), atol=1e-6, rtol=1e-6)
    assert int(q.step) == 1
    # usage and perplexity of this batch
    torch.testing.assert_close(out.usage_L, torch.tensor([2 / 3]))
    p = torch.tensor([0.4, 0.6])
    torch.testing.assert_close(out.perplexity_L, torch.exp(-(p * p.log()).sum())[None])


@pytest.mark.parametrize("training", [True, False])
def test_batch_usage_and_perplexity_are_the_shared_functions_on_its_codes(training):
    from evotok.models.codestats import code_counts, perplexity_from_counts, usage_from_counts

    torch.manual_seed(4)
    q = _q(K=8, L=3).train()
    q(torch.randn(2, 4, 3, 5))  # initialise
    q.train(training)
    out = q(torch.randn(2, 4, 3, 5))
    counts_LK = code_counts(out.codes, 3, 8)
    assert counts_LK.sum().item() == 3 * 2 * 3 * 5
    assert out.usage_L.dtype == torch.float32 and out.perplexity_L.dtype == torch.float32
    torch.testing.assert_close(out.usage_L, usage_from_counts(counts_LK).float())
    torch.testing.assert_close(out.perplexity_L, perplexity_from_counts(counts_LK).float())
    assert bool(((out.perplexity_L >= 1) & (out.perplexity_L <= 8)).all()) and bool((out.usage_L > 0).all())


def test_eval_mode_does_not_learn():
    torch.manual_seed(2)
    q = _q().train()
    q(torch.randn(4, 5, 4))
    snap = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    q(torch.randn(4, 5, 4))
    for k, v in q.state_dict().items():
        assert torch.equal(v, snap[k]), k


@pytest.mark.parametrize("ema_warmup", [0, 100])  # restarts run after and during the warm-up alike
def test_dead_code_is_restarted_from_that_depths_residual_inputs(ema_warmup):
    torch.manual_seed(3)
    q = _q(K=4, d=2, L=2, ema_decay=0.5, restart_threshold=1.0, ema_warmup=ema_warmup).train()
    cb = torch.tensor([
        [[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [100.0, 100.0]],  # code 3 is never used
        [[0.0, 0.0], [0.3, 0.3], [-0.3, 0.3], [-50.0, 80.0]],  # code 3 is never used
    ])
    _set_codebooks(q, cb)
    centers = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = (centers.repeat(20, 1) + 0.3 * torch.randn(60, 2))[None]  # every live code used >= 2 times
    out = q(x)
    assert q.last_restarts_L.tolist() == [1, 1]
    codes = out.codes[0]
    r1 = x[0]  # depth-1 residual inputs
    r2 = x[0] - cb[0][codes[:, 0]]  # depth-2 residual inputs
    for l, pool in ((0, r1), (1, r2)):
        new = q.codebooks_LKd[l, 3]
        assert (pool - new).abs().amax(dim=1).min() < 1e-6, f"depth {l + 1}: restarted code not from its pool"
        assert float(q.ema_size_LK[l, 3]) == 1.0
    assert (q.ema_size_LK[:, :3] >= 1.0).all()  # live codes kept (not restarted)


def test_more_dead_codes_than_residual_inputs_every_row_once_then_noisy_copies():
    torch.manual_seed(8)
    K, N = 16, 5
    q = _q(K=K, d=3, L=1, ema_decay=0.5, restart_threshold=1.0).train()
    cb = torch.full((1, K, 3), 1000.0)
    cb[0, 0] = 0.0  # the only code the batch uses; the other 15 are dead
    _set_codebooks(q, cb)
    x = torch.randn(1, N, 3)
    q(x)
    assert q.last_restarts_L.tolist() == [K - 1]
    new = q.codebooks_LKd[0, 1:]
    near = (new[:, None] - x[0][None]).abs().amax(-1).min(dim=1).values
    assert (near == 0).sum() == N, "each residual input exactly once"
    assert (near < 0.05).all() and torch.unique(new, dim=0).shape[0] == K - 1, "then distinct noisy copies"


def test_warmup_restarts_dead_codes_freezes_sums_and_rescales_codes():
    # This replaces the old "warm-up holds code vectors fixed, no restarts" test. The reference
    # (VisionXLab/EvoTok shared_rq_quantizer.py, VQEmbedding._update_buffers / _update_embedding) restarts
    # dead codes on every training step, warm-up included; during the warm-up it accumulates the cluster
    # sizes but not the vector sums, and still recomputes codes = sums / clamp(laplace(size), 1) -- so a
    # live code with EMA size s > 1 is scaled down by s. Under the old behaviour every assertion on the
    # restart (and on the rescaled codes) below fails.
    torch.manual_seed(4)
    K = 4
    q = _q(K=K, d=2, L=1, ema_decay=0.5, ema_warmup=100, restart_threshold=1.0).train()
    cb = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [100.0, 100.0]]])  # code 3 is never used
    _set_codebooks(q, cb)
    x = (cb[0, :3].repeat(20, 1) + 0.3 * torch.randn(60, 2))[None]
    out = q(x)
    assert int(q.step) == 1 and q.cfg.ema_warmup == 100  # still in the warm-up
    assert out.codes[0, :, 0].bincount(minlength=K).tolist() == [20, 20, 20, 0]
    # the dead code is restarted, to exactly one of this depth's residual inputs (here x itself)
    assert q.last_restarts_L.tolist() == [1]
    new = q.codebooks_LKd[0, 3]
    assert float((x[0] - new).abs().amax(dim=1).min()) == 0.0, "restarted code is not a residual input"
    assert float(q.ema_size_LK[0, 3]) == 1.0 and torch.equal(q.ema_sum_LKd[0, 3], new)
    # live codes: sums frozen, sizes accumulate, codes = frozen sums / clamp(laplace(size), 1)
    assert torch.equal(q.ema_sum_LKd[0, :3], cb[0, :3])
    size = torch.tensor([0.5 * 1 + 0.5 * 20] * 3 + [0.5 * 1])  # 10.5 each; code 3 (0.5 < 1) is dead
    torch.testing.assert_close(q.ema_size_LK[0, :3], size[:3])
    n = size.sum()
    smooth = (size + LAPLACE_EPS) / (n + K * LAPLACE_EPS) * n
    torch.testing.assert_close(q.codebooks_LKd[0, :3], cb[0, :3] / smooth[:3, None].clamp_min(1.0))
    assert float(q.codebooks_LKd[0, 1, 0]) < 0.5  # (5, 5) / 10.5: the reference's warm-up shrinkage
    # warm-up over (set_step wires the trainer's step in): the sums learn
    q.set_step(100)
    out2 = q(x)
    assert q.step.dtype == torch.int64 and int(q.step) == 101
    used_1 = out2.codes[0, :, 0] == 1
    torch.testing.assert_close(q.ema_sum_LKd[0, 1], 0.5 * cb[0, 1] + 0.5 * x[0][used_1].sum(0))


def test_init_from_first_batch_distinct_rows_and_small_batches():
    torch.manual_seed(5)
    # warm-up and no restarts, so ema_sum_LKd keeps the codebooks exactly as drawn (the code vectors
    # themselves are rescaled by the EMA sizes during the warm-up; see the warm-up test)
    q = _q(K=8, d=3, L=2, ema_warmup=1, restart_threshold=0.0).train()
    x = torch.randn(1, 50, 3)
    q.eval()
    q(x)
    assert not bool(q.initialized), "eval forwards must not initialise"
    q.train()
    q(x)
    cb1, cb2 = q.ema_sum_LKd[0], q.ema_sum_LKd[1]
    d_min = (cb1[:, None] - x[0][None]).abs().amax(-1).min(dim=1).values
    assert (d_min < 1e-6).all(), "depth-1 codes must be rows of the first batch"
    assert torch.unique(cb1, dim=0).shape[0] == 8, "N >= K: K distinct rows"
    # depth 2 is drawn from the depth-2 residuals: x minus its nearest new depth-1 code
    r2 = x[0] - cb1[torch.cdist(x[0], cb1).argmin(dim=1)]
    d2_min = (cb2[:, None] - r2[None]).abs().amax(-1).min(dim=1).values
    assert (d2_min < 1e-5).all(), "depth-2 codes must be rows of the depth-2 residuals"
    # N == K: every row exactly once
    q3 = _q(K=8, d=3, L=1, ema_warmup=1, restart_threshold=0.0).train()
    x3 = torch.randn(1, 8, 3)
    q3(x3)
    assert torch.equal(torch.sort(q3.ema_sum_LKd[0, :, 0]).values, torch.sort(x3[0, :, 0]).values)
    # N < K: every row once, then copies with small noise; all codes distinct
    q2 = _q(K=16, d=3, L=1, ema_warmup=1, restart_threshold=0.0).train()
    x2 = torch.randn(1, 5, 3)
    q2(x2)
    cb = q2.ema_sum_LKd[0]
    assert torch.unique(cb, dim=0).shape[0] == 16
    near = (cb[:, None] - x2[0][None]).abs().amax(-1).min(dim=1).values
    assert (near < 0.05).all() and (near < 1e-6).sum() == 5  # the 5 rows, then noisy copies


def test_l2_normalize_inputs():
    torch.manual_seed(6)
    q = _q(l2_normalize=True).train()
    x = 5 * torch.randn(2, 30, 4)
    q(x)
    out = q(x)
    xn = torch.nn.functional.normalize(x, dim=-1)
    assert (out.z_cum[-1] - xn).pow(2).mean() < (out.z_cum[-1] - x).pow(2).mean()


def test_bad_inputs_name_the_expected_shape():
    q = _q(K=8, d=4, L=2)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\) or \(B, N, 4\)"):
        q(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, N, 4\)"):
        q(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"\(B, N, 4\)"):
        q(torch.randn(10, 4))
    q.train()
    out = q(torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="depth"):
        q.decode_codes(out.codes, depth=3)
    with pytest.raises(ValueError, match="codes have 3 depths but the quantizer has depth 2"):
        q.decode_codes(torch.zeros(2, 6, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="depth must be an int in"):
        q.decode_codes(out.codes[..., :1], depth=2)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        q.decode_codes(torch.full((2, 6, 2), 8, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        q.decode_codes(out.codes.float())
    with pytest.raises(ValueError, match="ema_decay"):
        _q(ema_decay=1.0)
    with pytest.raises(ValueError, match="impl"):
        _q(impl="nope")
    with pytest.raises(ValueError, match="depth"):
        _q(L=0)


def test_no_dense_one_hot_or_distance_matrix_in_training_forward():
    """No single op of a training forward allocates anything near an N x K float matrix (profiler)."""
    torch.manual_seed(7)
    N, K, d, L = 4096, 4096, 8, 2
    q = _q(K=K, d=d, L=L, impl="auto").train()
    x = torch.randn(1, N, d)
    q(x)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        q(x)
    peak_alloc = max(e.self_cpu_memory_usage for e in prof.events())
    assert peak_alloc >= N * d * 4, "profiler did not see the (N, d) allocations"
    nk_bytes = N * K * 4
    assert peak_alloc < nk_bytes / 4, f"an op allocated {peak_alloc} bytes (N x K floats = {nk_bytes})"
    assert math.isfinite(float(q.codebooks_LKd.abs().max()))


@pytest.mark.slow  # part of make test, not of make test-fast
def test_bench_quick_runs_and_writes_json(tmp_path):
    import json

    from evotok.bench.quantizer import bench_quantizer

    res = bench_quantizer(quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "bench_quantizer.json").read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert "ref" in impls and "cpp" in impls and any(i.startswith("gemm[chunk=") for i in impls)
    assert data["gemm_rate_gflops"] > 0 and res["training"][0]["train_forward_ms"] > 0
    for r in data["rows"]:
        assert r["ms"] > 0 and r["agree"] > 0.99, r
    assert any(r["impl"] == "cpp" and r["peak_extra_mib"] is not None for r in data["rows"])
