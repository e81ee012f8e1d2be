"""Tokenizers behind one interface, the instruct/chat prompt, streaming decode.

``Tokenizer`` is the interface every command uses. ``SentencePieceTokenizer`` reads Mistral's
``tokenizer.model``; ``HFTokenizer`` (model/hf_tokenizer.py) reads ``tokenizer.json`` through the
``tokenizers`` library, and a GGUF file's vocabulary is turned into one (model/formats/gguf_vocab.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import sentencepiece as spm

from model.args import ConfigError, first_line

# Looked for in this order; after these, any other ``tokenizer.model.v*`` (highest version first).
TOKENIZER_FILE_NAMES: tuple[str, ...] = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")

# The tiny tokenizer shipped for random-weight test/demo models (vocab 512, made by
# scripts/make_tokenizer.py). It lives in the source tree, not in an installed package.
DEFAULT_TOKENIZER_PATH: Path = Path(__file__).resolve().parent.parent / "configs" / "tokenizer-512.model"

REPLACEMENT_CHAR = "\ufffd"


def _version_key(path: Path) -> tuple[int, str]:
    suffix = path.name[len("tokenizer.model.v") :]
    return (int(suffix) if suffix.isdigit() else -1, suffix)


def find_tokenizer_file(model_dir: str | Path) -> Path:
    """Return the SentencePiece model file in ``model_dir``, or raise ConfigError."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        return model_dir
    for name in TOKENIZER_FILE_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    others = sorted((p for p in model_dir.glob("tokenizer.model.v*") if p.is_file()), key=_version_key, reverse=True)
    if others:
        return others[0]
    expected = f"{', '.join(TOKENIZER_FILE_NAMES)} or tokenizer.model.v*"
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist (it should hold one of {expected})")
    hint = " (tekken.json tokenizers are not supported)" if (model_dir / "tekken.json").is_file() else ""
    raise ConfigError(f"no SentencePiece tokenizer in {model_dir}: expected one of {expected}{hint}")


Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": "..."}


class Tokenizer(ABC):
    """What the engine needs of a tokenizer, whatever file it came from."""

    path: Path

    @property
    @abstractmethod
    def n_words(self) -> int:
        """Ids [0, n_words) decode; the model's vocab_size may be larger (padded embeddings)."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (generation_config.json may list several)."""

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @abstractmethod
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids for text; with bos=True, the special tokens the model's tokenizer adds (BOS where it adds one)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text for ids; special/control tokens (BOS, EOS, chat markers) decode to nothing."""

    def checked_ids(self, ids: list[int]) -> list[int]:
        """ids as ints, or a ValueError naming the first one outside [0, n_words)."""
        ids = [int(i) for i in ids]
        n = self.n_words
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the tokenizer's vocabulary [0, {n}) ({self.path}); "
                "does the model's vocab_size match the tokenizer?"
            )
        return ids

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """A conversation, ready for the assistant's reply: the model's chat template where it has
        one (rendered as transformers does), else Mistral's ``[INST] ... [/INST]`` format."""
        return self.encode(mistral_instruct(messages), bos=True)

    def encode_instruct(self, prompt: str) -> list[int]:
        """One user turn through the chat format (what --instruct does)."""
        return self.encode_chat([{"role": "user", "content": prompt}])

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """tokenizer.json (HF) when the directory has one, else tokenizer.model (SentencePiece)."""
        d = Path(model_dir)
        if d.is_dir() and (d / "tokenizer.json").is_file():
            from model.hf_tokenizer import HFTokenizer

            return HFTokenizer.from_dir(d)
        return SentencePieceTokenizer(find_tokenizer_file(d))


def mistral_instruct(messages: list[Message]) -> str:
    """Mistral's v1 instruct format for models without a chat template: each user turn in
    ``[INST] ... [/INST]``, assistant turns after it ending in EOS text is not added here; a
    system message is put in front of the first user turn. ``encode(..., bos=True)`` adds BOS."""
    system = "\n\n".join(str(m["content"]) for m in messages if m.get("role") == "system")
    out, first = [], True
    for m in messages:
        role, content = m.get("role"), str(m.get("content", ""))
        if role == "user":
            if first and system:
                content = f"{system}\n\n{content}"
            first = False
            out.append(f"[INST] {content} [/INST]")
        elif role == "assistant":
            out.append(f" {content}</s>")
    return "".join(out)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with Mistral's conventions (BOS prepended, ``[INST] ... [/INST]``)."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ConfigError(f"tokenizer file {self.path} not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{self.path} is not a valid SentencePiece model ({first_line(e)})") from None
        if self._sp.vocab_size() < 1:
            raise ConfigError(f"{self.path} is not a valid SentencePiece model (empty vocabulary)")

    @property
    def n_words(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int | None:
        b = int(self._sp.bos_id())
        return None if b < 0 else b

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = int(self._sp.eos_id())
        return () if e < 0 else (e,)

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def pad_id(self) -> int:
        """-1 when the model has no pad piece (Mistral's tokenizers have none)."""
        return int(self._sp.pad_id())

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids: list[int] = list(self._sp.encode(text))
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text for ``ids``; control ids (BOS, EOS) decode to nothing."""
        return str(self._sp.decode(self.checked_ids(ids)))

    def id_to_piece(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(int(token_id)))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, n_words={self.n_words})"


class StreamDecoder:
    """Turns a stream of generated token ids into printable text chunks.

    Each ``push`` decodes every id seen so far and returns the text beyond what was already
    returned, so SentencePiece's leading-space rules come out right. A tail of U+FFFD characters
    (an incomplete UTF-8 sequence spread over byte-fallback tokens) is held back until later
    tokens complete it; ``flush`` returns whatever is still held back at the end of generation.
    The chunks joined together equal ``tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        printable = text.rstrip(REPLACEMENT_CHAR)
        return self._emit(printable)

    def flush(self) -> str:
        """Return the held-back tail (e.g. a byte sequence that never completed)."""
        return self._emit(self.tokenizer.decode(self.ids))

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return self._emitted

    def _emit(self, printable: str) -> str:
        if len(printable) <= len(self._emitted):
            return ""
        # Decoding is prefix-stable apart from the held-back tail, so this is the new text.
        new = printable[len(self._emitted) :]
        self._emitted = printable
        return new
