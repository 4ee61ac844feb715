"""Generation-stage nn.Modules and sampling functions: depth transformer, sampling, ImageGenerator (CPU, tiny)."""

from __future__ import annotations

import math

import pytest
import torch

from evotok.errors import UserError
from evotok.models.depth_transformer import (
    DepthTransformer,
    DepthTransformerConfig,
    GenerationConfigError,
    cumulative_code_vectors,
)
from evotok.models.generator import GeneratorConfig, ImageGenerator, positions_from_mask
from evotok.models.sampling import (
    SamplingError,
    cfg_logits,
    per_depth,
    sample,
    top_k_top_p_filter,
)

D, K, d, VOCAB = 4, 16, 8, 64


def _codebooks(L: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(L, K, d, generator=torch.Generator().manual_seed(seed))


def _generator(seed: int = 0) -> ImageGenerator:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    ))
    cfg = GeneratorConfig(lpix=D, head_width=32, head_layers=2, head_heads=4)
    return ImageGenerator(cfg, lm, _codebooks()).eval()


def _left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if n:
            ids[i, T - n:] = torch.randint(1, VOCAB, (n,), generator=g)
            mask[i, T - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def gen() -> ImageGenerator:
    return _generator()


@pytest.fixture(scope="module")
def prompts():
    cond = _left_padded([3, 5, 2], seed=1)
    uncond = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))  # empty prompt
    return cond, uncond


def _sample(gen, prompts, seed=0, **kw):
    (ids, mask), (u_ids, u_mask) = prompts
    args = dict(n_positions=9, cfg_scale=3.0, temperature=1.0, top_k=8, top_p=0.9,
                generator=torch.Generator().manual_seed(seed))
    args.update(kw)
    return gen.generate(ids, mask, u_ids, u_mask, **args)


# -- depth transformer -----------------------------------------------------------------------------------
def _head(seed=0):
    torch.manual_seed(seed)
    cfg = DepthTransformerConfig(context_dim=24, depth=D, codebook_size=K, code_dim=d, width=32, layers=2, heads=4)
    return DepthTransformer(cfg, _codebooks(D)).eval()


def test_depth_transformer_is_causal_across_depths():
    head = _head()
    ctx = torch.randn(5, 24)
    codes = torch.randint(0, K, (5, D))
    base = head(ctx, codes)
    assert base.shape == (5, D, K)
    for j in range(D):
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 1) % K
        out = head(ctx, changed)
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
        if j + 1 < D:  # the last depth's code is never an input
            assert (out[:, j + 1:] - base[:, j + 1:]).abs().amax(dim=-1).min() > 1e-4


def test_depth_transformer_step_matches_teacher_forcing():
    head = _head()
    ctx, codes = torch.randn(5, 24), torch.randint(0, K, (5, D))
    full = head(ctx, codes)
    cache = head.eval().cache(ctx)
    for k in range(D):
        torch.testing.assert_close(head.logits_at(ctx, codes[:, :k]), full[:, k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.logits(), full[:, k], rtol=1e-5, atol=1e-5)  # keys/values kept
        cache.push(codes[:, k])
    with pytest.raises(ValueError, match="all 4 depths"):
        cache.logits()


def _cpp_step_builds() -> bool:
    from evotok.ops import build
    from evotok.ops.steps import cpu_module

    return build.compiler_available() and cpu_module() is not None


@pytest.mark.parametrize("heads, layers", [(4, 2), (1, 3)])
def test_cpp_depth_step_equals_the_torch_step(heads, layers):
    """The C++ step (evotok/ops/csrc/depth_step_cpu.cpp) against _Block.step: logits at every depth, and the keys
    and values it leaves in the shared buffers."""
    if not _cpp_step_builds():
        pytest.skip("the CPU extension does not build here")
    torch.manual_seed(heads)
    cfg = DepthTransformerConfig(context_dim=24, depth=D, codebook_size=K, code_dim=d, width=32, layers=layers,
                                 heads=heads)
    head = DepthTransformer(cfg, _codebooks(D)).eval()
    ctx, codes = torch.randn(7, 24), torch.randint(0, K, (7, D))
    with torch.no_grad():
        full = head(ctx, codes)
        ref, fast = head.cache(ctx, "torch"), head.cache(ctx, "cpp")
        assert (ref.impl, fast.impl) == ("torch", "cpp")
        for k in range(D):
            want = ref.logits()
            torch.testing.assert_close(fast.logits(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(want, full[:, k], rtol=1e-5, atol=1e-5)
            ref.push(codes[:, k]), fast.push(codes[:, k])
        for a, b in zip(ref.kv, fast.kv):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_depth_step_impl_resolution():
    head, ctx = _head().eval(), torch.randn(3, 24)
    assert head.cache(ctx, "auto").impl == "torch"  # autograd on: the C++ step does not apply
    with pytest.raises(ValueError, match="impl='cpp' cannot run this depth step: it runs under torch.no_grad"):
        head.cache(ctx, "cpp")
    with pytest.raises(ValueError, match="depth step impl must be one of"):
        head.cache(ctx, "fast")
    with torch.no_grad():
        with pytest.raises(ValueError, match="float32 CPU tensors, got torch.float64"):
            head.double().cache(ctx.double(), "cpp")
        head.float()
        assert head.cache(ctx, "auto").impl == ("cpp" if _cpp_step_builds() else "torch")


def test_cumulative_code_vectors_sum_codebook_rows():
    cb = _codebooks(D)
    codes = torch.tensor([[1, 2, 3, 4]])
    z = cumulative_code_vectors(cb, codes)
    torch.testing.assert_close(z[0, 2], cb[0, 1] + cb[1, 2] + cb[2, 3])
    assert z.shape == (1, D, d)


def test_configs_name_the_bad_field():
    with pytest.raises(GenerationConfigError, match="lpix"):
        GeneratorConfig(lpix=0)
    with pytest.raises(GenerationConfigError, match="heads"):
        DepthTransformerConfig(context_dim=8, depth=D, codebook_size=K, code_dim=d, width=30, heads=4)
    with pytest.raises(GenerationConfigError, match="lpix"):
        ImageGenerator(GeneratorConfig(lpix=8, head_width=32, head_layers=1), _generator().lm, _codebooks(L=6))


# -- sampling functions ----------------------------------------------------------------------------------
def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2)
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(top_k_top_p_filter(logits, 0, p))[0].nonzero().flatten().tolist())
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {0, 1, 3}
    assert kept(0.5) == {1}
    assert kept(1e-4) == {1}  # always at least one
    assert kept(1.0) == {0, 1, 2, 3}
    # top-k first, then top-p on what is left: [0.5, 0.3] renormalised is [0.625, 0.375]
    assert set(torch.isfinite(top_k_top_p_filter(logits, 2, 0.6))[0].nonzero().flatten().tolist()) == {1}
    kept_logits = top_k_top_p_filter(logits, 0, 0.8)
    assert torch.equal(kept_logits[0, [1, 3]], logits[0, [1, 3]])  # survivors keep their values


def test_top_k_ties_are_deterministic():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    out = top_k_top_p_filter(logits, 2, 1.0)
    assert torch.isfinite(out)[0].tolist() == [False, True, True, False, False]
    assert sample(logits, temperature=0.0).item() == 1


def test_top_k_1_equals_greedy():
    logits = torch.randn(64, K)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    # and a real draw is not greedy everywhere
    assert not torch.equal(sample(logits, 1.0, generator=g), logits.argmax(-1))


def test_temperature_0_is_greedy_without_nan():
    logits = torch.randn(32, K) * 50
    ids = sample(logits, temperature=0.0, top_k=5, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, logits.argmax(-1))
    tiny = sample(logits, temperature=1e-30, generator=torch.Generator().manual_seed(0))  # no inf - inf
    assert torch.equal(tiny, logits.argmax(-1))


def test_cfg_logits():
    cond, uncond = torch.randn(3, K), torch.randn(3, K)
    both = torch.cat([cond, uncond])
    assert torch.equal(cfg_logits(both, 1.0), cond)
    assert torch.equal(cfg_logits(both, 0.0), uncond)
    torch.testing.assert_close(cfg_logits(both, 3.0), uncond + 3.0 * (cond - uncond))


@pytest.mark.parametrize("call, name", [
    (lambda: top_k_top_p_filter(torch.zeros(1, 4), 0, 0.0), "top_p"),
    (lambda: top_k_top_p_filter(torch.zeros(1, 4), 0, 1.5), "top_p"),
    (lambda: top_k_top_p_filter(torch.zeros(1, 4), -1, 1.0), "top_k"),
    (lambda: sample(torch.zeros(1, 4), temperature=-0.5), "temperature"),
    (lambda: cfg_logits(torch.zeros(2, 4), -1.0), "cfg_scale"),
])
def test_sampling_functions_name_bad_arguments(call, name):
    with pytest.raises(SamplingError, match=name) as e:
        call()
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_per_depth():
    assert per_depth(5, 3, "top_k") == [5, 5, 5]
    assert per_depth([1, 2, 3], 3, "top_k") == [1, 2, 3]
    with pytest.raises(SamplingError, match=r"top_k has 2 values but there are 3 code depths"):
        per_depth([1, 2], 3, "top_k")


# -- generator: sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("impl, step_impl", [("lean", "auto"), ("hf", "auto"), ("lean", "torch")])
def test_kv_cached_sampling_equals_uncached(gen, prompts, impl, step_impl):
    cached = _sample(gen, prompts, use_cache=True, decode_impl=impl, step_impl=step_impl)
    assert cached.shape == (3, 9, D) and cached.dtype == torch.long
    assert cached.min() >= 0 and cached.max() < K
    assert torch.equal(cached, _sample(gen, prompts, use_cache=False))
    # per-depth filters go through the same loop
    kw = dict(top_k=[4, 8, 16, 0], top_p=[0.9, 1.0, 0.7, 0.95])
    assert torch.equal(_sample(gen, prompts, use_cache=True, decode_impl=impl, step_impl=step_impl, **kw),
                       _sample(gen, prompts, use_cache=False, **kw))


def _llama_generator(**config) -> ImageGenerator:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      **config))
    return ImageGenerator(GeneratorConfig(lpix=D, head_width=32, head_layers=1, head_heads=2), lm, _codebooks()).eval()


@pytest.mark.parametrize("step_impl", ["torch", "cpp"])
@pytest.mark.parametrize("make", [_generator, _llama_generator], ids=["qwen2-gqa", "llama"])
def test_lean_decode_step_equals_the_models_forward(make, step_impl):
    """Hidden states of the lean decode step (its torch step, and the C++ one of evotok/ops/csrc/lm_step_cpu.cpp)
    against the LM's own forward over the whole left-padded sequence."""
    from transformers import DynamicCache

    from evotok.models.lm_decode import LeanDecoder, lean_decode_supported

    if step_impl == "cpp" and not _cpp_step_builds():
        pytest.skip("the CPU extension does not build here")
    g = make()
    assert lean_decode_supported(g.lm) is None
    ids, mask = _left_padded([2, 6, 4], seed=4)
    body, R, T, new = g.lm.base_model, 3, ids.shape[1], 5
    x_RNC = torch.randn(R, new, body.config.hidden_size, generator=torch.Generator().manual_seed(5))
    embeds = torch.cat([g._embed_tokens(ids), x_RNC], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(R, new)], dim=1)
    positions = positions_from_mask(full_mask)
    with torch.no_grad():
        want = g._lm_hidden(embeds, full_mask, positions)[:, T:]
        cache = DynamicCache(config=g.lm.config)
        g._lm_hidden(embeds[:, :T], mask, positions[:, :T], cache)
        dec = LeanDecoder(body, cache, mask, capacity=T + new, impl=step_impl)
        assert dec.impl == step_impl
        got = torch.stack([dec.step(x_RNC[:, j], positions[:, T + j]) for j in range(new)], dim=1)
        with pytest.raises(ValueError, match="all used"):
            dec.step(x_RNC[:, 0], positions[:, -1] + 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_impl_falls_back_or_refuses_where_lean_does_not_apply(prompts):
    from evotok.models.lm_decode import lean_decode_supported

    g = _llama_generator(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert "rope_type 'linear'" in lean_decode_supported(g.lm)
    auto = _sample(g, prompts, use_cache=True)  # auto: the model's own forward
    assert torch.equal(auto, _sample(g, prompts, use_cache=False))
    with pytest.raises(SamplingError, match="decode_impl='lean' does not support this LM: rope_type 'linear'"):
        _sample(g, prompts, decode_impl="lean")
    with pytest.raises(SamplingError, match="decode_impl must be one of"):
        _sample(g, prompts, decode_impl="fast")
    with pytest.raises(SamplingError, match="step_impl must be one of"):
        _sample(g, prompts, step_impl="fast")


def test_sampling_is_deterministic_for_a_seed(gen, prompts):
    assert torch.equal(_sample(gen, prompts, seed=5), _sample(gen, prompts, seed=5))
    assert not torch.equal(_sample(gen, prompts, seed=5), _sample(gen, prompts, seed=6))


def test_cfg_scale_1_equals_plain_conditional_sampling(gen, prompts):
    (ids, mask), _ = prompts
    plain = gen.generate(ids, mask, n_positions=9, cfg_scale=1.0, top_k=8, generator=torch.Generator().manual_seed(0))
    with_uncond = _sample(gen, prompts, cfg_scale=1.0, top_k=8, top_p=1.0)
    assert torch.equal(plain, with_uncond)
    assert not torch.equal(plain, _sample(gen, prompts, cfg_scale=3.0, top_k=8, top_p=1.0))  # guidance acts


def test_left_padding_does_not_change_a_row(gen):
    ids, mask = _left_padded([2, 6], seed=4)
    batch = gen.generate(ids, mask, n_positions=6, temperature=0.0)
    for i in range(2):
        n = int(mask[i].sum())
        alone = gen.generate(ids[i:i + 1, -n:], mask[i:i + 1, -n:], n_positions=6, temperature=0.0)
        assert torch.equal(batch[i], alone[0])


def test_generate_validates_arguments_at_the_edge(gen, prompts):
    with pytest.raises(SamplingError, match=r"top_k has 2 values but there are 4 code depths"):
        _sample(gen, prompts, top_k=[1, 2])
    with pytest.raises(SamplingError, match="top_p has 3 values"):
        _sample(gen, prompts, top_p=[0.9, 0.9, 0.9])
    for kw, name in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": [0.9, 0.9, 2.0, 0.9]}, "top_p"),
                     ({"cfg_scale": -1.0}, "cfg_scale"), ({"temperature": -0.1}, "temperature"),
                     ({"top_k": -3}, "top_k")]:
        with pytest.raises(SamplingError, match=name):
            _sample(gen, prompts, **kw)
    (ids, mask), _ = prompts
    with pytest.raises(SamplingError, match="uncond_ids_BT"):
        gen.generate(ids, mask, n_positions=2, cfg_scale=2.0)


# -- generator: teacher forcing --------------------------------------------------------------------------
def _codes(B=4, H=3, W=3, L=6, seed=2):
    return torch.randint(0, K, (B, H, W, L), generator=torch.Generator().manual_seed(seed))


def test_teacher_forcing_shapes_and_loss(gen):
    ids, mask = _left_padded([3, 4, 2, 4])
    out = gen(ids, mask, _codes())
    assert out.logits.shape == (4, 9, D, K) and out.ce_per_depth_D.shape == (D,)
    torch.testing.assert_close(out.loss, out.ce_per_depth_D.mean())
    assert abs(out.loss.item() - math.log(K)) < 1.0  # untrained: near uniform


def test_padding_a_prompt_does_not_change_its_loss(gen):
    g = torch.Generator().manual_seed(7)
    short, long = torch.randint(1, VOCAB, (1, 3), generator=g), torch.randint(1, VOCAB, (1, 7), generator=g)
    codes = _codes(B=2)
    alone = gen(short, torch.ones_like(short), codes[:1])
    padded_ids = torch.cat([short, torch.randint(1, VOCAB, (1, 4), generator=g)], dim=1)  # garbage in the pads
    padded_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]])
    padded = gen(padded_ids, padded_mask, codes[:1])
    torch.testing.assert_close(padded.loss, alone.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.ce_per_depth_D, alone.ce_per_depth_D, rtol=1e-5, atol=1e-5)
    batch = gen(torch.cat([padded_ids, long]), torch.cat([padded_mask, torch.ones_like(long)]), codes)
    torch.testing.assert_close(batch.logits[0], alone.logits[0], rtol=1e-4, atol=1e-5)
    # the pad slots really are different tokens: unmasked they change the loss
    unmasked = gen(padded_ids, torch.ones_like(padded_ids), codes[:1])
    assert abs(unmasked.loss.item() - alone.loss.item()) > 1e-4


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 1, 1, 2]]


def test_short_training_lowers_the_cross_entropy_at_every_depth():
    gen = _generator(seed=1).train()
    ids, mask = _left_padded([3, 5, 4, 2], seed=3)
    codes = _codes(B=4, seed=9)
    groups = gen.param_groups()
    opt = torch.optim.Adam([{"params": groups["projector"]}, {"params": groups["head"]}, {"params": groups["lm"]}], lr=3e-3)
    before = gen(ids, mask, codes).ce_per_depth_D.detach()
    for _ in range(40):
        opt.zero_grad()
        gen(ids, mask, codes).loss.backward()
        opt.step()
    after = gen(ids, mask, codes).ce_per_depth_D.detach()
    assert (after < before - 0.3).all(), (before, after)
    assert torch.equal(gen.codebooks_DKd, _codebooks()[:D])  # frozen tokenizer codebooks


def test_param_groups_partition_the_trainable_parameters(gen):
    groups = gen.param_groups()
    assert set(groups) == {"projector", "head", "lm"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in gen.parameters()}
    assert any(p is gen.boi for p in groups["projector"])
    names = {n for n, _ in gen.named_buffers()}
    assert "head.codebooks_DKd" in names and not any(b is gen.codebooks_DKd for b in gen.parameters())
