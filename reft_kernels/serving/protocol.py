"""OpenAI request bodies (the fields this server reads) and OpenAI-style error responses.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the ``openai``
client raises its usual exceptions (``BadRequestError`` for 400, ``NotFoundError`` for 404, ...).
Unknown fields are ignored, as by vLLM; fields we cannot honour (``n > 1``, ``logprobs``, ``echo``,
``best_of > 1``, tools) are refused with a 400 that names them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .rows import SEED_RANGE

__all__ = ["CompletionRequest", "ChatCompletionRequest", "LoadAdapterRequest", "UnloadAdapterRequest",
           "ApiError", "error_body", "find_bad_text", "reject_bad_text"]


class ApiError(Exception):
    """An error answered as OpenAI error JSON with HTTP ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    """OpenAI's error JSON. Text that is not valid UTF-8 (a lone surrogate echoed from a request)
    is escaped, so the error itself can always be written."""
    return {"error": {"message": _printable(message), "type": type_, "param": _printable(param), "code": code}}


def _printable(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def find_bad_text(value: Any, path: str = "") -> Optional[str]:
    """The dotted path of the first string in ``value`` (nested dicts / lists / pydantic models)
    that is not valid Unicode text (a lone UTF-16 surrogate such as ``\\ud800``); ``None`` if all are."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        bad = find_bad_text(key, path) if isinstance(key, str) else None
        bad = bad or find_bad_text(item, f"{path}.{key}" if path else str(key))
        if bad:
            return bad
    return None


def reject_bad_text(body: BaseModel) -> None:
    """400 naming the field of the first string that is not valid text (see :func:`find_bad_text`)."""
    bad = find_bad_text(body)
    if bad is not None:
        raise ApiError(400, f"{bad} is not valid Unicode text (it contains a lone UTF-16 surrogate such as "
                       "\\ud800); send UTF-8 text", param=bad)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    seed: Optional[int] = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Any] = None
    user: Optional[str] = None

    def stop_list(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must be non-empty", param="stop")
        if len(stops) > 4:
            raise ApiError(400, f"at most 4 stop strings are allowed, got {len(stops)}", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported; this server returns one choice per prompt (n=1)",
                           param="n")
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported by this server; leave logprobs unset", param="logprobs")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, or token ids (a list of ints
    or a list of such lists). Default ``max_tokens`` is 16, as in OpenAI's API."""

    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix)):
            if bad:
                raise ApiError(400, f"{name} is not supported by this server; leave it unset", param=name)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Optional[Union[str, List[Dict[str, Any]]]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"message content of type {part.get('type')!r} is not supported; send text",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` is OpenAI's newer name of max_tokens;
    without either, the completion may fill the rest of the context."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[Any] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")


class LoadAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
