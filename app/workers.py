"""`serve --workers N`: uvicorn's supervisor, except that SIGHUP reloads each worker's registry instead of
restarting the worker.

uvicorn's own supervisor answers SIGHUP by starting a new process per worker and retiring the old one: every
connection pool is opened again, every worker's counters start from zero, and a registry that does not load kills
each new worker at start. Here SIGHUP is forwarded to every worker, which rereads the files itself and swaps
them in between requests, or keeps serving and logs why not (app/reloading.py).

A worker that is still starting may not handle SIGHUP yet (its default action would end it), so it gets the signal
once it is ready; it skips the work when it already loaded the files as they are (a hash of their bytes).
"""

from __future__ import annotations

import logging
import os
import signal

from uvicorn.supervisors.multiprocess import Multiprocess, Process

logger = logging.getLogger("uvicorn.error")

READY_TIMEOUT_S = 1.0  # how long asking a worker whether it is ready may take, in the supervisor's loop


class ReloadingSupervisor(Multiprocess):
    """Forwards SIGHUP to every worker (see the module's text); otherwise uvicorn's Multiprocess."""

    _waiting: list[Process]  # workers that are to be signalled once they are ready

    def handle_hup(self) -> None:
        logger.info("Received SIGHUP, telling %d workers to reload the registry and API keys.", len(self.processes))
        self._waiting = list(self.processes)
        self._forward()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        if getattr(self, "_waiting", None):
            self._forward()

    def _forward(self) -> None:
        # A worker replaced meanwhile is not waited for: the new one read the files as they are when it started
        waiting = [p for p in self._waiting if p in self.processes and p.process.is_alive()]
        self._waiting = []
        for process in waiting:
            if process.pid is None or not process.is_ready(timeout=READY_TIMEOUT_S):
                self._waiting.append(process)
                continue
            try:
                os.kill(process.pid, signal.SIGHUP)
            except ProcessLookupError:
                continue  # it ended meanwhile; keep_subprocess_alive replaces it
            logger.info("Sent SIGHUP to worker [%d].", process.pid)
