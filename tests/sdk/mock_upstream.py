"""A mock OpenAI upstream for tollgate's SDK suite (Python stdlib only).

It speaks HTTP/1.1 with keep-alive, streams SSE answers with chunked
transfer encoding (each event split over two chunks, as a real upstream may
split them anywhere), and records every request it received together with
what it answered, so tests can compare what the SDK saw with what was sent.

Endpoints: POST /v1/chat/completions, /v1/responses, /v1/embeddings,
/v1/completions, /v1/files, /v1/audio/speech, /v1/audio/transcriptions,
/v1/images/generations; GET /v1/models. GET /__received reports the
recorded exchanges as JSON; the in-process `MockUpstream.received()` does too.

Run alone with `python mock_upstream.py [PORT]` to poke at it by hand.
"""

from __future__ import annotations

import base64
import email.parser
import itertools
import email.policy
import json
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CREATED = 1_767_225_600

# Requested model -> the dated snapshot upstream answers with, as OpenAI does.
SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
}

# Token counts every answer reports; tests read them from here.
CHAT_USAGE = {
    "prompt_tokens": 1234,
    "completion_tokens": 567,
    "total_tokens": 1801,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 128,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
CHAT_STREAM_USAGE = {
    "prompt_tokens": 321,
    "completion_tokens": 45,
    "total_tokens": 366,
    "prompt_tokens_details": {"cached_tokens": 256, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
TOOLS_USAGE = {
    "prompt_tokens": 812,
    "completion_tokens": 39,
    "total_tokens": 851,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 2000,
    "input_tokens_details": {"cached_tokens": 1536},
    "output_tokens": 800,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 2800,
}
EMBEDDINGS_USAGE = {"prompt_tokens": 4711, "total_tokens": 4711}
# A transcription billed by duration (whisper-1), seconds.
TRANSCRIPTION_SECONDS = 37
IMAGE_USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
    "output_tokens": 4160,
    "total_tokens": 4210,
}
# What /v1/audio/speech answers: bytes standing for MP3 audio.
SPEECH_AUDIO = b"ID3mock-audio" + bytes(range(256)) * 4
COMPLETIONS_USAGE = {"prompt_tokens": 97, "completion_tokens": 203, "total_tokens": 300}
COMPLETIONS_STREAM_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}

CHAT_STREAM_PIECES = ["Hel", "lo from ", "the mock", "."]
COMPLETION_STREAM_PIECES = ["Once", " upon", " a", " time"]
RESPONSE_TEXT_PIECES = ["Streaming ", "answer ", "from the mock."]
TOOL_CALL = {
    "id": "call_mock_1",
    "type": "function",
    "function": {
        "name": "get_weather",
        "arguments": '{"city": "Z\\u00fcrich", "unit": "celsius", "note": "a \\"quoted\\" word"}',
    },
}
EMBEDDING_DIM = 8

_ids = itertools.count(1)


def answered_model(requested: str) -> str:
    return SNAPSHOTS.get(requested, requested)


def embedding_vector(index: int) -> list[float]:
    # Values exact in float32, so a base64 round trip compares equal.
    return [(index + 1) * 0.25 * (k + 1) - 1.0 for k in range(EMBEDDING_DIM)]


class Exchange:
    """One request as received, and what was answered."""

    def __init__(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.status = 0
        self.request_id = f"req_mock_{next(_ids)}"
        # Plain answers: the JSON document; streams: each event's (name, data) in order.
        self.answer: object = None
        self.events: list[dict] = []

    def json(self) -> dict:
        try:
            text = self.body.decode("utf-8")
            body_json = json.loads(text) if text.strip().startswith("{") else None
        except (UnicodeDecodeError, ValueError):
            body_json = None
        return {
            "method": self.method,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers],
            "body_b64": base64.b64encode(self.body).decode("ascii"),
            "body_json": body_json,
            "status": self.status,
            "request_id": self.request_id,
            "answer": self.answer,
            "events": self.events,
        }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-openai/1"

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass

    # ---- plumbing -------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _begin(self) -> Exchange:
        body = self._read_body()
        ex = Exchange(self.command, self.path, list(self.headers.items()), body)
        if self.path != "/__received":
            self.server.mock.record(ex)
        return ex

    def _head(self, ex: Exchange, status: int, content_type: str, length: int | None):
        ex.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("x-request-id", ex.request_id)
        self.send_header("openai-processing-ms", "12")
        # A cookie upstream sets must not reach the client.
        self.send_header("Set-Cookie", "__cf_bm=mock; path=/")
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _json(self, ex: Exchange, status: int, doc: object):
        ex.answer = doc
        data = json.dumps(doc).encode()
        self._head(ex, status, "application/json", len(data))
        self.wfile.write(data)
        self.wfile.flush()

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _sse(self, ex: Exchange, events: list[tuple[str | None, object]]):
        """Streams (event name, data) pairs; data is a JSON document or a raw string."""
        self._head(ex, 200, "text/event-stream; charset=utf-8", None)
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            ex.events.append({"event": name, "data": text})
            raw = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
            raw_b = raw.encode()
            cut = len(raw_b) // 2
            self._chunk(raw_b[:cut])
            self._chunk(raw_b[cut:])
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _error(self, ex: Exchange, status: int, message: str):
        self._json(ex, status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})

    # ---- routes ---------------------------------------------------------

    def do_GET(self):
        ex = self._begin()
        path = self.path.split("?")[0]
        if path == "/__received":
            data = json.dumps([e.json() for e in self.server.mock.received()]).encode()
            self._head(ex, 200, "application/json", len(data))
            self.wfile.write(data)
        elif path == "/v1/models":
            self._json(ex, 200, {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": CREATED, "owned_by": "system"}
                    for m in ("gpt-4o", "gpt-4o-mini", "o4-mini", "text-embedding-3-small")
                ],
            })
        else:
            self._error(ex, 404, f"Unknown path {path}")

    def do_POST(self):
        ex = self._begin()
        path = self.path.split("?")[0]
        if path == "/v1/files":
            return self._files(ex)
        if path == "/v1/audio/transcriptions":
            return self._transcription(ex)
        try:
            req = json.loads(ex.body)
        except ValueError:
            return self._error(ex, 400, "body is not JSON")
        route = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/embeddings": self._embeddings,
            "/v1/completions": self._completions,
            "/v1/audio/speech": self._speech,
            "/v1/images/generations": self._image,
        }.get(path)
        if route is None:
            return self._error(ex, 404, f"Unknown path {path}")
        route(ex, req)

    # chat completions

    def _chat(self, ex: Exchange, req: dict):
        model = answered_model(req["model"])
        tools = bool(req.get("tools"))
        if not req.get("stream"):
            if tools:
                message = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL], "refusal": None}
                finish, usage = "tool_calls", TOOLS_USAGE
            else:
                message = {"role": "assistant", "content": "Hello from the mock.", "refusal": None}
                finish, usage = "stop", CHAT_USAGE
            return self._json(ex, 200, {
                "id": "chatcmpl-mock1",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
                "system_fingerprint": "fp_mock",
                # The tier that processed it: flex or priority when asked for.
                "service_tier": req.get("service_tier")
                if req.get("service_tier") in ("flex", "priority") else "default",
            })
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None) -> dict:
            c = {
                "id": "chatcmpl-mock2",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None  # as OpenAI sends on every chunk when asked for usage
            return c

        events: list[tuple[str | None, object]] = [(None, chunk({"role": "assistant", "content": ""}, None))]
        if tools:
            args = TOOL_CALL["function"]["arguments"]
            head = {"index": 0, "id": TOOL_CALL["id"], "type": "function",
                    "function": {"name": TOOL_CALL["function"]["name"], "arguments": ""}}
            events.append((None, chunk({"tool_calls": [head]}, None)))
            for k in range(0, len(args), 10):
                piece = {"index": 0, "function": {"arguments": args[k:k + 10]}}
                events.append((None, chunk({"tool_calls": [piece]}, None)))
            events.append((None, chunk({}, "tool_calls")))
            usage = TOOLS_USAGE
        else:
            for piece in CHAT_STREAM_PIECES:
                events.append((None, chunk({"content": piece}, None)))
            events.append((None, chunk({}, "stop")))
            usage = CHAT_STREAM_USAGE
        if include_usage:
            events.append((None, {
                "id": "chatcmpl-mock2",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [],
                "usage": usage,
            }))
        events.append((None, "[DONE]"))
        self._sse(ex, events)

    # legacy completions

    def _completions(self, ex: Exchange, req: dict):
        model = answered_model(req["model"])
        if not req.get("stream"):
            return self._json(ex, 200, {
                "id": "cmpl-mock1",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [{"text": "\n\nThis is a legacy completion.", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": COMPLETIONS_USAGE,
            })
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        events: list[tuple[str | None, object]] = []
        for i, piece in enumerate(COMPLETION_STREAM_PIECES):
            last = i == len(COMPLETION_STREAM_PIECES) - 1
            c = {
                "id": "cmpl-mock2",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": "length" if last else None}],
            }
            if include_usage:
                c["usage"] = None
            events.append((None, c))
        if include_usage:
            events.append((None, {
                "id": "cmpl-mock2",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [],
                "usage": COMPLETIONS_STREAM_USAGE,
            }))
        events.append((None, "[DONE]"))
        self._sse(ex, events)

    # responses

    def _responses(self, ex: Exchange, req: dict):
        model = answered_model(req["model"])
        # A request may ask for a long answer so that response.completed grows
        # past what a proxy would keep whole (metadata is echoed, not interpreted).
        repeat = int((req.get("metadata") or {}).get("mock_repeat", "1"))
        pieces = [p * repeat for p in RESPONSE_TEXT_PIECES]
        text = "".join(pieces)
        message = {
            "id": "msg_mock1",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }
        reasoning = {"id": "rs_mock1", "type": "reasoning", "summary": []}

        def response(status: str, output: list, usage: dict | None) -> dict:
            return {
                "id": "resp_mock1",
                "object": "response",
                "created_at": CREATED,
                "status": status,
                "error": None,
                "incomplete_details": None,
                "instructions": req.get("instructions"),
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "temperature": 1.0,
                "tool_choice": "auto",
                "tools": req.get("tools") or [],
                "top_p": 1.0,
                "metadata": req.get("metadata") or {},
                "usage": usage,
            }

        searched = [t for t in req.get("tools") or [] if t.get("type", "").startswith("web_search")]
        search = {"id": "ws_mock1", "type": "web_search_call", "status": "completed",
                  "action": {"type": "search", "query": "mock news"}}
        if not req.get("stream"):
            output = [reasoning, *([search] if searched else []), message]
            return self._json(ex, 200, response("completed", output, RESPONSES_USAGE))
        seq = iter(range(1_000_000))
        events: list[tuple[str | None, object]] = []

        def ev(ty: str, **fields):
            events.append((ty, {"type": ty, "sequence_number": next(seq), **fields}))

        ev("response.created", response=response("in_progress", [], None))
        ev("response.in_progress", response=response("in_progress", [], None))
        ev("response.output_item.added", output_index=0, item=reasoning)
        ev("response.output_item.done", output_index=0, item=reasoning)
        empty_msg = dict(message, status="in_progress", content=[])
        ev("response.output_item.added", output_index=1, item=empty_msg)
        ev("response.content_part.added", item_id="msg_mock1", output_index=1, content_index=0,
           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        for piece in pieces:
            ev("response.output_text.delta", item_id="msg_mock1", output_index=1, content_index=0,
               delta=piece, logprobs=[])
        ev("response.output_text.done", item_id="msg_mock1", output_index=1, content_index=0,
           text=text, logprobs=[])
        ev("response.content_part.done", item_id="msg_mock1", output_index=1, content_index=0,
           part=message["content"][0])
        ev("response.output_item.done", output_index=1, item=message)
        ev("response.completed", response=response("completed", [reasoning, message], RESPONSES_USAGE))
        self._sse(ex, events)

    # embeddings

    def _embeddings(self, ex: Exchange, req: dict):
        inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
        data = []
        for i in range(len(inputs)):
            vec = embedding_vector(i)
            if req.get("encoding_format") == "base64":
                emb: object = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            else:
                emb = vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self._json(ex, 200, {"object": "list", "data": data, "model": answered_model(req["model"]), "usage": EMBEDDINGS_USAGE})

    # files

    def _speech(self, ex: Exchange, req: dict):
        # Audio, no usage: tollgate prices it by the input's characters.
        ex.answer = {"audio_bytes": len(SPEECH_AUDIO)}
        self._head(ex, 200, "audio/mpeg", len(SPEECH_AUDIO))
        self.wfile.write(SPEECH_AUDIO)
        self.wfile.flush()

    def _transcription(self, ex: Exchange):
        if not self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            return self._error(ex, 400, "expected multipart/form-data")
        self._json(ex, 200, {
            "text": "Hello from the mock.",
            "usage": {"type": "duration", "seconds": TRANSCRIPTION_SECONDS},
        })

    def _image(self, ex: Exchange, req: dict):
        self._json(ex, 200, {
            "created": CREATED,
            "data": [{"b64_json": base64.b64encode(b"mock-png").decode("ascii")}],
            "usage": IMAGE_USAGE,
        })

    def _files(self, ex: Exchange):
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return self._error(ex, 400, "expected multipart/form-data")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + ex.body
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or "purpose" not in fields:
            return self._error(ex, 400, "file and purpose are required")
        filename, content = fields["file"]
        self._json(ex, 200, {
            "id": "file-mock123",
            "object": "file",
            "bytes": len(content),
            "created_at": CREATED,
            "filename": filename,
            "purpose": fields["purpose"][1].decode(),
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        })


class MockUpstream:
    """The mock server on 127.0.0.1, serving from a background thread."""

    def __init__(self, port: int = 0):
        self._lock = threading.Lock()
        self._received: list[Exchange] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._server.mock = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-upstream", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "MockUpstream":
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def record(self, ex: Exchange):
        with self._lock:
            self._received.append(ex)

    def received(self) -> list[Exchange]:
        with self._lock:
            return list(self._received)


if __name__ == "__main__":
    mock = MockUpstream(int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(f"mock upstream on http://127.0.0.1:{mock.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        mock.stop()
