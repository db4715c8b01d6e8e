"""`python -m bench.otlp_sink [PORT]`: an OTLP/HTTP receiver that accepts every export at once and keeps nothing
but counts: `GET /stats` answers `{"exports": N, "spans": S, "bytes": B}`.

For measuring what tracing costs the gateway itself (`bench/README.md`, tracing rows): the exporter's work is
all on the gateway's side, and a real collector's would add its own CPU to the box's. The spans are counted
(upb's C parser, about a millisecond per batch of 512) so a run whose spans never arrived cannot pass for a
cheap one.
"""

from __future__ import annotations

import asyncio
import json
import sys

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
STATS = {"exports": 0, "spans": 0, "bytes": 0, "undecodable": 0}


def _count(body: bytes) -> None:
    STATS["exports"] += 1
    STATS["bytes"] += len(body)
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except Exception:  # noqa: BLE001 (counted, not fatal: the run reports it)
        STATS["undecodable"] += 1
        return
    STATS["spans"] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if head.startswith(b"GET /stats"):
                stats = json.dumps(STATS).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(stats), stats)
                )
                continue
            _count(body)
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4319))
