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
    from evotok.data.evoshapes import FACTOR_KEYS
    from evotok.eval.geneval import TAGS, evaluate_geneval

    scores = evaluate_geneval(runs["p2"].path, n_per_tag=1, n_samples=2, batch_size=16, progress=False,
                              readout_images=8)
    for kind in ("geneval", "geneval_ceiling"):
        tags = [scores[f"{kind}/{t}"] for t in TAGS]
        assert scores[f"{kind}/overall"] == pytest.approx(sum(tags) / len(tags))
    assert set(scores) == ({f"{k}/{t}" for k in ("geneval", "geneval_ceiling") for t in (*TAGS, "overall")}
                           | {"gen_fd", "gen_fd_ceiling"} | {f"readout/{f}" for f in FACTOR_KEYS})
    assert all(0.0 <= scores[f"readout/{f}"] <= 1.0 for f in FACTOR_KEYS)
    assert scores["gen_fd"] >= 0 and scores["gen_fd_ceiling"] >= 0
    stored = json.loads(runs["p2"].metrics.read_text())
    assert stored["geneval"]["checker"]["fingerprint"].startswith("sha256:")
    assert (runs["p2"].figures / "geneval_heldout.png").is_file() and (runs["p2"].figures / "geneval_tags.png").is_file()


def test_likelihood_readout_tells_a_prompt_following_model_from_one_that_ignores_prompts():
    from types import SimpleNamespace

    from evotok.data.evoshapes import FACTORS, caption
    from evotok.eval.geneval import likelihood_readout
    from evotok.models.lm import train_text_tokenizer

    shapes = FACTORS["shape"]
    tokenizer = train_text_tokenizer([caption({"shape": c, "count": n, "color": 0, "texture": 0, "background": 0})
                                      for c in range(len(shapes)) for n in range(3)], vocab_size=400)
    K = len(shapes)

    class FakeGenerator(torch.nn.Module):
        """Codes of one position and depth; the likelihood of code c is high when the prompt names shape c."""

        def __init__(self, follows: bool):
            super().__init__()
            self.config, self.follows, self.w = SimpleNamespace(lpix=1), follows, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids_BT, mask_BT, codes_BHWD):
            logits = torch.zeros(len(ids_BT), 1, 1, K)
            for b, ids in enumerate(ids_BT):
                text = tokenizer.decode(ids[mask_BT[b].bool()])
                named = [c for c, name in enumerate(shapes) if f" {name}" in text or f"\n{name}" in text]
                if self.follows and named:
                    logits[b, 0, 0, named[-1]] = 5.0
            return SimpleNamespace(logits=logits)

    evotok = SimpleNamespace(encode=lambda x: x[:, :1, :1, :1].long().permute(0, 2, 3, 1))  # the code = the label
    labels = [{"shape": c % K, "count": 0, "color": 1, "texture": 2, "background": 3} for c in range(16)]
    images = torch.tensor([float(lab["shape"]) for lab in labels]).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    follows = likelihood_readout(FakeGenerator(True), tokenizer, evotok, images, labels, factors=("shape",), batch_size=5)
    ignores = likelihood_readout(FakeGenerator(False), tokenizer, evotok, images, labels, factors=("shape",))
    assert follows == {"readout/shape": 1.0}
    assert ignores == {"readout/shape": pytest.approx(2 / 16)}  # ties read as class 0: the images of shape 0


def test_ceiling_draws_real_items_that_match_each_prompt():
    from evotok.data.evoshapes import FACTOR_KEYS
    from evotok.eval.geneval import Prompt, matching_items

    labels_NF = np.array([[0, 0, 1, 0, 0], [2, 1, 3, 0, 0], [2, 0, 3, 1, 0], [2, 2, 3, 1, 1]])  # shape count color tex bg
    prompts = [Prompt("colors", "", {"color": 3, "shape": 2}), Prompt("texture", "", {"texture": 1, "shape": 2}),
               Prompt("single_object", "", {"shape": 0}), Prompt("colors", "", {"color": 0, "shape": 0})]
    draws = [matching_items(prompts, labels_NF, seed) for seed in range(20)]
    assert {d[0] for d in draws} == {1, 2, 3} and {d[1] for d in draws} == {2, 3}
    assert all(d[2] == 0 and d[3] == -1 for d in draws)  # the only match / none
    assert FACTOR_KEYS[:3] == ("shape", "count", "color")


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


def _fitted_checker(images_BCHW: torch.Tensor, labels_NF: torch.Tensor, max_steps: int = 150):
    """A small checker trained on ``images_BCHW`` until it reads every one of them correctly."""
    import torch.nn.functional as F

    from evotok.data.evoshapes import FACTOR_KEYS
    from evotok.models.checker import FACTORS, build_checker

    checker = build_checker(16)
    opt = torch.optim.Adam(checker.parameters(), lr=3e-3)
    for step in range(max_steps):
        logits = checker(images_BCHW).logits
        loss = sum(F.cross_entropy(logits[f], labels_NF[:, FACTOR_KEYS.index(f)]) for f in FACTORS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            read = checker.eval().read(images_BCHW)
            checker.train()
            if all(torch.equal(read[f], labels_NF[:, FACTOR_KEYS.index(f)]) for f in FACTORS):
                break
    return checker.eval()


def test_checker_scores_a_hand_made_set_of_right_and_wrong_images(tmp_path):
    """Real EvoShapes images chosen by their labels for every tag's prompts: the right image has every factor the
    prompt names, each wrong one differs from it in exactly one named factor. Read by a checker fitted to the image
    pool (asserted to read the pool correctly), the scoring marks every right image correct and every wrong one
    incorrect, and a mixed set scores the exact fraction per tag."""
    from evotok.data.evoshapes import FACTOR_KEYS, labels_from_row, partial_caption
    from evotok.data.sources import build_dataset
    from evotok.eval.geneval import TAGS, Prompt, checker_reads, tag_scores

    cfg = load_config("checker/tiny", [f"data.cache_dir={tmp_path}", "data.test_size=128"])
    pool = build_dataset(cfg.data, "test")
    images = torch.stack([pool[i]["image"] for i in range(len(pool))])
    labels_NF = torch.as_tensor(np.array(pool.labels_NF), dtype=torch.long)
    checker = _fitted_checker(images, labels_NF)
    assert checker_reads(checker, images) == [labels_from_row(row) for row in labels_NF.tolist()]

    prompts, right, wrong = [], [], []  # wrong: (prompt index, image index)
    for i in range(12):
        labels = pool.labels(i)
        for tag, named in TAGS.items():
            if tag == "heldout":  # its pairs are never in the test split
                continue
            want = {f: labels[f] for f in named}
            prompts.append(Prompt(tag, partial_caption(labels, named), want))
            right.append(i)
            for f in named:  # an image agreeing on every other named factor, differing in f
                ok = labels_NF[:, FACTOR_KEYS.index(f)] != want[f]
                for g in named:
                    if g != f:
                        ok &= labels_NF[:, FACTOR_KEYS.index(g)] == want[g]
                rows = torch.nonzero(ok).flatten()
                if len(rows):
                    wrong.append((len(prompts) - 1, int(rows[0])))
    assert {prompts[p].tag for p, _ in wrong} == set(TAGS) - {"heldout"}  # every tag has wrong images
    scored_right = tag_scores(prompts, checker_reads(checker, images[right]))
    assert set(scored_right.values()) == {1.0}
    wrong_prompts = [prompts[p] for p, _ in wrong]
    scored_wrong = tag_scores(wrong_prompts, checker_reads(checker, images[[j for _, j in wrong]]))
    assert set(scored_wrong.values()) == {0.0}
    mixed = tag_scores(prompts + wrong_prompts, checker_reads(checker, images[right + [j for _, j in wrong]]))
    for tag in set(TAGS) - {"heldout"}:
        n_right = sum(p.tag == tag for p in prompts)
        assert mixed[f"geneval/{tag}"] == n_right / (n_right + sum(p.tag == tag for p in wrong_prompts))


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

    torch.set_num_threads(2)  # the bench times 1 thread and the default count (restored by the autouse fixture)
    r = bench_generate(out_dir=tmp_path, quick=True)
    assert torch.get_num_threads() == 2
    assert r["same_codes"] and r["speedup"] > 0 and r["speedup_hf"] > 0 and r["depth_head_seconds"] > 0
    threads = [1, 2]
    assert [(row["threads"], row["kv_cache"], row["decode"]) for row in r["rows"]] == [
        (t, *v) for t in threads for v in [(True, "lean"), (True, "hf"), (False, "-")]]
    assert set(r["speedup_by_threads"]) == {str(t) for t in threads}
    assert r["speedup"] == r["speedup_by_threads"]["2"]["speedup"]
    assert (tmp_path / "bench_generate.json").is_file()
