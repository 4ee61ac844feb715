"""Stage views: functions mapping a common-schema item (see evotok.data) to the fields one stage's batches
carry. The stage registry (evotok/stages.py) names, per stage, which of these its batches use."""

from __future__ import annotations


def strip_image(text: str) -> str:
    return text.replace("<image>", "").strip()


def teacher_view(item: dict) -> dict:
    return {"image": item["image"], "caption_sem": item["caption_sem"] or item["caption"], "labels": item["labels"]}


def tokenizer_view(item: dict) -> dict:
    return {"image": item["image"], "labels": item["labels"], "index": item["index"]}


def checker_view(item: dict) -> dict:
    return {"image": item["image"], "labels": item["labels"]}


def lm_view(item: dict) -> dict:
    """Text to pretrain a language model on: the item's text lines, and its caption and question/answer pairs
    (rendered as chat turns by the lm stage)."""
    return {"text": item_text(item), "caption": item["caption"], "qa": item["qa"]}


def understanding_view(item: dict) -> dict:
    """The image, its LLaVA-style conversation (what training learns) and its question/answer pairs (what VQA
    evaluation asks); ``index`` looks up cached image features."""
    return {"image": item["image"], "index": item["index"], "conversations": item["conversations"], "qa": item["qa"]}


def generation_view(item: dict) -> dict:
    """The caption (and factor labels, from which the generation stage words partial prompts) of an item; the
    image's codes come from the tokenizer's codes cache by ``index``."""
    return {"index": item["index"], "caption": item["caption"], "labels": item["labels"]}


def item_text(item: dict) -> str:
    """Caption, semantic caption and QA / conversation text of an item, one per line."""
    lines = [item["caption"], item["caption_sem"]]
    lines += [f"{q['question']} {q['answer']}" for q in item["qa"]]
    if not item["qa"]:
        lines += [strip_image(t["value"]) for t in item["conversations"]]
    return "\n".join(x for x in lines if x)
