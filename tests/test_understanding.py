"""The lm and understanding stages end to end on tiny sizes: stand-in LM run -> HF folder; phase 1 trains the
projector only, phase 2 the LM too; VQA with its blind baseline; POPE / MME runners; chat; bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evotok.config import load_config


@pytest.fixture(scope="module")
def runs(mllm_base):
    """Understanding phases 1 and 2 (a few steps each) on the shared tiny tokenizer and stand-in LM."""
    from evotok.lit.train import train

    common, tok, lm = mllm_base["common"], mllm_base["tok"], mllm_base["lm"]
    und = dict(common=common, tok=tok, lm=lm)
    p1 = load_config("understanding/tiny_phase1", [*common, "run.name=p1", f"tokenizer.run={tok.path}",
                                                   f"lm.run={lm.path}", "trainer.max_steps=3",
                                                   "trainer.val_every_n_steps=3", "trainer.limit_val_batches=1"],
                     stage="understanding")
    und["p1"] = train(p1, "understanding")
    p2 = load_config("understanding/tiny_phase2", [*common, "run.name=p2", f"tokenizer.run={tok.path}",
                                                   f"lm.run={lm.path}", f"understanding.run={und['p1'].path}",
                                                   "trainer.max_steps=3", "trainer.val_every_n_steps=3",
                                                   "trainer.limit_val_batches=1"], stage="understanding")
    und["p2"] = train(p2, "understanding")
    return und


@pytest.mark.slow
def test_lm_run_saves_a_standard_hf_folder_that_loads_like_an_external_one(runs):
    from transformers import AutoModelForCausalLM

    from evotok.models.lm import IMAGE_TOKEN, load_lm, single_token_id

    hf = runs["lm"].path / "hf"
    loaded = load_lm(hf)
    plain = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    ids = torch.tensor([loaded.tokenizer.encode("two red stars")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, plain(ids).logits)
    assert single_token_id(loaded.tokenizer, IMAGE_TOKEN) is not None
    metrics = json.loads(runs["lm"].metrics.read_text())["scalars"]
    assert metrics["val/loss"] < float(np.log(len(loaded.tokenizer)))  # better than uniform over the vocabulary
    assert (runs["lm"].path / "checkpoints" / "best.ckpt").is_file()


def _lm_state(run_dir):
    from evotok.runs import load_checkpoint_file

    return load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.mark.slow
def test_phase1_trains_only_the_projector_and_phase2_the_lm_too(runs):
    from evotok.lit.lm_module import load_run_lm
    from evotok.lit.understanding_module import build, load_understanding
    from evotok.handover import resolve_upstreams

    base = {k: v.clone() for k, v in load_run_lm(resolve_upstreams(load_config(None, [f"lm.run={runs['lm'].path}"]),
                                                                   "understanding")).model.state_dict().items()}
    p1, _, cfg1 = load_understanding(runs["p1"].path)
    p2, _, _ = load_understanding(runs["p2"].path)
    assert not any(k.startswith("mllm.lm.") for k in _lm_state(runs["p1"].path))  # phase 1 stores no LM weights
    assert any(k.startswith("mllm.lm.") for k in _lm_state(runs["p2"].path))
    for k, v in p1.lm.state_dict().items():
        assert torch.equal(v, base[k]), f"phase 1 changed LM parameter {k}"
    assert any(not torch.equal(v, base[k]) for k, v in p2.lm.state_dict().items()), "phase 2 left the LM unchanged"
    assert not torch.equal(p1.projector.fc1.weight, p2.projector.fc1.weight)
    # and phase 1 did move its projector from the fresh initialisation
    cfg = load_config("understanding/tiny_phase1", [*runs["common"], f"tokenizer.run={runs['tok'].path}",
                                                    f"lm.run={runs['lm'].path}"], stage="understanding")
    fresh = build(cfg, resolve_upstreams(cfg, "understanding"))
    assert not torch.equal(fresh.mllm.projector.fc1.weight, p1.projector.fc1.weight)
    assert cfg1.mllm.phase == 1


@pytest.mark.slow
def test_a_short_run_lowers_the_loss(runs, tmp_path):
    from evotok.handover import resolve_upstreams
    from evotok.lit.train import make_datamodule
    from evotok.lit.understanding_module import build

    cfg = load_config("understanding/tiny_phase2", [*runs["common"], f"tokenizer.run={runs['tok'].path}",
                                                    f"lm.run={runs['lm'].path}", "understanding.run="], stage="understanding")
    module = build(cfg, resolve_upstreams(cfg, "understanding"))
    dm = make_datamodule(cfg, "understanding", module)
    dm.setup("fit")
    batch = next(iter(dm.dataloader("train", batch_size=16)))
    opt = torch.optim.AdamW([p for p in module.mllm.parameters() if p.requires_grad], lr=3e-3)  # phase 2: all
    losses = []
    for _ in range(12):
        loss = module.mllm(batch["lm"], module.features(batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < min(losses[:6]), losses


@pytest.mark.slow
def test_eval_vqa_writes_accuracies_and_the_blind_baseline(runs):
    from evotok.eval.understand import evaluate_vqa

    scores = evaluate_vqa(runs["p2"].path, split="test", max_images=16, progress=False)
    for t in ("shape", "count", "color", "texture", "background", "overall"):
        assert 0.0 <= scores[f"vqa/{t}"] <= 1.0 and 0.0 <= scores[f"blind/{t}"] <= 1.0
    stored = json.loads(runs["p2"].metrics.read_text())
    assert stored["scalars"]["vqa/overall"] == pytest.approx(scores["vqa/overall"])
    assert "blind = the features of another image" in stored["vqa_eval"]["features"]


@pytest.mark.slow
def test_depth_curve_probes_the_chosen_depths(runs):
    from evotok.eval.understand import depth_curve

    per = depth_curve(runs["p2"].path, depths="1,3", kinds=("semantic", "latent"), probe_steps=2, max_images=8,
                      progress=False)
    assert len(per["vqa_shape"]) == 3 and len(per["vqa_latent_count"]) == 3
    assert np.isnan(per["vqa_shape"][1]) and not np.isnan(per["vqa_shape"][0]) and not np.isnan(per["vqa_latent_overall"][2])
    assert json.loads(runs["p2"].metrics.read_text())["vqa_depth_eval"]["depths"] == [1, 3]


def test_pope_and_mme_files_are_read_and_scored(tmp_path):
    from evotok.eval.vqa import BenchmarkFileError, read_mme, read_pope, score_mme, score_pope

    pope = tmp_path / "pope.jsonl"
    pope.write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.png", "question": "Is there a star?", "label": "yes"},
        {"image": "a.png", "text": "Is there a cat?", "label": "no"},
        {"image": "b.png", "question": "Is there a circle?", "label": "yes"},
        {"image": "b.png", "question": "Is there a dog?", "label": "no"},
    ]) + "\n")
    recs = read_pope(pope)
    s = score_pope([r["label"] for r in recs], ["Yes.", "yes", "no", "maybe"])  # tp=1, fp=1, fn=1, 1 neither
    assert s["pope/accuracy"] == pytest.approx(0.25) and s["pope/precision"] == pytest.approx(0.5)
    assert s["pope/recall"] == pytest.approx(0.5) and s["pope/f1"] == pytest.approx(0.5)
    assert s["pope/yes_ratio"] == pytest.approx(0.5)
    mme = tmp_path / "mme.tsv"
    mme.write_text("category\timage\tquestion\tanswer\n"
                   "color\tx.png\tIs it red?\tYes\ncolor\tx.png\tIs it blue?\tNo\n"
                   "color\ty.png\tIs it red?\tNo\ncolor\ty.png\tIs it blue?\tYes\n"
                   "count\tz.png\tAre there two?\tYes\ncount\tz.png\tAre there three?\tNo\n")
    m = score_mme(read_mme(mme), ["yes", "no", "yes", "yes", "Yes", "No"])
    assert m["mme/color/acc"] == pytest.approx(75.0) and m["mme/color/acc_plus"] == pytest.approx(50.0)
    assert m["mme/count/score"] == pytest.approx(200.0) and m["mme/total"] == pytest.approx(325.0)
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "question": "q?"}\n')
    with pytest.raises(BenchmarkFileError, match="bad.jsonl line 1"):
        read_pope(tmp_path / "bad.jsonl")


@pytest.mark.slow
def test_benchmark_runner_and_chat_on_a_trained_run(runs, tmp_path, capsys):
    from PIL import Image

    from evotok.cli import main
    from evotok.eval.understand import chat, evaluate_benchmark

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "question": "Is there a star?", "label": "yes"}\n'
                                      '{"image": "b.png", "question": "Is there a star?", "label": "no"}\n')
    s = evaluate_benchmark("pope", runs["p2"].path, str(tmp_path / "p.jsonl"), str(tmp_path))
    assert s["pope/num_questions"] == 2.0 and 0.0 <= s["pope/accuracy"] <= 1.0
    a = chat(runs["p2"].path, str(tmp_path / "a.png"), ["What shape are the objects in the image?"], print_fn=lambda x: None)
    b = chat(runs["p2"].path, str(tmp_path / "a.png"), ["What shape are the objects in the image?"], print_fn=lambda x: None)
    assert a == b and len(a) == 1  # greedy: deterministic
    asked = iter(["How many objects are in the image?", ""])
    assert len(chat(runs["p2"].path, str(tmp_path / "a.png"), [], interactive=True, input_fn=lambda _: next(asked),
                    print_fn=lambda x: None)) == 1
    assert main(["chat", "--run", str(runs["p2"].path), "--image", str(tmp_path / "nope.png"), "Hi?"]) == 1
    assert "nope.png" in capsys.readouterr().err


@pytest.mark.slow
def test_records_that_cannot_be_encoded_are_skipped_and_named(runs):
    from evotok.lit.understanding_module import conversation_collate
    from evotok.models.lm import load_lm

    tokenizer = load_lm(runs["lm"].path / "hf").tokenizer
    collate = conversation_collate(tokenizer, 4, 40)
    img = torch.zeros(3, 32, 32)
    ok = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "star"}]
    items = [
        {"index": 0, "image": img, "qa": [], "conversations": ok},
        {"index": 1, "image": img, "qa": [], "conversations": [{"from": "human", "value": "What shape?"},
                                                              {"from": "gpt", "value": "star"}]},
        {"index": 2, "image": img, "qa": [], "conversations": [{"from": "human", "value": "<image> <image>"},
                                                              {"from": "gpt", "value": "star"}]},
        {"index": 3, "image": img, "qa": [], "conversations": []},
        {"index": 4, "image": img, "qa": [], "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                              {"from": "gpt", "value": "star " * 80}]},
    ]
    batch = collate(items)
    assert batch["index"].tolist() == [0] and batch["lm"].input_ids_BT.shape[0] == 1
    why = " | ".join(batch["skipped"])
    for needle in ("'1'", "no <image>", "'2'", "2 <image> markers", "'3'", "empty conversation", "'4'", "never cut"):
        assert needle in why, needle
    assert collate(items[1:2])["lm"] is None  # a batch with nothing usable is skipped by the training step


@pytest.mark.slow
def test_an_lm_folder_without_a_tokenizer_fails_naming_it_and_leaves_no_run(runs, tmp_path):
    import shutil

    from evotok.lit.train import train
    from evotok.models.lm import LMError

    folder = tmp_path / "no_tokenizer"
    shutil.copytree(runs["lm"].path / "hf", folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    cfg = load_config("understanding/tiny_phase1", [*runs["common"], f"run.dir={tmp_path / 'runs'}", "run.name=x",
                                                    f"tokenizer.run={runs['tok'].path}", "lm.run=", f"lm.path={folder}"],
                      stage="understanding")
    with pytest.raises(LMError, match=f"{folder}.*no tokenizer files"):
        train(cfg, "understanding")
    assert not (tmp_path / "runs" / "understanding" / "x").exists()
