"""The generation and checker stages end to end on tiny sizes: codes cache, phases 1 and 2, sampling from the
command line, the GenEval-style evaluation and its scoring, the generate benchmark, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evotok.config import load_config


@pytest.fixture(scope="module")
def runs(mllm_base):
    """A checker and generation phases 1 and 2 (a few steps each) on the shared tiny tokenizer and stand-in LM."""
    from evotok.lit.train import train

    common, tok, lm = mllm_base["common"], mllm_base["tok"], mllm_base["lm"]
    checker = train(load_config("checker/tiny", [*common, "run.name=c", "trainer.max_steps=4",
                                                 "trainer.val_every_n_steps=4", "data.batch_size=32"], stage="checker"),
                    "checker")
    g = [*common, f"tokenizer.run={tok.path}", f"lm.run={lm.path}", "trainer.val_every_n_steps=3",
         "trainer.limit_val_batches=1", "gen.depth_width=32", "gen.depth_layers=1"]
    p1 = train(load_config("generation/tiny_phase1", [*g, "run.name=g1", "trainer.max_steps=3"], stage="generation"),
               "generation")
    p2 = train(load_config("generation/tiny_phase2", [*g, "run.name=g2", "trainer.max_steps=3", f"generation.run={p1.path}",
                                                      f"checker.run={checker.path}"], stage="generation"), "generation")
    return dict(common=common, tok=tok, lm=lm, checker=checker, p1=p1, p2=p2)


@pytest.mark.slow
def test_codes_cache_matches_the_tokenizer_and_refuses_another(runs, tmp_path):
    from evotok.api import load_tokenizer
    from evotok.data import build_dataset
    from evotok.data.codes import CodesFileError, open_codes
    from evotok.handover import fingerprint_file

    tok_run = runs["tok"]
    cfg = load_config("generation/tiny_phase1", [*runs["common"], f"tokenizer.run={tok_run.path}"], stage="generation")
    fp = fingerprint_file(tok_run.best_ckpt)
    codes = open_codes(tok_run.path, fp, cfg.data, "train")
    ds = build_dataset(cfg.data, "train")
    model = load_tokenizer(tok_run.path)
    with torch.no_grad():
        expect = model.encode(torch.stack([ds[i]["image"] for i in range(4)]))
    assert codes.shape == (96, 8, 8, 3) and np.array_equal(codes[:4], expect.numpy())
    with pytest.raises(CodesFileError, match="encoded by a tokenizer with fingerprint .* rebuild it"):
        open_codes(tok_run.path, "sha256:" + "0" * 64, cfg.data, "train")
    with pytest.raises(CodesFileError, match="evotok data codes --run"):
        open_codes(tok_run.path, fp, load_config(None, ["data.train_size=80"]).data, "train")


@pytest.mark.slow
def test_phases_train_what_they_should(runs):
    from evotok.lit.generation_module import load_generation
    from evotok.runs import load_checkpoint_file

    s1 = load_checkpoint_file(runs["p1"].last_ckpt)["state_dict"]
    s2 = load_checkpoint_file(runs["p2"].last_ckpt)["state_dict"]
    assert not any(k.startswith("generator.lm.") for k in s1) and any(k.startswith("generator.lm.") for k in s2)
    g1, _, _, _ = load_generation(runs["p1"].path)
    g2, _, _, cfg = load_generation(runs["p2"].path)
    assert not torch.equal(g1.code_proj.weight, g2.code_proj.weight)  # phase 2 went on from phase 1
    m = json.loads(runs["p2"].metrics.read_text())["scalars"]
    assert all(f"ce_depth{k}" in m for k in (1, 2)) and m["val/ce"] > 0
    assert cfg.tokenizer.run == str(runs["tok"].path.resolve())


@pytest.mark.slow
def test_generate_command_writes_grid_and_codes_and_is_deterministic(runs, tmp_path, capsys):
    from evotok.cli import main

    argv = ["generate", "--run", str(runs["p2"].path), "two red stars", "--n", "3", "--seed", "5", "--top-k", "8,4",
            "--top-p", "0.9"]
    assert main([*argv, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b.png")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["codes"].shape == (3, 8, 8, 2) and np.array_equal(a["codes"], b["codes"])
    assert (tmp_path / "a.png").stat().st_size > 0
    assert main(["generate", "--run", str(runs["p2"].path), "", "--n", "1", "--out", str(tmp_path / "u.png")]) == 0
    assert "empty prompt: these are unconditional samples" in capsys.readouterr().out
    assert main(["generate", "--run", str(runs["p2"].path), "two zebras", "--n", "1", "--out", str(tmp_path / "z.png")]) == 0
    assert "zebras never appear in the training captions" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--n", "0"], "--n must be >= 1"), (["--cfg", "-1"], "cfg"), (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"), (["--top-k", "4,4,4"], "top_k has 3 values"), (["--temperature", "-0.5"], "temperature"),
])
@pytest.mark.slow
def test_bad_sampling_arguments_are_one_line(runs, tmp_path, capsys, extra, needle):
    from evotok.cli import main

    assert main(["generate", "--run", str(runs["p2"].path), "stars", "--out", str(tmp_path / "x.png"), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_geneval_scores_every_tag_and_the_fd(runs):
    from evotok.eval.geneval import TAGS, evaluate_geneval

    scores = evaluate_geneval(runs["p2"].path, n_per_tag=1, n_samples=2, batch_size=16, progress=False)
    assert set(scores) == {f"geneval/{t}" for t in TAGS} | {"geneval/overall", "gen_fd"}
    tags = [scores[f"geneval/{t}"] for t in TAGS]
    assert scores["geneval/overall"] == pytest.approx(sum(tags) / len(tags)) and scores["gen_fd"] >= 0
    stored = json.loads(runs["p2"].metrics.read_text())
    assert stored["geneval"]["checker"]["fingerprint"].startswith("sha256:")
    assert (runs["p2"].figures / "geneval_heldout.png").is_file()


def test_geneval_prompts_and_scoring():
    from evotok.data.evoshapes import FACTORS, heldout_pairs
    from evotok.eval.geneval import Prompt, correct, geneval_prompts, tag_scores

    prompts = geneval_prompts(4, seed=0, heldout_fraction=0.1)
    held = set(heldout_pairs(0, 0.1))
    assert all((p.want["color"], p.want["shape"]) in held for p in prompts if p.tag == "heldout")
    assert all((p.want["color"], p.want["shape"]) not in held for p in prompts if p.tag == "colors")
    count = next(p for p in prompts if p.tag == "counting")
    assert count.text.split()[0] == FACTORS["count"][count.want["count"]]
    # hand-made readings: right where every named factor matches, wrong otherwise
    p1 = Prompt("counting", "two stars", {"count": 1, "shape": 3})
    p2 = Prompt("colors", "red stars", {"color": 0, "shape": 3})
    right = {"count": 1, "shape": 3, "color": 0, "texture": 2, "background": 5}
    wrong_count = dict(right, count=2)
    assert correct(p1.want, right) and not correct(p1.want, wrong_count) and correct(p2.want, wrong_count)
    s = tag_scores([p1, p1, p2, p2], [right, wrong_count, right, dict(right, color=4)])
    assert s == {"geneval/counting": 0.5, "geneval/colors": 0.5, "geneval/overall": 0.5}


@pytest.mark.slow
def test_checker_run_records_test_and_heldout_accuracy(runs):
    from evotok.lit.checker_module import load_checker

    m = json.loads(runs["checker"].metrics.read_text())["scalars"]
    for f in ("shape", "count", "color", "texture", "background"):
        assert 0 <= m[f"acc/{f}"] <= 1 and 0 <= m[f"heldout_acc/{f}"] <= 1
    checker = load_checker(runs["checker"].path)
    read = checker.read(torch.rand(2, 3, 32, 32))
    assert set(read) == {"shape", "count", "color", "texture", "background"} and read["shape"].shape == (2,)


def test_bench_generate_quick(tmp_path):
    from evotok.bench.generate import bench_generate

    r = bench_generate(out_dir=tmp_path, quick=True)
    assert r["same_codes"] and r["speedup"] > 0 and (tmp_path / "bench_generate.json").is_file()
