"""Admission at the door: the ASGI middleware that takes or refuses a slot of the worker's limiter
(app/resilience/admission.py), and the uvicorn protocol that stamps when a request arrived and refuses one
before the application sees it.

The protocol runs as bytes are parsed, so its stamp is when the server received the request, not when the
event loop got round to running the handler; the fetch deadline counts from it (app/serving/fetch.py). When
the limiter is full it answers 503 at once, without a task for the app, routing or decoding the body (the
body is still read off the socket by uvicorn's parser, so the connection stays usable). Under any other server
(or an in-process ASGI client) the middleware does the same job one step later.

Only the serving endpoints are shed; health, metrics, the status page and the registry never are.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import Overloaded
from app.resilience.admission import Limiter, Work
from app.serving.gateway import Gateway
from routers.errors import PROBLEM

RECEIVED = "feature_gateway.received"  # scope key: time.perf_counter() when the request arrived
ADMISSION = "feature_gateway.admission"  # lifespan state key: the worker's Limiter
DEADLINE = "feature_gateway.deadline_s"  # scope key: the deadline a fetch asked for (unset: the default)
# Scope key, set on a degraded answer: its time is a backend's deadline or failure, not the worker's queue, and
# timing it would shrink the limit (and refuse requests) for what the circuit breaker is there to handle.
NOT_A_SAMPLE = "feature_gateway.not_a_sample"

SHED: dict[str, Work] = {
    "/v1/features/fetch": Work.READ,
    "/get-online-features": Work.READ,
    "/v1/features/write": Work.WRITE,
    "/write-to-online-store": Work.WRITE,
}


def refusal(work: Work, limiter: Limiter) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The 503 answer's headers and body: problem+json with Retry-After."""
    error = Overloaded(
        f"this worker is serving as many requests as it can ({int(limiter.limit)} at once) without missing "
        "deadlines; nothing was read or written, retry shortly",
        extra={"work": str(work)},
    )
    body = msgspec.json.encode(error.problem())
    headers = [
        (b"content-type", PROBLEM.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers().items()),
    ]
    return headers, body


async def refuse(send: Send, work: Work, limiter: Limiter) -> None:
    headers, body = refusal(work, limiter)
    await send({"type": "http.response.start", "status": Overloaded.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AdmissionControl:
    """Takes a slot for each serving request, answers 503 when there is none, gives it back (timed) after."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (work := SHED.get(scope["path"])) is None:
            await self.app(scope, receive, send)
            return
        gateway: Gateway | None = getattr(scope["app"].state, "gateway", None)  # set once backends are open
        limiter = None if gateway is None else gateway.admission
        started = time.perf_counter()
        scope.setdefault(RECEIVED, started)
        if gateway is None or limiter is None:
            await self.app(scope, receive, send)
            return
        if not limiter.acquire(work):
            await refuse(send, work, limiter)
            return
        default_deadline_s = gateway.limits.default_deadline_ms / 1000
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # Only answers the backends were read for are samples: a refusal or a bad request is not latency.
            timed = status == 200 and not scope.get(NOT_A_SAMPLE)
            latency = time.perf_counter() - started if timed else None
            limiter.release(work, latency, scope.get(DEADLINE, default_deadline_s))


class _NoEvent:
    def set(self) -> None:
        pass


class _Refused:
    """Stands in for uvicorn's RequestResponseCycle while the body of a request refused at the door arrives:
    its response is complete from the start, so the parser's callbacks skip the body."""

    response_started = response_complete = True
    disconnected = keep_alive = False
    message_event = _NoEvent()


REFUSED = _Refused()
SHED_RAW = {path.encode(): work for path, work in SHED.items()}
_answers: dict[tuple[Work, int, bool], bytes] = {}  # (work, limit, keep-alive) -> the whole 503, made once


def refusal_bytes(work: Work, limiter: Limiter, keep_alive: bool) -> bytes:
    key = (work, int(limiter.limit), keep_alive)
    answer = _answers.get(key)
    if answer is None:
        headers, body = refusal(work, limiter)
        if not keep_alive:
            headers.append((b"connection", b"close"))
        head = b"".join(b"%s: %s\r\n" % header for header in headers)
        answer = _answers[key] = b"HTTP/1.1 503 Service Unavailable\r\n%s\r\n%s" % (head, body)
    return answer


class ReceivedAtProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the arrival stamp and refusal at the door (see the module's text).

    A refusal is decided as soon as the head is parsed and written straight to the socket: no ASGI task, no
    app, no scope or cycle, and the body is skipped as it arrives. At twice the load a worker serves, every
    other request is one of these, and what each costs comes out of the goodput: 20 us of CPU each here (wrk
    against a worker held full, 144,000 refusals in 5 s), against 31 us when uvicorn's scope and cycle were
    built first, and about 400 us for a served 1 x 100 fetch."""

    _refused: Any = None  # the stand-in cycle of a request refused at the door, until its body has been read

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[RECEIVED] = time.perf_counter()  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        limiter: Limiter | None = self.app_state.get(ADMISSION)
        work = None if limiter is None else SHED_RAW.get(self.url.partition(b"?")[0])
        if (
            limiter is None
            or work is None
            or limiter.admits(work)
            or (self.cycle is not None and not self.cycle.response_complete)  # pipelined: see _start_asgi_task
            or self.flow.write_paused  # a client not reading its answers: uvicorn's own path waits for it
            or self.parser.should_upgrade()
        ):
            super().on_headers_complete()
            return
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self._refuse(work, limiter, keep_alive, self.expect_100_continue)
        self.cycle = self._refused = REFUSED  # type: ignore[assignment]

    def _refuse(self, work: Work, limiter: Limiter, keep_alive: bool, expect_100_continue: bool) -> None:
        """Count the refusal and write it. Without keep-alive, or when the client waits for a 100 Continue before
        sending its body, the connection ends with the answer (that body would be taken for the next request)."""
        limiter.refused(work)
        keep_alive = keep_alive and not expect_100_continue
        self.transport.write(refusal_bytes(work, limiter, keep_alive))
        if not keep_alive:
            self.transport.close()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """A pipelined request, started once the one before it is answered: refused the same way."""
        scope = cycle.scope
        work = SHED.get(scope.get("path", ""))
        limiter: Limiter | None = self.app_state.get(ADMISSION) if work is not None else None
        if limiter is None or work is None or limiter.admits(work) or self.flow.write_paused:
            super()._start_asgi_task(cycle, app)
            return
        # Its own 100-continue flag: the protocol's is the latest parsed request's, maybe one behind it.
        self._refuse(work, limiter, cycle.keep_alive, cycle.waiting_for_100_continue)
        cycle.response_started = cycle.response_complete = True
        if cycle.more_body:
            self._refused = cycle  # its end is the request's end: see on_message_complete
        else:  # its body was read while it waited its turn: the next one may start (not from inside this call)
            self.loop.call_soon(self.on_response_complete)

    def on_message_complete(self) -> None:
        if self.cycle is not None and self.cycle is self._refused:
            # The refused request's body has all been read off the socket: now the connection is idle (its
            # keep-alive timer runs) or the next pipelined request may start.
            self._refused = None
            self.on_response_complete()
            return
        super().on_message_complete()
