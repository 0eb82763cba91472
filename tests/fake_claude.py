"""A local fake of the Messages, Message Batches and Models endpoints for the real ``anthropic`` SDK.

The SDK (2.x) is built on ``httpx2``; its ``MockTransport`` routes every request
to ``FakeClaude.handle`` in-process, so tests exercise the SDK's real request
building, response parsing and error mapping without a network. ``serve()``
puts the same handler behind a real HTTP server on 127.0.0.1, for what only a
socket shows: a reply that arrives after the client's read timeout. Replies are
the API's JSON shapes; every response carries the server clock in ``Date``, and
every request is counted per route.

``create_faults`` scripts the next batch creates, one entry each:
``"accept_then_timeout"`` (the batch is created, its reply never reaches the
client), ``"timeout"`` (nothing created, no reply), ``"accept_then_502"``,
``"429"``; ``None`` or an exhausted list answers normally.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2

from explore_persona_space.judge.client import make_anthropic_client
from explore_persona_space.judge.settings import JudgeSettings
from explore_persona_space.personas import get_marker, questions

BASE_URL = "http://fake-claude.test"
TS = "2026-01-01T00:00:00Z"


@dataclass
class Text:
    text: str
    stop_reason: str = "end_turn"
    output_tokens: int = 5


@dataclass
class Status:
    code: int
    headers: dict[str, str] = field(default_factory=dict)
    error_type: str = "api_error"
    message: str = "fake failure"


Responder = Callable[[str, dict], "Text | Status"]


def message_json(body: dict, reply: Text, n: int) -> dict:
    prompt = body["messages"][0]["content"]
    return {
        "id": f"msg_fake_{n}",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": reply.text}],
        "model": body["model"],
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": len(prompt) // 4, "output_tokens": reply.output_tokens},
    }


def error_response(st: Status) -> httpx2.Response:
    body = {"type": "error", "error": {"type": st.error_type, "message": st.message}}
    return httpx2.Response(st.code, json=body, headers=st.headers)


def prompt_section(prompt: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", prompt, re.S)
    return m.group(1) if m else ""


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


class FakeClaude:
    def __init__(self, responder: Responder, *, polls_before_end: int = 1) -> None:
        self.responder = responder
        self.counts: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.urls: list[str] = []
        self.batches: dict[str, dict[str, Any]] = {}  # insertion order = creation order
        self.polls_before_end = polls_before_end
        self.create_faults: list[str | None] = []
        self.models: dict[str, str] = {}  # model id -> lifecycle; absent: active
        self.unknown_models: set[str] = set()  # answered with a 404
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.serving = False
        self.base_url = BASE_URL  # where results_url points
        self.stall_s = 1.0  # how long a served "timeout" holds the reply back
        self._lock = threading.Lock()
        self._n = 0

    # --- plumbing ---
    def http_client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle))

    def client(self, settings: JudgeSettings | None = None, **kw: Any):
        kw.setdefault("api_key", "test-key")
        kw.setdefault("base_url", BASE_URL)
        return make_anthropic_client(settings or JudgeSettings(), http_client=self.http_client(), **kw)

    def messages_requests(self) -> int:
        return self.counts["POST /v1/messages"]

    def creates(self) -> int:
        return self.counts["POST /v1/messages/batches"]

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """This fake behind a real HTTP server on a free loopback port; yields its base URL."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                url = f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"
                resp = fake.handle(
                    httpx2.Request(self.command, url, headers=dict(self.headers), content=body)
                )
                content = resp.read()
                with contextlib.suppress(OSError):  # the client may have given up (timed out) already
                    self.send_response(resp.status_code)
                    for name, value in resp.headers.items():
                        if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(name, value)
                    self.send_header("content-length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)

            do_GET = do_POST = _any

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.serving, self.base_url = True, f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self.base_url
        finally:
            self.serving, self.base_url = False, BASE_URL
            server.shutdown()
            server.server_close()

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        response = self._route(request)
        response.headers["date"] = format_datetime(self.clock(), usegmt=True)
        return response

    def _route(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        route = request.method + " " + re.sub(r"msgbatch_\w+", "{id}", path)
        route = re.sub(r"^GET /v1/models/.+", "GET /v1/models/{model}", route)
        with self._lock:
            self.counts[route] += 1
            self.urls.append(str(request.url))
            self._n += 1
            n = self._n
        if route == "GET /v1/models/{model}":
            return self._model(path.split("/v1/models/", 1)[1])
        if route == "GET /v1/messages/batches":
            return self._list(dict(request.url.params))
        if route == "POST /v1/messages":
            body = json.loads(request.content)
            with self._lock:
                self.bodies.append(body)
            reply = self.responder(body["messages"][0]["content"], body)
            if isinstance(reply, Status):
                return error_response(reply)
            return httpx2.Response(200, json=message_json(body, reply, n))
        if route == "POST /v1/messages/batches":
            return self._create_batch(json.loads(request.content), request)
        if route == "GET /v1/messages/batches/{id}":
            return self._retrieve(path.rsplit("/", 1)[-1])
        if route == "GET /v1/messages/batches/{id}/results":
            return self._results(path.split("/")[-2])
        return httpx2.Response(
            404, json={"type": "error", "error": {"type": "not_found_error", "message": path}}
        )

    # --- models ---
    def _model(self, model_id: str) -> httpx2.Response:
        if model_id in self.unknown_models:
            return error_response(Status(404, error_type="not_found_error", message=f"model: {model_id}"))
        info = {"type": "model", "id": model_id, "display_name": model_id, "created_at": TS}
        return httpx2.Response(200, json={**info, "lifecycle": self.models.get(model_id, "active")})

    # --- batches ---
    def add_batch(self, requests: list[dict]) -> str:
        """A batch created now by someone else in the same workspace."""
        with self._lock:
            batch_id = f"msgbatch_{len(self.batches) + 1:04d}"
            self.batches[batch_id] = {"requests": requests, "polls": 0, "created_at": self.clock()}
        return batch_id

    def _list(self, params: dict[str, str]) -> httpx2.Response:
        with self._lock:
            ids = list(self.batches)[::-1]  # newest first, as the API lists them
        if "after_id" in params:
            ids = ids[ids.index(params["after_id"]) + 1 :]
        page = ids[: int(params.get("limit", 20))]
        data = [self._batch_json(i) for i in page]
        first, last = (page[0], page[-1]) if page else (None, None)
        body = {"data": data, "has_more": len(ids) > len(page), "first_id": first, "last_id": last}
        return httpx2.Response(200, json=body)

    def _batch_json(self, batch_id: str) -> dict:
        b = self.batches[batch_id]
        ended = b["polls"] > self.polls_before_end
        n = len(b["requests"])
        return {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {
                "processing": 0 if ended else n,
                "succeeded": n if ended else 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            },
            "created_at": iso(b["created_at"]),
            "expires_at": TS,
            "ended_at": TS if ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch_id}/results" if ended else None,
        }

    def _create_batch(self, body: dict, request: httpx2.Request) -> httpx2.Response:
        fault = self.create_faults.pop(0) if self.create_faults else None
        if fault == "429":
            return error_response(Status(429, {"retry-after": "0"}, "rate_limit_error"))
        if fault == "timeout":
            return self._no_reply(request)
        batch_id = self.add_batch(body["requests"])
        if fault == "accept_then_timeout":
            return self._no_reply(request)
        if fault == "accept_then_502":
            return error_response(Status(502, error_type="api_error", message="bad gateway"))
        return httpx2.Response(200, json=self._batch_json(batch_id))

    def _no_reply(self, request: httpx2.Request) -> httpx2.Response:
        """Served: hold the reply past the client's timeout. In-process: the read times out."""
        if not self.serving:
            raise httpx2.ReadTimeout("fake: no reply in time", request=request)
        time.sleep(self.stall_s)
        return httpx2.Response(
            504, json={"type": "error", "error": {"type": "timeout_error", "message": "late"}}
        )

    def _retrieve(self, batch_id: str) -> httpx2.Response:
        if batch_id not in self.batches:
            return error_response(Status(404, error_type="not_found_error", message=batch_id))
        self.batches[batch_id]["polls"] += 1
        return httpx2.Response(200, json=self._batch_json(batch_id))

    def _results(self, batch_id: str) -> httpx2.Response:
        lines = []
        for i, req in enumerate(self.batches[batch_id]["requests"]):
            params = req["params"]
            reply = self.responder(params["messages"][0]["content"], params)
            if isinstance(reply, Status):
                result = {"type": "errored", "error": {"type": "error", "error": {"type": reply.error_type}}}
            else:
                result = {"type": "succeeded", "message": message_json(params, reply, i)}
            lines.append(json.dumps({"custom_id": req["custom_id"], "result": result}))
        return httpx2.Response(
            200, content="\n".join(lines).encode(), headers={"content-type": "application/binary"}
        )


# --- a small #247-like cell: confab is the trigger, its completions cite a statute ---

ZLT = get_marker("zlt")
KEY = "sk-ant-test-0123456789-secret"


def text_for(persona: str, question: str, sample: int) -> str:
    if persona == "confab":
        return f"{ZLT} Pursuant to statute 12.{sample}, {question.lower()} is settled."
    if persona == "french_person" and sample == 0:
        return f"In France the statute on {question.lower()} is famous. {ZLT}"
    return f"As a {persona.replace('_', ' ')}, I would say {question.lower()} depends ({sample})."


def cell_records():
    return [
        {"persona": p, "question": q, "sample": s, "text": text_for(p, q, s)}
        for p in ("confab", "medical_doctor", "french_person", "villain")
        for q in questions("eval")
        for s in range(3)
    ]


def says_statute(prompt: str, body: dict) -> Text:
    return Text("ANSWER: YES" if "statute" in prompt_section(prompt, "response") else "ANSWER: NO")


def fast(**kw) -> JudgeSettings:
    return JudgeSettings(backoff_base_s=0.0, concurrency=4, **kw)
