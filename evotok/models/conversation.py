"""LLaVA-style conversations -> token ids, labels and image placeholders, built per message (STYLE.md
"Language-model stages"): every piece of the ChatML rendering is tokenised on its own and the ids and labels
are concatenated side by side, so labels can never drift from the real tokenisation (LLaVA's "tokenization
mismatch", which derives masks from token-length arithmetic of a rendered template).

Rendering (the Qwen2.5 ChatML format, identical to ``lm.CHATML_TEMPLATE``)::

    [<|im_start|>system\\n{system}<|im_end|>\\n]            only when ``system`` is given
    <|im_start|>user\\n{question, <image> expanded}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n              ... one block per turn

Labels are -100 everywhere except each answer's content tokens and its closing ``<|im_end|>``.

Image-token policy (understanding): exactly one ``<image>`` per conversation (when ``require_image``), in the
first human turn; it expands to ``n_image_tokens`` copies of the ``<image>`` token id (marked in
``image_mask``), whose embeddings the bridge later overwrites with the projected image features.

Truncation policy (``max_length``): an answer is never cut. A conversation is a list of rounds (question,
answer). The system turn and the first round (which holds the image) are always kept whole; later rounds are
appended in order while they fit whole, and the first that does not fit is dropped together with every round
after it (later questions may refer to earlier answers, so the kept rounds stay contiguous). When the first
round alone does not fit, :class:`ConversationTooLong` is raised: callers skip that record (and count it).
``Encoded.rounds_dropped`` reports what was dropped. Prompts for generation are never truncated.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

from evotok.errors import UserError
from evotok.models.lm import ENDOFTEXT, IM_END, IM_START, IMAGE_TOKEN, single_token_id

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(UserError, ValueError):
    """A conversation record the suite cannot encode; the message names the problem and the record."""


class ConversationTooLong(ConversationError):
    """Even the first round (question + answer) does not fit ``max_length``: skip the record."""


class SpecialIds(NamedTuple):
    image: int
    im_start: int
    im_end: int
    pad: int
    eos: int


def special_ids(tokenizer) -> SpecialIds:
    """The ids of the tokens the conversation format needs (``load_lm`` / ``train_text_tokenizer`` provide them)."""
    ids = {t: single_token_id(tokenizer, t) for t in (IMAGE_TOKEN, IM_START, IM_END)}
    missing = [t for t, i in ids.items() if i is None] + ([] if tokenizer.pad_token_id is not None else ["a pad token"])
    if missing:
        raise ConversationError(f"the tokenizer lacks {', '.join(missing)}; load it with evotok.models.lm.load_lm")
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = single_token_id(tokenizer, ENDOFTEXT)
    return SpecialIds(ids[IMAGE_TOKEN], ids[IM_START], ids[IM_END], tokenizer.pad_token_id,
                      ids[IM_END] if eos is None else eos)


class Encoded(NamedTuple):
    input_ids_T: torch.Tensor  # int64
    labels_T: torch.Tensor  # int64, IGNORE_INDEX outside the answers
    image_mask_T: torch.Tensor  # bool, True at the n_image_tokens placeholder positions
    rounds_dropped: int  # whole (question, answer) rounds left out to fit max_length


class LMBatch(NamedTuple):
    input_ids_BT: torch.Tensor  # int64, pad id at padding
    labels_BT: torch.Tensor  # int64, IGNORE_INDEX at padding
    attention_mask_BT: torch.Tensor  # int64, 1 = token, 0 = padding
    image_mask_BT: torch.Tensor  # bool
    position_ids_BT: torch.Tensor  # int64, cumsum(mask) - 1 at tokens, 1 at padding (HF generate's convention)

    def to(self, device: torch.device | str) -> "LMBatch":
        return LMBatch(*(t.to(device) for t in self))


# ------------------------------------------------------------------------------------------ validation


def _where(record_id: Optional[str]) -> str:
    return "conversation" if record_id is None else f"conversation {record_id!r}"


def normalise_conversation(conv: Sequence[Mapping[str, Any]], record_id: Optional[str] = None) -> list[tuple[str, str]]:
    """LLaVA (``from``/``value``) or chat (``role``/``content``) messages -> [(role, text)] with role in
    {"user", "assistant"}, checked to alternate starting with a human turn."""
    where = _where(record_id)
    if isinstance(conv, (str, bytes)) or not isinstance(conv, Sequence):
        raise ConversationError(f"{where}: expected a list of messages, got {type(conv).__name__}")
    if len(conv) == 0:
        raise ConversationError(f"{where}: empty conversation (no messages)")
    out = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, Mapping):
            raise ConversationError(f"{where}: message {i} is a {type(msg).__name__}, not a dict with 'from' and 'value'")
        role = msg.get("from", msg.get("role"))
        text = msg.get("value", msg.get("content"))
        if role not in ROLES:
            raise ConversationError(
                f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)} "
                f"(a system prompt goes in the system= argument)"
            )
        if not isinstance(text, str):
            raise ConversationError(f"{where}: message {i} ({role}) has no text value (got {type(text).__name__})")
        if not text.strip():
            raise ConversationError(f"{where}: message {i} ({role}) is empty")
        expected = "user" if i % 2 == 0 else "assistant"
        if ROLES[role] != expected:
            what = "a gpt turn comes first" if i == 0 else f"two {ROLES[role]} turns in a row at message {i}"
            raise ConversationError(f"{where}: turns must alternate human, gpt, ...; {what}")
        out.append((ROLES[role], text))
    return out


def _check_text(text: str, where: str, what: str, forbidden: Sequence[str]) -> None:
    for tok in forbidden:
        if tok in text:
            raise ConversationError(f"{where}: {what} contains the special token {tok!r} as text")


def _check_images(messages: list[tuple[str, str]], where: str, require_image: bool) -> None:
    counts = [text.count(IMAGE_TOKEN) for _, text in messages]
    total = sum(counts)
    if total > 1:
        raise ConversationError(f"{where}: {total} {IMAGE_TOKEN} markers; exactly one image per conversation")
    if total == 1 and counts[0] != 1:
        i = counts.index(1)
        raise ConversationError(
            f"{where}: {IMAGE_TOKEN} is in message {i} ({messages[i][0]}); for understanding it must be in the "
            f"first human turn"
        )
    if total == 0 and require_image:
        raise ConversationError(f"{where}: no {IMAGE_TOKEN} marker in the first human turn, but an image is required")


# ------------------------------------------------------------------------------------------ encoding


class _Piece(NamedTuple):
    ids: list[int]
    labels: list[int]
    image: list[bool]


def _cat(pieces: Sequence[_Piece]) -> _Piece:
    out = _Piece([], [], [])
    for p in pieces:
        out.ids.extend(p.ids)
        out.labels.extend(p.labels)
        out.image.extend(p.image)
    return out


class _Encoder:
    """Tokenises message blocks for one tokenizer (each text piece on its own, never a rendered template)."""

    def __init__(self, tokenizer, n_image_tokens: int):
        if int(n_image_tokens) < 1:
            raise ValueError(f"n_image_tokens must be >= 1, got {n_image_tokens}")
        self.tok, self.n_image = tokenizer, int(n_image_tokens)
        self.ids = special_ids(tokenizer)
        self.forbidden = [t for t in tokenizer.all_special_tokens if t and t != IMAGE_TOKEN]
        self.newline = self.text("\n")

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False) if s else []

    def header(self, role: str) -> _Piece:
        ids = [self.ids.im_start, *self.text(role + "\n")]
        return _Piece(ids, [IGNORE_INDEX] * len(ids), [False] * len(ids))

    def block(self, role: str, content: str) -> _Piece:
        """``<|im_start|>role\\n{content}<|im_end|>\\n``; an assistant block labels its content and <|im_end|>."""
        ids: list[int] = []
        image: list[bool] = []
        for j, part in enumerate(content.split(IMAGE_TOKEN)):
            if j:
                ids += [self.ids.image] * self.n_image
                image += [True] * self.n_image
            t = self.text(part)
            ids += t
            image += [False] * len(t)
        ids.append(self.ids.im_end)
        image.append(False)
        labels = list(ids) if role == "assistant" else [IGNORE_INDEX] * len(ids)
        head = self.header(role)
        return _cat([head, _Piece(ids, labels, image), _Piece(self.newline, [IGNORE_INDEX] * len(self.newline),
                                                              [False] * len(self.newline))])


def _tensors(piece: _Piece, rounds_dropped: int) -> Encoded:
    return Encoded(torch.tensor(piece.ids, dtype=torch.long), torch.tensor(piece.labels, dtype=torch.long),
                   torch.tensor(piece.image, dtype=torch.bool), rounds_dropped)


class _Prepared(NamedTuple):
    where: str
    messages: list[tuple[str, str]]
    enc: _Encoder
    prefix: list[_Piece]  # the system block, when given


def _prepare(conv, tokenizer, n_image_tokens: int, system: Optional[str], require_image: bool,
             record_id: Optional[str], last_role: str, last_error: str) -> _Prepared:
    """Validate a conversation (roles, the image marker, special tokens as text) and the system prompt."""
    where = _where(record_id)
    messages = normalise_conversation(conv, record_id)
    if messages[-1][0] != last_role:
        raise ConversationError(f"{where}: {last_error}")
    _check_images(messages, where, require_image)
    enc = _Encoder(tokenizer, n_image_tokens)
    for i, (role, text) in enumerate(messages):
        _check_text(text, where, f"message {i} ({role})", enc.forbidden)
    if system is None:
        return _Prepared(where, messages, enc, [])
    if IMAGE_TOKEN in system:
        raise ConversationError(f"{where}: the system prompt contains {IMAGE_TOKEN}")
    _check_text(system, where, "the system prompt", enc.forbidden)
    return _Prepared(where, messages, enc, [enc.block("system", system)])


def encode_conversation(
    conv: Sequence[Mapping[str, Any]], tokenizer, n_image_tokens: int, max_length: Optional[int],
    system: Optional[str] = None, *, require_image: bool = True, record_id: Optional[str] = None,
) -> Encoded:
    """A training example: every answer labelled, ``<image>`` expanded, truncated by whole rounds (module doc).

    The conversation must alternate human/gpt starting with human and end with a gpt turn."""
    where, messages, enc, prefix = _prepare(conv, tokenizer, n_image_tokens, system, require_image, record_id,
                                            "assistant", "the last turn is a human turn with no answer to learn from")
    rounds = [_cat([enc.block(*messages[i]), enc.block(*messages[i + 1])]) for i in range(0, len(messages), 2)]
    kept = _cat(prefix + rounds[:1])
    if max_length is not None and len(kept.ids) > max_length:
        raise ConversationTooLong(
            f"{where}: the first question and answer take {len(kept.ids)} tokens (with {n_image_tokens} image "
            f"tokens) > max_length={max_length}; answers are never cut, so this record is skipped"
        )
    n_kept = 1
    for r in rounds[1:]:
        if max_length is not None and len(kept.ids) + len(r.ids) > max_length:
            break
        kept = _cat([kept, r])
        n_kept += 1
    return _tensors(kept, len(rounds) - n_kept)


def encode_prompt(
    conv: Sequence[Mapping[str, Any]], tokenizer, n_image_tokens: int, max_length: Optional[int],
    system: Optional[str] = None, *, require_image: bool = True, record_id: Optional[str] = None,
) -> Encoded:
    """A generation prompt: the conversation (ending with a human turn; earlier rounds are context) followed by
    ``<|im_start|>assistant\\n``; all labels are IGNORE_INDEX. Never truncated: too long raises ConversationTooLong."""
    where, messages, enc, prefix = _prepare(conv, tokenizer, n_image_tokens, system, require_image, record_id,
                                            "user", "a prompt must end with a human turn (the question to answer)")
    piece = _cat(prefix + [enc.block(*m) for m in messages] + [enc.header("assistant")])
    piece = _Piece(piece.ids, [IGNORE_INDEX] * len(piece.ids), piece.image)
    if max_length is not None and len(piece.ids) > max_length:
        raise ConversationTooLong(f"{where}: the prompt takes {len(piece.ids)} tokens > max_length={max_length}")
    return _tensors(piece, 0)


# ------------------------------------------------------------------------------------------ batching


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1 at tokens and 1 at padding, as HF's generate computes them for left-padded batches."""
    mask = attention_mask_BT.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def collate_encoded(items: Sequence[Encoded], pad_id: int, side: str = "right") -> LMBatch:
    """Pad to the longest item: ``side="right"`` for training, ``"left"`` for batched generation (every row's
    last position is then a real token). Position ids come from the attention mask either way."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if len(items) == 0:
        raise ValueError("collate_encoded: no items")
    B, T = len(items), max(len(it.input_ids_T) for it in items)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    image = torch.zeros(B, T, dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it.input_ids_T)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl], labels[b, sl], image[b, sl] = it.input_ids_T, it.labels_T, it.image_mask_T
        mask[b, sl] = 1
    return LMBatch(ids, labels, mask, image, position_ids_from_mask(mask))


def encode_generation_prompt(text: str, tokenizer, max_length: Optional[int] = None,
                             record_id: Optional[str] = None) -> Encoded:
    """The prompt of text-to-image generation: ``<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``
    (the image follows in the assistant turn). ``text`` may be empty: that is the unconditional prompt of
    classifier-free guidance (an empty user turn, as in the reference code). All labels are IGNORE_INDEX."""
    where = _where(record_id)
    enc = _Encoder(tokenizer, 1)
    if IMAGE_TOKEN in text:
        raise ConversationError(f"{where}: a generation prompt names the image to make; it cannot contain {IMAGE_TOKEN}")
    _check_text(text, where, "the prompt", enc.forbidden)
    piece = _cat([enc.block("user", text), enc.header("assistant")])
    piece = _Piece(piece.ids, [IGNORE_INDEX] * len(piece.ids), piece.image)
    if max_length is not None and len(piece.ids) > max_length:
        raise ConversationTooLong(f"{where}: the prompt takes {len(piece.ids)} tokens > max_length={max_length}")
    return _tensors(piece, 0)
