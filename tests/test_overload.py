"""Overload on a real server (`python -m app serve`, one worker): more requests than it can serve are refused at
once with 503 overload instead of all being served late, and a starved CPU opens no circuit on a healthy backend.

What is checked is what happened (which answers came back, which circuits opened, that the CPU really was
starved), never how long something took. The limiter's rule itself: test_admission.py; goodput figures:
`python -m bench.overload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx

from bench.overload import Client
from tests.support.clients import metric_value, parse_metrics
from tests.support.gateways import GatewayProcess
from tests.support.registries import Names
from tests.support.servers import RedisProcess
from tests.support.waiting import wait_until

FEATURES = ["live:orders_7d", "live:avg_basket", "history:lifetime_orders", "local:score"]
ENTITIES = list(range(1, 51))


def registry(names: Names) -> str:
    return f"""
backends:
  hot: {names.backend("redis")}
  bulk: {names.backend("cockroach")}
  local: {names.backend("sqlite")}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: hot
    features:
      orders_7d: {{dtype: int64, default: 0}}
      avg_basket: {{dtype: float64, default: 0.5}}
  history:
    entity: consumer
    backend: bulk
    features:
      lifetime_orders: {{dtype: int64, default: -1}}
  local:
    entity: consumer
    backend: local
    features:
      score: {{dtype: float64, default: 0.0}}
"""


ROWS = {
    "live": [{"consumer_id": i, "orders_7d": i, "avg_basket": 1.5} for i in ENTITIES],
    "history": [{"consumer_id": i, "lifetime_orders": i * 10} for i in ENTITIES],
    "local": [{"consumer_id": i, "score": i / 2} for i in ENTITIES],
}


def fetch_bytes(entity: int, deadline_ms: float) -> bytes:
    body = json.dumps({"entities": {"consumer_id": [entity]}, "features": FEATURES, "deadline_ms": deadline_ms})
    return (
        b"POST /v1/features/fetch HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
    )


@contextlib.contextmanager
def serving(tmp_path: Path, names: Names) -> Iterator[GatewayProcess]:
    path = tmp_path / "registry.yaml"
    path.write_text(registry(names))
    server = GatewayProcess(path, tmp_path / "gateway.log")
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for group, rows in ROWS.items():
                assert client.post("/v1/features/write", json={"group": group, "rows": rows}).status_code == 200
        yield server
    finally:
        server.stop()


async def flood(port: int, connections: int, seconds: float, deadline_ms: float) -> Counter[str]:
    """Closed loop: `connections` clients, each sending its next fetch as soon as the last is answered, or
    after the Retry-After of a 503 overload, as a well-behaved client does (one that retries at once turns
    every refusal into another request to refuse: that load has no bound)."""
    answers: Counter[str] = Counter()
    stop = time.monotonic() + seconds
    requests = [fetch_bytes(i, deadline_ms) for i in ENTITIES]

    async def client(n: int) -> None:
        conn = await Client.open(port)
        try:
            i = n
            while time.monotonic() < stop:
                status, body = await conn.post(requests[i % len(requests)])
                i += 1
                answers[what := kind(status, body)] += 1
                if what == "503 overload":
                    await asyncio.sleep(min(1.0, stop - time.monotonic()))
        finally:
            conn.close()

    await asyncio.gather(*(client(n) for n in range(connections)))
    return answers


def kind(status: int, body: bytes) -> str:
    if status == 200:
        answer = json.loads(body)
        if not answer["degraded"]:
            return "served"
        outcomes = sorted(f"{name}={b['status']}" for name, b in answer["backends"].items() if b["status"] != "ok")
        return "degraded: " + ", ".join(outcomes)
    if status == 503:
        problem = json.loads(body)
        return "503 " + problem["type"].rsplit("/", 1)[1]
    return f"{status}: {body[:200]!r}"


def scrape(server: GatewayProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=10).text)


def starve(pid: int) -> list[subprocess.Popen[bytes]]:
    """A busy loop per core, twice over, and the gateway `pid` at the lowest priority.

    With the kernel's autogroup scheduling (on by default), nice works only within a session and the gateway
    runs in its own, so the lowest priority is given to its session's group as well."""
    os.setpriority(os.PRIO_PGRP, pid, 19)
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        autogroup.write_text("19")
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]


def circuits(server: GatewayProcess) -> tuple[dict[str, str], float]:
    """The circuits /readyz reports (read and write), and reads skipped so far by an open one."""
    ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
    samples = scrape(server)
    skipped = sum(
        samples.get(("feature_gateway_backend_reads_total", frozenset({"backend": b, "outcome": "open"}.items())), 0)
        for b in ("hot", "bulk", "local")
    )
    states = {f"read {b}": s for b, s in ready["circuits"].items()}
    states |= {f"write {b}": s for b, s in ready["write_circuits"].items()}
    return states, skipped


async def test_more_load_than_the_worker_can_serve_is_refused_at_once_not_served_late(
    tmp_path: Path, names: Names
) -> None:
    """256 clients back to back against one worker: without admission control every request waits in one
    queue and most miss their 100 ms deadline (answered all defaults); with it, what is admitted is served
    whole and the rest is told 503 overload, with Retry-After."""
    with serving(tmp_path, names) as server:
        answers = await flood(server.port, connections=256, seconds=4, deadline_ms=100)
        states, skipped = circuits(server)
        shed = scrape(server)
    total = sum(answers.values())
    report = f"{total} answers: {dict(answers.most_common())}"
    assert answers["served"] > 0, report
    assert answers["503 overload"] > 0, report  # it was overloaded, and said so
    assert set(answers) <= {"served", "503 overload"} | {k for k in answers if k.startswith("degraded")}, report
    degraded = sum(n for k, n in answers.items() if k.startswith("degraded"))
    assert degraded <= 0.02 * answers["served"], report  # what is admitted is served in time
    assert set(states.values()) == {"closed"}, states
    assert skipped == 0
    assert metric_value(shed, "requests_shed_total", work="read") > 0


async def test_a_starved_cpu_opens_no_circuit_on_healthy_backends(tmp_path: Path, names: Names) -> None:
    """CPU hogs on every core and the gateway at the lowest priority: its event loop runs late, replies from
    healthy Redis, PostgreSQL and SQLite sit unread, reads miss their 60 ms deadline (more than the 50 ms after
    which a cut-off read used to count against the backend). None of that is the backends'
    doing, so no circuit opens, no write is refused by one, and once the hogs stop every read is served."""
    hogging: list[subprocess.Popen[bytes]] = []
    with serving(tmp_path, names) as server:
        assert server.proc is not None
        try:
            hogging = starve(server.proc.pid)
            writes: Counter[int] = Counter()

            async def writer() -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                    stop = time.monotonic() + 4
                    while time.monotonic() < stop:
                        for group, rows in ROWS.items():
                            response = await client.post("/v1/features/write", json={"group": group, "rows": rows})
                            writes[response.status_code] += 1
                            # A starved worker may not finish a write within its timeout (503, "did not confirm"),
                            # or refuse it (overload); what it must never do is refuse it for an open circuit.
                            assert "circuit is open" not in response.text, response.text

            starved, _ = await asyncio.gather(flood(server.port, 16, 4, deadline_ms=60), writer())
        finally:
            for hog in hogging:
                hog.kill()
                hog.wait()
        states, skipped = circuits(server)
        after = await flood(server.port, 4, 1, deadline_ms=1000)
        lag = scrape(server)
    late_loop = metric_value(lag, "event_loop_lag_seconds_count") - metric_value(
        lag, "event_loop_lag_seconds_bucket", le="0.05"
    )
    report = f"while starved: {dict(starved.most_common())}; writes {dict(writes)}; after: {dict(after)}"
    # The starvation was real: the loop woke more than 50 ms late, and reads missed their deadline.
    assert late_loop > 0, report
    assert any(k.startswith("degraded") or k == "503 overload" for k in starved), report
    assert set(states.values()) == {"closed"}, f"{states}; {report}"
    assert skipped == 0, report
    assert set(after) == {"served"}, report


def read_answer(reader: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off a socket's buffered reader (pipelined answers may come in one read)."""
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers["content-length"]))


def test_a_request_refused_at_the_door_is_answered_before_its_body_and_its_connection_stays_usable(
    tmp_path: Path, names: Names
) -> None:
    """uvicorn's protocol refuses as the head is parsed (routers/admission.py): the 503 comes back while the
    body is still withheld, the body sent after it is skipped, pipelined requests are each answered in order,
    and both connections serve the next request once the worker has room."""
    store = RedisProcess()
    path = tmp_path / "registry.yaml"
    path.write_text(names.registry(names.backend("redis", url=store.url)))
    one_at_a_time = {f"GATEWAY_ADMISSION_{k}_LIMIT": "1" for k in ("INITIAL", "MIN", "MAX")}
    server = GatewayProcess(path, tmp_path / "gateway.log", env={**os.environ, **one_at_a_time})
    body = json.dumps({"entities": {"consumer_id": [1]}, "features": ["live:orders_7d"], "deadline_ms": 10_000})
    head = (
        b"POST /v1/features/fetch HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    whole = head + body.encode()
    try:
        store.start()
        server.start()
        row = {"consumer_id": 1, "orders_7d": 7, "avg_basket": 1.0, "active": True, "name": None, "raw": None}
        row |= {"embedding": None, "ids": None}
        assert httpx.post(f"{server.url}/v1/features/write", json={"group": "live", "rows": [row]}).status_code == 200
        store.freeze()
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as held,
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as withheld,
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as pipelined,
        ):
            held_answers, withheld_answers, pipelined_answers = (s.makefile("rb") for s in (held, withheld, pipelined))
            # The first waits on the frozen Redis, holding the worker's one slot; two more are pipelined behind it.
            held.sendall(whole * 3)
            wait_until(lambda: metric_value(scrape(server), "admission_inflight") == 1, what="the fetch in flight")
            withheld.sendall(head)  # and not the body: only a refusal at the door can answer now
            refused = read_answer(withheld_answers)
            withheld.sendall(body.encode())
            pipelined.sendall(whole + whole)
            refused_twice = [read_answer(pipelined_answers), read_answer(pipelined_answers)]
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as closing:
                closing.sendall(head.replace(b"Host: gateway", b"Host: gateway\r\nExpect: 100-continue"))
                closing_answers = closing.makefile("rb")
                refused_closing = read_answer(closing_answers)
                # it would not send its body before a 100 Continue: the connection ends with the answer
                assert closing_answers.read() == b""
            store.thaw()
            served = read_answer(held_answers)
            # The second starts as the first is answered, while its slot is still held: refused. The third
            # starts after it (it must: its body was read long ago), served or refused as the slot allows.
            behind = [read_answer(held_answers), read_answer(held_answers)]
            held.sendall(whole)
            after_held = read_answer(held_answers)
            withheld.sendall(whole)
            after_withheld = read_answer(withheld_answers)
            pipelined.sendall(whole)
            after_pipelined = read_answer(pipelined_answers)
    finally:
        store.thaw()
        server.stop()
        store.stop()
    assert refused_closing[1]["connection"] == "close"
    for status, headers, answer in (refused, *refused_twice, refused_closing):
        assert status == 503
        assert headers["retry-after"] == "1"
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(answer)["type"].endswith("/overload")
    assert behind[0][0] == 503
    assert behind[1][0] in (200, 503)
    for status, _, answer in (served, after_withheld, after_pipelined, after_held):
        assert status == 200
        assert json.loads(answer)["rows"][0]["values"] == [7]
