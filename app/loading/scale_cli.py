"""`feature-gateway materialize` at scale: `--engine spark [--master URL]` for a file or Parquet dataset, and
`--watch DIR`, the drop folder (app/loading/watch.py). The in-process load of one file or dataset stays in
app/cli.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from app.errors import BackendFailed
from app.loading.errors import MaterializeError
from app.loading.load import Report
from app.metrics import Metrics
from app.settings import Settings


def add_arguments(materialize: argparse.ArgumentParser) -> None:
    materialize.add_argument(
        "--engine",
        choices=["inprocess", "spark"],
        default="inprocess",
        help="inprocess: this process [default]; spark: a Spark job whose executors write (pyspark needed)",
    )
    materialize.add_argument(
        "--master", help="with --engine spark: local[N], spark://HOST:7077, yarn, ... [spark-submit's or local[*]]"
    )
    materialize.add_argument(
        "--watch",
        metavar="DIR",
        help="load each new complete file dropped into DIR once, until stopped (a local folder, or s3://... with "
        "s3fs installed)",
    )
    materialize.add_argument("--poll", type=float, default=2.0, help="with --watch: seconds between looks [2]")
    materialize.add_argument(
        "--state", help="with --watch: where the manifest and checkpoints are kept [DIR itself, when local]"
    )


def _print(report: Report) -> None:
    print("\n".join(report.lines()), flush=True)


def materialize_at_scale(args: argparse.Namespace, settings: Settings) -> int:
    registry_path = args.registry or settings.registry
    if registry_path is None:  # (app/cli.py checked it already)
        print("error: give --registry FILE (or set GATEWAY_REGISTRY)", file=sys.stderr)
        return 2
    if args.watch is not None:
        if args.file is not None or args.engine != "inprocess":
            print("error: --watch DIR takes no FILE and loads in this process (no --engine spark)", file=sys.stderr)
            return 2
        return _watch(args, settings, registry_path)
    if args.file is None:
        print("error: give the FILE or directory to load", file=sys.stderr)
        return 2
    from app.loading.frames import SparkJobFailed, spark_materialize

    try:
        report = spark_materialize(
            registry_path,
            args.group,
            args.file,
            master=args.master,
            batch_size=args.batch_size,
            retries=args.retries,
            limits=settings.limits(),
        )
    except MaterializeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BackendFailed as exc:
        print(f"error: {exc.detail}\nrerun the same command (rows written again are harmless)", file=sys.stderr)
        return 1
    except SparkJobFailed as exc:
        print(
            f"error: the Spark job failed: {exc}\nrerun the same command (rows written again are harmless)",
            file=sys.stderr,
        )
        return 1
    metrics = Metrics(settings.metrics_dir, worker=False)  # the driver's exact sums: a gateway's /v1/usage shows them
    metrics.written(report.group, "spark", report.written, report.skipped_stale, report.rejected)
    try:
        metrics.dump()
    except OSError as exc:
        print(f"warning: could not share the load's counts: {exc}", file=sys.stderr)
    _print(report)
    return 3 if report.rejected else 0


def _watch(args: argparse.Namespace, settings: Settings, registry_path: str | Path) -> int:
    """Runs until SIGTERM or SIGINT (exit 0); a load under way stops after its last stored batch."""
    from app.cli import _load
    from app.loading.watch import Watcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    registry = _load(registry_path)
    try:
        watcher = Watcher(
            args.watch,
            registry,
            args.group,
            limits=settings.limits(),
            state=Path(args.state) if args.state else None,
            poll_s=args.poll,
            batch_size=args.batch_size,
            retries=args.retries,
            report=_print,
            metrics=Metrics(settings.metrics_dir, worker=False),  # a gateway's folder: its /v1/usage shows the loads
        )
    except MaterializeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"watching {args.watch} for {args.group} (manifest {watcher.manifest_path})", file=sys.stderr, flush=True)
        await watcher.run(stop)

    asyncio.run(run())
    return 0
