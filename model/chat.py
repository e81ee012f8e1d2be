"""Chat templates rendered the way transformers' ``apply_chat_template`` renders them.

A model's chat template is Jinja written against transformers' environment: a sandbox with
``trim_blocks``/``lstrip_blocks``, a ``tojson`` that does not escape HTML, ``raise_exception``,
``strftime_now``, loop controls and a ``{% generation %}`` tag. Anything else would render a
different prompt than the model was trained on, so this mirrors that environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.args import ConfigError

Message = dict[str, Any]

# The named special tokens transformers hands to every template (those the tokenizer has).
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ConfigError):
    """The template refused the conversation (``raise_exception``) or failed while rendering."""


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; for
    inference it renders its body unchanged (without the tag such templates would not parse)."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[Message],
    special_tokens: Mapping[str, str] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for ``messages``; ``special_tokens`` maps names like ``bos_token`` to their
    strings. Raises ChatTemplateError (a ConfigError, so a ValueError) with the template's message."""
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse: {e.message} (template line {e.lineno})") from None
    # transformers drops None-valued keys (APIs send content=None), and templates test for absence.
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    tokens = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
    try:
        return compiled.render(
            messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **tokens
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e.message or type(e).__name__}") from None
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
