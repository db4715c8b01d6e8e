"""`feature-gateway move GROUP --to BACKEND`: the command around app/tiering/move.py (gateways to reload,
progress on stderr, the report)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

from app.errors import RegistryError
from app.tiering.move import Move, MoveError, describe


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    move = sub.add_parser(
        "move",
        help="move a group to another backend while it is served (dual write, backfill, verify, cut over)",
        description="Move GROUP's values to BACKEND while gateways serve it: the registry gains moving_to (writes "
        "reach both copies), the old copy is copied over, verified per key range, reads are cut over, the old copy "
        "stops being written and is optionally deleted. Every gateway named is reloaded after each registry step. "
        "Run the same command again to resume a move that stopped.",
    )
    move.add_argument("group")
    move.add_argument("--to", required=True, dest="target", help="the backend to move the group to")
    move.add_argument("--registry", help="registry YAML (default: $GATEWAY_REGISTRY); rewritten by each step")
    move.add_argument(
        "--gateway",
        action="append",
        default=[],
        help="base URL of a gateway serving this registry, reloaded after each step (repeat for each replica)",
    )
    move.add_argument("--token", help="an admin API key for the reloads (default: $GATEWAY_TOKEN)")
    move.add_argument("--offline", action="store_true", help="no gateway serves the registry: nothing to reload")
    move.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to wait after each reload for requests started before it to finish [3]",
    )
    move.add_argument("--delete-old", action="store_true", help="delete the old copy's rows at the end")
    move.add_argument("--batch", type=int, default=1000, help="rows per page of the backfill [1000]")
    move.add_argument("--no-progress", action="store_true")
    move.set_defaults(run=cmd_move)


def cmd_move(args: argparse.Namespace) -> int:
    path = args.registry or os.environ.get("GATEWAY_REGISTRY")
    if not path:
        print("error: --registry (or GATEWAY_REGISTRY) is required", file=sys.stderr)
        return 2
    if not args.gateway and not args.offline:
        print(
            "error: name every gateway serving this registry (--gateway URL, repeated), so each step reaches them, "
            "or --offline when none does",
            file=sys.stderr,
        )
        return 2
    token = args.token or os.environ.get("GATEWAY_TOKEN")

    async def reload() -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(timeout=30) as client:
            for url in args.gateway:
                response = await client.post(f"{url.rstrip('/')}/v1/admin/reload", headers=headers)
                if response.status_code != 200:
                    raise MoveError(f"{url} did not reload ({response.status_code}): {response.text[:400]}")
                others = response.json().get("other_workers", {})
                if others.get("told") is False and "single worker" not in str(others.get("detail")):
                    raise MoveError(f"{url} reloaded one worker but could not tell its others; reload them (SIGHUP)")

    last = [0.0]

    def progress(phase: str, done: int, total: int | None) -> None:
        if args.no_progress or time.monotonic() - last[0] < 0.5:
            return
        last[0] = time.monotonic()
        of = f" of {total:,}" if total else ""
        print(f"\r{args.group}: {phase}: {done:,}{of} rows   ", end="", file=sys.stderr, flush=True)

    def step(phase: str) -> None:
        print(f"{args.group}: {phase}", file=sys.stderr, flush=True)

    move = Move(
        Path(path),
        args.group,
        args.target,
        env=dict(os.environ),
        reload=reload,
        settle_s=args.settle,
        delete_old=args.delete_old,
        batch=args.batch,
        progress=progress,
        step=step,
    )
    try:
        state = asyncio.run(move.run())
    except (MoveError, RegistryError, httpx.HTTPError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        print("the move stopped; nothing done so far is lost: run the same command again to continue", file=sys.stderr)
        return 1
    if not args.no_progress:
        print(file=sys.stderr)
    for line in describe(state):
        print(line)
    return 0
