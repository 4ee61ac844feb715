"""``evotok bench generate``: images/s of the generation sampler at batch 16 with and without the LM's KV cache,
measured side by side in one run (alternating, median of repeats), and their ratio, at one intra-op thread and at
torch's default count (the headline). The cached sampler is timed twice: with its default decode step
(``decode_impl="auto"``: the lean step where the LM supports it) and through the LM's own forward and
``DynamicCache`` (``"hf"``); all give the same codes.

Without ``--run`` the model is a randomly initialised generator of the embedded sizes (the stand-in LM preset,
the depth transformer of ``generation/tiny_phase1``, 8 x 8 positions x 4 depths, K = 32, CFG on): the sampler's
speed does not depend on the weights. With ``--run`` a trained generation run is timed."""

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

    from evotok.config import load_config
    from evotok.lit.generation_module import generator_config
    from evotok.models.generator import ImageGenerator
    from evotok.models.lm import tiny

    a, cfg = tiny(), load_config("generation/tiny_phase1", [])  # the embedded config's depth transformer
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                      num_key_value_heads=a.kv_heads, max_position_embeddings=a.max_positions))
    gen = ImageGenerator(generator_config(cfg, depth), lm, torch.randn(depth, codebook, dim))
    return gen.eval(), positions


def bench_generate(out_dir: str | Path = "results", batch: int = 16, repeats: int = 5, run: Optional[str] = None,
                   quick: bool = False) -> dict:
    from evotok.models.lm_decode import lean_decode_supported

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
    # (label, use_cache, decode_impl): the sampler's default, the LM's own forward with its DynamicCache, no cache
    variants = [("cached", True, "auto"), ("cached_hf", True, "hf"), ("uncached", False, "auto")]
    default_threads = torch.get_num_threads()
    # the cached sampler is a chain of small operations that a second intra-op thread barely helps, the uncached
    # one re-runs whole sequences that it does: both thread counts are measured, the default one is the headline
    thread_counts = sorted({1, default_threads})
    codes, med, rows = {}, {}, []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {v[0]: [] for v in variants}
            for _ in range(repeats):
                for label, use_cache, impl in variants:
                    start = time.perf_counter()
                    codes[label, threads] = gen.generate(
                        prompt, mask, uncond, umask, n_positions=positions, cfg_scale=3.0,
                        generator=torch.Generator().manual_seed(1), use_cache=use_cache, decode_impl=impl)
                    times[label].append(time.perf_counter() - start)
            med[threads] = {k: statistics.median(v) for k, v in times.items()}
        torch.set_num_threads(default_threads)
        head: dict[str, list[float]] = {"auto": [], "torch": []}  # the depth transformer alone, on random LM states
        hidden = torch.randn(2 * batch, gen.head.config.context_dim, generator=g)
        for _ in range(repeats):
            for impl in head:
                start = time.perf_counter()
                with torch.no_grad():
                    for _ in range(positions):
                        cache = gen.head.cache(hidden, impl)
                        for _ in range(gen.config.lpix):
                            cache.push(cache.logits().argmax(dim=-1))
                head[impl].append(time.perf_counter() - start)
        with torch.no_grad():  # as in the sampler
            depth_step = gen.head.cache(hidden[:1]).impl  # what "auto" runs here
    finally:
        torch.set_num_threads(default_threads)
    decode = {"cached": "lean" if lean_decode_supported(gen.lm) is None else "hf", "cached_hf": "hf", "uncached": "-"}
    for threads in thread_counts:
        rows += [{"threads": threads, "kv_cache": use_cache, "decode": decode[label], "seconds": med[threads][label],
                  "images_per_s": batch / med[threads][label]} for label, use_cache, _ in variants]
    ratio = {t: {"speedup": m["uncached"] / m["cached"], "speedup_hf": m["uncached"] / m["cached_hf"]}
             for t, m in med.items()}
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "batch": batch, "positions": positions,
        "depths": gen.config.lpix, "repeats": repeats, "model": run or "random embedded-size generator",
        "threads": default_threads, "cpu_count": os.cpu_count(), "platform": platform.platform(), "rows": rows,
        **ratio[default_threads], "speedup_by_threads": {str(t): r for t, r in ratio.items()},
        "same_codes": all(torch.equal(codes["uncached", default_threads], c) for c in codes.values()),
        "depth_step": depth_step, "depth_head_seconds": statistics.median(head["auto"]),
        "depth_head_seconds_torch": statistics.median(head["torch"]),
    }
    out = Path(out_dir) / "bench_generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        print(f"threads={r['threads']} kv_cache={r['kv_cache']!s:<5} decode={r['decode']:<4} {r['seconds']:.2f} s "
              f"per batch of {batch}: {r['images_per_s']:.2f} images/s")
    print(f"depth transformer alone (cached, both CFG halves, {default_threads} threads): "
          f"{result['depth_head_seconds']:.2f} s per batch with its {depth_step} step, "
          f"{result['depth_head_seconds_torch']:.2f} s with the torch step")
    for t, r in ratio.items():
        print(f"KV cache speed-up at {t} thread{'s' * (t > 1)}: {r['speedup']:.2f}x ({r['speedup_hf']:.2f}x through "
              f"the LM's own forward)")
    print(f"codes identical across all runs: {result['same_codes']}; {out}")
    return result
