"""Request bodies in: read (bounded), checked to be JSON (415 otherwise), decoded with msgspec into the
serving core's typed requests, with errors that name the field."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope

from app.errors import BadRequest, TooLarge, UnsupportedMedia, ValidationFailed

T = TypeVar("T", bound=msgspec.Struct)
_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$")


def check_json_media(scope: Scope, *, untyped_ok: bool = False) -> None:
    """Refuse (415) a body not declared `application/json`.

    Why: a web page may send a cross-origin POST without asking the server first (no CORS preflight) only with
    `text/plain`, `application/x-www-form-urlencoded`, `multipart/form-data` or no content type at all; parsing
    such bodies as JSON would let any page a developer opens write to a keyless gateway on loopback. Demanding
    `application/json` forces the preflight, which fails unless `cors_origins` allows the page's origin.

    `untyped_ok` admits a body with no content type from a client that is not a browser (no `Origin` header):
    Feast's remote online store posts its JSON that way, and browsers send `Origin` on every cross-origin POST.
    """
    media: bytes | None = None
    origin = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value
        elif name == b"origin":
            origin = True
    if media is None:
        if untyped_ok and not origin:
            return
        raise UnsupportedMedia("send the body with content-type: application/json", field="(content-type)")
    kind, _, params = media.partition(b";")
    charset = params.strip().lower().partition(b"charset=")[2].strip(b'" ')
    if kind.strip().lower() != b"application/json" or charset not in (b"", b"utf-8", b"utf8"):
        shown = media.decode("latin-1")[:100]
        raise UnsupportedMedia(
            f"content-type {shown!r} is not accepted; send the body as application/json (UTF-8)",
            field="(content-type)",
        )


async def read_body(request: Request, limit: int, *, untyped_ok: bool = False) -> bytes:
    """The JSON body (see check_json_media), refused with 413 as soon as it passes `limit` bytes (not after
    buffering all of it)."""
    return await receive_body(request.scope, request.receive, limit, untyped_ok=untyped_ok)


async def receive_body(scope: Scope, receive: Receive, limit: int, *, untyped_ok: bool = False) -> bytes:
    """read_body on the raw ASGI call: what the routes FastAPI serves and the fast path (routers/fast_path.py)
    share."""
    check_json_media(scope, untyped_ok=untyped_ok)
    declared = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            declared = value
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {declared.decode()} bytes; the limit is {limit}", field="(body)")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over the limit of {limit} bytes", field="(body)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_LENIENT: dict[type[msgspec.Struct], msgspec.json.Decoder[Any]] = {}


def _lenient_decoder(kind: type[msgspec.Struct]) -> msgspec.json.Decoder[Any]:
    decoder = _LENIENT.get(kind)
    if decoder is None:
        decoder = _LENIENT[kind] = msgspec.json.Decoder(kind, float_hook=float)
    return decoder


def decode_body(body: bytes, kind: type[T]) -> T:
    """`body` (read by read_body, so within its size limit) as a `kind`; 400/422 naming the field otherwise."""
    try:
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as exc:
            if not str(exc).startswith("Number out of range"):
                raise
        # A number literal past float64 (1e309) in a free-form value (an id, a row's feature): decoded as
        # infinity, the dtype checks that follow refuse it naming the exact field (msgspec cannot: `[...]`).
        lenient: T = _lenient_decoder(kind).decode(body)
        return lenient
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _MSGSPEC_PATH.search(message)
        # `[...]` stands for "some key of this object" in msgspec's paths: name the object instead.
        field = match[1].lstrip(".").partition("[...]")[0] if match else ""
        reason = message[: match.start()] if match else message
        if reason.startswith("Object missing required field"):
            field = ".".join(filter(None, (field, message.split("`")[1])))  # name the missing field itself
        elif reason.startswith("Object contains unknown field"):
            reason = f"unknown field; expected one of {', '.join(kind.__struct_fields__)}"
            field = message.split("`")[1] if not match else field
        raise ValidationFailed(reason, field=field or "(body)") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", field="(body)") from None
    except UnicodeDecodeError:
        # msgspec raises this (not DecodeError) for a string that is not UTF-8.
        raise BadRequest("the body is not valid UTF-8", field="(body)") from None
    except RecursionError:
        # msgspec refuses nesting past the interpreter's recursion limit at once, before building anything.
        raise BadRequest("the body is nested too deeply", field="(body)") from None
