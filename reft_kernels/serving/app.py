"""The HTTP layer: an OpenAI-compatible FastAPI app over an :class:`~.engine.Engine`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream=true`` as server-sent events), ``GET /health``, with ``debug`` ``GET /debug/stats`` (batch
counters), and, when runtime adapters are enabled, vLLM's ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter``. The request's ``model`` names the adapter; the base model's own name
means no adapter (vLLM's LoRA convention). Every error is OpenAI-style JSON (see :mod:`.protocol`)
and concerns only its request: a request that fails inside a batch is answered 500 alone (see
:mod:`.engine`), and anything unexpected is answered by :class:`~.guard.Guard`. Limits
(:class:`ServeOptions`): prompts per request, tokens per request, body size; each a 4xx naming it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..artifacts import AdapterError, apply_template
from .engine import Engine, GenerationRequest, UnknownAdapterError
from .guard import BodyTooLarge, Guard, server_error_body, too_large_body
from .options import ServeOptions
from .protocol import (ApiError, ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                       UnloadAdapterRequest, error_body, reject_bad_text)
from .rows import SamplingParams

__all__ = ["create_app", "ServeOptions", "RUNTIME_ADAPTERS_OFF", "ADAPTER_NOT_LOADABLE"]

log = logging.getLogger("reft_kernels.serving")

RUNTIME_ADAPTERS_OFF = ("runtime adapter loading is off; start the server with --enable-runtime-adapters "
                        "(or the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")


# One answer for every runtime lora_path that cannot be served, whatever the reason (missing, not a
# directory, no or bad reft_run.json, bad checkpoint, outside --allowed-adapter-dir): the reason is
# logged on the server, so a client cannot tell which paths exist on the server's disk.
ADAPTER_NOT_LOADABLE = ("lora_path is not a loadable ReFT adapter on this server (the server log has the "
                        "reason, under this response's x-request-id)")


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist. Served models: see GET /v1/models.",
                    param="model", code="model_not_found")


class _Server:
    def __init__(self, engine: Engine, served_model_name: str, max_model_len: Optional[int],
                 runtime_adapters: bool, model_root: str, options: ServeOptions):
        self.engine, self.name, self.max_model_len = engine, served_model_name, max_model_len
        self.runtime_adapters, self.root, self.created = runtime_adapters, model_root, int(time.time())
        self.options = options

    # -- request -> engine requests ----------------------------------------------------------------
    def adapter_for(self, model: str) -> Optional[str]:
        if model == self.name:
            return None
        if model in self.engine.specs:
            return model
        raise _not_found(model)

    def params(self, body, prompt_len: int, max_tokens: Optional[int], default_max: Optional[int],
               prompt_param: str = "prompt") -> SamplingParams:
        if prompt_len == 0:
            raise ApiError(400, "the prompt is empty (it encodes to no tokens); send a non-empty prompt",
                           param=prompt_param)
        ctx = self.max_model_len
        if ctx is not None and prompt_len >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                           f"{prompt_len} tokens, which leaves no room for the completion. Please reduce the "
                           "length of the prompt.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:   # chat's default: the rest of the context, within --max-tokens-per-request
            max_tokens = default_max if default_max is not None else max(1, min(
                ctx - prompt_len if ctx else 256, self.options.max_tokens_per_request - prompt_len))
        if ctx is not None and prompt_len + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                           "completion). Please reduce the length of the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, stop=tuple(body.stop_list()))
        except ValueError as exc:   # the body's own checks should have caught it; still the client's error
            raise ApiError(400, str(exc), param=str(exc).split("=", 1)[0]) from None

    def check_limits(self, prompts: List[List[int]], params: List[SamplingParams]) -> None:
        opts = self.options
        if len(prompts) > opts.max_prompts_per_request:
            raise ApiError(400, f"this request has {len(prompts)} prompts; this server takes at most "
                           f"{opts.max_prompts_per_request} per request (--max-prompts-per-request); split it",
                           param="prompt", code="too_many_prompts")
        total = sum(len(ids) + p.max_tokens for ids, p in zip(prompts, params))
        if total > opts.max_tokens_per_request:
            raise ApiError(400, f"this request asks for {total} tokens (prompt tokens + max_tokens, summed over its "
                           f"prompts); this server takes at most {opts.max_tokens_per_request} per request "
                           "(--max-tokens-per-request); lower max_tokens or split the request",
                           param="max_tokens", code="too_many_tokens")

    def encode(self, text: str) -> List[int]:
        return list(self.engine.tokenizer(text)["input_ids"])

    def chat_prompt(self, body: ChatCompletionRequest, adapter: Optional[str]) -> str:
        """The tokenizer's chat template when it has one; else the adapter's training template."""
        tok = self.engine.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        roles = [m["role"] for m in messages]
        if roles not in (["user"], ["system", "user"]):
            raise ApiError(400, f"the tokenizer has no chat template, so only one user message (optionally after one "
                           f"system message) can be formatted; got roles {roles}", param="messages")
        text = "\n\n".join(m["content"] for m in messages)
        spec = self.engine.specs.get(adapter) if adapter is not None else None
        template = spec.template if spec is not None else (self.engine.default_template or "instruction")
        return text if template == "chat" else apply_template(template, text, tokenizer=tok)

    # -- responses -----------------------------------------------------------------------------------
    def failure(self, exc: BaseException, rid: str) -> ApiError:
        """The answer to a request that failed in the engine: 404 for an adapter unloaded while it
        waited, else a 500 in OpenAI's shape (logged with the request id)."""
        if isinstance(exc, UnknownAdapterError):
            return _not_found(exc.args[0])
        log.error("request %s failed in generation: %r", rid, exc, exc_info=exc)
        return ApiError(500, server_error_body(rid, "generation failed for this request")["error"]["message"],
                        "server_error")

    async def run(self, requests: List[GenerationRequest], rid: str):
        futures = [asyncio.wrap_future(self.engine.submit(r, group=rid)) for r in requests]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise self.failure(r, rid)
        return results

    def stream(self, request: GenerationRequest, chunk, final_usage: bool, rid: str):
        """SSE generator: ``chunk(text, finish_reason)`` builds each event's JSON."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request.on_delta = lambda text, done, reason: loop.call_soon_threadsafe(
            events.put_nowait, ("delta", text, reason))
        future = self.engine.submit(request, group=rid)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f, None)))

        async def gen():
            try:
                async for event in events_of():
                    yield event
            finally:   # done, or the client went away: either way the row need not run on
                request.abandoned = True

        async def events_of():
            first = chunk(None, None)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                kind, value, reason = await events.get()
                if kind == "delta":
                    if value or reason:
                        yield f"data: {json.dumps(chunk(value, reason))}\n\n"
                    continue
                exc = value.exception()
                if exc is not None:
                    yield f"data: {json.dumps(self.failure(exc, rid).body())}\n\n"
                elif final_usage:
                    res = value.result()
                    usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                             "total_tokens": res.prompt_tokens + len(res.token_ids)}
                    yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                return
        return StreamingResponse(gen(), media_type="text/event-stream")


def _headers(results) -> dict:
    return {"x-reft-batch-id": ",".join(str(r.batch_id) for r in results),
            "x-reft-batch-size": ",".join(str(r.batch_size) for r in results)}


def _usage(results) -> dict:
    p, c = sum(r.prompt_tokens for r in results), sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _rid(request: Request) -> str:
    return request.scope.get("reft_request_id") or uuid.uuid4().hex[:16]


def create_app(engine: Engine, served_model_name: str, max_model_len: Optional[int] = None,
               enable_runtime_adapters: bool = False, model_root: str = "",
               options: Optional[ServeOptions] = None) -> FastAPI:
    """The FastAPI app; starts ``engine``'s worker on startup and stops it on shutdown."""
    from contextlib import asynccontextmanager

    opts = options or ServeOptions()
    srv = _Server(engine, served_model_name, max_model_len, enable_runtime_adapters, model_root, opts)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="reft-kernels", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(Guard, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                             for e in errors)
        first = next(iter(errors), {})
        # a JSON syntax error's loc is the character offset: that is no parameter
        param = None if first.get("type") == "json_invalid" else \
            ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(error_body(f"invalid request body: {problems}", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, BodyTooLarge):
            return JSONResponse(too_large_body(opts.max_body_bytes), status_code=413)
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}"), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    if opts.debug:
        @app.get("/debug/stats")
        async def stats():
            return {"mode": engine.mode, "max_batch_size": engine.max_batch_size,
                    "batch_window_s": engine.batch_window_s, **engine.stats}

    @app.get("/v1/models")
    async def models():
        def card(name, root, parent):   # server paths only with --debug
            return {"id": name, "object": "model", "created": srv.created, "owned_by": "reft-kernels",
                    "root": root if opts.debug else name, "parent": parent, "max_model_len": srv.max_model_len}
        return {"object": "list", "data": [card(srv.name, srv.root, None)] + [
            card(name, spec.path, srv.name) for name, spec in list(engine.specs.items())]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        reject_bad_text(body)
        body.refuse_unsupported()
        adapter = srv.adapter_for(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [srv.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            if len(p) > opts.max_prompts_per_request:   # before tokenizing them all
                srv.check_limits([[]] * len(p), [])
            prompts = [srv.encode(x) if isinstance(x, str) else list(x) for x in p]
        if not prompts:
            raise ApiError(400, "prompt is an empty list; send a string or a list of strings", param="prompt")
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        params = [srv.params(body, len(ids), body.max_tokens, 16) for ids in prompts]
        srv.check_limits(prompts, params)
        reqs = [GenerationRequest(ids, adapter, sp) for ids, sp in zip(prompts, params)]
        cid, created, rid = f"cmpl-{uuid.uuid4().hex}", int(time.time()), _rid(request)
        if body.stream:
            if len(reqs) != 1:
                raise ApiError(400, "stream=true takes one prompt per request", param="prompt")

            def chunk(text, reason):
                if text is None:
                    return None
                return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
            return srv.stream(reqs[0], chunk, bool(body.stream_options and body.stream_options.include_usage), rid)
        results = await srv.run(reqs, rid)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                        for i, r in enumerate(results)],
            "usage": _usage(results)}, headers=_headers(results))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        reject_bad_text(body)
        body.refuse_unsupported()
        adapter = srv.adapter_for(body.model)
        ids = srv.encode(srv.chat_prompt(body, adapter))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = srv.params(body, len(ids), max_tokens, None, prompt_param="messages")
        srv.check_limits([ids], [params])
        req = GenerationRequest(ids, adapter, params)
        cid, created, rid = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), _rid(request)
        if body.stream:
            def chunk(text, reason):
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            return srv.stream(req, chunk, bool(body.stream_options and body.stream_options.include_usage), rid)
        results = await srv.run([req], rid)
        r = results[0]
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                         "finish_reason": r.finish_reason}],
            "usage": _usage(results)}, headers=_headers(results))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest, request: Request):
        if not srv.runtime_adapters:
            raise ApiError(404, RUNTIME_ADAPTERS_OFF, code="runtime_adapters_disabled")
        reject_bad_text(body)
        if body.lora_name == srv.name or body.lora_name in engine.specs:
            raise ApiError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
        try:
            if opts.allowed_adapter_dir is not None and not _inside(body.lora_path, opts.allowed_adapter_dir):
                raise AdapterError(f"{body.lora_path!r} is outside --allowed-adapter-dir {opts.allowed_adapter_dir!r}")
            await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        except Exception as exc:  # noqa: BLE001 - one answer for every unloadable path (see ADAPTER_NOT_LOADABLE)
            if isinstance(exc, ValueError) and body.lora_name in engine.specs:   # lost a race for the name
                raise ApiError(400, f"The lora adapter '{body.lora_name}' has already been loaded.",
                               param="lora_name") from None
            log.warning("request %s: runtime load of %r from %r refused: %s", _rid(request), body.lora_name,
                        body.lora_path, exc)
            raise ApiError(400, ADAPTER_NOT_LOADABLE, param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        if not srv.runtime_adapters:
            raise ApiError(404, RUNTIME_ADAPTERS_OFF, code="runtime_adapters_disabled")
        reject_bad_text(body)
        try:
            await run_in_threadpool(engine.unload_adapter, body.lora_name)
        except UnknownAdapterError:
            raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                           code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app
