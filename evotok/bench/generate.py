"""``evotok bench generate``: images/s of the generation sampler at batch 16 with and without the LM's KV cache,
measured side by side in one run (alternating, median of repeats), and their ratio.

Without ``--run`` the model is a randomly initialised generator of the embedded sizes (the stand-in LM preset,
a 2-layer width-128 depth transformer, 8 x 8 positions x 4 depths, K = 32, CFG on): the sampler's speed does
not depend on the weights. With ``--run`` a trained generation run is timed."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch


def _random_generator(positions: int = 64, depth: int = 4, codebook: int = 32, dim: int = 32, vocab: int = 512):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from evotok.models.generator import GeneratorConfig, ImageGenerator
    from evotok.models.lm import tiny

    a = tiny()
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                      num_key_value_heads=a.kv_heads, max_position_embeddings=a.max_positions))
    gen = ImageGenerator(GeneratorConfig(lpix=depth, head_width=128, head_layers=2, head_heads=4), lm,
                         torch.randn(depth, codebook, dim))
    return gen.eval(), positions


def bench_generate(out_dir: str | Path = "results", batch: int = 16, repeats: int = 3, run: Optional[str] = None,
                   quick: bool = False) -> dict:
    if run:
        from evotok.lit.generation_module import load_generation

        gen, _, evotok, _ = load_generation(run)
        positions = evotok.grid[0] * evotok.grid[1]
    else:
        gen, positions = _random_generator()
    if quick:
        batch, repeats, positions = 4, 1, 16
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 100, (batch, 12), generator=g)
    mask = torch.ones_like(prompt)
    uncond, umask = prompt[:1, :4], torch.ones(1, 4, dtype=torch.long)
    times: dict[bool, list[float]] = {True: [], False: []}
    codes = {}
    for _ in range(repeats):
        for use_cache in (True, False):
            start = time.perf_counter()
            codes[use_cache] = gen.generate(prompt, mask, uncond, umask, n_positions=positions, cfg_scale=3.0,
                                            generator=torch.Generator().manual_seed(1), use_cache=use_cache)
            times[use_cache].append(time.perf_counter() - start)
    head = []  # the depth transformer's share: the same depth-by-depth sampling alone, on random LM states
    hidden = torch.randn(2 * batch, gen.head.config.context_dim, generator=g)
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(positions):
                cache = gen.head.cache(hidden)
                for _ in range(gen.config.lpix):
                    cache.push(cache.logits().argmax(dim=-1))
        head.append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "batch": batch, "positions": positions,
        "depths": gen.config.lpix, "repeats": repeats, "model": run or "random embedded-size generator",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "rows": [{"kv_cache": k, "seconds": med[k], "images_per_s": batch / med[k]} for k in (True, False)],
        "speedup": med[False] / med[True], "same_codes": bool(torch.equal(codes[True], codes[False])),
        "depth_head_seconds": statistics.median(head),
    }
    out = Path(out_dir) / "bench_generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        print(f"kv_cache={r['kv_cache']!s:<5} {r['seconds']:.2f} s per batch of {batch}: {r['images_per_s']:.2f} images/s")
    print(f"depth transformer alone (cached, both CFG halves): {result['depth_head_seconds']:.2f} s per batch")
    print(f"KV cache speed-up: {result['speedup']:.2f}x (codes identical: {result['same_codes']}); {out}")
    return result
