"""The outermost layer of every HTTP request: API key, body size, request id, and the catch-all.

:class:`Guard` is plain ASGI middleware (no FastAPI import) that the app installs first:

* every request gets an id (``x-request-id`` response header, ``scope["reft_request_id"]``), which
  the server log names for every failure;
* with an API key (``--api-key``, ``REFT_KERNELS_API_KEY`` or vLLM's ``VLLM_API_KEY``) every route
  but ``/health`` needs ``Authorization: Bearer KEY``; otherwise 401 in OpenAI's error shape
  (``code: "invalid_api_key"``, so the ``openai`` client raises ``AuthenticationError``); the key is
  compared in constant time;
* a body over ``max_body_bytes`` (default 8 MiB) is answered 413 before it is parsed;
* anything unexpected raised below is answered ``500 {"error": {"message", "type": "server_error",
  "param": null, "code": null}}`` and logged with the request id and its traceback. The exception
  stops here: uvicorn never sees it, so it does not close the client's keep-alive connection. If the
  response had already started (a stream), the body is ended cleanly instead.
"""
from __future__ import annotations

import hmac
import json
import logging
import uuid
from typing import Iterable, Optional

from .options import MAX_BODY_BYTES
from .protocol import error_body

__all__ = ["Guard", "BodyTooLarge", "server_error_body",
           "too_large_body"]

log = logging.getLogger("reft_kernels.serving")

class BodyTooLarge(Exception):
    """Raised by the guarded ``receive`` once the body passes the limit (FastAPI may wrap it in an
    HTTPException: the app's handler answers 413 for that cause)."""


def server_error_body(request_id: str, what: str = "the server failed to answer this request") -> dict:
    """The one body of every unexpected failure (details are in the server log, under the id)."""
    return error_body(f"{what} (request id {request_id}; the server log has the details)", "server_error")


def too_large_body(limit: int) -> dict:
    return error_body(f"the request body is over this server's limit of {limit} bytes", code="request_too_large")


async def _respond(send, status: int, body: dict, headers: Iterable = ()) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class Guard:
    """ASGI middleware: see the module docstring. ``open_paths`` need no key."""

    def __init__(self, app, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
                 open_paths: Iterable[str] = ("/health",)):
        self.app = app
        self.expected = f"Bearer {api_key}".encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.open_paths = frozenset(open_paths)

    def _authorized(self, scope) -> bool:
        got = next((v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), b"")
        return hmac.compare_digest(got, self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope["reft_request_id"] = rid
        state = {"started": False, "finished": False}

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        if self.expected is not None and scope.get("path") not in self.open_paths and not self._authorized(scope):
            return await _respond(send_tagged, 401, error_body(
                "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with the key this "
                "server was started with (--api-key / REFT_KERNELS_API_KEY)", code="invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
        length = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        too_large = too_large_body(self.max_body_bytes)
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _respond(send_tagged, 413, too_large)
        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, receive_counted, send_tagged)
        except BodyTooLarge:
            if not state["started"]:
                await _respond(send_tagged, 413, too_large)
        except Exception:  # noqa: BLE001 - the catch-all: answered here, never reaches uvicorn
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if not state["started"]:
                await _respond(send_tagged, 500, server_error_body(rid))
            elif not state["finished"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
