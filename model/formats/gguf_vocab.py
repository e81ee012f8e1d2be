"""A GGUF file's vocabulary as an ``HFTokenizer``.

A GGUF carries no tokenizer.json, only llama.cpp's metadata: the tokens, their types, merges or
scores, and the special ids. The ``tokenizers`` object built here has the shape transformers gives
the same file (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), so both split text into
the same ids:

- ``gpt2``: byte-level BPE (the tokens spelled in GPT-2's byte alphabet, the file's merges, the
  pre-tokenizer regex named by ``tokenizer.ggml.pre`` where one is known, GPT-2's otherwise);
- ``llama``: SentencePiece-style BPE with byte fallback (``<0xNN>`` pieces), merges rebuilt from
  the scores, a "▁" prefix on the text's first word.

Control tokens become special added tokens (matched whole in text, dropped when decoding),
user-defined ones plain added tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as TkTokenizer
from tokenizers.models import BPE

from model.args import ConfigError
from model.hf_tokenizer import HFTokenizer, add_missing_specials

# llama.cpp's token types (tokenizer.ggml.token_type), as in SentencePiece's ModelProto.
CONTROL, USER_DEFINED = 3, 4

# Named special ids and the template variable each one fills.
_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# Tokens llama.cpp also ends generation on (end of turn / end of message), where the file names them.
_EXTRA_STOP_IDS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# The split regexes of the pre-tokenizers transformers knows by their ``tokenizer.ggml.pre`` name
# (the ones llama.cpp uses for those models); any other name gets GPT-2's ByteLevel regex.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2),
}


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value: printable Latin-1 bytes stand for
    themselves, the rest are moved up past U+00FF in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return tuple(out[b] for b in range(256))


def derive_merges(tokens: Sequence[str], scores: Sequence[float] | None) -> list[tuple[str, str]]:
    """Merges a vocabulary implies when the file lists none: every split of a token into two
    tokens. Ranked by the merged token's score, best first (SentencePiece), or by its id, lowest
    first (BPE without scores); ties by the halves' lengths, then the file's order (the order
    transformers uses, so the two tokenize alike)."""
    ids = {t: i for i, t in enumerate(tokens)}
    rank: dict[str, float] = (
        dict(zip(tokens, scores, strict=True)) if scores is not None else {t: float(i) for t, i in ids.items()}
    )
    found: list[tuple[float, int, int, str, str]] = []
    for token, r in rank.items():
        halves = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        halves.sort(key=lambda h: (ids[h[0]], ids[h[1]]))
        found.extend((r, len(a), len(b), a, b) for a, b in halves)
    # sorted() is stable with reverse=True too, so equal keys keep the order above.
    found.sort(key=lambda m: m[:3], reverse=scores is not None)
    return [(a, b) for _, _, _, a, b in found]


def _file_merges(meta: dict[str, Any]) -> list[tuple[str, str]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    out = []
    for m in merges:
        a, sep, b = str(m).partition(" ")
        if not sep:
            raise ConfigError(f"GGUF merge {m!r} is not two tokens separated by a space")
        out.append((a, b))
    return out


def _byte_level_bpe(meta: dict[str, Any]) -> tuple[TkTokenizer, list[str]]:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    spelling = byte_alphabet()
    alphabet = set(spelling)
    # Tokens are stored as text; the BPE works on byte-alphabet spellings, so respell any token
    # (e.g. one holding a raw space) that is not already written in that alphabet.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    merges = _file_merges(meta)
    if merges is None:
        merges = derive_merges(tokens, None)
    tk = TkTokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split = _SPLITS.get(str(meta.get("tokenizer.ggml.pre", "")))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    # A "control" token outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    control = [t for t in _of_type(meta, CONTROL) if set(t) <= alphabet]
    user = [t for t in _of_type(meta, USER_DEFINED) if t in vocab]
    # transformers' GPT-2 class also makes <|endoftext|> special by default; only where it exists.
    defaults: list[str] = [t for t in ("<|endoftext|>",) if t in vocab]
    _add_tokens(tk, control + defaults, user)
    return tk, tokens


def _sentencepiece_bpe(meta: dict[str, Any]) -> tuple[TkTokenizer, list[str]]:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(meta)
    if merges is None:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ConfigError("GGUF llama vocabulary has neither merges nor one score per token")
        merges = derive_merges(tokens, [float(s) for s in scores])
    tk = TkTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    # As transformers builds it from a GGUF: "▁" before the first word only (not after special
    # tokens) and not when the text already starts with a space; tokenizer.ggml.add_space_prefix
    # is not consulted.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # transformers' Llama class makes these special by default; only where they exist.
    defaults: list[str] = [t for t in ("<unk>", "<s>", "</s>") if t in vocab]
    _add_tokens(tk, _of_type(meta, CONTROL) + defaults, _of_type(meta, USER_DEFINED))
    return tk, tokens


def _of_type(meta: dict[str, Any], token_type: int) -> list[str]:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return []
    if len(types) != len(tokens):
        raise ConfigError(f"GGUF has {len(types)} token types for {len(tokens)} tokens")
    return [t for t, ty in zip(tokens, types, strict=True) if ty == token_type]


def _add_tokens(tk: TkTokenizer, special: list[str], plain: list[str]) -> None:
    add_missing_specials(tk, special)
    if plain:
        # User-defined tokens are matched whole in text (llama.cpp does) but decode like text.
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])


def set_special_processor(tk: TkTokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """What transformers' ``update_post_processor`` installs: ``[BOS] $A [EOS]``, each only when
    the tokenizer says to add it."""
    pre = f"{bos[0]}:0 " if bos else ""
    post = f" {eos[0]}:0" if eos else ""
    pair_pre = f" {bos[0]}:1" if bos else ""
    pair_post = f" {eos[0]}:1" if eos else ""
    single = f"{pre}$A:0{post}"
    tk.post_processor = processors.TemplateProcessing(
        single=single,
        pair=f"{single}{pair_pre} $B:1{pair_post}",
        special_tokens=[t for t in (bos, eos) if t is not None],
    )


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def read_tokenizer_metadata(path: Path, reader: Any = None) -> dict[str, Any]:
    """The ``tokenizer.*`` and ``general.architecture`` fields of a GGUF file, as Python values.
    ``reader``: a ``gguf.GGUFReader`` already open on ``path`` (opening one parses the whole
    header, seconds for a large vocabulary, so a caller that has one should pass it)."""
    if reader is None:
        import gguf  # the gguf package is only needed for GGUF files

        try:
            reader = gguf.GGUFReader(str(path))
        except FileNotFoundError:
            raise ConfigError(f"GGUF file {path} not found") from None
        except (ValueError, OSError, IndexError, KeyError) as e:  # what a truncated or foreign file raises
            raise ConfigError(f"{path} is not a readable GGUF file ({e})") from None
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") or name == "general.architecture":
            try:
                meta[name] = field.contents()
            except UnicodeDecodeError:
                raise ConfigError(f"{path}: GGUF field {name} holds text that is not UTF-8") from None
    return meta


def gguf_tokenizer(path: Path, reader: Any = None) -> HFTokenizer:
    """The tokenizer a GGUF file describes; ConfigError if it has none or one of another kind.
    ``reader``: an open ``gguf.GGUFReader`` on ``path`` to reuse (see read_tokenizer_metadata)."""
    path = Path(path)
    meta = read_tokenizer_metadata(path, reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or not meta.get("tokenizer.ggml.tokens"):
        raise ConfigError(f"{path} holds no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
    builder = _BUILDERS.get(str(kind))
    if builder is None:
        raise ConfigError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: {', '.join(sorted(_BUILDERS))})"
        )
    try:
        tk, tokens = builder(meta)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # tokenizers rejects e.g. a merge naming an unknown token with a plain Exception
        raise ConfigError(f"{path}: cannot build its tokenizer ({e})") from None

    def token_at(key: str) -> tuple[str, int] | None:
        i = meta.get(key)
        return (tokens[i], int(i)) if isinstance(i, int) and 0 <= i < len(tokens) else None

    named = {name: t[0] for name, key in _SPECIAL_IDS.items() if (t := token_at(key)) is not None}
    add_missing_specials(tk, named.values())
    bos, eos = token_at(_SPECIAL_IDS["bos_token"]), token_at(_SPECIAL_IDS["eos_token"])
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to; transformers too.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    set_special_processor(tk, bos if add_bos else None, eos if add_eos else None)

    stops = [t[1] for key in (_SPECIAL_IDS["eos_token"], *_EXTRA_STOP_IDS) if (t := token_at(key)) is not None]
    template = meta.get("tokenizer.chat_template")
    return HFTokenizer(
        tk,
        bos_id=bos[1] if bos else None,
        eos_ids=stops,
        chat_template=template if isinstance(template, str) else None,
        special_tokens=named,
        path=path,
    )
