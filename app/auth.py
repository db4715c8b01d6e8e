"""API keys: the config is parsed and validated once at start-up; each request is checked in constant time.

A client sends `Authorization: Bearer <token>`. The gateway keeps no token, only a list of entries

    [{"name": "ranker", "sha256": "<64 hex digits>", "scopes": ["read"], "groups": ["consumer_live"]}]

from GATEWAY_API_KEYS (JSON) or GATEWAY_API_KEYS_FILE (YAML or JSON); `feature-gateway keys new` makes a
token and its entry. Scopes: `read` (fetch, Feast fetch, registry, usage, metrics), `write` (write, Feast
write), `admin` (everything, and any admin endpoint to come). `groups`, when given, limits the key to those
feature groups. Every endpoint then needs a key but /healthz, /docs and /openapi.json (these describe the API,
not its data); with no keys configured authentication is off (and `serve` binds to loopback only).

Why a plain SHA-256 rather than bcrypt, scrypt or argon2: those are slow on purpose so that a stolen hash of a
low-entropy human password cannot be guessed quickly. A token here is 256 random bits, so finding it from its
hash is about 2^255 hash computations however cheap each one is; a slow KDF would add nothing but tens of
milliseconds of CPU to every request (and hand anyone with a bad token a way to burn it). A salt is
unnecessary for the same reason (no precomputed table covers a 256-bit space). So a leaked key file is not a
leaked key. This holds only for random tokens: never configure the hash of a password a person chose.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from app.errors import Forbidden, KeyConfigError, Unauthorized, ValidationFailed
from app.registry.model import OnDemand, Registry

Scope = Literal["read", "write", "admin"]
SCOPES: Final = ("read", "write", "admin")
TOKEN_PREFIX: Final = "fgk_"  # makes a leaked token recognisable (secret scanners, grep of logs)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
# RFC 6750 b64token; longer than any token we make by far, short enough that a huge header is not hashed.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]{16,512}=*$")
_FIELDS = ("name", "sha256", "scopes", "groups")
INLINE_SOURCE = "GATEWAY_API_KEYS"


def new_token() -> str:
    """A fresh token: the prefix and 32 random bytes, base64url (256 bits of entropy)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 the config stores for a token (see the module docstring for why SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: bytes = field(repr=False)
    scopes: frozenset[str]
    groups: frozenset[str] | None  # None: every group
    grants: frozenset[str] = field(repr=False)  # scopes, or every scope for admin

    def may(self, scope: str) -> bool:
        return scope in self.grants


class KeyRing:
    """The configured keys. Empty: authentication is off and `check` lets everything through."""

    __slots__ = ("enabled", "keys", "source")

    def __init__(self, keys: Sequence[ApiKey] = (), source: str | None = None):
        self.keys = tuple(keys)
        self.source = source
        self.enabled = bool(self.keys)

    def identify(self, authorization: str | None) -> ApiKey:
        """The key that `Authorization: Bearer <token>` carries; Unauthorized when none, malformed or unknown.

        Every configured hash is compared with `hmac.compare_digest` and the loop never stops early, so
        the time taken depends on the number of keys, not on which one (if any) matched or on how much of
        a hash matched. Errors never quote the header.
        """
        if not authorization:
            raise Unauthorized(
                "this endpoint needs an API key: send the header 'Authorization: Bearer <token>'",
                invalid_token=False,
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip(" ")
        if scheme.lower() != "bearer" or not _TOKEN.match(token):
            raise Unauthorized(
                "the Authorization header is not 'Bearer <token>' with a well-formed token", invalid_token=True
            )
        digest = hashlib.sha256(token.encode()).digest()
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        if found is None:
            raise Unauthorized("the API key is not valid", invalid_token=True)
        return found

    def check(self, authorization: str | None, scope: Scope | None) -> ApiKey | None:
        """The caller's key, checked for `scope` (None: any valid key). None when authentication is off."""
        if not self.enabled:
            return None
        key = self.identify(authorization)
        if scope is not None and scope not in key.grants:
            raise Forbidden(f"this API key does not have the {scope!r} scope", scope=scope)
        return key


# -- group limits (called by the fetch and write paths and the registry route) -------------------------


def check_feature_groups(
    features: Sequence[str], groups: Collection[str], on_demand: Mapping[str, OnDemand] | None = None
) -> None:
    """Forbidden naming the first feature ref (`group:feature`, `group:*`, an on-demand feature) outside
    `groups`; an on-demand feature is inside when every group it reads is.

    Runs before the refs are planned, so a group-limited key learns nothing about other groups: an unknown
    group and a forbidden one get the same 403, as do an unknown name and an on-demand feature reading a group
    outside the key's, and no error lists the registry's groups.
    """
    for i, ref in enumerate(features):
        source, sep, _ = ref.partition(":")
        view = (on_demand or {}).get(source)
        if view is not None:
            if all(g in groups for g in view.input_groups):
                continue
        elif sep:
            if source in groups:
                continue
            raise Forbidden(f"this API key may not use feature group {source!r}", field=f"features[{i}]")
        elif source in groups:
            raise ValidationFailed("expected group:feature or group:*", field=f"features[{i}]")
        raise Forbidden(f"this API key may not use {source!r}", field=f"features[{i}]")


def check_write_group(group: str, groups: Collection[str]) -> None:
    if group not in groups:
        raise Forbidden(f"this API key may not write feature group {group!r}", field="group")


def check_every_group(groups: Collection[str] | None, what: str) -> None:
    """Forbidden for a group-limited key: `what` reports on every group."""
    if groups is not None:
        raise Forbidden(f"this API key is limited to some feature groups; {what} reports on all of them")


def visible_registry(registry: Registry, groups: Collection[str] | None) -> dict[str, Any]:
    """`registry.describe()`, cut down to `groups` and the entities and backends they use."""
    described = registry.describe()
    if groups is None:
        return described
    kept = {name: g for name, g in described["groups"].items() if name in groups}
    entities = {g["entity"] for g in kept.values()}
    backends = {g["backend"] for g in kept.values()}
    return {
        "backends": {n: b for n, b in described["backends"].items() if n in backends},
        "entities": {n: e for n, e in described["entities"].items() if n in entities},
        "groups": kept,
    }


# -- loading -------------------------------------------------------------------------------------------


def load_keys(inline: str | None, path: Path | None, registry: Registry | None) -> KeyRing:
    """The key ring from GATEWAY_API_KEYS (`inline`, JSON) or GATEWAY_API_KEYS_FILE (`path`); empty when
    neither is set. Raises KeyConfigError naming the source and the bad field, like the registry loader.
    """
    if inline is not None and path is not None:
        raise KeyConfigError(INLINE_SOURCE, "(root)", "GATEWAY_API_KEYS_FILE is set too: configure keys in one place")
    if inline is not None:
        if not inline.strip():
            raise KeyConfigError(
                INLINE_SOURCE, "(root)", "empty; give a JSON list of keys, or unset it to run without authentication"
            )
        return KeyRing(parse_keys(_json(inline, INLINE_SOURCE), INLINE_SOURCE, registry), INLINE_SOURCE)
    if path is not None:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyConfigError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
        doc = _json(text, source) if path.suffix.lower() == ".json" else _yaml(text, source)
        return KeyRing(parse_keys(doc, source, registry), source)
    return KeyRing()


def _json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyConfigError(source, f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}") from None


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise KeyConfigError(source, where, f"not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise KeyConfigError(source, "(file)", f"not valid YAML: {exc}") from None


def _strings(value: Any, path: str, source: str, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise KeyConfigError(source, path, f"expected a non-empty list of {what}")
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise KeyConfigError(source, f"{path}[{i}]", f"expected one of the {what}, as a string")
        if item in seen:
            raise KeyConfigError(source, f"{path}[{i}]", f"{item!r} is listed twice")
        seen[item] = i
    return list(value)


def parse_keys(doc: Any, source: str, registry: Registry | None) -> list[ApiKey]:
    """Validate the key list; `registry` (when given) must hold every group a key is limited to.

    Errors never quote a `sha256` value: it might be a token pasted in the wrong place.
    """
    if doc is None or doc == []:
        raise KeyConfigError(
            source, "(root)", "no keys; give at least one, or unset it to run without authentication (loopback only)"
        )
    if not isinstance(doc, list):
        raise KeyConfigError(source, "(root)", "expected a list of keys, each {name, sha256, scopes, groups?}")
    keys: list[ApiKey] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for i, entry in enumerate(doc):
        path = f"[{i}]"
        if not isinstance(entry, Mapping):
            raise KeyConfigError(source, path, "expected a mapping with name, sha256, scopes and optionally groups")
        for name in entry:
            if name not in _FIELDS:
                raise KeyConfigError(source, f"{path}.{name}", f"unknown field; expected one of {', '.join(_FIELDS)}")
        for required in ("name", "sha256", "scopes"):
            if required not in entry:
                raise KeyConfigError(source, f"{path}.{required}", "required")

        name = entry["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            reason = "expected 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            raise KeyConfigError(source, f"{path}.name", reason)
        if name in names:
            raise KeyConfigError(source, f"{path}.name", f"{name!r} is already the name of [{names[name]}]")
        names[name] = i

        sha = entry["sha256"]
        if not isinstance(sha, str) or not _SHA256_HEX.match(sha):
            pasted = isinstance(sha, str) and sha.startswith(TOKEN_PREFIX)
            hint = " (this looks like the token itself: configure its hash)" if pasted else ""
            raise KeyConfigError(source, f"{path}.sha256", f"expected the 64 hex digits of the token's SHA-256{hint}")
        digest = bytes.fromhex(sha)
        if digest in digests:
            raise KeyConfigError(source, f"{path}.sha256", f"the same hash as [{digests[digest]}]: one token, two keys")
        digests[digest] = i

        scopes = _strings(entry["scopes"], f"{path}.scopes", source, "scopes " + ", ".join(SCOPES))
        for j, scope in enumerate(scopes):
            if scope not in SCOPES:
                raise KeyConfigError(
                    source, f"{path}.scopes[{j}]", f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}"
                )

        groups: frozenset[str] | None = None
        if "groups" in entry:
            if "admin" in scopes:
                raise KeyConfigError(
                    source, f"{path}.groups", "an admin key may do everything, so it cannot be limited to groups"
                )
            listed = _strings(entry["groups"], f"{path}.groups", source, "feature groups")
            if registry is not None:
                for j, group in enumerate(listed):
                    if group not in registry.groups:
                        raise KeyConfigError(
                            source,
                            f"{path}.groups[{j}]",
                            f"unknown group {group!r}; the registry has {', '.join(registry.groups)}",
                        )
            groups = frozenset(listed)

        grants = frozenset(SCOPES) if "admin" in scopes else frozenset(scopes)
        keys.append(ApiKey(name, digest, frozenset(scopes), groups, grants))
    return keys


def key_entry(name: str, token: str, scopes: Sequence[str], groups: Sequence[str] = ()) -> dict[str, Any]:
    """The config entry for a token, in the shape `parse_keys` reads."""
    entry: dict[str, Any] = {"name": name, "sha256": hash_token(token), "scopes": list(scopes)}
    if groups:
        entry["groups"] = list(groups)
    return entry
