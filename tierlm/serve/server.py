"""The HTTP server: OpenAI-compatible routes over one AsyncEngine.

    POST /v1/completions, POST /v1/chat/completions   (``stream: true`` -> server-sent events)
    GET  /v1/models, /health, /metrics

A request's path: validate (pydantic) -> tokenize (worker thread) -> SamplingParams -> engine
queue (AsyncEngine.add_request) -> RequestStream -> JSON response or SSE chunks. Every error
leaves as OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for anything wrong with
the request (FastAPI's 422 included), 429 when ``max_queue`` requests are in flight, 500/503 when
the engine fails. The ``model`` field is not checked: one model is served, and responses name it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierlm.engine.engine import RequestError
from tierlm.loader.chat_templates import with_template_stops
from tierlm.loader.tokenizer import TokenizerError
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams, SamplingParamsError
from tierlm.serve.async_engine import AsyncEngine, EngineDeadError, EngineStepError, QueueFullError, RequestStream
from tierlm.serve.metrics import ServerMetrics
from tierlm.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
    Usage,
)

log = logging.getLogger("tierlm.serve")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def _error_response(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                    code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


# long: the routes are closures over one engine, its metrics and the model's name, declared where the app is
def build_app(llm, served_model_name: str, max_queue: int = 64) -> FastAPI:
    """An app serving ``llm`` (a tierlm.LLM); its engine thread runs while the app's lifespan does."""
    metrics = ServerMetrics()
    engine = AsyncEngine(llm.engine, metrics, max_queue=max_queue)
    max_model_len = llm.config.model.max_model_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="tierlm", lifespan=lifespan)
    app.state.engine = engine

    # -- errors -------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError) -> JSONResponse:
        return _error_response(err.status, err.message, err.param, err.type, err.code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc and not loc[0].isdigit() and first.get("type") != "json_invalid" else None
        where = ".".join(loc) if param else "body"
        return _error_response(400, f"{where}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(err.status_code, str(err.detail), type="invalid_request_error"
                               if err.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return _error_response(500, f"internal error: {type(err).__name__}: {err}", type="server_error")

    # -- info routes --------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return _error_response(503, "the engine is not running", type="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name, max_model_len=max_model_len)])

    # -- tokenizer routes (llama-server's names, with vLLM's fields too) ----------------------------
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ids = await run_in_threadpool(_tokenize, llm, body)
        tokens = [TokenPiece(id=i, piece=piece(i)) for i in ids] if body.with_pieces else ids
        return TokenizeResponse(tokens=tokens, count=len(ids), max_model_len=max_model_len)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        _check_token_ids(llm, body.tokens, "tokens")
        if llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "tokens")
        text = await run_in_threadpool(llm.tokenizer.decode, body.tokens, False)
        return DetokenizeResponse(content=text, prompt=text)

    # -- generation ---------------------------------------------------------------------------
    def piece(token_id: int) -> str:
        return llm.tokenizer.decode([token_id], skip_special_tokens=False) if llm.tokenizer else str(token_id)

    async def submit(ids: list[int], params: SamplingParams, text: str | None, prompt_param: str) -> RequestStream:
        try:
            return await engine.add_request(ids, params, prompt=text)
        except QueueFullError as err:
            raise APIError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded") from None
        except RequestError as err:
            raise APIError(400, str(err), prompt_param) from None
        except EngineDeadError as err:
            raise APIError(503, str(err), type="server_error") from None

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        _reject_unsupported(body, echo=body.echo, best_of=body.best_of not in (None, 1), suffix=bool(body.suffix))
        ids, text = await run_in_threadpool(_encode_prompt, llm, body.prompt)
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = _sampling_params(body, max_tokens, body.logprobs)
        stream = await submit(ids, params, text, "prompt")
        rid, name = f"cmpl-{uuid.uuid4().hex}", served_model_name

        def logprobs_of(out: RequestOutput, new_only: bool, offset: int) -> CompletionLogprobs | None:
            if body.logprobs is None or out.logprobs is None:
                return None
            return CompletionLogprobs.of(_new_logprobs(out) if new_only else out.logprobs, piece, offset)

        if body.stream:
            num_sent_chars = 0  # the next chunk's logprob text offset

            def chunks(out: RequestOutput) -> list[BaseModel]:
                nonlocal num_sent_chars
                lp = logprobs_of(out, True, num_sent_chars)
                num_sent_chars += len(out.new_text)
                if not (out.new_text or out.finished or (lp and lp.tokens)):
                    return []
                choice = CompletionChoice(text=out.new_text, logprobs=lp, finish_reason=_finish_reason(out))
                return [CompletionResponse(id=rid, model=name, choices=[choice])]

            usage = (lambda out: CompletionResponse(id=rid, model=name, choices=[], usage=_usage(out))) \
                if body.include_usage else None
            return _sse_response(stream, [], chunks, usage)
        out = await _collect(stream, request)
        choice = CompletionChoice(text=out.text, logprobs=logprobs_of(out, False, 0), finish_reason=_finish_reason(out))
        return JSONResponse(CompletionResponse(id=rid, model=name, choices=[choice], usage=_usage(out)).model_dump())

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        _reject_unsupported(body)
        messages = [m.as_template_dict() for m in body.messages]
        try:
            ids = await run_in_threadpool(llm.chat_token_ids, messages)
        except (TokenizerError, RequestError) as err:
            raise APIError(400, str(err), "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, max_model_len - len(ids))
        params = _sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        params = with_template_stops(llm.tokenizer, params)  # the plain transcript's next "User:" ends it
        stream = await submit(ids, params, None, "messages")
        rid, name = f"chatcmpl-{uuid.uuid4().hex}", served_model_name

        def logprobs_of(out: RequestOutput, new_only: bool) -> ChatLogprobs | None:
            if not body.logprobs or out.logprobs is None:
                return None
            return ChatLogprobs.of(_new_logprobs(out) if new_only else out.logprobs, piece)

        if body.stream:
            def chunks(out: RequestOutput) -> list[BaseModel]:
                lp = logprobs_of(out, True)
                if not (out.new_text or out.finished or (lp and lp.content)):
                    return []
                choice = ChatChunkChoice(delta=ChatDelta(content=out.new_text or None), logprobs=lp,
                                         finish_reason=_finish_reason(out))
                return [ChatCompletionChunk(id=rid, model=name, choices=[choice])]

            first = ChatCompletionChunk(id=rid, model=name,
                                        choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
            usage = (lambda out: ChatCompletionChunk(id=rid, model=name, choices=[], usage=_usage(out))) \
                if body.include_usage else None
            return _sse_response(stream, [first], chunks, usage)
        out = await _collect(stream, request)
        choice = ChatChoice(message=ChatMessageOut(content=out.text), logprobs=logprobs_of(out, False),
                            finish_reason=_finish_reason(out))
        body = ChatCompletionResponse(id=rid, model=name, choices=[choice], usage=_usage(out))
        return JSONResponse(body.model_dump())

    return app


# -- request -> engine ----------------------------------------------------------------------------

def _reject_unsupported(body, **unsupported: bool) -> None:
    if body.n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", "n")
    if body.logit_bias:
        unsupported["logit_bias"] = True
    for name, present in unsupported.items():
        if present:
            raise APIError(400, f"{name} is not supported by this server", name)


def _encode_prompt(llm, prompt) -> tuple[list[int], str | None]:
    """(token ids, text or None). Runs in a worker thread: the tokenizer is thread-safe."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as token ids", "prompt")
        return llm.tokenizer.encode(prompt), prompt
    _check_token_ids(llm, prompt, "prompt")
    return list(prompt), None


def _check_token_ids(llm, ids: list[int], param: str) -> None:
    vocab = llm.arch.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param)


def _tokenize(llm, body: TokenizeRequest) -> list[int]:
    """The ids of /tokenize's text (runs in a worker thread, as _encode_prompt)."""
    if (body.content is None) == (body.prompt is None):
        raise APIError(400, "send the text as exactly one of 'content' (llama-server) or 'prompt' (vLLM)", "content")
    if llm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", "content" if body.content is not None else "prompt")
    flags = [f for f in (body.add_special, body.add_special_tokens) if f is not None]
    return llm.tokenizer.encode(body.content if body.content is not None else body.prompt,
                                add_special_tokens=flags[0] if flags else True)


def _sampling_params(body, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return body.to_sampling_params(max_tokens, logprobs)
    except SamplingParamsError as err:
        raise APIError(400, str(err), body.request_field(err.field)) from None


# -- engine -> response ---------------------------------------------------------------------------

def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


def _usage(out: RequestOutput) -> Usage:
    return Usage.of(len(out.prompt_token_ids), len(out.token_ids))


def _new_logprobs(out: RequestOutput) -> list:
    num_new = len(out.new_token_ids)
    return out.logprobs[len(out.logprobs) - num_new:] if out.logprobs and num_new else []


async def _collect(stream: RequestStream, request: Request) -> RequestOutput:
    """The finished output. A client that leaves first gets its request aborted (checked twice a second)."""
    async def close_on_disconnect() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        stream.close()

    watcher = asyncio.create_task(close_on_disconnect())
    final = None
    try:
        async for out in stream:
            final = out
    except (EngineStepError, EngineDeadError) as err:
        raise APIError(500, str(err), type="server_error") from None
    finally:
        watcher.cancel()
        stream.close()
    if final is None or not final.finished:
        raise APIError(499, "the client closed the request")  # nobody reads this
    return final


def _sse_response(stream: RequestStream, first: list[BaseModel], chunks: Callable[[RequestOutput], list[BaseModel]],
                  usage_chunk: Callable[[RequestOutput], BaseModel] | None) -> StreamingResponse:
    """SSE in OpenAI's framing: ``data: <json>`` events, then ``data: [DONE]``.

    When the client disconnects, Starlette cancels this generator; its ``finally`` closes the
    stream, which aborts the request and frees its KV blocks.
    """
    async def events() -> AsyncIterator[str]:
        try:
            for chunk in first:
                yield f"data: {chunk.model_dump_json()}\n\n"
            final = None
            async for out in stream:
                final = out
                for chunk in chunks(out):
                    yield f"data: {chunk.model_dump_json()}\n\n"
            if usage_chunk is not None and final is not None:
                yield f"data: {usage_chunk(final).model_dump_json()}\n\n"
        except (EngineStepError, EngineDeadError) as err:
            # The status line is gone; OpenAI clients raise on an event that carries "error".
            err_body = ErrorResponse(error=ErrorInfo(message=str(err), type="server_error"))
            yield f"data: {err_body.model_dump_json()}\n\n"
        finally:
            stream.close()
        yield "data: [DONE]\n\n"

    # The background close covers a client gone before the first event: Starlette then never
    # starts the generator, so its ``finally`` would not run.
    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(stream.close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- running --------------------------------------------------------------------------------------

def default_model_name(llm) -> str:
    path = Path(llm.config.model.model)
    return path.stem if path.suffix == ".gguf" else path.name


def serve(llm, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 64,
          served_model_name: str | None = None, access_log: bool = False, started: float | None = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM); open streams get 5 s to finish. Once the socket
    listens and the engine thread runs, logs one readiness line with the address clients reach
    (the port the OS chose, for port 0): ``ready in S s: serving NAME on http://HOST:PORT/v1``,
    S counted from ``started`` (a perf_counter() time; None: from this call)."""
    import uvicorn

    started = time.perf_counter() if started is None else started
    name = served_model_name or default_model_name(llm)
    app = build_app(llm, name, max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log,
                            timeout_graceful_shutdown=5)
    server = _announcing_server(config, lambda urls: log.info("ready in %.1f s: serving %s on %s",
                                                              time.perf_counter() - started, name, ", ".join(urls)))
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully; as uvicorn.run, end quietly
        return
    if not server.started:  # uvicorn logged why (the address went away between the check and the bind)
        raise OSError(f"the server could not listen on {host}:{port}")


def _announcing_server(config, announce: Callable[[list[str]], None]):
    """A uvicorn.Server that calls ``announce`` with its URLs once it listens (uvicorn's own line
    prints the address asked for, port 0 included)."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                announce([_url(sock.getsockname()) for srv in self.servers for sock in srv.sockets])

    return AnnouncingServer(config)


def _url(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
