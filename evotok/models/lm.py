"""The language model of the multimodal stages: the stand-in LLM (a small Qwen2-style causal LM with a byte-level
BPE tokenizer trained on EvoShapes text, DESIGN.md §2) and the one loading path for any local Hugging Face
causal-LM folder (for example Qwen2.5-7B-Instruct, DESIGN.md §1).

Sizes are presets: functions returning an :class:`LMArch`, gathered in ``PRESETS``; ``lm.preset`` picks one.
The vocabulary is not part of the architecture: it comes from the tokenizer.

Tokens every tokenizer of the suite has (``load_lm`` enforces it, see there for the policy):
``<|im_start|>`` / ``<|im_end|>`` (ChatML, the Qwen2.5 format), a pad token, and ``<image>`` as one special token
(the placeholder that the understanding stage expands to the image's feature positions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional

import torch

from evotok.errors import UserError

log = logging.getLogger(__name__)

IM_START, IM_END, ENDOFTEXT, IMAGE_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN)  # ids 0..3 of a trained tokenizer

# The Qwen2.5 ChatML format without Qwen's default system prompt: a system turn is rendered only when given.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHATML_ROLES = ("system", "user", "assistant")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")
WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


class LMError(UserError, ValueError):
    """A language-model folder, tokenizer or architecture the suite cannot use; the message names the culprit."""


# ------------------------------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class LMArch:
    """Sizes of a Qwen2-style causal LM (the vocabulary size comes from the tokenizer)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 512
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    attn_impl: str = "sdpa"  # "sdpa" | "eager"

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "max_positions"):
            if int(getattr(self, name)) < 1:
                raise LMError(f"LMArch.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise LMError(f"LMArch.hidden={self.hidden} is not a multiple of LMArch.heads={self.heads}")
        if self.heads % self.kv_heads:
            raise LMError(f"LMArch.heads={self.heads} is not a multiple of LMArch.kv_heads={self.kv_heads}")
        if self.attn_impl not in ("sdpa", "eager"):
            raise LMError(f"LMArch.attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")


def tiny() -> LMArch:
    """The embedded stand-in LLM: 0.45M parameters with the ~450-token EvoShapes vocabulary. Forward+backward of
    a 32 x 96 batch: 0.41-0.48 s on one core of the 2-core reference machine, 0.24 s on two idle cores. It is
    matmul-bound (~8 GFLOP at ~27 GFLOP/s on one AVX2 core): halving the width (64) still takes 0.18-0.28 s."""
    return LMArch(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384, max_positions=512)


def small() -> LMArch:
    """3.1M parameters (about 7x the tiny compute; 2.7-3.0 s per 32 x 96 forward+backward on one core): for a
    GPU check or long CPU runs."""
    return LMArch(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=768, max_positions=1024)


PRESETS: dict[str, Callable[[], LMArch]] = {"tiny": tiny, "small": small}


def get_arch(preset: str) -> LMArch:
    if preset not in PRESETS:
        raise LMError(f"lm.preset '{preset}' is not an LM preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]()


# ------------------------------------------------------------------------------------------ tokenizer


def train_text_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with Qwen2's normalizer (NFC) and pre-tokenizer (its split regex, then bytes) trained on
    ``texts``, wrapped as ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` (pad and eos),
    ``<|im_start|>``, ``<|im_end|>`` and ``<image>`` as special tokens (ids 0-3) and the ChatML chat template.
    The ChatML role names are added to the corpus. Train on the texts as the LM will read them: in ChatML an
    answer starts a line, so include answers on their own (byte-level BPE tells "star" from " star").

    ``vocab_size`` is an upper bound: a small corpus runs out of merges first. Deterministic for the same texts
    (the BPE trainer breaks count ties by the pair itself, not by order).

    Why Qwen2's pre-tokenizer: ``AutoTokenizer`` rebuilds any tokenizer saved next to a ``qwen2`` config as
    ``Qwen2Tokenizer``, which imposes that pre-tokenizer; training with it keeps the ids identical after
    ``save_lm`` / ``load_lm``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise LMError(f"vocab_size={vocab_size} is below the byte alphabet plus special tokens "
                      f"({len(alphabet) + len(SPECIAL_TOKENS)})")
    texts = [t for t in texts if t]
    if not texts:
        raise LMError("train_text_tokenizer: no non-empty texts to train on")
    texts += list(CHATML_ROLES)  # so that the role names of the ChatML headers get merges too
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False,
        continuing_subword_prefix="", end_of_word_suffix="",  # as Qwen2Tokenizer writes them (same behaviour as None)
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END, IMAGE_TOKEN], chat_template=CHATML_TEMPLATE,
    )


def single_token_id(tokenizer, token: str) -> Optional[int]:
    """The id of ``token`` when the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


# ------------------------------------------------------------------------------------------ build, save, load


def build_lm(arch: LMArch, tokenizer):
    """A randomly initialised ``Qwen2ForCausalLM`` (seed the caller's RNG first) whose vocabulary is the
    tokenizer's; generation stops at ``<|im_end|>`` or the eos token when read by HF's own ``generate``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    stop = [i for i in (single_token_id(tokenizer, IM_END), tokenizer.eos_token_id) if i is not None]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        max_position_embeddings=arch.max_positions, tie_word_embeddings=arch.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rope_theta)},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop[0] if len(stop) == 1 else stop,
        attn_implementation=arch.attn_impl,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class LoadedLM(NamedTuple):
    model: "torch.nn.Module"  # a transformers PreTrainedModel (causal LM), eval mode
    tokenizer: "object"  # a transformers tokenizer with <|im_start|>, <|im_end|>, <image> and a pad token


def save_lm(model, tokenizer, folder: str | Path) -> Path:
    """``save_pretrained`` of both into ``folder``: a normal HF folder that ``load_lm`` and
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _check_folder(path: Path) -> None:
    what = ("put a Hugging Face causal-LM folder there (config.json, *.safetensors weights and the tokenizer "
            "files), e.g. the output of `evotok train lm` or a local copy of Qwen2.5-7B-Instruct")
    if not path.exists():
        raise LMError(f"LM folder '{path}' does not exist; {what}")
    if not path.is_dir():
        raise LMError(f"LM path '{path}' is a file, not a folder; {what}")
    if not (path / "config.json").is_file():
        raise LMError(f"LM folder '{path}' has no config.json, so it is not a Hugging Face model folder; {what}")
    if not any(any(path.glob(g)) for g in WEIGHT_GLOBS):
        raise LMError(f"LM folder '{path}' has no model weights ({', '.join(WEIGHT_GLOBS)}); {what}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LMError(
            f"LM folder '{path}' has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
            f"tokenizer next to the weights (tokenizer.save_pretrained(folder), or copy the tokenizer files of "
            f"the checkpoint's release)"
        )


def prepare_tokenizer(tokenizer, path: str | Path = "<tokenizer>") -> bool:
    """Make a loaded tokenizer usable by the suite, in place; returns whether ``<image>`` was added.

    Policy: ``<|im_start|>`` and ``<|im_end|>`` must already be single tokens (they carry trained meaning in an
    instruct model; adding them untrained would silently break the chat format), else LMError. A missing pad
    token becomes the eos token (no new id). ``<image>`` is added as a special token when it is not one token
    already: its input embedding is always replaced by image features, so an untrained row is harmless."""
    missing = [t for t in (IM_START, IM_END) if single_token_id(tokenizer, t) is None]
    if missing:
        raise LMError(
            f"the tokenizer of '{path}' lacks the ChatML token(s) {', '.join(missing)}; the suite renders "
            f"conversations in the Qwen2.5 ChatML format, so use a ChatML model (Qwen2/Qwen2.5) or the `lm` stage"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LMError(f"the tokenizer of '{path}' has neither a pad nor an eos token; set pad_token in its "
                          f"tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    if single_token_id(tokenizer, IMAGE_TOKEN) is not None:
        return False
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if single_token_id(tokenizer, IMAGE_TOKEN) is None:  # pragma: no cover - a tokenizer that ignores added tokens
        raise LMError(f"could not add {IMAGE_TOKEN} as a single token to the tokenizer of '{path}'")
    return True


def load_lm(path: str | Path, dtype: Optional[torch.dtype] = None) -> LoadedLM:
    """Any local HF causal-LM folder through ``AutoModelForCausalLM`` / ``AutoTokenizer`` (local files only),
    in eval mode. Fails at once, naming the path and what to put there, for a missing folder, one without
    config.json, weights or tokenizer files. The tokenizer goes through :func:`prepare_tokenizer`; when
    ``<image>`` was added and its id is beyond the embedding matrix, the embeddings are resized (mean-initialised
    new row; Qwen's padded embedding matrices usually have room, and then nothing changes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path).expanduser()
    _check_folder(path)
    bars = hf_logging.is_progress_bar_enabled()  # a "Loading weights" bar per load: noise in logs and errors
    hf_logging.disable_progress_bar()
    try:
        return _load(path, dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load(path: Path, dtype: Optional[torch.dtype]) -> LoadedLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError depending on the file
        raise LMError(f"cannot load the tokenizer of LM folder '{path}': {e}") from e
    try:
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:
        raise LMError(f"cannot load a causal LM from '{path}' with AutoModelForCausalLM: {e}") from e
    if prepare_tokenizer(tokenizer, path):
        image_id = single_token_id(tokenizer, IMAGE_TOKEN)
        rows = model.get_input_embeddings().num_embeddings
        if image_id >= rows:
            model.resize_token_embeddings(len(tokenizer))
        log.info("added %s to the tokenizer of %s as id %d (embedding rows: %d)", IMAGE_TOKEN, path, image_id,
                 model.get_input_embeddings().num_embeddings)
    return LoadedLM(model.eval(), tokenizer)


def tokenizer_to_json(tokenizer) -> str:
    """A trained stand-in tokenizer as one JSON string (the `tokenizers` serialisation), for checkpoints."""
    return tokenizer.backend_tokenizer.to_str()


def tokenizer_from_json(text: str):
    """The stand-in tokenizer back from :func:`tokenizer_to_json` (special tokens and chat template as in
    :func:`train_text_tokenizer`)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text), eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END, IMAGE_TOKEN], chat_template=CHATML_TEMPLATE,
    )
