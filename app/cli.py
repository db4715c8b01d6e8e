"""`feature-gateway serve | check | migrate | materialize | consume | cost | keys new`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from pydantic import ValidationError

from app.auth import SCOPES, KeyRing, key_entry, load_keys, new_token, parse_keys
from app.errors import KeyConfigError, RegistryError
from app.registry.load import load_registry
from app.registry.model import Registry
from app.settings import Settings

if TYPE_CHECKING:
    from app.loading.checkpoint import Checkpoint


def _load(path: str | Path) -> Registry:
    try:
        return load_registry(path, os.environ)
    except RegistryError as exc:
        print(f"error: invalid registry: {exc.detail}", file=sys.stderr)
        raise SystemExit(2) from None


def _keys(registry: Registry) -> KeyRing:
    try:
        settings = Settings()
        return load_keys(settings.api_keys, settings.api_keys_file, registry)
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyConfigError as exc:
        print(f"error: invalid API keys: {exc.detail}", file=sys.stderr)
        raise SystemExit(2) from None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def cmd_check(args: argparse.Namespace) -> int:
    registry = _load(args.registry)
    features = sum(len(g.features) for g in registry.groups.values())
    print(
        f"{args.registry}: ok: {len(registry.backends)} backends, {len(registry.entities)} entities, "
        f"{len(registry.groups)} groups, {features} features"
        + (f", {len(registry.on_demand)} on-demand" if registry.on_demand else "")
        + (f", {len(registry.services)} services" if registry.services else "")
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from backends import open_backend

    registry = _load(args.registry)

    async def run() -> int:
        failed = 0
        for name, spec in registry.backends.items():
            backend = open_backend(spec, registry)
            try:
                async with asyncio.timeout(30):
                    await backend.migrate()
                print(f"{name} ({spec.type}): ready")
            except Exception as exc:
                failed += 1
                print(f"{name} ({spec.type}): failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            finally:
                await backend.aclose()
        return 1 if failed else 0

    return asyncio.run(run())


class ProgressBar:
    """A one-line progress bar on a terminal; elsewhere (logs, CI) a plain line every few seconds."""

    def __init__(self, stream: IO[str], label: str, *, interval_s: float | None = None):
        self.stream = stream
        self.label = label
        self.tty = stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.1 if self.tty else 5.0)
        self.started = self.last = time.monotonic()
        self.first_rows = 0
        self.drawn = False

    def begin(self, rows_done: int) -> None:
        """Rates count from here (a resumed load starts past its first rows)."""
        self.started = self.last = time.monotonic()
        self.first_rows = rows_done

    def update(self, checkpoint: Checkpoint, fraction: float | None, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.interval_s:
            return
        self.last = now
        rate = (checkpoint.rows_done - self.first_rows) / max(now - self.started, 1e-9)
        counts = (
            f"{checkpoint.rows_done:,} rows ({checkpoint.written:,} written, {checkpoint.skipped_stale:,} stale, "
            f"{checkpoint.rejected:,} rejected) {rate:,.0f} rows/s"
        )
        if fraction is not None:
            filled = int(fraction * 24)
            counts = f"[{'#' * filled}{'.' * (24 - filled)}] {fraction * 100:5.1f}% {counts}"
        if self.tty:
            self.stream.write(f"\r{self.label}: {counts}\x1b[K")
            self.drawn = True
        else:
            self.stream.write(f"{self.label}: {counts}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _registry_of(args: argparse.Namespace, settings: Settings) -> Registry | None:
    """The registry of `--registry`, else GATEWAY_REGISTRY; None (said on stderr) when neither is given."""
    path = args.registry or settings.registry
    if path is None:
        print("error: give --registry FILE (or set GATEWAY_REGISTRY)", file=sys.stderr)
        return None
    return _load(path)


def cmd_materialize(args: argparse.Namespace) -> int:
    """Exit 0: every row stored (or stale); 3: finished, some rows rejected; 1: backend failed (rerun resumes);
    2: arguments, registry, file or checkpoint are wrong (nothing written, unless the file is unreadable
    partway); 130: interrupted (rerun resumes)."""
    from app.errors import BackendFailed
    from app.loading.errors import MaterializeError
    from app.loading.load import open_load, run_load
    from app.metrics import Metrics

    settings = Settings()
    registry = _registry_of(args, settings)
    if registry is None:
        return 2
    if args.watch is not None or args.engine == "spark":
        from app.loading.scale_cli import materialize_at_scale

        return materialize_at_scale(args, settings)
    if args.file is None:
        print("error: give the FILE or directory to load (or --watch DIR)", file=sys.stderr)
        return 2
    path = Path(args.file)
    try:
        load = open_load(
            registry,
            args.group,
            path,
            limits=settings.limits(),
            fmt=args.format,
            batch_size=args.batch_size,
            checkpoint_path=Path(args.checkpoint) if args.checkpoint else None,
            restart=args.restart,
        )
        if load.checkpoint.rows_done:
            print(f"resuming after row {load.checkpoint.rows_done:,} ({load.checkpoint_path})", file=sys.stderr)
        progress = None if args.no_progress else ProgressBar(sys.stderr, f"{path.name} -> {args.group}")
        metrics = Metrics(settings.metrics_dir, worker=False)  # a gateway's folder: its /v1/usage shows the load
        report = asyncio.run(run_load(load, retries=args.retries, progress=progress, metrics=metrics))
    except MaterializeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BackendFailed as exc:
        print(f"error: {exc.detail}\nrerun the same command to continue from the last stored batch", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue from the last stored batch", file=sys.stderr)
        return 130
    print("\n".join(report.lines()), flush=True)
    return 3 if report.rejected else 0


def cmd_consume(args: argparse.Namespace) -> int:
    """Runs until SIGTERM or SIGINT; entries taken and not yet stored stay pending for the other consumers."""
    import gc
    import socket

    from app.serving.gateway import Gateway
    from app.streams.consume import NatsConsumer, RedisStreamConsumer
    from app.streams.ingest import aggregation_groups
    from backends import open_backend

    settings = Settings()
    registry = _registry_of(args, settings)
    if registry is None:
        return 2
    stream = registry.streams.get(args.stream)
    if stream is None:
        print(
            f"error: --stream: unknown stream {args.stream!r}; streams: {', '.join(registry.streams) or 'none'}",
            file=sys.stderr,
        )
        return 2
    source_type = (stream.source or {}).get("type")
    if source_type not in ("redis_stream", "nats"):
        print(
            f"error: stream {stream.name} has no source (redis_stream or nats): send its events over HTTP",
            file=sys.stderr,
        )
        return 2
    if not aggregation_groups(registry, stream.name):
        print(f"error: no aggregation group reads stream {stream.name}: nothing to consume into", file=sys.stderr)
        return 2
    name = args.name or f"{socket.gethostname()}:{os.getpid()}"

    async def run() -> int:
        names = {g.backend for g in aggregation_groups(registry, stream.name)}
        backends = {b: open_backend(registry.backends[b], registry) for b in names}
        gw = Gateway(registry, backends, limits=settings.limits())
        kind = RedisStreamConsumer if source_type == "redis_stream" else NatsConsumer
        consumer = kind(gw, stream, name, batch=args.batch, block_ms=args.block_ms, claim_idle_ms=args.claim_idle_ms)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            for backend in backends.values():
                await backend.migrate()
            # What start-up built lives as long as the process: out of the collector's way, whose full
            # collections would otherwise walk every module's objects again and again under load
            gc.collect()
            gc.freeze()
            print(f"consumer {name}: reading stream {stream.name} from {source_type}", flush=True)
            await consumer.run(stop)
        finally:
            await consumer.aclose()
            await gw.aclose()
        print(f"consumer {name}: stopped after {consumer.stored:,} entries stored, {consumer.dead:,} dead", flush=True)
        return 0

    return asyncio.run(run())


def cmd_serve(args: argparse.Namespace) -> int:
    from app.main import DEMO_REGISTRY

    # A bad registry or key config stops here with its message, not in each worker.
    args.registry = args.registry or os.environ.get("GATEWAY_REGISTRY") or None
    if args.registry:
        os.environ["GATEWAY_REGISTRY"] = str(Path(args.registry).resolve())
        registry = _load(args.registry)
    else:
        os.environ.pop("GATEWAY_REGISTRY", None)
        registry = _load(DEMO_REGISTRY)
    keyring = _keys(registry)
    if not keyring.enabled and not is_loopback(args.host):
        print(
            f"error: refusing to serve on {args.host}: no API keys are configured, so anyone who can reach the "
            "port could read and write every feature. Configure keys (GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE; "
            "`feature-gateway keys new` makes one) or serve on loopback only (--host 127.0.0.1, ::1 or localhost).",
            file=sys.stderr,
        )
        return 2
    if not args.registry:
        print("Serving the demo registry on embedded SQLite (no servers needed). Try:")
        print(
            f"  curl -s http://{args.host}:{args.port}/v1/features/fetch -H 'content-type: application/json' "
            + ('-H "authorization: Bearer $TOKEN" ' if keyring.enabled else "")
            + '-d \'{"entities": {"consumer_id": [101, 104, 106]}, '
            '"features": ["consumer_live:orders_7d", "consumer_history:*"]}\'',
            flush=True,
        )
    if args.workers > 1:
        # A POST /v1/admin/reload lands on one worker, which signals this process to have every worker reload
        os.environ["GATEWAY_SUPERVISOR_PID"] = str(os.getpid())
    else:
        os.environ.pop("GATEWAY_SUPERVISOR_PID", None)
    scratch = None
    if args.workers > 1 and not os.environ.get("GATEWAY_METRICS_DIR"):
        # Workers count separately; they meet in this directory so a scrape of any one sees them all.
        scratch = tempfile.mkdtemp(prefix="feature-gateway-metrics-")
        os.environ["GATEWAY_METRICS_DIR"] = scratch
    try:
        _run_uvicorn(args)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, plus the gateway's own loggers (backend up/down, shutdown) on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("app", "backends"):
        config["loggers"][name] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    # Lines logged while a request is served carry its trace and span ids (app.telemetry.TraceIds).
    config.setdefault("filters", {})["trace_ids"] = {"()": "app.telemetry.TraceIds"}
    config["handlers"]["default"]["filters"] = ["trace_ids"]
    config["formatters"]["default"]["fmt"] += "%(trace)s"
    return config


def _exit_after_drain(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _run_uvicorn(args: argparse.Namespace) -> None:
    """uvicorn.run's steps, with a supervisor whose SIGHUP reloads the workers' registry (app/workers.py)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from app.workers import ReloadingSupervisor

    # On SIGTERM uvicorn stops accepting, drains in-flight requests, runs the lifespan shutdown (closing every
    # pool), then raises the SIGTERM again so the previous handler acts: with the default one the process
    # would die of it (status 143) after a clean shutdown, skipping cmd_serve's cleanup. This handler makes
    # a clean drain exit 0.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    # SIGHUP's default action ends the process: a single worker ignores it until its lifespan handles it (a
    # reload), and again while it shuts down (the supervisor of several installs its own handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="routers.admission:ReceivedAtProtocol",  # httptools, stamping arrival and refusing at the door
        log_level=args.log_level,
        log_config=_log_config(args.log_level),
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    if config.workers > 1:
        ReloadingSupervisor(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def cmd_keys_new(args: argparse.Namespace) -> int:
    registry = _load(args.registry) if args.registry else None
    token = new_token()
    entry = key_entry(args.name, token, list(dict.fromkeys(args.scope)), list(dict.fromkeys(args.group or ())))
    try:
        parse_keys([entry], "keys new", registry)  # the rules start-up applies, so the entry will load
    except KeyConfigError as exc:
        option = exc.path.removeprefix("[0].").partition("[")[0].replace("scopes", "scope").replace("groups", "group")
        print(f"error: --{option}: {exc.reason}", file=sys.stderr)
        return 2
    print(f"token: {token}")
    print(f"entry: {json.dumps(entry)}")
    print(
        "The token is shown only this once: give it to the client now (it sends 'Authorization: Bearer <token>').\n"
        "The gateway keeps only its SHA-256: add the entry to the JSON list in GATEWAY_API_KEYS, or to the list\n"
        "in the file GATEWAY_API_KEYS_FILE names (YAML or JSON), and reload that file (SIGHUP, or POST\n"
        "/v1/admin/reload) or restart the gateway.",
        file=sys.stderr,
    )
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    """Asks a running gateway (the usage counts live there): exit 0 with the report, 1 when it cannot be had."""
    import httpx

    token = args.token or os.environ.get("GATEWAY_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = args.url.rstrip("/") + "/v1/cost"
    try:
        # Measuring may take the gateway up to its own timeout (10 s) the first time: a margin over it
        response = httpx.get(url, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"error: {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        detail = response.text
        with contextlib.suppress(ValueError):
            detail = response.json().get("detail", detail)
        print(f"error: {url} answered {response.status_code}: {detail}", file=sys.stderr)
        return 1
    report = response.json()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(cost_lines(report)))
    return 0


def cost_lines(report: dict[str, Any]) -> list[str]:
    """The report as aligned tables: one line per group per backend, per backend its totals, then the facts."""
    from app.tiering.cost import fmt_bytes, fmt_money

    def count(value: int | None, estimated: bool = False) -> str:
        return "-" if value is None else ("~" if estimated else "") + f"{value:,}"

    rows = [["group", "backend", "role", "keys", "size", "cost/month", "req/day", "default rate", "never requested"]]
    for name, group in report["groups"].items():
        first = True
        for backend, held in group["backends"].items():
            size = fmt_bytes(held["bytes"]) if held["bytes"] is not None else "-"
            rows.append(
                [
                    name if first else "",
                    backend,
                    held["role"].replace("_", " "),
                    count(held["keys"], held["keys_estimated"]),
                    ("~" if held["sampled"] and held["bytes"] else "") + size,
                    fmt_money(held["monthly_cost"]) if held["bytes"] is not None else "-",
                    *(
                        [
                            "-" if group["requests_per_day"] is None else f"{group['requests_per_day']:,.0f}",
                            "-" if group["default_rate"] is None else f"{group['default_rate']:.1%}",
                            ", ".join(group["never_requested"]) or "-",
                        ]
                        if first
                        else ["", "", ""]
                    ),
                ]
            )
            first = False
    totals = [["backend", "type", "price/GiB-month", "keys", "size", "cost/month", "measured"]]
    for name, backend in report["backends"].items():
        price = backend["cost_per_gb_month"]
        totals.append(
            [
                name,
                backend["type"],
                "-" if price is None else f"{price:g}",
                count(backend["keys"]),
                fmt_bytes(backend["bytes"]),
                fmt_money(backend["monthly_cost"]) if backend["bytes"] is not None else "-",
                f"error: {backend['error']}" if backend["error"] else "ok",
            ]
        )
    lines = [*_aligned(rows), "", *_aligned(totals)]
    lines.append(f"monthly cost, over the backends with a price: {fmt_money(report['monthly_cost'])}")
    lines += ["", "Recommendations (facts; nothing is done on their account):"]
    lines += [f"- {fact}" for fact in report["recommendations"]] or ["- none"]
    lines += ["", *(f"note: {note}" for note in report["notes"])]
    return lines


def _aligned(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, numbers right-aligned under their heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = {i for i in range(len(widths)) if all(_number(row[i]) for row in rows[1:] if row[i])}
    out = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in numeric and row is not rows[0] else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _number(cell: str) -> bool:
    return cell == "-" or cell.lstrip("~").replace(",", "").replace(".", "").replace("%", "").isdigit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feature-gateway", description="Serve ML features from many stores")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument(
        "--registry", help="registry YAML (default: $GATEWAY_REGISTRY, else the demo registry on embedded SQLite)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--access-log", action="store_true", help="log every request (costs latency)")
    serve.add_argument("--graceful-timeout", type=float, default=10.0, help="seconds to drain on SIGTERM")
    serve.set_defaults(run=cmd_serve)

    check = sub.add_parser("check", help="validate a registry file without serving")
    check.add_argument("registry")
    check.set_defaults(run=cmd_check)

    migrate = sub.add_parser("migrate", help="create every backend's tables (idempotent; also done at start-up)")
    migrate.add_argument("--registry", required=True)
    migrate.set_defaults(run=cmd_migrate)

    materialize = sub.add_parser(
        "materialize",
        help="load a Parquet, CSV or JSON Lines file into a group (validated, batched, resumable)",
        description="Load FILE into one group through the write path's validation, in batches; a rerun of the "
        "same command after a crash continues after the last stored batch.",
    )
    materialize.add_argument(
        "file",
        nargs="?",
        help="the rows: .parquet, .csv or .jsonl (.csv.gz and .jsonl.gz too), or a directory of Parquet files",
    )
    materialize.add_argument("--group", required=True, help="the feature group the rows belong to")
    materialize.add_argument("--registry", help="registry YAML (default: $GATEWAY_REGISTRY)")
    materialize.add_argument("--format", choices=["parquet", "csv", "jsonl"], help="default: from the extension")
    materialize.add_argument("--batch-size", type=int, default=1000, help="rows per write [1000]")
    materialize.add_argument("--checkpoint", help="progress file [FILE.GROUP.checkpoint.json next to FILE]")
    materialize.add_argument("--restart", action="store_true", help="ignore a checkpoint; load from the first row")
    materialize.add_argument("--retries", type=int, default=3, help="retries of a failed batch write [3]")
    materialize.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    from app.loading.scale_cli import add_arguments as add_scale_arguments

    add_scale_arguments(materialize)
    materialize.set_defaults(run=cmd_materialize)

    consume = sub.add_parser(
        "consume",
        help="read a stream's events from Redis Streams or NATS JetStream into its aggregation groups (run several "
        "to share the work)",
    )
    consume.add_argument("--registry", help="registry YAML (default: $GATEWAY_REGISTRY)")
    consume.add_argument("--stream", required=True, help="the registry's stream (its source says where it is)")
    consume.add_argument("--name", help="this consumer's name in the consumer group [host:pid]")
    consume.add_argument("--batch", type=int, default=1000, help="entries read at once [1000]")
    consume.add_argument("--block-ms", type=int, default=1000, help="how long a read waits for entries [1000]")
    consume.add_argument(
        "--claim-idle-ms",
        type=int,
        default=30_000,
        help="claim entries another consumer left pending this long [30000]",
    )
    consume.set_defaults(run=cmd_consume)

    from app.tiering.move_cli import add_parser as add_move

    add_move(sub)

    cost = sub.add_parser(
        "cost",
        help="what each group holds on each backend, its monthly cost and its use (asks a running gateway)",
        description="GET /v1/cost of a running gateway, where the usage counts live, as a table: one line per group "
        "per backend, then each backend's totals and the recommendations (plain facts).",
    )
    cost.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway [http://127.0.0.1:8000]")
    cost.add_argument("--token", help="an API key with the read scope (default: $GATEWAY_TOKEN)")
    cost.add_argument("--json", action="store_true", help="print the report as the gateway answers it")
    cost.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer [30]")
    cost.set_defaults(run=cmd_cost)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="make an API key: prints its token once and the config entry to add")
    new.add_argument("--name", required=True, help="the key's id, as logs and the config show it")
    new.add_argument("--scope", action="append", required=True, choices=SCOPES, help="repeat for several scopes")
    new.add_argument("--group", action="append", help="limit the key to this feature group (repeat for several)")
    new.add_argument("--registry", help="check that the groups exist in this registry")
    new.set_defaults(run=cmd_keys_new)

    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
