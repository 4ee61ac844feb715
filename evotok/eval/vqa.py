"""Visual question answering: greedy answers of a multimodal LM, scored per question type, beside a blind
baseline (the same model given another image's features, so answer priors show), and offline runners for
local POPE-style (jsonl) and MME-style (tsv) benchmark files.

Scoring functions take plain lists and return dicts, so each is testable without a model.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from evotok.errors import UserError

NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six"}
QA_TYPES = ("shape", "count", "color", "texture", "background")


class BenchmarkFileError(UserError, ValueError):
    """A benchmark file that cannot be read; the message names the file and line."""


def normalise_answer(text: str) -> str:
    """Lower case, first line, surrounding punctuation and articles dropped, digits as words ('2' -> 'two')."""
    t = text.strip().splitlines()[0].strip().lower() if text.strip() else ""
    t = re.sub(r"^[\s\"'.,;:!?]+|[\s\"'.,;:!?]+$", "", t)
    t = re.sub(r"^(a|an|the)\s+", "", t)
    return NUMBER_WORDS.get(t, t)


def yes_no(text: str) -> Optional[bool]:
    """True for an answer that starts with yes, False for no, None for anything else."""
    t = normalise_answer(text)
    if t.startswith("yes"):
        return True
    if t.startswith("no"):
        return False
    return None


# ------------------------------------------------------------------------------------------- asking


def ask(mllm, tokenizer, features_BNC: Optional[torch.Tensor], questions: Sequence[str], *, max_new_tokens: int = 12,
        with_image: bool = True) -> list[str]:
    """Greedy answers, one per row: row b asks ``questions[b]`` about the image whose features are row b of
    ``features_BNC`` (left-padded batch, KV cache; see MultimodalLM.generate)."""
    from evotok.models.conversation import collate_encoded, encode_prompt
    from evotok.models.mllm import decode_generated

    n_tokens = int(features_BNC.shape[1]) if features_BNC is not None else 1
    prompts = [encode_prompt([{"from": "human", "value": ("<image>\n" if with_image else "") + q}], tokenizer,
                             n_tokens, None, require_image=with_image) for q in questions]
    device = next(mllm.parameters()).device
    batch = collate_encoded(prompts, tokenizer.pad_token_id, side="left").to(device)
    feats = features_BNC.to(device) if (with_image and features_BNC is not None) else None
    return decode_generated(tokenizer, mllm.generate(batch, feats, max_new_tokens=max_new_tokens))


class VQATally:
    """Correct / asked per question type, for the model and its blind baseline."""

    def __init__(self) -> None:
        self.correct: dict[str, dict[str, int]] = {"vqa": defaultdict(int), "blind": defaultdict(int)}
        self.total: dict[str, int] = defaultdict(int)

    def add(self, qtype: str, answers: Sequence[str], blind: Sequence[str], truth: Sequence[str]) -> None:
        for a, b, t in zip(answers, blind, truth):
            gt = normalise_answer(t)
            self.total[qtype] += 1
            self.correct["vqa"][qtype] += int(normalise_answer(a) == gt)
            self.correct["blind"][qtype] += int(normalise_answer(b) == gt)

    def scalars(self) -> dict[str, float]:
        """``vqa/<type>``, ``blind/<type>`` and the ``overall`` of each (mean over types, each type weighted
        equally)."""
        out: dict[str, float] = {}
        types = [t for t in QA_TYPES if self.total.get(t)] + sorted(t for t in self.total if t not in QA_TYPES)
        for kind in ("vqa", "blind"):
            accs = [self.correct[kind][t] / self.total[t] for t in types]
            out.update({f"{kind}/{t}": a for t, a in zip(types, accs)})
            if accs:
                out[f"{kind}/overall"] = sum(accs) / len(accs)
        return out


@torch.no_grad()
def vqa_on_batches(mllm, tokenizer, batches: Iterable[dict], features: Callable[[dict], torch.Tensor], *,
                   max_images: int = 0, progress: bool = False, blind: bool = True) -> dict[str, float]:
    """Every question of every image of ``batches`` (understanding-view dicts with ``image``, ``qa``), asked with
    the image's own features and, for the blind baseline (``blind``), with the features of the next image in the
    batch; without it the ``blind/*`` scores are absent."""
    tally, seen = VQATally(), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_images or None, desc="vqa", unit="img")
    for batch in batches:
        qa = batch["qa"]
        if max_images:
            qa = qa[: max_images - seen]
        if not qa:
            break
        feats = features(batch)[: len(qa)]
        blind_feats = feats.roll(1, dims=0) if len(qa) > 1 else torch.zeros_like(feats)
        types = [q["type"] for q in qa[0]]
        for j, qtype in enumerate(types):
            questions = [item[j]["question"] for item in qa]
            answers = ask(mllm, tokenizer, feats, questions)
            tally.add(qtype, answers, ask(mllm, tokenizer, blind_feats, questions) if blind else answers,
                      [item[j]["answer"] for item in qa])
        seen += len(qa)
        if bar is not None:
            bar.update(len(qa))
        if max_images and seen >= max_images:
            break
    if bar is not None:
        bar.close()
    out = tally.scalars()
    if not blind:
        out = {k: v for k, v in out.items() if not k.startswith("blind/")}
    out["vqa_num_images"] = float(seen)
    return out


# ------------------------------------------------------------------------------------- benchmarks


def read_pope(path: str | Path) -> list[dict[str, Any]]:
    """POPE-style jsonl: one object per line with ``image``, ``question`` (or ``text``) and ``label`` (yes/no)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFileError(f"{path} line {n}: not JSON ({e.msg})") from None
        q = rec.get("question", rec.get("text"))
        label = yes_no(str(rec.get("label", rec.get("answer", ""))))
        if not rec.get("image") or not q or label is None:
            raise BenchmarkFileError(f"{path} line {n}: needs 'image', 'question' (or 'text') and a yes/no 'label'")
        out.append({"image": rec["image"], "question": q, "label": label})
    if not out:
        raise BenchmarkFileError(f"{path} holds no records")
    return out


def score_pope(labels: Sequence[bool], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of 'yes' as the positive class, and the yes-ratio of the answers (an
    answer that is neither yes nor no counts as wrong and as not-yes)."""
    said = [yes_no(a) for a in answers]
    tp = sum(1 for l, s in zip(labels, said) if l and s is True)
    fp = sum(1 for l, s in zip(labels, said) if not l and s is True)
    fn = sum(1 for l, s in zip(labels, said) if l and s is not True)
    correct = sum(1 for l, s in zip(labels, said) if s is l)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(labels), 1)
    return {"pope/accuracy": correct / n, "pope/precision": precision, "pope/recall": recall, "pope/f1": f1,
            "pope/yes_ratio": sum(1 for s in said if s is True) / n, "pope/num_questions": float(len(labels))}


def read_mme(path: str | Path) -> list[dict[str, Any]]:
    """MME-style tsv: columns ``category``, ``image``, ``question``, ``answer`` (Yes/No); a header row naming
    them is optional; a 3-column file (image, question, answer) takes the file's stem as the category."""
    rows = list(csv.reader(Path(path).read_text().splitlines(), delimiter="\t"))
    if rows and [c.strip().lower() for c in rows[0]][-3:] == ["image", "question", "answer"]:
        rows = rows[1:]
    out = []
    for n, row in enumerate(rows, 1):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) == 3:
            row = [Path(path).stem, *row]
        if len(row) != 4 or yes_no(row[3]) is None:
            raise BenchmarkFileError(f"{path} row {n}: needs category, image, question and a Yes/No answer "
                                     f"(tab-separated), got {row}")
        out.append({"category": row[0], "image": row[1], "question": row[2], "label": yes_no(row[3])})
    if not out:
        raise BenchmarkFileError(f"{path} holds no rows")
    return out


def score_mme(records: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, float]:
    """Per category, MME's acc (questions answered right) and acc+ (images whose every question is answered
    right), each in %, and the category score acc + acc+; ``mme/total`` sums the category scores."""
    per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for rec, a in zip(records, answers):
        per[rec["category"]][rec["image"]].append(yes_no(a) is rec["label"])
    out: dict[str, float] = {}
    total = 0.0
    for cat, images in sorted(per.items()):
        flat = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        out.update({f"mme/{cat}/acc": acc, f"mme/{cat}/acc_plus": acc_plus, f"mme/{cat}/score": acc + acc_plus})
        total += acc + acc_plus
    out["mme/total"] = total
    return out
