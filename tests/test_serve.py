"""`python -m launch serve` through the official openai client: equal to offline generate (P = 1, 2),
continuous batching under 32 concurrent clients, hang-ups, bad requests, metrics, a killed stage."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from common import BASE, CONFIGS, write_model
from serve_common import ServerProcess, offline

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

TEXTS = ["Once upon a time", "The quick brown fox jumps over", "a", "Hello world, this is a longer prompt "
         "that takes more than one chunk of the window to prefill"]
MAX = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("serve") / "m", CONFIGS["dense"])


@pytest.fixture(scope="module")
def nowindow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("serve") / "nowindow", dict(BASE), seed=3)


def client(srv: ServerProcess, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module", params=[1, 2], ids=["P1", "P2"])
def server(request: pytest.FixtureRequest, model: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(model, ["--max_batch", "8", "--token_budget", "8", "--dist_timeout", "60"],
                        nproc=request.param)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _stream_text(stream: object) -> tuple[str, str | None]:
    text, reason, _ = _stream(stream)
    return text, reason


def _stream(stream: object) -> tuple[str, str | None, int]:
    """(text, finish reason, chunks before the end that are not chat's opening role chunk)."""
    text, reason, tokens = "", None, 0
    for chunk in stream:  # type: ignore[attr-defined]
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            text += piece or ""
            reason = c.finish_reason or reason
            tokens += c.finish_reason is None and getattr(getattr(c, "delta", None), "role", None) is None
    return text, reason, tokens


@pytest.mark.timeout(600)
def test_completions_and_chat_equal_offline_generate(server: ServerProcess, model: Path, tmp_path: Path) -> None:
    ref = offline(model, [{"prompt": t} for t in TEXTS], tmp_path, ["--max_tokens", str(MAX)])
    ref_chat = offline(model, [{"prompt": t} for t in TEXTS[:2]], tmp_path, ["--max_tokens", str(MAX), "--instruct"])
    c = client(server)
    for t, r in zip(TEXTS, ref, strict=True):
        got = c.completions.create(model="m", prompt=t, max_tokens=MAX, temperature=0)
        assert got.choices[0].text == r["text"]
        assert got.usage is not None and got.usage.completion_tokens == len(r["tokens"])
        assert got.choices[0].finish_reason == ("length" if len(r["tokens"]) == MAX else "stop")
        stream = c.completions.create(model="m", prompt=t, max_tokens=MAX, temperature=0, stream=True)
        # one chunk per generated token (so clients see each token's timing), then the end
        assert _stream(stream) == (r["text"], got.choices[0].finish_reason, len(r["tokens"]))
    # a list of prompts, and token ids, in one request
    both = c.completions.create(model="m", prompt=TEXTS[:2], max_tokens=MAX, temperature=0)
    assert [x.text for x in sorted(both.choices, key=lambda x: x.index)] == [r["text"] for r in ref[:2]]
    ids = c.completions.create(model="m", prompt=[1, 5, 9, 13], max_tokens=4, temperature=0)
    ref_ids = offline(model, [{"tokens": [1, 5, 9, 13]}], tmp_path, ["--max_tokens", "4"])
    assert ids.choices[0].text == ref_ids[0]["text"]
    for t, r in zip(TEXTS[:2], ref_chat, strict=True):
        msgs = [{"role": "user", "content": t}]
        got_chat = c.chat.completions.create(model="m", messages=msgs, max_tokens=MAX, temperature=0)  # type: ignore
        assert got_chat.choices[0].message.content == r["text"]
        stream = c.chat.completions.create(model="m", messages=msgs, max_tokens=MAX, temperature=0,  # type: ignore
                                           stream=True)
        text, _, tokens = _stream(stream)
        assert (text, tokens) == (r["text"], len(r["tokens"]))
    assert [m.id for m in c.models.list().data] == ["m"]


@pytest.mark.timeout(600)
def test_32_concurrent_clients_each_equal_to_alone(server: ServerProcess) -> None:
    c = client(server)
    # mixed prompt lengths (one to several chunks) and max_tokens
    jobs = [dict(prompt=" ".join(["word"] * (1 + (i * 7) % 40)) + f" {i}", max_tokens=2 + (i * 5) % 23)
            for i in range(32)]
    sampled = dict(prompt="Sampling is seeded", max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = [c.completions.create(model="m", temperature=0, **j).choices[0].text for j in jobs]  # type: ignore
    alone_sampled = c.completions.create(model="m", **sampled).choices[0].text  # type: ignore

    def one(i: int) -> str:
        if i == len(jobs):
            return c.completions.create(model="m", **sampled).choices[0].text  # type: ignore
        j = jobs[i]
        if i % 3 == 0:
            s = c.completions.create(model="m", temperature=0, stream=True, **j)  # type: ignore
            return _stream_text(s)[0]
        return c.completions.create(model="m", temperature=0, **j).choices[0].text  # type: ignore

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        loaded = list(pool.map(one, range(len(jobs) + 1)))
    assert loaded[:-1] == alone
    assert loaded[-1] == alone_sampled


def metrics(srv: ServerProcess, key: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.timeout(600)
def test_hangup_frees_slot_bad_requests_and_metrics(nowindow: Path) -> None:
    key = "sekrit"
    srv = ServerProcess(nowindow, ["--max_batch", "1", "--max_queue", "1", "--max_context", "100000",
                                   "--api_key", key, "--model_name", "nw"])
    try:
        srv.wait_ready()
        c = client(srv, key)
        # One slot: an endless stream holds it; a second request waits; the first client hangs up.
        with httpx.Client(timeout=60) as h:
            hdr = {"Authorization": f"Bearer {key}"}
            with h.stream("POST", srv.url + "/v1/completions", headers=hdr,
                          json={"model": "nw", "prompt": "forever", "max_tokens": 90000, "temperature": 0,
                                "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                with ThreadPoolExecutor(1) as pool:
                    waiting = pool.submit(lambda: c.completions.create(model="nw", prompt="next", max_tokens=3))
                    deadline = time.monotonic() + 60
                    while metrics(srv).get(("serve_queue_depth", ()), 0) < 1 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    # The slot and the one queue place are taken: 429 with Retry-After.
                    full = h.post(srv.url + "/v1/completions", headers=hdr,
                                  json={"model": "nw", "prompt": "x", "max_tokens": 2})
                    assert full.status_code == 429 and full.headers["retry-after"]
                    assert full.json()["error"]["type"]
                    r.close()  # hang up mid-stream
                    assert waiting.result(timeout=90).choices[0].finish_reason in ("length", "stop")
            m = metrics(srv)
            assert m[("serve_sequences_finished_total", (("reason", "cancelled"),))] == 1
            assert m[("serve_requests_total", (("endpoint", "/v1/completions"), ("status", "429")))] == 1

            def post(body: object, path: str = "/v1/completions", headers: dict[str, str] | None = hdr) -> int:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                resp = h.post(srv.url + path, headers=headers, content=raw)
                if resp.status_code != 200:
                    assert "message" in resp.json()["error"]
                return resp.status_code

            ok = {"model": "nw", "prompt": "hi", "max_tokens": 2}
            assert post(ok, headers=None) == 401
            assert post(ok, headers={"Authorization": "Bearer wrong"}) == 401
            assert post(b"{not json") == 400
            assert post([1, 2]) == 400
            assert post(ok | {"max_tokens": "many"}) == 400
            assert post(ok | {"prompt": 5}) == 400
            assert post(ok | {"temperature": -0.5}) == 400
            assert post(ok | {"top_p": 0}) == 400
            assert post(ok | {"top_p": 1.5}) == 400
            assert post(ok | {"prompt": [1, 2, 512]}) == 400
            assert post(ok | {"prompt": [1, -1]}) == 400
            assert post(ok | {"model": "gpt-4"}) == 404
            assert post(ok | {"n": 2}) == 400
            assert post(ok | {"stop": 3}) == 400
            assert post(ok | {"max_tokens": 100000}) == 400  # over the context
            assert post({"model": "nw", "messages": "hi"}, "/v1/chat/completions") == 400
            assert post({"model": "nw", "messages": [{"content": "no role"}]}, "/v1/chat/completions") == 400
            assert post(ok) == 200  # and it goes on serving
            stop = c.completions.create(model="nw", prompt=[1, 5, 9], max_tokens=20, temperature=0)
            text = stop.choices[0].text
            if len(text) > 2:  # a stop string cuts the text before it
                cut = c.completions.create(model="nw", prompt=[1, 5, 9], max_tokens=20, temperature=0,
                                           stop=[text[1:3]])
                assert cut.choices[0].text == text[: text.find(text[1:3])]
                assert cut.choices[0].finish_reason == "stop"
            m = metrics(srv)
            for name in ("serve_time_to_first_token_seconds_count", "serve_inter_token_latency_seconds_count",
                         "serve_generation_tokens_total", "serve_prompt_tokens_total"):
                assert m[(name, ())] > 0
            assert ("serve_stage_busy_fraction", (("stage", "0"),)) in m
            assert m[("serve_requests_total", (("endpoint", "/v1/completions"), ("status", "401")))] == 2
    finally:
        assert srv.stop() == 0, srv.output()


@pytest.mark.timeout(300)
def test_kill9_of_rank1_ends_open_streams_and_every_process(model: Path) -> None:
    srv = ServerProcess(model, ["--max_batch", "4", "--dist_timeout", "20"], nproc=2)
    try:
        srv.wait_ready()
        c = client(srv)
        streams = [c.completions.create(model="m", prompt=f"endless {i}", max_tokens=10**6, temperature=0,
                                        stream=True) for i in range(2)]
        for s in streams:
            next(iter(s))
        ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(srv.proc.pid).children(recursive=True)}
        os.kill(ranks[1].pid, signal.SIGKILL)
        for s in streams:
            with pytest.raises((openai.APIError, httpx.HTTPError)):
                for _ in s:
                    pass
        t0 = time.monotonic()
        code = srv.proc.wait(60)
        assert code != 0
        assert time.monotonic() - t0 < 60
        for p in ranks.values():
            assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    finally:
        srv.stop()


@pytest.mark.timeout(600)
def test_compiled_server_gives_offline_tokens(model: Path, tmp_path: Path) -> None:
    """serve --compile: decode steps of the changing batch shapes go through torch.compile (bounded
    recompiles, eager past torch's limit); concurrent greedy completions still equal offline generate."""
    ref = offline(model, [{"prompt": t} for t in TEXTS], tmp_path, ["--max_tokens", str(MAX)])
    srv = ServerProcess(model, ["--max_batch", "4", "--dist_timeout", "60", "--compile"])
    try:
        srv.wait_ready()
        c = client(srv)
        with ThreadPoolExecutor(len(TEXTS)) as pool:
            got = list(pool.map(lambda t: c.completions.create(model="m", prompt=t, max_tokens=MAX,
                                                               temperature=0).choices[0].text, TEXTS))  # fmt: skip
        assert got == [r["text"] for r in ref]
    finally:
        srv.stop()
