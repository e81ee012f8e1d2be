"""A ``tokenizers.Tokenizer`` (tokenizer.json, or one built from a GGUF's vocabulary) behind the
engine's ``Tokenizer`` interface, with the add-BOS policy, special tokens, EOS list and chat
template read the way transformers' ``AutoTokenizer`` reads them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as TkTokenizer

from model.args import ConfigError, first_line
from model.chat import SPECIAL_TOKEN_NAMES, render_chat
from model.tokenizer import Message, Tokenizer


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def _read_object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _pick_template(value: Any, where: Path) -> str | None:
    """A template string, or transformers' list of ``{"name", "template"}``: the one named default."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    raise ConfigError(f"{where}: chat_template should be a string or a list of named templates")


def add_missing_specials(tk: TkTokenizer, tokens: Iterable[str]) -> None:
    """Make these strings special added tokens unless they already are added tokens (transformers
    does this for every named special token, so e.g. ``<s>`` in text is one id, not pieces)."""
    added = {t.content for t in tk.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(tokens) if t and t not in added]
    if missing:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` plus what tokenizer.json does not hold: BOS/EOS ids, the chat
    template and the special-token strings the template sees."""

    def __init__(
        self,
        tk: TkTokenizer,
        *,
        bos_id: int | None,
        eos_ids: Iterable[int],
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        path: str | Path = "<memory>",
        clean_up_spaces: bool = False,
    ) -> None:
        self._tk = tk
        self._bos_id = bos_id
        self._eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.path = Path(path)
        # transformers skips its space clean-up for BPE models (it would eat real spaces there).
        model_type = type(tk.model).__name__
        self._clean_up = clean_up_spaces and model_type != "BPE"

    @property
    def backend(self) -> TkTokenizer:
        return self._tk

    @property
    def n_words(self) -> int:
        return int(self._tk.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        # The post-processor decides what "special tokens" means (BOS, EOS, nothing), as in transformers.
        return list(self._tk.encode(text, add_special_tokens=bos).ids)

    def decode(self, ids: list[int]) -> str:
        text = str(self._tk.decode(self.checked_ids(ids), skip_special_tokens=True))
        return _clean_up_tokenization(text) if self._clean_up else text

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ConfigError(f"{self.path} has no chat template")
        return render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        if self.chat_template is None:
            return super().encode_chat(messages)
        # apply_chat_template(tokenize=True) adds no special tokens: the template writes its own BOS.
        return self.encode(self.render_chat(messages), bos=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> HFTokenizer:
        d = Path(model_dir)
        tk_path = d / "tokenizer.json"
        if not tk_path.is_file():
            raise ConfigError(f"{tk_path} not found")
        try:
            tk = TkTokenizer.from_file(str(tk_path))
        except Exception as e:  # tokenizers raises plain Exception for any bad file
            raise ConfigError(f"{tk_path} is not a valid tokenizer.json ({first_line(e)})") from None
        config = _read_object(d / "tokenizer_config.json")
        named = _named_tokens(config, _read_object(d / "special_tokens_map.json"))
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extras = [s for s in (_token_str(t) for t in extra) if s] if isinstance(extra, list) else []
        add_missing_specials(tk, [*named.values(), *extras])

        bos, eos = named.get("bos_token"), named.get("eos_token")
        bos_id = tk.token_to_id(bos) if bos else None
        eos_id = tk.token_to_id(eos) if eos else None
        # tokenizer.json's post-processor alone decides what encode(bos=True) adds: transformers 5
        # drops add_bos_token/add_eos_token from tokenizer_config.json when tokenizer.json exists.

        template = _pick_template(config.get("chat_template"), d / "tokenizer_config.json")
        jinja = d / "chat_template.jinja"
        if jinja.is_file():  # transformers saves the template here, and the file takes priority
            template = jinja.read_text(encoding="utf-8")

        eos_ids = [eos_id] if eos_id is not None else []
        gen = _read_object(d / "generation_config.json").get("eos_token_id")
        for i in gen if isinstance(gen, list) else [gen]:
            if isinstance(i, int) and not isinstance(i, bool):
                eos_ids.append(i)
        return cls(
            tk,
            bos_id=bos_id,
            eos_ids=eos_ids,
            chat_template=template,
            special_tokens=named,
            path=d,
            clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, n_words={self.n_words}, bos={self.bos_id}, eos={self.eos_ids})"


def _named_tokens(config: Mapping[str, Any], special_map: Mapping[str, Any]) -> dict[str, str]:
    """bos_token etc. from tokenizer_config.json; special_tokens_map.json (the older file) is read,
    and overrides, only when the config has no ``added_tokens_decoder``, as transformers does."""
    sources = [config] if "added_tokens_decoder" in config else [config, special_map]
    named: dict[str, str] = {}
    for source in sources:
        for name in SPECIAL_TOKEN_NAMES:
            if name in source:
                value = _token_str(source[name])
                if value is None:
                    named.pop(name, None)
                else:
                    named[name] = value
    return named


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (for WordPiece/Unigram models that ask for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
