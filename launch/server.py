"""`python -m launch serve`: OpenAI's HTTP API on rank 0, continuous batching through the pipeline.

Rank 0 runs uvicorn (FastAPI) in a thread and the scheduler (distributed/scheduler.py Engine) in
the main thread; the other ranks serve their stages as for any command. The HTTP server starts
before the model loads, so /health answers 503 until it is ready; the URL is printed once the
model is loaded. A lost stage ends every open request with an error, turns /health to 503 and
ends the process non-zero (the other ranks follow within the process-group timeout).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from distributed.pipeline import DEFAULT_CHUNK_NO_WINDOW, Pipeline
from distributed.scheduler import Engine, Scheduler, Sequence
from launch.commands import Command
from launch.openai_api import ApiError, Job, Reply, parse, usage
from launch.options import ServeOptions
from launch.runtime import Runtime, log
from model.args import ConfigError
from model.tokenizer import StreamDecoder, Tokenizer

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    """Prometheus instruments in a registry of their own (nothing global)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.finished = Counter("serve_sequences_finished", "sequences ended, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("serve_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("serve_generation_tokens", "tokens generated", registry=r)
        self.queue = Gauge("serve_queue_depth", "sequences waiting for a slot", registry=r)
        self.running = Gauge("serve_running_sequences", "sequences holding a slot", registry=r)
        self.ttft = Histogram("serve_time_to_first_token_seconds", "arrival to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("serve_inter_token_latency_seconds", "between a sequence's tokens", buckets=ITL_BUCKETS,
                             registry=r)
        self.busy = Gauge("serve_stage_busy_fraction", "fraction of the last ~10 s a stage computed", ["stage"],
                          registry=r)
        self.busy_seconds = Gauge("serve_stage_busy_seconds", "seconds a stage computed since start", ["stage"],
                                  registry=r)
        self._samples: deque[tuple[float, list[float]]] = deque()
        self._last = 0.0

    def update(self, engine: Engine, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.25:
            return
        self._last = now
        sched = engine.scheduler
        self.queue.set(engine.queue_depth)
        self.running.set(sched.n_running)
        busy = list(sched.busy_seconds)
        self._samples.append((now, busy))
        while len(self._samples) > 2 and now - self._samples[1][0] >= 10:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        for s, b in enumerate(busy):
            self.busy_seconds.labels(str(s)).set(b)
            if now > t0:
                self.busy.labels(str(s)).set(min(1.0, max(0.0, (b - b0[s]) / (now - t0))))


class Outbox:
    """Events from the engine thread, handed to the event loop once per engine step: one wake-up
    of the HTTP thread per step instead of one per token (each wake-up costs a GIL hand-off)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._lock = threading.Lock()

    def put(self, q: asyncio.Queue[Any], item: Any) -> None:
        with self._lock:
            self._items.append((q, item))

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if items and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class Track:
    """One sequence seen from its HTTP request: text deltas (stop strings cut) and the end, posted
    from the engine thread to the request's asyncio queue."""

    def __init__(self, index: int, tok: Tokenizer, stop: list[str], events: asyncio.Queue[tuple[int, str, str | None]],
                 outbox: Outbox, metrics: Metrics) -> None:
        self.index, self.stop, self.events, self.outbox, self.metrics = index, stop, events, outbox, metrics
        self.decoder = StreamDecoder(tok)
        self.text, self.sent, self.stopped = "", 0, False
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        self.arrival = time.perf_counter()
        self.last: float | None = None

    def _post(self, text: str, reason: str | None) -> None:
        self.outbox.put(self.events, (self.index, text, reason))

    def _cut(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def on_token(self, seq: Sequence, tok: int) -> bool:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.metrics.generation_tokens.inc()
        self.text += self.decoder.push(tok)
        self._cut()
        if self.stopped:
            return False
        # One event per token, its text possibly empty (held back: an incomplete UTF-8 sequence, a
        # stop string that may be forming): a stream then carries one chunk per generated token, as
        # vLLM's does, so its clients see every token's timing.
        safe = max(self.sent, len(self.text) - self.hold)
        self._post(self.text[self.sent : safe], None)
        self.sent = safe
        return True

    def on_finish(self, seq: Sequence) -> None:
        reason = seq.finish_reason or "stop"
        if not self.stopped and not reason.startswith("error"):
            self.text += self.decoder.flush()
            self._cut()
        self.metrics.finished.labels(reason.split(":")[0]).inc()
        self._post(self.text[self.sent :], reason)
        self.sent = len(self.text)


class State:
    def __init__(self, opts: ServeOptions, name: str) -> None:
        self.opts, self.name = opts, name
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.outbox = Outbox()
        self.tok: Tokenizer | None = None
        self.vocab, self.capacity = 0, 0
        self.window: int | None = None
        self.eos: tuple[int, ...] = ()


def _check_auth(state: State, authorization: str | None) -> None:
    key = state.opts.api_key
    if key and not secrets.compare_digest((authorization or "").encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _fit(state: State, job: Job, explicit: bool) -> None:
    """Prompts must fit a slot (models without a window); max_tokens shrinks to fit if not given."""
    if state.window is not None:
        return
    for p in job.prompts:
        room = state.capacity - len(p)
        if room < 1 or (explicit and job.max_tokens > room):
            raise ApiError(400, f"this model's context is {state.capacity} tokens; the prompt has {len(p)} and "
                           f"max_tokens is {job.max_tokens}: shorten them", "prompt", "context_length_exceeded")
        job.max_tokens = min(job.max_tokens, room)


async def _complete(state: State, request: Request, chat: bool) -> Any:
    _check_auth(state, request.headers.get("authorization"))
    engine = state.engine
    if engine is None or engine.error is not None or state.tok is None:
        raise ApiError(503, "the model is not ready" if engine is None else f"the pipeline failed: {engine.error}",
                       kind="server_error")
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if isinstance(body, dict) and body.get("model") not in (None, state.name):
        raise ApiError(404, f"model {body.get('model')!r} does not exist; this server has {state.name!r}", "model",
                       "model_not_found")
    job = parse(body, state.tok, state.vocab, state.opts.max_tokens, chat)
    _fit(state, job, explicit=isinstance(body, dict) and (body.get("max_tokens") or body.get("max_completion_tokens"))
         is not None)
    if engine.queue_depth + len(job.prompts) > state.opts.max_queue + max(0, state.opts.max_batch
                                                                            - engine.scheduler.n_running):
        raise ApiError(429, "the queue is full; retry shortly", code="queue_full")
    state.outbox.loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()
    tracks = [Track(i, state.tok, job.stop, events, state.outbox, state.metrics) for i in range(len(job.prompts))]
    seqs = [Sequence(p, job.max_tokens, job.sampling, state.eos, i, t.on_token, t.on_finish)
            for i, (p, t) in enumerate(zip(job.prompts, tracks, strict=True))]
    state.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
    for s in seqs:
        engine.submit(s)
    state.outbox.flush()  # a pipeline that already failed answered at once
    reply = Reply(state.name, chat)

    def tally() -> dict[str, int]:
        return usage(sum(len(p) for p in job.prompts), sum(len(s.out) for s in seqs))

    def cancel() -> None:
        for s in seqs:
            if s.finish_reason is None:
                s.cancelled = True

    if job.stream:
        async def sse() -> Any:
            try:
                if chat:
                    for i in range(len(seqs)):
                        yield f"data: {json.dumps(reply.chunk(i, None, None, first=True))}\n\n"
                left = len(seqs)
                while left:
                    i, text, reason = await events.get()
                    if reason is not None and reason.startswith("error"):
                        err = ApiError(500, f"generation failed: {reason[len('error: '):]}", kind="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        return
                    # a token's chunk; or the end, with what text was still held back
                    yield f"data: {json.dumps(reply.chunk(i, text if reason is None else text or None, reason))}\n\n"
                    if reason is not None:
                        left -= 1
                if job.include_usage:
                    yield f"data: {json.dumps(reply.usage_chunk(tally()))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel()  # a client that hung up frees its slots

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts, reasons = [""] * len(seqs), [""] * len(seqs)
    left = len(seqs)
    try:
        while left:
            try:
                i, text, reason = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            texts[i] += text
            if reason is not None:
                if reason.startswith("error"):
                    raise ApiError(500, f"generation failed: {reason[len('error: '):]}", kind="server_error")
                reasons[i], left = reason, left - 1
    finally:
        cancel()
    return JSONResponse(reply.whole(texts, reasons, tally()))


def build_app(state: State) -> Any:
    app = FastAPI(title="mistral-pipeline", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(state, request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        _check_auth(state, request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0,
                                            "owned_by": "mistral-pipeline"}]}

    @app.get("/health")
    async def health() -> Any:
        e = state.engine
        if e is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if e.error is not None:
            return JSONResponse({"status": "error", "error": e.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Any:
        if state.engine is not None:
            state.metrics.update(state.engine, force=True)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        # Plain ASGI (not BaseHTTPMiddleware), so streams and disconnects pass through untouched.
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def send_counted(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                state.metrics.requests.labels(path, str(msg["status"])).inc()
            await send(msg)

        await app(scope, receive, send_counted)

    return counted


class Serve(Command):
    def __init__(self, rt: Runtime, model_dir: Path, opts: ServeOptions) -> None:
        super().__init__(rt, model_dir)
        self.opts = opts
        self.batch = opts.max_batch
        name = opts.model_name or (model_dir.stem if model_dir.suffix == ".gguf" else model_dir.name)
        self.state = State(opts, name)
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def prepare(self) -> Pipeline:
        o = self.opts
        for flag, low in (("max_batch", 1), ("max_queue", 0), ("token_budget", 1), ("max_context", 2)):
            if getattr(o, flag) < low:
                raise ConfigError(f"--{flag} must be >= {low}, got {getattr(o, flag)}")
        if not 0 <= o.port < 65536:
            raise ConfigError(f"--port must be in [0, 65535], got {o.port}")
        if o.itl_cap != 0 and not o.itl_cap > 1:
            raise ConfigError(f"--itl_cap must be above 1 (decode steps) or 0 (off), got {o.itl_cap}")
        if self.rt.rank == 0:
            self._start_http()  # /health says 503 while the model loads
        pipeline = super().prepare()
        if self.rt.rank == 0:
            assert self.tok is not None
            args = pipeline.stage.model.args
            s = self.state
            s.tok, s.vocab, s.window, s.eos = self.tok, args.vocab_size, args.sliding_window, self.tok.eos_ids
            s.capacity = args.sliding_window or o.max_context
        return pipeline

    def _start_http(self) -> None:
        import uvicorn
        config = uvicorn.Config(build_app(self.state), host=self.opts.host, port=self.opts.port,
                                log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"cannot listen on {self.opts.host}:{self.opts.port} (in use?); choose another "
                                  "--port or --host")
            time.sleep(0.02)

    def run(self, pipeline: Pipeline) -> None:
        o, s = self.opts, self.state
        args = pipeline.stage.model.args
        chunk = o.chunk_size or args.sliding_window or DEFAULT_CHUNK_NO_WINDOW
        lanes = o.num_microbatches or self.rt.n_stages
        sched = Scheduler(pipeline, o.max_batch, lanes, s.capacity, chunk, o.token_budget, o.static_batching,
                          o.merge_steps != "never", learn_merge=o.merge_steps == "auto", itl_cap=o.itl_cap)
        engine = Engine(sched, keepalive_s=max(0.5, o.dist_timeout / 4))
        def on_step(_: Scheduler) -> None:
            s.outbox.flush()
            s.metrics.update(engine)

        engine.on_step = on_step
        s.engine = engine
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: engine.request_stop())
        port = self.server.servers[0].sockets[0].getsockname()[1] if self.server.servers else o.port
        log(f"serving {s.name} at http://{o.host}:{port}/v1 ({self.rt.n_stages} stage(s), {o.max_batch} slots of "
            f"{s.capacity} tokens, {len(sched.lanes)} lane(s))")
        try:
            engine.run()
        finally:
            sched.fail("error: the server is shutting down")
            s.outbox.flush()
            self.server.should_exit = True
            if self.thread is not None:
                self.thread.join(timeout=5)
        sched.close()
