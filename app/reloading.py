"""Reloading the registry and the API keys while serving: on SIGHUP, or POST /v1/admin/reload.

Both files are read and validated with start-up's rules first; only when both are valid are they swapped in, in one
step between requests (Gateway.reload; the key ring in the same step), so a bad edit never serves and never stops a
worker: it keeps its previous registry and keys, and the error names the file and the field path.

Several workers (`serve --workers N`): uvicorn's supervisor would restart every worker on SIGHUP; ours forwards it
to each one instead (app/workers.py), and a POST, which lands on one worker, reloads that one and then signals the
supervisor so that the others follow. A worker whose files have not changed since its last successful load skips
the work (by a hash of their bytes), which is what the worker that answered the POST does when the forwarded
signal reaches it too. A POST itself never skips: it may follow a signal sent to one worker only, or a reload that
failed elsewhere.

Part of the composition root: it is handed the paths and inputs the settings name, and reads no settings itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.auth import KeyRing, load_keys
from app.errors import KeyConfigError, RegistryError, ReloadRefused
from app.registry.load import load_registry
from app.registry.model import BackendSpec, Registry
from app.serving.gateway import Gateway
from app.serving.generations import Reloaded
from backends.base import FeatureBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConfigFiles:
    """Where the registry and the API keys are read from (what start-up read)."""

    registry: Path | None  # None: the app was handed its registry (tests), there is no file to reread
    api_keys: str | None  # GATEWAY_API_KEYS: fixed for the life of the process
    api_keys_file: Path | None
    env: Mapping[str, str]  # fills the registry's ${VAR}s

    def fingerprint(self) -> str | None:
        """A hash of the bytes a load reads; None when a file cannot be read (the load then says why)."""
        if self.registry is None:
            return None
        digest = hashlib.sha256()
        try:
            digest.update(self.registry.read_bytes())
            digest.update(b"\0keys\0")
            if self.api_keys_file is not None:
                digest.update(self.api_keys_file.read_bytes())
            elif self.api_keys is not None:
                digest.update(self.api_keys.encode())
        except OSError:
            return None
        return digest.hexdigest()[:16]

    def load(self) -> Loaded:
        """Both files, validated as at start-up; RegistryError or KeyConfigError naming the file and field."""
        # Hashed before reading: should a file change in between, the hash is of the older bytes, so the next
        # reload sees a difference and reads it again (never the other way round, which would skip a change)
        fingerprint = self.fingerprint()
        if self.registry is None:
            raise RegistryError("(none)", "(file)", "this gateway was handed its registry, not a file to reread")
        registry = load_registry(self.registry, self.env)
        keyring = load_keys(self.api_keys, self.api_keys_file, registry)
        return Loaded(registry, keyring, fingerprint)


@dataclass(frozen=True, slots=True)
class Loaded:
    registry: Registry
    keyring: KeyRing
    fingerprint: str | None


@dataclass(frozen=True, slots=True)
class Told:
    """Whether the other workers were asked to reload, and how (or why not)."""

    told: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Reload:
    """A reload done (or skipped: the files were those of the last load)."""

    registry: str
    fingerprint: str | None
    keys: KeyRing
    changes: Reloaded | None  # None: skipped
    worker: int  # this process's pid


class Reloader:
    """Reloads one worker's gateway and key ring; one reload at a time."""

    def __init__(
        self,
        files: ConfigFiles,
        gateway: Gateway,
        open_backend: Callable[[BackendSpec, Registry], FeatureBackend],
        swap_keys: Callable[[KeyRing], None],
        *,
        keys: KeyRing,
        fingerprint: str | None,
        supervisor_pid: int | None = None,
    ) -> None:
        self.files = files
        self.gateway = gateway
        self.open_backend = open_backend
        self.swap_keys = swap_keys
        self.keys = keys
        self.fingerprint = fingerprint  # of the last successful load (None: not loaded from the files)
        self.supervisor_pid = supervisor_pid
        self._lock = asyncio.Lock()

    async def reload(self, *, force: bool, why: str) -> Reload:
        """Read, validate and swap in both files; ReloadRefused (logged) when one is invalid. Without `force`,
        files whose hash is that of the last successful load are not read again."""
        async with self._lock:
            if not force:
                fingerprint = self.files.fingerprint()
                if fingerprint is not None and fingerprint == self.fingerprint:
                    log.info(
                        "%s: worker %d: registry %s and API keys unchanged since generation %d (%s); nothing to do",
                        why,
                        os.getpid(),
                        self.files.registry,
                        self.gateway.current.number,
                        fingerprint,
                    )
                    return Reload(str(self.files.registry), fingerprint, self.keys, None, os.getpid())
            try:
                # In a thread: a large registry takes a while to parse, and the loop serves meanwhile
                loaded = await asyncio.to_thread(self.files.load)
            except (RegistryError, KeyConfigError) as exc:
                generation = self.gateway.current.number
                log.error(
                    "%s: worker %d: reload refused, still serving generation %d: %s",
                    why,
                    os.getpid(),
                    generation,
                    exc.detail,
                )
                raise ReloadRefused(exc, generation) from None
            changes = await self.gateway.reload(
                loaded.registry, self.open_backend, on_swap=lambda: self.swap_keys(loaded.keyring)
            )
            self.fingerprint = loaded.fingerprint
            self.keys = loaded.keyring
            log.info(
                "%s: worker %d: registry %s reloaded as generation %d (%s), %d API keys: %s",
                why,
                os.getpid(),
                self.files.registry,
                changes.generation,
                loaded.fingerprint,
                len(loaded.keyring.keys),
                changes.summary(),
            )
            return Reload(str(self.files.registry), loaded.fingerprint, loaded.keyring, changes, os.getpid())

    def tell_other_workers(self) -> Told:
        """Signal the supervisor, which forwards SIGHUP to every worker (app/workers.py)."""
        pid = self.supervisor_pid
        if pid is None:
            return Told(False, "a single worker: there is no other to tell")
        if os.getppid() != pid:  # the supervisor is gone: that pid may now be anyone's
            return Told(False, f"the supervisor (pid {pid}) is not this worker's parent any more; not signalled")
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            return Told(False, f"could not signal the supervisor (pid {pid}): {exc.strerror or exc}")
        return Told(True, f"SIGHUP sent to the supervisor (pid {pid}), which forwards it to every worker")


async def reload_on_signal(reloader: Reloader) -> None:
    """A SIGHUP's reload: its outcome is in the log, nobody waits for an answer."""
    try:
        await reloader.reload(force=False, why="SIGHUP")
    except ReloadRefused:
        pass  # logged, naming the file and field
    except Exception:
        log.exception("SIGHUP: worker %d: reload failed; still serving the previous registry", os.getpid())


def on_sighup(callback: Callable[[], Any]) -> Callable[[], None]:
    """Run `callback` on the event loop at each SIGHUP; answers the function that puts the previous handling back.

    Without this a single-worker server dies of SIGHUP (uvicorn handles only SIGINT and SIGTERM). Only the main
    thread may handle signals: elsewhere (an app under a test's thread) this does nothing.
    """
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGHUP)
    try:
        loop.add_signal_handler(signal.SIGHUP, callback)
    except (ValueError, RuntimeError, NotImplementedError):
        return lambda: None

    def restore() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGHUP, previous)

    return restore
