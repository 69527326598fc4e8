"""tollgate proven with the real client: the official `openai` Python SDK.

The SDK talks to the real tollgate binary (TOLLGATE_BIN), which forwards to
the mock upstream in mock_upstream.py. Each test checks three views of one
call: what the SDK got (exactly what the mock sent, minus the usage chunk
tollgate asked for on the client's behalf), what the mock received (upstream
key, no x-user, include_usage spliced in), and the one record tollgate wrote
(tokens, models, exact cost from the built-in price list), read back through
tollgate's REST API.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from openai import AzureOpenAI, OpenAI

import mock_upstream as mock

# Everything here is on loopback: no proxy may be involved.
for _var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

USER = "sdk-user"
UPSTREAM_TOKEN = "sk-test-upstream"
REPO = Path(__file__).resolve().parent.parent.parent
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- expected costs --------------------------------------------------------


def load_prices() -> dict[str, tuple[Decimal, Decimal | None, Decimal]]:
    """The built-in price list (the file tollgate compiles in) as
    (input, cached or None, output) dollars per 1M tokens."""
    prices = {}
    path = next(p for p in (REPO / "src" / "prices.tsv", REPO / "prices.tsv") if p.exists())
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, inp, cached, out = line.split()[:4]
        prices[name] = (
            Decimal(inp),
            None if cached == "-" else Decimal(cached),
            Decimal("0") if out == "-" else Decimal(out),
        )
    return prices


PRICES = load_prices()
DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def expected_cost(answered: str, requested: str, query: int, answer: int, cached: int) -> tuple[Decimal, bool]:
    """Exact cost and whether a price applies: answered model, requested model,
    then the answered model without its date suffix (issue 3's lookup order).
    A record without tokens (model lists, files) costs nothing and is not
    counted as unpriced."""
    if query == 0 and answer == 0:
        return Decimal(0), True
    for name in (answered, requested, DATE_SUFFIX.sub("", answered)):
        if name in PRICES:
            inp, cached_price, out = PRICES[name]
            if cached_price is None:
                cached_price = inp
            cost = (Decimal(query - cached) * inp + Decimal(cached) * cached_price + Decimal(answer) * out) / Decimal(
                1_000_000
            )
            return cost, True
    return Decimal(0), False


def tokens(usage: dict) -> tuple[int, int, int, int]:
    """(query, answer, cached, reasoning) of a usage object of any endpoint."""
    query = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    answer = usage.get("completion_tokens", usage.get("output_tokens", 0))
    qd = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    ad = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return query, answer, qd.get("cached_tokens", 0), ad.get("reasoning_tokens", 0)


# ---- fixtures --------------------------------------------------------------


def get_json(url: str, exact: bool = True):
    with _http.open(url, timeout=10) as r:
        # Costs are exact decimals: never let them pass through a float.
        return json.loads(r.read(), parse_float=Decimal) if exact else json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tollgate:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, upstream: mock.MockUpstream):
        self.proc = proc
        self.port = port
        self.log = log
        self.upstream = upstream
        self.base = f"http://127.0.0.1:{port}"
        self._last_id = 0
        self._seen_upstream = 0

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def queries(self) -> list[dict]:
        return get_json(f"{self.base}/queries?user={USER}")

    def new_records(self) -> list[dict]:
        """Records written since the last call. A stream's record is settled as
        its last byte passes, which can be a moment after the SDK is done."""
        deadline = time.monotonic() + 5
        while True:
            fresh = [r for r in self.queries() if r["id"] > self._last_id]
            if fresh or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if fresh:
            self._last_id = max(r["id"] for r in fresh)
        return fresh

    def new_upstream(self) -> list[dict]:
        """Requests the mock received since the last call, as it reports them."""
        # Plain floats here: they are compared with what the SDK parsed.
        got = get_json(f"http://127.0.0.1:{self.upstream.port}/__received", exact=False)
        fresh = got[self._seen_upstream :]
        self._seen_upstream = len(got)
        return fresh


@pytest.fixture(autouse=True)
def fresh_start(request):
    """Each test looks only at what its own calls left, even after a failure."""
    if "tollgate" in request.fixturenames:
        tg = request.getfixturevalue("tollgate")
        tg.new_upstream()
        tg._last_id = max((r["id"] for r in tg.queries()), default=0)
    yield


@pytest.fixture(scope="module")
def upstream():
    m = mock.MockUpstream().start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def tollgate(upstream, tmp_path_factory):
    binary = os.environ.get("TOLLGATE_BIN")
    if not binary:
        pytest.fail("TOLLGATE_BIN must name the tollgate binary (cargo test --test sdk sets it)")
    tmp = tmp_path_factory.mktemp("tollgate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_") and k != "FORWARD_TOKEN"}
    env["TOLLGATE_UPSTREAM_TOKEN"] = UPSTREAM_TOKEN
    log = tmp / "tollgate.log"
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"http://127.0.0.1:{upstream.port}",
                "--db",
                str(tmp / "usage.db"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    tg = Tollgate(proc, port, log, upstream)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"tollgate exited with {proc.returncode} at start:\n{tg.log_tail()}")
        try:
            get_json(f"{tg.base}/usage")
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"tollgate did not answer within 30 s:\n{tg.log_tail()}")
            time.sleep(0.05)
    yield tg
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"tollgate did not stop on SIGTERM:\n{tg.log_tail()}")
    assert code == 0, f"tollgate exited with {code} on SIGTERM:\n{tg.log_tail()}"


@pytest.fixture
def client(tollgate):
    # No retries: a retried request would leave a second record and hide failures.
    c = OpenAI(
        base_url=f"{tollgate.base}/v1",
        api_key="sk-client",
        default_headers={"x-user": USER},
        max_retries=0,
        timeout=30,
    )
    yield c
    c.close()


# ---- checks ----------------------------------------------------------------


def one_upstream_request(tg: Tollgate, method: str, path: str) -> dict:
    got = tg.new_upstream()
    assert [(e["method"], e["path"]) for e in got] == [(method, path)]
    ex = got[0]
    names = [k.lower() for k, _ in ex["headers"]]
    auth = [v for k, v in ex["headers"] if k.lower() == "authorization"]
    assert auth == [f"Bearer {UPSTREAM_TOKEN}"], "the upstream key must replace the client's"
    assert "x-user" not in names, "x-user must not reach upstream"
    return ex


def one_record(
    tg: Tollgate,
    ex: dict,
    *,
    endpoint: str,
    model: str,
    requested: str,
    usage: tuple[int, int, int, int],
    stream: bool,
) -> dict:
    recs = tg.new_records()
    assert len(recs) == 1, f"expected exactly one new record, got {recs}\n{tg.log_tail()}"
    rec = recs[0]
    query, answer, cached, reasoning = usage
    cost, priced = expected_cost(model, requested, query, answer, cached)
    got = {k: rec[k] for k in (
        "user", "endpoint", "model", "requestedModel", "queryTokens", "answerTokens",
        "cachedQueryTokens", "reasoningTokens", "estimated", "priced", "status", "stream", "requestId",
    )}
    want = {
        "user": USER,
        "endpoint": endpoint,
        "model": model,
        "requestedModel": requested,
        "queryTokens": query,
        "answerTokens": answer,
        "cachedQueryTokens": cached,
        "reasoningTokens": reasoning,
        "estimated": False,
        "priced": priced,
        "status": 200,
        "stream": stream,
        "requestId": ex["request_id"],
    }
    assert got == want
    assert isinstance(rec["cost"], (Decimal, int)), f"cost must be a JSON number, got {rec['cost']!r}"
    assert Decimal(str(rec["cost"])) == cost, f"cost {rec['cost']} != expected {cost}"
    return rec


def sent_chunks(ex: dict) -> list[dict]:
    """The JSON events the mock streamed, without the closing [DONE]."""
    assert ex["events"][-1]["data"] == "[DONE]"
    return [json.loads(e["data"]) for e in ex["events"][:-1]]


def without_usage_chunk(chunks: list[dict]) -> list[dict]:
    kept = [c for c in chunks if c["choices"] != []]
    assert len(kept) == len(chunks) - 1, "the mock must have sent exactly one usage chunk"
    assert "usage" in chunks[-1] and chunks[-1]["choices"] == []
    return kept


def sse_bytes(events: list[dict]) -> bytes:
    return b"".join(
        ((f"event: {e['event']}\n" if e["event"] else "") + f"data: {e['data']}\n\n").encode() for e in events
    )


# ---- chat completions ------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello (gruezi, \u00e7a va?)"},
]


def test_chat_plain(client, tollgate):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, temperature=0.2)
    resp = raw.parse()
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    assert resp.to_dict() == ex["answer"], "the SDK must see exactly the upstream answer"
    assert resp.choices[0].message.content == "Hello from the mock."
    assert resp.model == "gpt-4o-2024-08-06"
    assert raw.headers.get("x-request-id") == ex["request_id"]
    assert "set-cookie" not in raw.headers, "upstream cookies must not reach the client"
    assert ex["body_json"] == {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0.2}
    one_record(
        tollgate, ex, endpoint="/v1/chat/completions", model="gpt-4o-2024-08-06", requested="gpt-4o",
        usage=tokens(mock.CHAT_USAGE), stream=False,
    )


def test_chat_stream_without_include_usage(client, tollgate):
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = [c.to_dict() for c in stream]
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    assert ex["body_json"]["stream_options"] == {"include_usage": True}, "tollgate must ask upstream for usage"
    assert {k: v for k, v in ex["body_json"].items() if k != "stream_options"} == {
        "model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
    }
    assert chunks == without_usage_chunk(sent_chunks(ex))
    assert all(c["choices"] for c in chunks), "the client did not ask for the usage chunk"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(mock.CHAT_STREAM_PIECES)
    one_record(
        tollgate, ex, endpoint="/v1/chat/completions", model="gpt-4o-mini", requested="gpt-4o-mini",
        usage=tokens(mock.CHAT_STREAM_USAGE), stream=True,
    )


def test_chat_stream_with_include_usage(client, tollgate):
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c.to_dict() for c in stream]
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    assert ex["body_json"]["stream_options"] == {"include_usage": True}
    assert chunks == sent_chunks(ex)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == mock.CHAT_STREAM_USAGE
    one_record(
        tollgate, ex, endpoint="/v1/chat/completions", model="gpt-4o-2024-08-06", requested="gpt-4o",
        usage=tokens(mock.CHAT_STREAM_USAGE), stream=True,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_azure_openai_client(tollgate, stream):
    """The AzureOpenAI client calls /openai/deployments/{model}/...?api-version=
    with its key as api-key; tollgate serves it as /v1/ (here to an OpenAI
    upstream): the api-version and the client's api-key stay behind."""
    az = AzureOpenAI(
        azure_endpoint=tollgate.base,
        api_key="sk-client-azure",
        api_version="2024-10-21",
        default_headers={"x-user": USER},
        max_retries=0,
        timeout=30,
    )
    try:
        if stream:
            chunks = [c.to_dict() for c in az.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)]
        else:
            resp = az.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        az.close()
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    assert all(k.lower() != "api-key" for k, _ in ex["headers"]), "the client's api-key must not reach upstream"
    if stream:
        assert chunks == without_usage_chunk(sent_chunks(ex))
        model, usage = "gpt-4o-mini", mock.CHAT_STREAM_USAGE
    else:
        assert resp.to_dict() == ex["answer"]
        model, usage = resp.model, mock.CHAT_USAGE
    one_record(
        tollgate, ex, endpoint="/v1/chat/completions", model=model, requested="gpt-4o-mini",
        usage=tokens(usage), stream=stream,
    )


@pytest.mark.parametrize("include_usage", [False, True], ids=["stripped", "asked"])
def test_chat_stream_bytes(client, tollgate, include_usage):
    """At the byte level: the asked-for stream arrives unchanged; the other one
    unchanged but for the usage event tollgate added."""
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, **extra
    ) as resp:
        got = b"".join(resp.iter_bytes())
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    events = ex["events"]
    if not include_usage:
        events = [e for e in events if e["data"] == "[DONE]" or json.loads(e["data"])["choices"] != []]
        assert len(events) == len(ex["events"]) - 1
    assert got == sse_bytes(events)
    one_record(
        tollgate, ex, endpoint="/v1/chat/completions", model="gpt-4o-mini", requested="gpt-4o-mini",
        usage=tokens(mock.CHAT_STREAM_USAGE), stream=True,
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    }
]


def test_tools(client, tollgate):
    resp = client.chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES, tools=TOOLS, tool_choice="auto")
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    assert ex["body_json"]["tools"] == TOOLS and ex["body_json"]["tool_choice"] == "auto"
    assert resp.to_dict() == ex["answer"]
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id == mock.TOOL_CALL["id"]
    assert call.function.name == "get_weather"
    assert call.function.arguments == mock.TOOL_CALL["function"]["arguments"]
    assert json.loads(call.function.arguments)["city"] == "Z\u00fcrich"
    one_record(
        tollgate, ex, endpoint="/v1/chat/completions", model="gpt-4.1-mini-2025-04-14", requested="gpt-4.1-mini",
        usage=tokens(mock.TOOLS_USAGE), stream=False,
    )


def test_tools_streaming(client, tollgate):
    stream = client.chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES, tools=TOOLS, stream=True)
    chunks = [c.to_dict() for c in stream]
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    assert chunks == without_usage_chunk(sent_chunks(ex))
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"] == mock.TOOL_CALL["id"]
    assert "".join(tc["function"]["arguments"] for tc in calls) == mock.TOOL_CALL["function"]["arguments"]
    one_record(
        tollgate, ex, endpoint="/v1/chat/completions", model="gpt-4.1-mini-2025-04-14", requested="gpt-4.1-mini",
        usage=tokens(mock.TOOLS_USAGE), stream=True,
    )


# ---- responses -------------------------------------------------------------


def test_responses_plain(client, tollgate):
    resp = client.responses.create(model="o4-mini", input="Say hello", instructions="Be terse.")
    ex = one_upstream_request(tollgate, "POST", "/v1/responses")
    assert ex["body_json"] == {"model": "o4-mini", "input": "Say hello", "instructions": "Be terse."}
    assert resp.to_dict() == ex["answer"]
    assert resp.output_text == "".join(mock.RESPONSE_TEXT_PIECES)
    assert resp.usage.input_tokens_details.cached_tokens == 1536
    assert resp.usage.output_tokens_details.reasoning_tokens == 512
    one_record(
        tollgate, ex, endpoint="/v1/responses", model="o4-mini-2025-04-16", requested="o4-mini",
        usage=tokens(mock.RESPONSES_USAGE), stream=False,
    )


def check_response_stream(client, tollgate, metadata: dict | None = None) -> dict:
    extra = {"metadata": metadata} if metadata else {}
    events = list(client.responses.create(model="o4-mini", input="Say hello", stream=True, **extra))
    ex = one_upstream_request(tollgate, "POST", "/v1/responses")
    assert "stream_options" not in ex["body_json"], "the Responses API reports usage unasked"
    sent = ex["events"]
    assert [e.type for e in events] == [e["event"] for e in sent]
    assert [e.to_dict() for e in events] == [json.loads(e["data"]) for e in sent]
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.to_dict() == mock.RESPONSES_USAGE
    one_record(
        tollgate, ex, endpoint="/v1/responses", model="o4-mini-2025-04-16", requested="o4-mini",
        usage=tokens(mock.RESPONSES_USAGE), stream=True,
    )
    return ex


def test_responses_streaming(client, tollgate):
    check_response_stream(client, tollgate)


def test_responses_streaming_large_completed_event(client, tollgate):
    """response.completed carries the whole response: usage must be found at
    its end even when the event is far larger than what is kept whole."""
    ex = check_response_stream(client, tollgate, {"mock_repeat": "8000"})
    assert len(ex["events"][-1]["data"]) > 200_000


# ---- embeddings ------------------------------------------------------------


def test_embeddings(client, tollgate):
    inputs = ["first text", "second text", "third"]
    resp = client.embeddings.create(model="text-embedding-3-small", input=inputs)
    ex = one_upstream_request(tollgate, "POST", "/v1/embeddings")
    # The SDK asks for base64 by default and decodes it itself.
    assert ex["body_json"]["encoding_format"] == "base64"
    assert ex["body_json"]["input"] == inputs
    assert [d.embedding for d in resp.data] == [mock.embedding_vector(i) for i in range(len(inputs))]
    assert resp.usage.prompt_tokens == mock.EMBEDDINGS_USAGE["prompt_tokens"]
    for d, sent in zip(resp.data, ex["answer"]["data"]):
        raw = base64.b64decode(sent["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == d.embedding
    one_record(
        tollgate, ex, endpoint="/v1/embeddings", model="text-embedding-3-small", requested="text-embedding-3-small",
        usage=tokens(mock.EMBEDDINGS_USAGE), stream=False,
    )


# ---- legacy completions ----------------------------------------------------


def test_completions_plain(client, tollgate):
    # A legacy model missing from the price list: tokens recorded, no cost.
    resp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test", max_tokens=300)
    ex = one_upstream_request(tollgate, "POST", "/v1/completions")
    assert ex["body_json"] == {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 300}
    assert resp.to_dict() == ex["answer"]
    assert resp.choices[0].text == "\n\nThis is a legacy completion."
    rec = one_record(
        tollgate, ex, endpoint="/v1/completions", model="gpt-3.5-turbo-instruct", requested="gpt-3.5-turbo-instruct",
        usage=tokens(mock.COMPLETIONS_USAGE), stream=False,
    )
    assert rec["priced"] is False


def test_completions_streaming(client, tollgate):
    stream = client.completions.create(model="gpt-4o-mini", prompt="Once", max_tokens=7, stream=True)
    chunks = [c.to_dict() for c in stream]
    ex = one_upstream_request(tollgate, "POST", "/v1/completions")
    assert ex["body_json"]["stream_options"] == {"include_usage": True}
    assert chunks == without_usage_chunk(sent_chunks(ex))
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(mock.COMPLETION_STREAM_PIECES)
    one_record(
        tollgate, ex, endpoint="/v1/completions", model="gpt-4o-mini", requested="gpt-4o-mini",
        usage=tokens(mock.COMPLETIONS_STREAM_USAGE), stream=True,
    )


# ---- pass-through endpoints ------------------------------------------------


def test_models_list(client, tollgate):
    models = client.models.list()
    ex = one_upstream_request(tollgate, "GET", "/v1/models")
    assert [m.id for m in models] == [m["id"] for m in ex["answer"]["data"]]
    rec = one_record(
        tollgate, ex, endpoint="/v1/models", model="", requested="", usage=(0, 0, 0, 0), stream=False,
    )
    assert Decimal(str(rec["cost"])) == 0


def test_file_upload(client, tollgate):
    # Not UTF-8 and larger than one read: must arrive byte for byte.
    content = bytes(range(256)) * 4096 + b'{"custom_id": "r1"}\n'
    resp = client.files.create(file=("batch-input.jsonl", content, "application/jsonl"), purpose="batch")
    ex = one_upstream_request(tollgate, "POST", "/v1/files")
    assert resp.to_dict() == ex["answer"]
    assert resp.id == "file-mock123" and resp.bytes == len(content)
    assert resp.filename == "batch-input.jsonl" and resp.purpose == "batch"
    body = base64.b64decode(ex["body_b64"])
    assert content in body
    ctype = dict((k.lower(), v) for k, v in ex["headers"])["content-type"]
    assert ctype.startswith("multipart/form-data; boundary=")
    assert ctype.split("boundary=", 1)[1].encode() in body
    one_record(
        tollgate, ex, endpoint="/v1/files", model="", requested="", usage=(0, 0, 0, 0), stream=False,
    )


# ---- the rest of the invoice: tiers, speech, transcription, images, tools ----


def price_row(name: str) -> list[str]:
    """A bundled price row's 15 columns (see src/prices.tsv's header),
    shorter rows padded with "-"."""
    path = next(p for p in (REPO / "src" / "prices.tsv", REPO / "prices.tsv") if p.exists())
    for line in path.read_text().splitlines():
        cols = line.split()
        if cols and cols[0] == name:
            return cols + ["-"] * (15 - len(cols))
    raise AssertionError(f"{name} is not in the bundled price list")


def per_m(n: int, usd_per_1m: str) -> Decimal:
    return Decimal(n) * Decimal(usd_per_1m) / Decimal(1_000_000)


def only_record(tg: Tollgate) -> dict:
    recs = tg.new_records()
    assert len(recs) == 1, f"expected exactly one new record, got {recs}\n{tg.log_tail()}"
    return recs[0]


def money(v) -> Decimal:
    assert isinstance(v, (Decimal, int)), f"money must be a JSON number, got {v!r}"
    return Decimal(str(v))


def test_chat_flex_tier(client, tollgate):
    resp = client.chat.completions.create(model="o4-mini", messages=MESSAGES, service_tier="flex")
    ex = one_upstream_request(tollgate, "POST", "/v1/chat/completions")
    assert ex["body_json"]["service_tier"] == "flex"
    assert resp.service_tier == "flex"
    rec = only_record(tollgate)
    assert rec["serviceTier"] == "flex" and rec["tierRates"] == "flex"
    query, answer, cached, _ = tokens(mock.CHAT_USAGE)
    row = price_row("o4-mini")
    flex = per_m(query - cached, row[4]) + per_m(cached, row[5]) + per_m(answer, row[6])
    standard = per_m(query - cached, row[1]) + per_m(cached, row[2]) + per_m(answer, row[3])
    assert money(rec["cost"]) == flex
    assert money(rec["tierAdjustment"]) == flex - standard < 0


def test_speech(client, tollgate):
    text = "Hello from the official SDK."
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input=text)
    ex = one_upstream_request(tollgate, "POST", "/v1/audio/speech")
    assert audio.content == mock.SPEECH_AUDIO, "the audio must pass byte for byte"
    rec = only_record(tollgate)
    assert rec["requestedModel"] == "tts-1" and rec["status"] == 200
    assert rec["units"] == f"characters={len(text)}"
    assert money(rec["cost"]) == len(text) * Decimal(price_row("tts-1")[14])
    assert rec["estimated"] is False
    assert ex["body_json"]["input"] == text


def test_transcription(client, tollgate):
    wav = b"RIFF" + bytes(range(256)) * 64
    resp = client.audio.transcriptions.create(model="whisper-1", file=("hello.wav", wav, "audio/wav"))
    ex = one_upstream_request(tollgate, "POST", "/v1/audio/transcriptions")
    assert resp.text == "Hello from the mock."
    assert wav in base64.b64decode(ex["body_b64"]), "the upload must pass byte for byte"
    rec = only_record(tollgate)
    assert rec["requestedModel"] == "whisper-1"
    assert rec["units"] == f"seconds={mock.TRANSCRIPTION_SECONDS}"
    cost = mock.TRANSCRIPTION_SECONDS * Decimal(price_row("whisper-1")[14])
    assert money(rec["cost"]) == cost == money(rec["audioInputCost"])


def test_image_generation(client, tollgate):
    resp = client.images.generate(model="gpt-image-1", prompt="a lighthouse at dusk")
    ex = one_upstream_request(tollgate, "POST", "/v1/images/generations")
    assert resp.data[0].b64_json == ex["answer"]["data"][0]["b64_json"]
    rec = only_record(tollgate)
    u = mock.IMAGE_USAGE
    assert rec["queryTokens"] == u["input_tokens"] and rec["answerTokens"] == u["output_tokens"]
    assert rec["imageAnswerTokens"] == u["output_tokens"] and rec["imageQueryTokens"] == 0
    row = price_row("gpt-image-1")
    text_in = per_m(u["input_tokens_details"]["text_tokens"], row[1])
    image_out = per_m(u["output_tokens"], row[13])
    assert money(rec["inputCost"]) == text_in
    assert money(rec["imageOutputCost"]) == image_out
    assert money(rec["cost"]) == text_in + image_out


def test_responses_with_web_search(client, tollgate):
    resp = client.responses.create(model="gpt-4o-mini", input="Any news?", tools=[{"type": "web_search"}])
    ex = one_upstream_request(tollgate, "POST", "/v1/responses")
    assert resp.to_dict() == ex["answer"]
    assert [o.type for o in resp.output].count("web_search_call") == 1
    rec = only_record(tollgate)
    assert rec["units"] == "web_search_call=1"
    call = Decimal(price_row("web_search_call/gpt-4o-mini")[14])
    assert money(rec["toolCost"]) == call
    query, answer, cached, _ = tokens(mock.RESPONSES_USAGE)
    row = price_row("gpt-4o-mini")
    token_cost = per_m(query - cached, row[1]) + per_m(cached, row[2]) + per_m(answer, row[3])
    assert money(rec["cost"]) == token_cost + call


# ---- totals ----------------------------------------------------------------


def test_usage_totals_match_records(client, tollgate):
    client.embeddings.create(model="text-embedding-3-small", input="one more")
    one_upstream_request(tollgate, "POST", "/v1/embeddings")
    assert len(tollgate.new_records()) == 1
    recs = tollgate.queries()
    totals = get_json(f"{tollgate.base}/usage?{urllib.parse.urlencode({'user': USER})}")
    assert totals["numQueries"] == len(recs)
    assert totals["queryTokens"] == sum(r["queryTokens"] for r in recs)
    assert totals["answerTokens"] == sum(r["answerTokens"] for r in recs)
    assert totals["cachedQueryTokens"] == sum(r["cachedQueryTokens"] for r in recs)
    assert totals["reasoningTokens"] == sum(r["reasoningTokens"] for r in recs)
    assert Decimal(str(totals["cost"])) == sum(Decimal(str(r["cost"])) for r in recs)
    assert totals["unpricedQueries"] == sum(1 for r in recs if not r["priced"])
