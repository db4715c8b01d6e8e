"""The pipelined Redis read connection: order under cancellation, reconnects, AUTH and SELECT."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from backends.resp import PipelinedReader
from tests.support.faults import keep_redis_busy
from tests.support.registries import REDIS_URL, Names
from tests.support.servers import RedisProcess


def reader(url: str = REDIS_URL, timeout_s: float = 1.0) -> PipelinedReader:
    return PipelinedReader(url, timeout_s=timeout_s, connect_timeout_s=1.0, client_name="feature-gateway:test")


async def test_a_cancelled_read_never_hands_its_reply_to_the_next(names: Names) -> None:
    admin = redis.Redis.from_url(REDIS_URL)
    await admin.mset({f"{names.prefix}a": b"A", f"{names.prefix}b": b"B"})
    client = reader(timeout_s=5.0)  # above the script's second: no reply here is overdue, only queued
    try:
        await client.mget([f"{names.prefix}a"])  # connected
        # A second of script: however late this test runs on a loaded box, `slow` is sent and cancelled in it.
        busy = asyncio.create_task(keep_redis_busy(admin, 1_000_000))
        await asyncio.sleep(0.01)
        slow = asyncio.create_task(client.mget([f"{names.prefix}a"]))
        await asyncio.sleep(0.01)
        assert not slow.done(), "the script did not hold Redis: the race under test did not happen"
        slow.cancel()  # its reply ("A") is still coming on the shared socket
        assert await client.mget([f"{names.prefix}b", f"{names.prefix}missing"]) == [b"B", None]
        assert await client.mget([f"{names.prefix}a"]) == [b"A"]
        await busy
    finally:
        await client.aclose()
        await admin.aclose()


async def test_concurrent_reads_share_one_socket_in_order(names: Names) -> None:
    admin = redis.Redis.from_url(REDIS_URL)
    await admin.mset({f"{names.prefix}{i}": str(i).encode() for i in range(200)})
    client = reader()
    try:
        answers = await asyncio.gather(
            *(client.mget([f"{names.prefix}{i}", f"{names.prefix}{i + 1}"]) for i in range(199))
        )
        clients = await admin.client_list()
    finally:
        await client.aclose()
        await admin.aclose()
    assert answers == [[str(i).encode(), str(i + 1).encode()] for i in range(199)]
    assert sum(1 for c in clients if c["name"] == "feature-gateway:test") == 1


async def test_auth_and_database_from_the_url() -> None:
    server = RedisProcess()
    server.start()
    try:
        admin = redis.Redis(port=server.port)
        await admin.config_set("requirepass", "s3cret")
        await admin.aclose()
        admin = redis.Redis(port=server.port, password="s3cret", db=3)
        await admin.set("k", b"in db 3")
        client = reader(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        wrong = reader(f"redis://:nope@127.0.0.1:{server.port}/3")
        try:
            assert await client.mget(["k"]) == [b"in db 3"]
            with pytest.raises(redis.ResponseError):
                await wrong.mget(["k"])
        finally:
            await client.aclose()
            await wrong.aclose()
            await admin.aclose()
    finally:
        server.stop()


async def test_a_hung_server_is_abandoned_after_the_timeout_and_reconnected() -> None:
    server = RedisProcess()
    server.start()
    client = reader(f"redis://127.0.0.1:{server.port}/0", timeout_s=0.2)
    try:
        assert await client.mget(["k"]) == [None]
        first = client._protocol
        server.freeze()  # stopped for sure before the read (a SIGSTOP alone is delivered asynchronously)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.mget(["k"])  # no answer: the caller's deadline gives up
        # The reply is now overdue (> 0.2 s): the next read drops that socket and dials again, which
        # hangs too while the server is stopped (the kernel accepts, Redis never answers the handshake).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.mget(["k"])
        server.thaw()
        assert await client.mget(["k"]) == [None]
        assert client._protocol is not first
    finally:
        server.thaw()
        await client.aclose()
        server.stop()


async def test_a_connection_attempt_outlives_the_caller_that_started_it(names: Names) -> None:
    client = reader()
    try:
        caller = asyncio.create_task(client.mget([f"{names.prefix}a"]))
        await asyncio.sleep(0)  # it has started the connection attempt and waits on it...
        assert client._connecting is not None
        caller.cancel()  # ...and gives up before the connection can be made
        with pytest.raises(asyncio.CancelledError):
            await caller
        for _ in range(100):  # the shared attempt carries on and the connection is there for the next caller
            if client._protocol is not None:
                break
            await asyncio.sleep(0.01)
        assert client._protocol is not None
        first = client._protocol
        assert await client.mget([f"{names.prefix}a"]) == [None]
        assert client._protocol is first
    finally:
        await client.aclose()


def test_tls_options_from_the_url_are_honoured() -> None:
    import ssl

    strict = PipelinedReader("rediss://cache:6380/0", timeout_s=1, connect_timeout_s=1, client_name="t")._tls()
    assert strict.verify_mode == ssl.CERT_REQUIRED
    assert strict.check_hostname is True
    lax = PipelinedReader(
        "rediss://cache:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false",
        timeout_s=1,
        connect_timeout_s=1,
        client_name="t",
    )._tls()
    assert lax.verify_mode == ssl.CERT_NONE
    assert lax.check_hostname is False
