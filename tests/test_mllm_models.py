"""Understanding-stage modules without Lightning: the stand-in LM and its loader, conversations -> ids and
labels, the image-feature bridge, greedy decoding."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from evotok.data.evoshapes import FACTORS, caption, qa_pairs
from evotok.errors import UserError
from evotok.models.conversation import (
    IGNORE_INDEX,
    ConversationError,
    ConversationTooLong,
    collate_encoded,
    encode_conversation,
    encode_prompt,
    special_ids,
)
from evotok.models.lm import (
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    PRESETS,
    SPECIAL_TOKENS,
    LMArch,
    LMError,
    build_lm,
    get_arch,
    load_lm,
    save_lm,
    train_text_tokenizer,
)
from evotok.models.mllm import (
    BridgeError,
    FeatureSource,
    ImageFeatures,
    MultimodalLM,
    Projector,
    build_mllm,
    decode_generated,
    splice_image_features,
)

N_IMG, FEAT = 4, 16  # image tokens per image and feature width of the synthetic features
MICRO = LMArch(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=256)
QUESTION = qa_pairs({k: 0 for k in FACTORS})[0]["question"]  # "What shape are the objects in the image?"


def evoshapes_texts(step: int = 5) -> list[str]:
    """Captions, questions and answers of EvoShapes label combinations; answers also alone (in ChatML an
    answer starts a line, without a leading space)."""
    texts = []
    combos = itertools.product(*(range(len(FACTORS[k])) for k in ("shape", "count", "color", "texture", "background")))
    for i, (s, n, c, t, b) in enumerate(combos):
        if i % step:
            continue
        labels = {"shape": s, "count": n, "color": c, "texture": t, "background": b}
        texts.append(caption(labels))
        for qa in qa_pairs(labels):
            texts += [qa["question"], qa["answer"]]
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(evoshapes_texts(), vocab_size=512)


def conv(question: str, answer: str, *more: str) -> list[dict]:
    msgs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    for q, a in zip(more[::2], more[1::2]):
        msgs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return msgs


def micro_mllm(tok, seed: int = 0) -> MultimodalLM:
    torch.manual_seed(seed)
    return build_mllm(build_lm(MICRO, tok), tok, FEAT)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_training_is_deterministic_and_special_tokens_are_single(tok):
    again = train_text_tokenizer(evoshapes_texts(), vocab_size=512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    other = train_text_tokenizer(evoshapes_texts(step=7), vocab_size=512)
    assert other.backend_tokenizer.to_str() != tok.backend_tokenizer.to_str()  # the texts matter
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    ids = tok.encode(f"{IMAGE_TOKEN}\n{QUESTION}", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids(IMAGE_TOKEN) and ids.count(ids[0]) == 1
    assert tok.encode(f"a {IMAGE_TOKEN}{IMAGE_TOKEN}b", add_special_tokens=False).count(3) == 2
    assert tok.decode(tok.encode("two red striped stars on a navy background")) == "two red striped stars on a navy background"
    assert len(tok) <= 512 and len(tok.encode("two red striped stars on a navy background")) <= 8  # merges learned


def test_chat_template_is_chatml_and_matches_per_message_encoding(tok):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat?"},
                {"role": "assistant", "content": "star"}, {"role": "user", "content": "Color?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<image>\nWhat?<|im_end|>\n"
                    "<|im_start|>assistant\nstar<|im_end|>\n<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages[:3], tokenize=False).endswith("star<|im_end|>\n")
    # one image token -> the per-message ids equal the tokenisation of the rendered template
    chat = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat?"}, {"from": "gpt", "value": "star"},
            {"from": "human", "value": "Color?"}]
    prompt = encode_prompt(chat, tok, n_image_tokens=1, max_length=None, system="Answer briefly.")
    assert prompt.input_ids_T.tolist() == tok.encode(text, add_special_tokens=False)
    assert (prompt.labels_T == IGNORE_INDEX).all()
    full = encode_conversation(chat + [{"from": "gpt", "value": "red"}], tok, 1, None, system="Answer briefly.")
    rendered = tok.apply_chat_template(messages + [{"role": "assistant", "content": "red"}], tokenize=False)
    assert full.input_ids_T.tolist() == tok.encode(rendered, add_special_tokens=False)


# ------------------------------------------------------------------------------------------ labels, truncation


def labelled_runs(tok, enc) -> list[str]:
    """The decoded contiguous runs of labelled tokens."""
    runs, cur = [], []
    for i, lab in zip(enc.input_ids_T.tolist(), enc.labels_T.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    return [tok.decode(r) for r in runs]


def test_labels_keep_every_answer_token_and_mask_prompt_image_and_padding(tok):
    answers = ["two red striped stars", "checkered", "three"]
    c = conv(f"{IMAGE_TOKEN}\n{QUESTION}", answers[0], "What texture do the objects in the image have?", answers[1],
             "How many objects are in the image?", answers[2])
    enc = encode_conversation(c, tok, n_image_tokens=8, max_length=None, system="Look at the image.")
    assert labelled_runs(tok, enc) == [a + IM_END for a in answers]
    n_answer_tokens = sum(len(tok.encode(a, add_special_tokens=False)) + 1 for a in answers)
    assert int((enc.labels_T != IGNORE_INDEX).sum()) == n_answer_tokens
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int(enc.image_mask_T.sum()) == 8 and (enc.input_ids_T[enc.image_mask_T] == image_id).all()
    assert (enc.input_ids_T == image_id).sum() == 8 and (enc.labels_T[enc.image_mask_T] == IGNORE_INDEX).all()
    short = encode_conversation(conv(f"{IMAGE_TOKEN} Shape?", "star"), tok, 8, None)
    for side in ("right", "left"):
        batch = collate_encoded([enc, short], tok.pad_token_id, side=side)
        pad = batch.attention_mask_BT == 0
        assert int(pad.sum()) == len(enc.input_ids_T) - len(short.input_ids_T)
        assert (batch.labels_BT[pad] == IGNORE_INDEX).all() and not batch.image_mask_BT[pad].any()
        assert (batch.input_ids_BT[pad] == tok.pad_token_id).all()
        assert labelled_runs(tok, short) == ["star" + IM_END]
        real = batch.labels_BT[1][batch.attention_mask_BT[1] == 1]
        assert torch.equal(real, short.labels_T)


def test_collate_positions_follow_the_attention_mask(tok):
    a = encode_prompt([{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}], tok, 4, None)
    b = encode_prompt([{"from": "human", "value": f"{IMAGE_TOKEN} Shape?"}], tok, 4, None)
    na, nb = len(a.input_ids_T), len(b.input_ids_T)
    assert na > nb
    right = collate_encoded([a, b], tok.pad_token_id, "right")
    left = collate_encoded([a, b], tok.pad_token_id, "left")
    assert right.position_ids_BT[1, :nb].tolist() == list(range(nb)) and (right.position_ids_BT[1, nb:] == 1).all()
    assert left.position_ids_BT[1, na - nb:].tolist() == list(range(nb)) and (left.position_ids_BT[1, :na - nb] == 1).all()
    assert left.attention_mask_BT[:, -1].all() and left.attention_mask_BT[1, : na - nb].sum() == 0
    assert torch.equal(left.input_ids_BT[1, na - nb:], b.input_ids_T)
    with pytest.raises(ValueError, match="side"):
        collate_encoded([a], 0, side="middle")


def test_truncation_drops_whole_later_rounds_and_never_cuts_an_answer(tok):
    c = conv(f"{IMAGE_TOKEN}\n{QUESTION}", "star", "What color are the objects in the image?", "red",
             "How many objects are in the image?", "two")
    full = encode_conversation(c, tok, 8, None)
    one = encode_conversation(c[:2], tok, 8, None)
    two = encode_conversation(c[:4], tok, 8, None)
    assert full.rounds_dropped == 0 and len(one.input_ids_T) < len(two.input_ids_T) < len(full.input_ids_T)
    assert encode_conversation(c, tok, 8, len(full.input_ids_T)).rounds_dropped == 0  # exactly fits
    cut = encode_conversation(c, tok, 8, len(full.input_ids_T) - 1)  # the last answer would be cut: drop its round
    assert cut.rounds_dropped == 1 and torch.equal(cut.input_ids_T, two.input_ids_T)
    assert labelled_runs(tok, cut) == ["star" + IM_END, "red" + IM_END]
    # the second round does not fit but the third would: dropped too (rounds stay contiguous)
    tight = encode_conversation(c, tok, 8, len(two.input_ids_T) - 1)
    assert tight.rounds_dropped == 2 and torch.equal(tight.input_ids_T, one.input_ids_T)
    with pytest.raises(ConversationTooLong, match=r"'rec-7'.*max_length=20.*never cut"):
        encode_conversation(c, tok, 8, 20, record_id="rec-7")
    with pytest.raises(ConversationTooLong, match="max_length"):
        encode_prompt(c[:1], tok, 8, 10)


@pytest.mark.parametrize("bad, message", [
    ([], "empty conversation"),
    (conv(QUESTION, "star"), "no <image> marker"),
    (conv(f"{IMAGE_TOKEN} {IMAGE_TOKEN} {QUESTION}", "star"), "2 <image> markers"),
    (conv(f"{IMAGE_TOKEN} {QUESTION}", "star", f"{IMAGE_TOKEN} again?", "red"), "2 <image> markers"),
    (conv(QUESTION, f"{IMAGE_TOKEN}"), r"<image> is in message 1 \(assistant\)"),
    ([{"from": "gpt", "value": "star"}, {"from": "human", "value": IMAGE_TOKEN}], "a gpt turn comes first"),
    ([{"from": "human", "value": f"{IMAGE_TOKEN} a"}, {"from": "human", "value": "b"}], "two user turns in a row"),
    ([{"from": "human", "value": f"{IMAGE_TOKEN} {QUESTION}"}], "no answer to learn from"),
    (conv(f"{IMAGE_TOKEN} {QUESTION}", "  "), r"message 1 \(gpt\) is empty"),
    ([{"from": "bot", "value": "x"}], "role 'bot'"),
    (conv(f"{IMAGE_TOKEN} {QUESTION}", "star<|im_end|>"), "special token '<|im_end|>'"),
    ("<image> hi", "expected a list of messages"),
])
def test_bad_conversations_give_clear_errors(tok, bad, message):
    with pytest.raises(ConversationError, match=message) as info:
        encode_conversation(bad, tok, 4, 128, record_id="evoshapes/train/12")
    assert "'evoshapes/train/12'" in str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_text_only_conversations_need_require_image_false(tok):
    c = conv("two red stars on a navy background?", "yes")
    enc = encode_conversation(c, tok, 4, 64, require_image=False)
    assert not enc.image_mask_T.any() and labelled_runs(tok, enc) == ["yes" + IM_END]
    with pytest.raises(ConversationError, match="image is required"):
        encode_conversation(c, tok, 4, 64)


# ------------------------------------------------------------------------------------------ the LM


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_forward_backward_every_parameter_gets_a_gradient(tok, preset):
    torch.manual_seed(0)
    model = build_lm(get_arch(preset), tok).train()
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    ids = torch.randint(0, len(tok), (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 12, len(tok))
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_lm_arch_and_preset_errors_name_the_field():
    with pytest.raises(LMError, match=r"LMArch.hidden=100 is not a multiple of LMArch.heads=8"):
        LMArch(hidden=100, layers=1, heads=8, kv_heads=2, intermediate=8)
    with pytest.raises(LMError, match="LMArch.kv_heads"):
        LMArch(hidden=64, layers=1, heads=4, kv_heads=3, intermediate=8)
    with pytest.raises(LMError, match="LMArch.layers must be >= 1"):
        LMArch(hidden=64, layers=0, heads=4, kv_heads=2, intermediate=8)
    with pytest.raises(LMError, match="lm.preset 'huge'.*tiny, small"):
        get_arch("huge")


def test_save_load_round_trip_gives_identical_logits_and_plain_hf_folder(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = build_lm(MICRO, tok).eval()
    folder = save_lm(model, tok, tmp_path / "lm")
    loaded = load_lm(folder)
    ids = torch.randint(0, len(tok), (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(loaded.model(input_ids=ids).logits, ref)
        plain = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        assert torch.equal(plain(input_ids=ids).logits, ref)
    assert not loaded.model.training
    assert loaded.tokenizer.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert loaded.tokenizer.chat_template == CHATML_TEMPLATE
    assert special_ids(loaded.tokenizer) == special_ids(tok)
    assert AutoTokenizer.from_pretrained(folder, local_files_only=True).encode(IMAGE_TOKEN) == [3]
    assert set(plain.generation_config.eos_token_id) == {tok.convert_tokens_to_ids(IM_END), tok.eos_token_id}


def test_load_lm_missing_path_and_missing_tokenizer_name_the_problem(tok, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(LMError, match=r"nowhere' does not exist; put a Hugging Face causal-LM folder there") as info:
        load_lm(missing)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    torch.manual_seed(0)
    folder = tmp_path / "weights_only"
    build_lm(MICRO, tok).save_pretrained(folder)
    with pytest.raises(LMError, match=r"weights_only' has no tokenizer files \(none of tokenizer.json"):
        load_lm(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LMError, match="has no config.json"):
        load_lm(tmp_path / "empty")


def _tokenizer_without(texts: list[str], specials: list[str]):
    """A byte-level BPE tokenizer with only ``specials`` (as a foreign checkpoint might ship)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=specials[0], extra_special_tokens=specials[1:])


def test_load_lm_adds_image_token_and_resizes_embeddings(tmp_path):
    texts = evoshapes_texts(step=50)
    foreign = _tokenizer_without(texts, ["<|endoftext|>", IM_START, IM_END])
    assert foreign.pad_token is None and len(foreign.encode(IMAGE_TOKEN, add_special_tokens=False)) > 1
    torch.manual_seed(0)
    model = build_lm(MICRO, foreign).eval()
    rows = model.get_input_embeddings().num_embeddings
    folder = save_lm(model, foreign, tmp_path / "foreign")
    loaded = load_lm(folder)
    ids = special_ids(loaded.tokenizer)
    assert ids.image == rows and loaded.model.get_input_embeddings().num_embeddings == rows + 1
    assert ids.pad == ids.eos == foreign.eos_token_id  # pad falls back to eos
    x = torch.randint(0, rows, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=x).logits[..., :rows], model(input_ids=x).logits, atol=1e-6)
    enc = encode_conversation(conv(f"{IMAGE_TOKEN}\n{QUESTION}", "star"), loaded.tokenizer, 4, None)
    assert int((enc.input_ids_T == rows).sum()) == 4

    no_chatml = _tokenizer_without(texts, ["<|endoftext|>"])
    folder = save_lm(build_lm(MICRO, no_chatml), no_chatml, tmp_path / "plain")
    with pytest.raises(LMError, match=r"lacks the ChatML token\(s\) <\|im_start\|>, <\|im_end\|>"):
        load_lm(folder)


# ------------------------------------------------------------------------------------------ the bridge


@pytest.mark.parametrize("side", ["right", "left"])
def test_splice_puts_projected_features_exactly_at_the_placeholders(tok, side):
    m = micro_mllm(tok)
    questions = [f"{IMAGE_TOKEN}\n{QUESTION}", f"Shape? {IMAGE_TOKEN}", f"What is {IMAGE_TOKEN} here, in a few words?"]
    items = [encode_conversation(conv(q, "star"), tok, N_IMG, None) for q in questions]
    items.insert(1, encode_conversation(conv("Say star.", "star"), tok, N_IMG, None, require_image=False))
    assert len({len(it.input_ids_T) for it in items}) == 4  # unequal lengths
    batch = collate_encoded(items, tok.pad_token_id, side)
    feats = torch.randn(3, N_IMG, FEAT)
    embeds = m.embed(batch, feats)
    tokens = m.lm.get_input_embeddings()(batch.input_ids_BT)
    projected = m.projector(feats)
    img = batch.image_mask_BT
    assert img.sum(-1).tolist() == [N_IMG, 0, N_IMG, N_IMG]
    for i, b in enumerate([0, 2, 3]):
        assert torch.equal(embeds[b][img[b]], projected[i])
    assert torch.equal(embeds[~img], tokens[~img])
    # the positions are where <image> was in the text
    for b, it in zip(range(4), items):
        offset = 0 if side == "right" else batch.input_ids_BT.shape[1] - len(it.input_ids_T)
        where = torch.nonzero(it.image_mask_T).flatten() + offset
        assert torch.equal(torch.nonzero(img[b]).flatten(), where)


def test_splice_count_checks(tok):
    embeds, mask = torch.zeros(2, 10, 8), torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 1:5] = True
    with pytest.raises(BridgeError, match="2 row\\(s\\) have image placeholders but 1 image"):
        splice_image_features(embeds, mask, torch.ones(1, 4, 8))
    with pytest.raises(BridgeError, match="0 or exactly N=3"):
        splice_image_features(embeds, mask, torch.ones(2, 3, 8))
    with pytest.raises(BridgeError, match="C=8"):
        splice_image_features(embeds, mask, torch.ones(2, 4, 7))
    with pytest.raises(BridgeError, match="no image features were given"):
        splice_image_features(embeds, mask, None)
    out = splice_image_features(embeds, mask, torch.arange(64.0).reshape(2, 4, 8))
    assert out[1, 4, 0] == 56 and out[0, 0].abs().sum() == 0 and embeds.abs().sum() == 0  # input untouched


def test_image_features_from_a_frozen_evotok(tok):
    from evotok.config import QuantizerConfig
    from evotok.models.tokenizer import EvoTok, get_arch as tokenizer_arch

    torch.manual_seed(0)
    evotok = EvoTok(tokenizer_arch("tiny"), QuantizerConfig(codebook_size=16, dim=8), lpix=2, lsem=3, resolution=32,
                    teacher_width=24, teacher_grid=(8, 8))
    images = torch.rand(2, 3, 32, 32)
    sem = ImageFeatures(evotok, FeatureSource("semantic"))
    lat = ImageFeatures(evotok, FeatureSource("latent", depth=1))
    assert (sem.depth, sem.width, sem.n_tokens) == (3, 24, 64) and (lat.depth, lat.width) == (1, 8)
    z = evotok.eval().cumulative(images)
    assert torch.equal(sem(images), evotok.decode_semantic(z[2]))
    assert torch.equal(lat(images), z[0].flatten(2).transpose(1, 2))
    assert FeatureSource("latent").resolve_depth(evotok) == 2
    with pytest.raises(BridgeError, match="depth=4 exceeds the tokenizer's L=3"):
        ImageFeatures(evotok, FeatureSource("semantic", depth=4))
    with pytest.raises(BridgeError, match="kind must be one of semantic, latent"):
        FeatureSource("pixels")

    torch.manual_seed(0)
    m = build_mllm(build_lm(MICRO, tok), tok, sem.width, features=sem).train()
    assert not evotok.training and m.lm.training
    batch = collate_encoded([encode_conversation(conv(f"{IMAGE_TOKEN}\n{QUESTION}", "star"), tok, 64, None)] * 2,
                            tok.pad_token_id)
    m(batch, m.image_features(images)).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in evotok.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())
    groups = m.param_groups()
    assert set(groups) == {"projector", "lm"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    with pytest.raises(BridgeError, match="projector input 16 != the feature width 24"):
        MultimodalLM(m.lm, Projector(16, 64), special_ids(tok), sem)


# ------------------------------------------------------------------------------------------ training, decoding

SHAPES = ["circle", "two stars", "three striped hexagons on a navy background", "one dotted heart"]  # unequal lengths


def shape_task(n: int, gen: torch.Generator, centres: torch.Tensor):
    """Conversations 'what shape?' -> name, with features = the class centre + noise."""
    labels = torch.randint(0, len(SHAPES), (n,), generator=gen)
    feats = centres[labels] + 0.1 * torch.randn(n, N_IMG, FEAT, generator=gen)
    convs = [conv(f"{IMAGE_TOKEN}\n{QUESTION}", SHAPES[int(k)]) for k in labels]
    return labels, feats, convs


@pytest.fixture(scope="module")
def trained(tok):
    """A micro MLLM trained for 60 steps on the shape task; returns (model, losses, centres)."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(len(SHAPES), N_IMG, FEAT, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = micro_mllm(tok).train()
    groups = m.param_groups()
    opt = torch.optim.AdamW([{"params": groups["projector"], "lr": 1e-2}, {"params": groups["lm"], "lr": 3e-3}],
                            weight_decay=0.0)
    losses = []
    for _ in range(60):
        _, feats, convs = shape_task(16, gen, centres)
        batch = collate_encoded([encode_conversation(c, tok, N_IMG, 64) for c in convs], tok.pad_token_id)
        loss = m(batch, feats).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    return m.eval(), losses, centres


def test_a_few_optimizer_steps_lower_the_loss(tok):
    m = micro_mllm(tok, seed=3).train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    batch = collate_encoded([encode_conversation(conv(f"{IMAGE_TOKEN}\n{QUESTION}", s), tok, N_IMG, None)
                             for s in SHAPES], tok.pad_token_id)
    feats = torch.randn(len(SHAPES), N_IMG, FEAT)
    losses = []
    for _ in range(8):
        loss = m(batch, feats).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_greedy_decoding_is_deterministic_and_batched_equals_one_at_a_time(tok, trained):
    m, losses, centres = trained
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    gen = torch.Generator().manual_seed(5)
    labels, feats, _ = shape_task(4, gen, centres)
    questions = [QUESTION, "Shape?", "What shape are the objects?", f"Look. {QUESTION}"]  # unequal prompt lengths
    prompts = [encode_prompt([{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}], tok, N_IMG, None) for q in questions]
    batch = collate_encoded(prompts, tok.pad_token_id, side="left")
    assert len({len(p.input_ids_T) for p in prompts}) == 4
    out = m.generate(batch, feats, max_new_tokens=12)
    again = m.generate(batch, feats, max_new_tokens=12)
    assert torch.equal(again.tokens_BT, out.tokens_BT) and torch.equal(again.logprobs_BT, out.logprobs_BT)
    im_end = tok.convert_tokens_to_ids(IM_END)
    for b in range(4):
        one = m.generate(collate_encoded([prompts[b]], tok.pad_token_id, "left"), feats[b:b + 1], max_new_tokens=12)
        n = one.tokens_BT.shape[1]
        assert torch.equal(one.tokens_BT[0], out.tokens_BT[b, :n]) and int(one.lengths_B[0]) == int(out.lengths_B[b])
        assert torch.allclose(one.logprobs_BT[0], out.logprobs_BT[b, :n], atol=2e-6)
        assert (out.tokens_BT[b, n:] == tok.pad_token_id).all() and (out.logprobs_BT[b, n:] == 0).all()
    # it learned to answer and stop: every row ends with <|im_end|> inside the budget, rows at different steps
    assert (out.lengths_B < 12).all() and len(set(out.lengths_B.tolist())) > 1
    assert all(out.tokens_BT[b, int(n)] == im_end for b, n in enumerate(out.lengths_B))
    answers = decode_generated(tok, out)
    assert sum(a == SHAPES[int(k)] for a, k in zip(answers, labels)) >= 3, (answers, labels.tolist())
    right = collate_encoded(prompts, tok.pad_token_id, side="right")
    with pytest.raises(BridgeError, match="left-padded"):
        m.generate(right, feats)


def test_the_saved_folder_is_json_and_safetensors(tok, tmp_path):
    folder = save_lm(build_lm(MICRO, tok), tok, tmp_path / "lm")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] == len(tok) and config["tie_word_embeddings"]
