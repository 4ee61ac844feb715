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
    return {"text": item_text(item)}


def understanding_view(item: dict) -> dict:
    conv = item["conversations"]
    q = next((i for i, t in enumerate(conv) if t["from"] == "human"), None)
    question = strip_image(conv[q]["value"]) if q is not None else ""
    answer = next((t["value"] for t in conv[(q or 0) + 1:] if t["from"] == "gpt"), "") if q is not None else ""
    return {"image": item["image"], "conversations": conv, "question": question, "answer": answer}


def generation_view(item: dict) -> dict:
    return {"image": item["image"], "caption": item["caption"]}


def item_text(item: dict) -> str:
    """Caption, semantic caption and QA / conversation text of an item, one per line."""
    lines = [item["caption"], item["caption_sem"]]
    lines += [f"{q['question']} {q['answer']}" for q in item["qa"]]
    if not item["qa"]:
        lines += [strip_image(t["value"]) for t in item["conversations"]]
    return "\n".join(x for x in lines if x)
