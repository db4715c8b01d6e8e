"""A pipelined read connection to Redis for the hot path: MGET on one socket, replies matched in order.

Why not redis-py here: its asyncio client spends about 60-80 us of CPU per command (pool checkout under a
lock, a readability probe of the socket, per-command timeouts and metrics hooks) against about 12-15 us for
this (hiredis parsing, one write per command), and every concurrent request needs its own pooled
connection. Redis answers a connection's commands in order, so one socket serves every request of a
process: a reply whose caller gave up (deadline) is read and dropped, never handed to the next caller.
redis-py still does everything else (writes, scripts, ping, cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import RedisSSLContext, SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


def pack(*parts: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, str):
            data = part.encode()
        else:
            data = b"%d" % part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.pending.popleft()[0]
            if future.done():  # its caller was cancelled: the reply is consumed and dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisConnectionError(f"connection lost: {exc or 'closed by server'}")
        if not self.closed.done():
            self.closed.set_result(None)
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(self.lost)

    def send_many(self, payloads: Sequence[bytes]) -> list[asyncio.Future[Any]]:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise self.lost or RedisConnectionError("connection closed")
        loop, now = asyncio.get_running_loop(), time.monotonic()
        futures = [loop.create_future() for _ in payloads]
        self.pending.extend((future, now) for future in futures)
        self.transport.write(b"".join(payloads))
        return futures

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise self.lost or RedisConnectionError("connection closed")
        future = asyncio.get_running_loop().create_future()
        self.pending.append((future, time.monotonic()))
        self.transport.write(payload)
        return future


class PipelinedReader:
    """MGET over one lazily (re)connected socket; `timeout_s` also bounds how long a reply may be overdue
    before the connection is declared dead (a server that vanished without closing the socket)."""

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float, client_name: str):
        self.options = parse_url(url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.client_name = client_name
        self._protocol: _Protocol | None = None
        # One connection attempt shared by every caller and shielded from their deadlines: a TLS + AUTH
        # handshake may take longer than one request's deadline, and must still finish for the next ones.
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self.options
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if "path" in options:
                    _, protocol = await loop.create_unix_connection(_Protocol, options["path"])
                else:
                    tls = self._tls() if options.get("connection_class") is SSLConnection else None
                    _, protocol = await loop.create_connection(
                        _Protocol, options.get("host", "localhost"), options.get("port", 6379), ssl=tls
                    )
                await self._handshake(protocol)
        except BaseException:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
            raise
        return protocol

    def _tls(self) -> ssl.SSLContext:
        """The URL's TLS options (ssl_cert_reqs, ssl_ca_certs, ...) with redis-py's defaults, as its writes use."""
        o: dict[str, Any] = dict(self.options)
        return RedisSSLContext(
            keyfile=o.get("ssl_keyfile"),
            certfile=o.get("ssl_certfile"),
            cert_reqs=o.get("ssl_cert_reqs", "required"),
            ca_certs=o.get("ssl_ca_certs"),
            ca_data=o.get("ssl_ca_data"),
            ca_path=o.get("ssl_ca_path"),
            check_hostname=o.get("ssl_check_hostname", True),
            min_version=o.get("ssl_min_version"),
            ciphers=o.get("ssl_ciphers"),
            password=o.get("ssl_password"),
        ).get()

    async def _handshake(self, protocol: _Protocol) -> None:
        options = self.options
        handshake = []
        if options.get("password"):
            auth = [options["username"], options["password"]] if options.get("username") else [options["password"]]
            handshake.append(pack("AUTH", *auth))
        if options.get("db"):
            handshake.append(pack("SELECT", str(options["db"])))
        handshake.append(pack("CLIENT", "SETNAME", self.client_name))
        replies = [protocol.send(command) for command in handshake]
        for reply in replies:
            await reply

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None and protocol.transport is not None:
            if not protocol.transport.is_closing():
                if not protocol.pending or time.monotonic() - protocol.pending[0][1] < self.timeout_s:
                    return protocol
                protocol.transport.abort()  # the oldest reply is overdue: the server is gone or hung
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.get_running_loop().create_task(self._reconnect())
            # Every caller may have given up by the time it fails; its exception is still consumed.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _reconnect(self) -> _Protocol:
        try:
            self._protocol = await self._connect()
            return self._protocol
        finally:
            self._connecting = None

    async def mget(self, keys: Sequence[str | bytes]) -> list[bytes | None]:
        reply: list[bytes | None] = await self.send(pack("MGET", *keys))
        return reply

    async def send(self, payload: bytes) -> Any:
        """A command packed by the caller, for reads only: resent once on a connection that broke."""
        for attempt in (1, 2):
            protocol = await self._ready()
            try:
                return await protocol.send(payload)
            except RedisConnectionError:
                # A pooled socket that died with a Redis restart: reconnect once (reads are idempotent).
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def send_many(self, payloads: Sequence[bytes]) -> list[Any]:
        """Commands packed by the caller, for reads only, written at once; their replies in order (the first
        error raised once all have answered). Resent once on a connection that broke."""
        for attempt in (1, 2):
            protocol = await self._ready()
            try:
                futures = protocol.send_many(payloads)
                replies = await asyncio.gather(*futures, return_exceptions=True)
            except RedisConnectionError:
                if attempt == 2:
                    raise
                continue
            for reply in replies:
                if isinstance(reply, RedisConnectionError) and attempt == 1:
                    break  # the connection broke under them: once more
                if isinstance(reply, BaseException):
                    raise reply
            else:
                return replies
        raise RedisConnectionError("connection lost twice")

    async def call(self, *parts: bytes | str | int) -> Any:
        """One command, sent once: a connection lost on the way raises (the caller knows whether it may
        resend). For big script calls, where redis-py's packing of thousands of arguments costs milliseconds."""
        protocol = await self._ready()
        return await protocol.send(pack(*parts))

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await protocol.closed  # let the loop finish closing the socket before it may stop
