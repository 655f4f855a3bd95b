"""``python -m bot serve``: the local engine behind an OpenAI-compatible HTTP API.

Any client of OpenAI-compatible servers (the ``openai`` package, the bot's remote backend on
other machines, a web page) can use the fine-tuned model, and the engine's continuous batching
and prefix cache work across HTTP requests: each request joins the running batch; a dialogue's
next turn, sent as the whole conversation, starts from the keys/values its previous turn left
(found by ``user``, or by the longest cached text the prompt extends).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (messages rendered in the
project's dialogue format; the system message becomes the persona, ``SYSTEM_PROMPT`` when there
is none), ``GET /v1/models``, ``POST /tokenize``, ``GET /healthz`` (503 until the model is warm),
``GET /metrics`` (Prometheus). Statuses: 400 for a bad body or a prompt that does not fit (vLLM's
wording), 401 without a valid key when ``API_KEYS`` is set, 404 for another model name, 429 with
``Retry-After`` when the queue is full, 503 while loading or shutting down or after a timeout.
A client that goes away mid-request (streamed or not) has its row dropped at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bot.config import Settings
from bot.engine.generation import GenerationEngine
from bot.engine.openai_api import (
    CompletionRequest,
    RequestError,
    ResponseShape,
    delta,
    error_body,
    model_card,
    parse_request,
)
from bot.engine.requests import (
    Completion,
    ContextLengthError,
    EngineBusy,
    EngineClosed,
    EngineTimeout,
    stop_token_ids,
)
from dataset_tools.dialogue_format import SPEAKER_TAGS, parse_reply, render_prompt
from models.loading import count_parameters

logger = logging.getLogger(__name__)

#: Seconds a client is told to wait after a 429 (a reply takes about this long on a CPU).
RETRY_AFTER_S = 2
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ServerMetrics:
    """What ``GET /metrics`` shows (its own registry: tests run several servers)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "server_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "server_prompt_tokens", "prompt tokens of finished requests", registry=self.registry
        )
        self.cached_tokens = Counter(
            "server_cached_prompt_tokens",
            "prompt tokens served from the prefix cache",
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "server_generation_tokens", "tokens generated", registry=self.registry
        )
        self.seconds = Histogram(
            "server_request_seconds",
            "time to the whole completion",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
            registry=self.registry,
        )
        self.queue_depth = Gauge("server_queue_depth", "requests waiting", registry=self.registry)
        self.running = Gauge("server_running_rows", "rows being decoded", registry=self.registry)
        self.threads = Gauge(
            "server_engine_threads",
            "threads the engine decodes with (fewer while the cores are shared)",
            registry=self.registry,
        )
        self.stalls = Gauge(
            "server_engine_openmp_stalls",
            "times decoding was found waiting on another thread's OpenMP pool (see the log)",
            registry=self.registry,
        )

    def watch(self, engine: GenerationEngine) -> None:
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.active_rows)
        self.threads.set_function(lambda: engine.worker_threads)
        self.stalls.set_function(lambda: engine.openmp_stalls)

    def count(self, completion: Completion) -> None:
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.cached_tokens.inc(completion.cached_tokens)
        self.generated_tokens.inc(len(completion.token_ids))


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, status), status=status, headers=headers)


class InferenceServer:
    """The HTTP routes over one :class:`GenerationEngine` (set once it is warm)."""

    def __init__(
        self,
        *,
        model_name: str,
        model_root: str,
        api_keys: frozenset[str] = frozenset(),
        dtype: str = "float32",
        quantization: str | None = None,
    ) -> None:
        self.engine: GenerationEngine | None = None
        self.model_name = model_name
        self.model_root = model_root
        self.api_keys = api_keys
        self.dtype = dtype
        self.quantization = quantization
        self.metrics = ServerMetrics()
        self._parameters = 0

    def attach(self, engine: GenerationEngine) -> None:
        """The engine is warm: start serving it."""
        self.engine = engine
        self._parameters = count_parameters(engine.model)
        if self.dtype == "auto":  # what it resolved to on this machine
            self.dtype = str(engine.model.dtype).removeprefix("torch.")
        self.metrics.watch(engine)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=8 * 2**20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_view)
        return app

    # -- plumbing ----------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Bearer keys on the API routes (``API_KEYS``); health and metrics stay open."""
        route = request.path
        if self.api_keys and (route.startswith("/v1/") or route == "/tokenize"):
            given = request.headers.get("Authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(token, key) for key in self.api_keys):
                self.metrics.requests.labels(route, "401").inc()
                return _error("Unauthorized: a valid API key is required", 401)
        response = await handler(request)
        self.metrics.requests.labels(route, str(response.status)).inc()
        return response

    def _ready(self) -> GenerationEngine:
        if self.engine is None:
            raise web.HTTPServiceUnavailable(
                text=json.dumps(error_body("the model is still loading", 503)),
                content_type="application/json",
            )
        return self.engine

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            return await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None

    # -- routes ------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        ready = self.engine is not None
        return web.json_response({"model": ready}, status=200 if ready else 503)

    async def metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), content_type="text/plain", charset="utf-8"
        )

    async def models(self, request: web.Request) -> web.Response:
        engine = self._ready()
        card = model_card(
            self.model_name,
            self.model_root,
            engine.context_tokens,
            self.dtype,
            self.quantization or "none",
            self._parameters,
        )
        return web.json_response({"object": "list", "data": [card]})

    async def tokenize(self, request: web.Request) -> web.Response:
        engine = self._ready()
        try:
            body = await self._body(request)
            if isinstance(body, dict) and "messages" in body:
                parsed = parse_request(
                    body, chat=True, served_model=self.model_name, vocab_size=self._vocab(engine)
                )
                text = self._chat_prompt(engine, parsed)
            elif isinstance(body, dict) and isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise RequestError("give prompt (a string) or messages", param="prompt")
        except RequestError as error:
            return _error(str(error), error.status)
        tokens = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        return web.json_response(
            {"count": len(tokens), "max_model_len": engine.context_tokens, "tokens": tokens}
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    @staticmethod
    def _vocab(engine: GenerationEngine) -> int:
        return engine.model.get_input_embeddings().weight.shape[0]

    @staticmethod
    def _chat_prompt(engine: GenerationEngine, parsed: CompletionRequest) -> str:
        assert parsed.turns is not None
        persona = parsed.persona if parsed.persona is not None else engine.persona
        return render_prompt(parsed.turns, persona or None)

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        engine = self._ready()
        try:
            parsed = parse_request(
                await self._body(request),
                chat=chat,
                served_model=self.model_name,
                vocab_size=self._vocab(engine),
            )
        except RequestError as error:
            return _error(str(error), error.status)
        eos = engine.tokenizer.eos_token_id
        if chat:  # a reply ends where the next speaker's tag would begin
            prompt: str | list[int] = self._chat_prompt(engine, parsed)
            vocab = engine.tokenizer.get_vocab()
            stop = parsed.stop + tuple(t for t in SPEAKER_TAGS if t not in vocab)
            stop_ids = [*stop_token_ids(engine.tokenizer), *parsed.stop_token_ids]
        else:
            assert parsed.prompt is not None
            prompt, stop, stop_ids = parsed.prompt, parsed.stop, [eos, *parsed.stop_token_ids]
        count = len(prompt) if isinstance(prompt, list) else engine.count_tokens(prompt)
        max_tokens = parsed.max_tokens or max(engine.context_tokens - count, 1)
        if count + max_tokens > engine.context_tokens:
            return _error(str(ContextLengthError(engine.context_tokens, count, max_tokens)), 400)
        job = _Job(
            engine,
            prompt,
            replace(parsed.params, max_new_tokens=max_tokens),
            key=("user", parsed.user) if parsed.user else None,
            stop=stop,
            stop_ids=stop_ids,
            view=(lambda raw: parse_reply(raw, eos_token=engine.tokenizer.eos_token))
            if chat
            else (lambda raw: raw),
        )
        shape = ResponseShape(self.model_name, chat=chat)
        with self.metrics.seconds.time():
            if parsed.stream:
                return await self._stream(request, job, shape, parsed.include_usage)
            try:
                completion = await job.run()
            except _Refused as refused:
                return refused.response
            self.metrics.count(completion)
            usage = shape.usage(
                completion.prompt_tokens, len(completion.token_ids), completion.cached_tokens
            )
            body = shape.whole(
                job.view(completion.text), completion.finish_reason, completion.stop_reason, usage
            )
            return web.json_response(body)

    async def _stream(
        self, request: web.Request, job: _Job, shape: ResponseShape, include_usage: bool
    ) -> web.StreamResponse:
        """Server-sent events: text deltas, the finish reason, the usage if asked, ``[DONE]``."""
        job.start()
        await asyncio.sleep(0)  # the engine refuses a full queue at once: still time for a 429
        if job.task is not None and job.task.done():
            try:
                job.task.result()
            except _Refused as refused:
                return refused.response
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            await response.write(f"data: {data}\n\n".encode())

        sent = ""
        try:
            if shape.chat:
                await send(shape.chunk(None, role=True))
            async for text in job.texts():
                more = delta(sent, text)
                if more:
                    sent = text
                    await send(shape.chunk(more))
            try:
                completion = await job.run()
            except _Refused as refused:  # after the header: the error goes in the stream
                await send({"error": refused.body["error"]})
                await send("[DONE]")
                return response
            self.metrics.count(completion)
            rest = delta(sent, job.view(completion.text)) or ""
            await send(shape.chunk(rest, completion.finish_reason, completion.stop_reason))
            if include_usage:
                usage = shape.usage(
                    completion.prompt_tokens, len(completion.token_ids), completion.cached_tokens
                )
                await send(shape.usage_chunk(usage))
            await send("[DONE]")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            logger.info("client left mid-stream: its row is dropped")
        finally:
            job.cancel()
        return response


class _Refused(Exception):
    """The engine could not take or finish the request: the HTTP answer to give instead."""

    def __init__(self, message: str, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.body = error_body(message, status)
        self.response = _error(message, status, headers)


class _Job:
    """One completion running in the engine, with its streamed texts in a queue."""

    def __init__(
        self,
        engine: GenerationEngine,
        prompt: str | list[int],
        params: Any,
        *,
        key: Any,
        stop: tuple[str, ...],
        stop_ids: list[int],
        view: Any,
    ) -> None:
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.key = key
        self.stop = stop
        self.stop_ids = stop_ids
        self.view = view
        self.task: asyncio.Task[Completion] | None = None
        self._texts: asyncio.Queue[str] = asyncio.Queue()

    async def _complete(self, on_text: Any = None) -> Completion:
        try:
            return await self.engine.complete(
                self.prompt,
                self.params,
                key=self.key,
                stop=self.stop,
                stop_token_ids=self.stop_ids,
                on_text=on_text,
            )
        except EngineBusy:
            raise _Refused(
                "the server is busy: too many requests are waiting, retry later",
                429,
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except EngineTimeout:
            raise _Refused("the request timed out in the queue or while generating", 503) from None
        except EngineClosed:
            raise _Refused("the server is shutting down", 503) from None
        except ContextLengthError as error:
            raise _Refused(str(error), 400) from None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._complete(self._texts.put_nowait))

    async def run(self) -> Completion:
        """The whole completion (started here unless :meth:`start` streamed it)."""
        if self.task is None:
            return await self._complete()
        return await self.task

    async def texts(self) -> Any:
        """The view of the text so far, each time it grows, until the completion ends."""
        assert self.task is not None
        while True:
            getter = asyncio.ensure_future(self._texts.get())
            done, _ = await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            yield self.view(getter.result())

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the engine drops the row at its next step


def served_name(settings: Settings) -> str:
    return settings.served_model_name or Path(settings.model_path).name or settings.model_path


async def run_server(settings: Settings, host: str, port: int) -> None:
    """Listen at once (``/healthz`` says 503 while the model loads), serve until a signal."""
    from bot.engine.factory import open_local_engine

    if not settings.server_api_keys and host not in LOOPBACK:
        logger.warning("serving on %s with no API_KEYS: anyone who can reach it may use it", host)
    server = InferenceServer(
        model_name=served_name(settings),
        model_root=settings.model_path,
        api_keys=settings.server_api_keys,
        dtype=settings.model_dtype,
        quantization=settings.model_quantize if settings.model_quantize != "none" else None,
    )
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info("listening on http://%s:%d (loading the model)", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    engine = None
    loading = asyncio.ensure_future(open_local_engine(settings))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():  # asked to stop while loading
            loading.cancel()
            return
        engine = loading.result()
        server.attach(engine)
        logger.info("serving %s at http://%s:%d/v1", server.model_name, host, port)
        await stopping
    finally:
        stopping.cancel()
        await runner.cleanup()
        if engine is not None:
            await engine.aclose()
        logger.info("stopped: model released")
