"""OpenAI request bodies checked field by field, and the response shapes (no HTTP here).

Every check a client can fail raises ApiError with the status and an OpenAI error object; the
server turns it into the response and goes on serving.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from model.sampling import SamplingParams
from model.tokenizer import Message, Tokenizer


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        default = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        self.kind = kind or default.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request: its prompts as token ids and how to generate for each."""

    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    chat: bool


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict[str, Any], name: str, default: float) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
        raise ApiError(400, f"'{name}' must be a finite number, got {x!r}", name)
    return float(x)


def _prompts(body: dict[str, Any], tok: Tokenizer, vocab: int) -> list[list[int]]:
    p = body.get("prompt")
    if isinstance(p, str):
        items: list[Any] = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or isinstance(x, list) for x in p):
        items = p
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt")
    out = []
    for x in items:
        if isinstance(x, str):
            out.append(tok.encode(x))
            continue
        if not x or not all(_is_int(t) for t in x):
            raise ApiError(400, "a token-id prompt must be a non-empty list of integers", "prompt")
        bad = [t for t in x if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        out.append(list(x))
    return out


def _messages(body: dict[str, Any]) -> list[Message]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out: list[Message] = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "every message needs a string 'role' and a 'content'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, "only text content parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(400, "a message's 'content' must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse(body: object, tok: Tokenizer, vocab: int, default_max_tokens: int, chat: bool) -> Job:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if chat:
        try:
            prompts = [tok.encode_chat(_messages(body))]
        except ApiError:
            raise
        except Exception as e:  # a template that refuses these messages (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
    else:
        prompts = _prompts(body, tok, vocab)
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "only n = 1 is supported", "n")
    mt = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else body.get("max_tokens")
    if mt is not None and (not _is_int(mt) or mt < 1):
        raise ApiError(400, f"'max_tokens' must be an integer >= 1, got {mt!r}", "max_tokens")
    temperature = _number(body, "temperature", 1.0)  # OpenAI's default
    if temperature < 0:
        raise ApiError(400, f"'temperature' must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by this server", "logprobs")
    # Seeds are 63-bit on the wire; a request without one samples with a fresh random seed.
    seed = (seed % (1 << 63)) if seed is not None else secrets.randbits(63)
    return Job(
        prompts=prompts,
        max_tokens=mt if mt is not None else default_max_tokens,
        sampling=SamplingParams(temperature, top_p, seed),
        stop=stop,
        stream=stream,
        include_usage=bool(opts.get("include_usage")),
        chat=chat,
    )


class Reply:
    """The response objects of one request (ids and timestamps shared by every chunk)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, texts: list[str], reasons: list[str], usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choices: list[dict[str, Any]] = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
            return self._head("chat.completion") | {"choices": choices, "usage": usage}
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return self._head("text_completion") | {"choices": choices, "usage": usage}

    def chunk(self, index: int, text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._head("text_completion") | {"choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
