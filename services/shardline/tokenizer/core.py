"""Tokenization, chat templates and incremental detokenization for one model (no gRPC here).

Incremental detokenization is stateless on this side, vLLM-style. The client keeps, per sequence,
all its token ids and two offsets into them, and sends only ids[prefix_offset:]:

    ids:   t0 t1 t2 | t3 t4 t5 | t6 t7
                    ^ prefix   ^ read       (t3..t5 already emitted as text; t6, t7 are new)

    prefix_text = decode(ids[prefix:read])      full = decode(ids[prefix:])
    new text    = full[len(prefix_text):]       unless full ends in U+FFFD (an unfinished UTF-8
                                                character) or did not grow: then "" and no change.

Decoding from `prefix` rather than from `read` gives byte-level and SentencePiece decoders the
context they need (a leading space, the rest of a multi-byte character), so the deltas concatenate
to decode(all ids) while each call decodes only a few tokens.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jinja2
from transformers import AutoTokenizer

from shardline.common.model_source import resolve_model
from shardline.common.server import InvalidArgument

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")
REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class ChatPrompt:
    """A chat conversation rendered by the model's template, and its token ids."""
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class DetokenizeItem:
    """One sequence's ids from its prefix offset on, and where already-emitted text ends."""
    token_ids: Sequence[int]
    read_offset: int = 0
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class DetokenizeResult:
    """New text; how many ids the client may drop; the new read offset (both relative to the item)."""
    text: str
    prefix_advance: int
    read_offset: int


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int = -1                  # -1: none
    has_chat_template: bool = False
    name: str = ""


class TokenizerCore:
    """One loaded fast tokenizer. Methods are synchronous. Encoding (tokenize, chat templates)
    may only run on one thread at a time: HF sets truncation and padding on the backend for each
    call, and a concurrent call fails with "Already borrowed". Decoding (detokenize, decode) uses
    its own copy of the backend, which nothing mutates, so it may run on another thread
    meanwhile (the service runs it on its event loop, sparing a thread hand-off per step)."""

    def __init__(self, tokenizer, name: str = "", extra_eos_token_ids: Sequence[int] = (),
                 max_positions: Optional[int] = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{name or tokenizer}: a fast (tokenizers-backed) tokenizer is required")
        self._tok = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._decoder = type(self._backend).from_str(self._backend.to_str())
        self.vocab_size = len(tokenizer)
        self.max_positions = max_positions      # the model's, when its config.json says
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        eos += [i for i in extra_eos_token_ids if i not in eos]
        self._info = TokenizerInfo(
            vocab_size=self.vocab_size,
            eos_token_ids=list(dict.fromkeys(eos)),
            bos_token_id=-1 if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
            has_chat_template=bool(tokenizer.chat_template),
            name=name or str(getattr(tokenizer, "name_or_path", "")),
        )

    @classmethod
    def load(cls, model: str, cache_dir: Optional[str] = None) -> "TokenizerCore":
        """Resolve `model` (dir, hub id, .gguf or alias) (common/model_source.py) and load it."""
        return cls.from_dir(resolve_model(model, cache_dir), name=model)

    @classmethod
    def from_dir(cls, model_dir: str | Path, name: Optional[str] = None) -> "TokenizerCore":
        """Load the tokenizer of a local HF model directory (plus generation_config.json's EOS ids)."""
        model_dir = Path(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        core = cls(tokenizer, name=name or str(model_dir),
                   extra_eos_token_ids=_generation_eos_ids(model_dir / "generation_config.json"),
                   max_positions=_max_positions(model_dir / "config.json"))
        log.info("loaded tokenizer %s from %s: vocab %d, eos %s", core._info.name, model_dir,
                 core.vocab_size, core._info.eos_token_ids)
        return core

    def info(self) -> TokenizerInfo:
        """Vocabulary size (with added tokens), EOS ids, BOS id, chat template presence, name."""
        return self._info

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text, in one batched call."""
        if not texts:
            return []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidArgument(f"texts[{i}] is {type(t).__name__}, not str")
        enc = self._tok(list(texts), add_special_tokens=add_special_tokens)
        return [list(ids) for ids in enc["input_ids"]]

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> ChatPrompt:
        """Render messages ({"role", "content"}) with the model's chat template, then tokenize.

        The rendered text already holds the template's special tokens, so it is tokenized without
        adding more (as transformers does).
        """
        if not self._info.has_chat_template:
            raise InvalidArgument(f"{self._info.name} has no chat template; send text instead")
        if not messages:
            raise InvalidArgument("messages must not be empty")
        msgs = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role is {role!r}; expected one of {', '.join(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise InvalidArgument(f"messages[{i}].content must be a string")
            msgs.append({"role": role, "content": content})
        try:
            text = self._tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
        except jinja2.TemplateError as exc:   # templates raise on e.g. roles out of order
            raise InvalidArgument(f"chat template rejected the messages: {exc}") from exc
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        return ChatPrompt(token_ids=list(ids), text=text)

    def detokenize(self, items: Sequence[DetokenizeItem]) -> list[DetokenizeResult]:
        """Incremental, UTF-8 safe text for a batch of sequences (see the module docstring).

        All items that need decoding are decoded in one batched call per skip_special_tokens value.
        """
        results: list[Optional[DetokenizeResult]] = [None] * len(items)
        pending: dict[bool, list[int]] = {True: [], False: []}
        for i, item in enumerate(items):
            ids = item.token_ids
            if not 0 <= item.read_offset <= len(ids):
                raise InvalidArgument(f"items[{i}]: read_offset {item.read_offset} outside [0, {len(ids)}]")
            if item.read_offset == len(ids):      # nothing new
                results[i] = DetokenizeResult("", 0, item.read_offset)
                continue
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise InvalidArgument(f"items[{i}]: token id outside [0, {self.vocab_size})")
            pending[bool(item.skip_special_tokens)].append(i)

        for skip, idx in pending.items():
            if not idx:
                continue
            seqs = [list(items[i].token_ids[:items[i].read_offset]) for i in idx]
            seqs += [list(items[i].token_ids) for i in idx]
            texts = self._decoder.decode_batch(seqs, skip_special_tokens=skip)
            for k, i in enumerate(idx):
                prefix_text, full = texts[k], texts[len(idx) + k]
                if len(full) > len(prefix_text) and not full.endswith(REPLACEMENT_CHAR):
                    results[i] = DetokenizeResult(full[len(prefix_text):], items[i].read_offset,
                                                  len(items[i].token_ids))
                else:
                    results[i] = DetokenizeResult("", 0, items[i].read_offset)
        return results  # type: ignore[return-value]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Plain (non-incremental) decode, the reference that the deltas of detokenize add up to."""
        return self._decoder.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def _max_positions(path: Path) -> Optional[int]:
    """max_position_embeddings of a config.json, if there is one that says."""
    try:
        n = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def _generation_eos_ids(path: Path) -> list[int]:
    """eos_token_id (an int or a list) from a generation_config.json, if there is one."""
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return []
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
