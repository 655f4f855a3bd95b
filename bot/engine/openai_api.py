"""The JSON of the OpenAI-compatible API: requests checked field by field, responses shaped.

The contract is OpenAI's, and vLLM's where OpenAI's is silent (``top_k``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``temperature: 0`` meaning greedy,
the wording of the over-length error), so that any client written for vLLM works unchanged.
A field with a wrong type or value is a :class:`RequestError` (HTTP 400) that names the field;
fields this server does not implement are refused when they would change the result
(``n`` > 1, ``logprobs``, ``echo``, penalties other than 0) and ignored otherwise, as vLLM does.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from bot.db.repository import BOT_ROLE, USER_ROLE, Turn
from bot.engine.sampling import SamplingParams
from bot.memory import alternate

#: OpenAI's default ``max_tokens`` for completions (vLLM's too).
DEFAULT_COMPLETION_TOKENS = 16


class RequestError(ValueError):
    """A request this API refuses; ``status`` is the HTTP status (400, 404)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def error_body(message: str, status: int, kind: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (``{"error": {...}}``), as vLLM returns it."""
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}
    kinds |= {429: "RateLimitError", 503: "ServiceUnavailableError"}
    return {
        "error": {
            "message": message,
            "type": kind or kinds.get(status, "InternalServerError"),
            "param": None,
            "code": status,
        }
    }


@dataclass(frozen=True)
class CompletionRequest:
    """What a request asks for, in the engine's terms."""

    prompt: str | list[int] | None  # completions
    turns: list[str] | None  # chat: user/assistant turns, ending with the user's
    persona: str | None  # chat: the system message, if any
    params: SamplingParams
    max_tokens: int | None  # None: the rest of the context (chat)
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    user: str | None
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer", param=name)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} must be {bound}, got {value}", param=name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise RequestError("stop must be a string or a list of strings", param="stop")


def _stop_token_ids(body: dict[str, Any], vocab_size: int) -> tuple[int, ...]:
    value = body.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in value
    ):
        raise RequestError(
            f"stop_token_ids must be a list of token ids below {vocab_size}", param="stop_token_ids"
        )
    return tuple(value)


def _prompt(body: dict[str, Any], vocab_size: int) -> str | list[int]:
    """Text, or token ids; a list holding one of them is accepted (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if not all(0 <= t < vocab_size and not isinstance(t, bool) for t in prompt):
            raise RequestError(f"prompt token ids must be below {vocab_size}", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError("this server takes one prompt per request", param="prompt")
    raise RequestError("prompt must be a non-empty string or list of token ids", param="prompt")


def _message_text(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{index}] must be an object", param="messages")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise RequestError(
            f"messages[{index}].role must be system, user or assistant", param="messages"
        )
    if isinstance(content, list):  # content parts: only text ones
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError("only text content parts are supported", param="messages")
            parts.append(str(part.get("text", "")))
        content = " ".join(parts)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string", param="messages")
    return role, content


def _chat(body: dict[str, Any]) -> tuple[list[str], str | None]:
    """The dialogue's turns (alternating, ending with the user's) and the system message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        role, content = _message_text(message, index)
        if role in ("system", "developer"):
            system.append(content)
        elif content.strip():
            turns.append(Turn(USER_ROLE if role == "user" else BOT_ROLE, content))
    if not turns or turns[-1].role != USER_ROLE:
        raise RequestError("the last message must be the user's", param="messages")
    return alternate(turns), (" ".join(system) if system else None)


def parse_request(
    body: Any, *, chat: bool, served_model: str, vocab_size: int
) -> CompletionRequest:
    """Check a completions (``chat=False``) or chat completions request; RequestError if bad."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise RequestError(f"The model `{model}` does not exist.", status=404, param="model")
    if body.get("n", 1) != 1 or body.get("best_of", 1) not in (1, None):
        raise RequestError("only n=1 is supported", param="n")
    if body.get("echo") or body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("echo and logprobs are not supported", param="logprobs")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, 0.0, -2.0, 2.0) != 0.0:
            raise RequestError(f"{penalty} is not supported: use repetition_penalty", param=penalty)
    name = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    max_tokens = _integer(body, name, 1)
    if max_tokens is None and not chat:
        max_tokens = DEFAULT_COMPLETION_TOKENS
    top_k = _integer(body, "top_k", -1)
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("user must be a string", param="user")
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=max(top_k or 0, 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-3, 10.0),
        max_new_tokens=max_tokens or 1,
        min_new_tokens=_integer(body, "min_tokens", 0) or 0,
        seed=None if seed is None else seed % 2**63,
    )
    turns, persona = _chat(body) if chat else (None, None)
    return CompletionRequest(
        prompt=None if chat else _prompt(body, vocab_size),
        turns=turns,
        persona=persona,
        params=params,
        max_tokens=max_tokens,
        stop=_stop(body),
        stop_token_ids=_stop_token_ids(body, vocab_size),
        user=user or None,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


class ResponseShape:
    """One response's id, time and model, and the JSON of its chunks and final object."""

    def __init__(self, model: str, *, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _choice(
        self, text: str | None, finish: str | None, stop_reason: str | int | None, *, delta: bool
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            if delta:
                choice["delta"] = {} if text is None else {"content": text}
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text or ""
        choice["stop_reason"] = stop_reason
        return choice

    def whole(
        self, text: str, finish: str, stop_reason: str | int | None, usage: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(text, finish, stop_reason, delta=False)],
            "usage": usage,
        }

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        stop_reason: str | int | None = None,
        *,
        role: bool = False,
    ) -> dict[str, Any]:
        choice = self._choice(text, finish, stop_reason, delta=True)
        if role:
            choice["delta"] = {"role": "assistant", "content": ""}
        return {
            "id": self.id,
            "object": self._object + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        chunk = self.chunk(None)
        chunk["choices"] = []
        chunk["usage"] = usage
        return chunk


def model_card(
    name: str, root: str, context: int, dtype: str, quantization: str, parameters: int
) -> dict[str, Any]:
    """``GET /v1/models``'s entry: vLLM's fields, plus what an operator wants to see."""
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "bot",
        "root": root,
        "parent": None,
        "max_model_len": context,
        "dtype": dtype,
        "quantization": quantization,
        "parameters": parameters,
    }


def delta(sent: str, now: str) -> str | None:
    """What to send after ``sent`` to show ``now``; ``None`` when ``now`` does not extend it."""
    return now[len(sent) :] if now.startswith(sent) else None
