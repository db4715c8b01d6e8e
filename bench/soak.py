"""`python -m bench.soak` (or `bench/soak`): hours of the locust mix in minutes; does anything keep growing?

    bench/soak                                     10 minutes, 50 users, one sample a minute
    bench/soak --minutes 30 --json soak.json --png soak.png
    bench/soak --minutes 0.5 --interval 5          a quick look

It starts the gateway as `scripts/serve` does (`feature-gateway serve`, the demo registry on embedded SQLite in
a scratch folder; `--registry` for another) in its own process group, then locust headless with the repo's
locustfile and the README's mix (`-u 50 -r 10`), plus `bench/soak_probe.py`, a locust plugin that writes one
JSON line per interval. At each line the soak reads /proc for every process of the gateway's group (the
supervisor and its workers): RSS summed, open file descriptors, threads, and established TCP connections
(its socket fds whose inode /proc/net/tcp{,6} lists as ESTABLISHED: the clients' keep-alive connections plus
any connections to backends). One table row per interval goes to stdout as it comes, progress to stderr.

The verdict, "no unbounded growth", splits the planned run by time into thirds (a sample belongs to the third
its interval's middle falls in): the first is warm-up (pools fill, the allocator grows its arenas, not
judged), the middle is the baseline, the last is judged against it.
  RSS          fails when still rising at the end: the least-squares slope over every sample after warm-up
               is above --rss-mb-per-hour [10] AND the last third's median is above the middle third's by
               more than --rss-slack-mb [2]. A plateau or a single spike passes; a leak fails both.
  fds, tcp,    the last third's maximum may not exceed the maximum of the first two thirds by more than
  threads      --count-slack [10]: a leaked descriptor, connection or thread shows as a new high.
  p50, p99     the last third's median of the per-interval percentile may not exceed the middle third's
               x --latency-factor [1.5] + --latency-slack-ms [2] (generous: neighbours on a shared box move
               latency; a gateway slowing down as something grows moves it more).
  failures     the last third's median per-interval share of real failures (every kind but 503, see
               bench/soak_probe.py) may not exceed the middle third's by more than --failure-slack
               percentage points [0.1]. A median, so one burst is not growth; a rising rate is.
Requests/s is plotted but not judged: the load is closed-loop, so it mirrors latency. A gateway process that
dies, or a worker that restarts, fails the run outright.

Fetches carry `"deadline_ms": 1000` (--deadline-ms; 0 sends none, so the gateway's 100 ms applies). The mix
keeps the gateway saturated (no pause between requests), so its p99 sits near 100 ms on a small box and the
default deadline would turn queueing noise into degraded answers, which the latency checks already judge;
with 1000 ms a degraded answer means a backend really stalled.

Exit status: 0 every check passes; 1 a check failed or the gateway died; 2 the soak could not run (bad
arguments, the gateway or locust did not start, interrupted). Outputs: `--json FILE` (every sample, the
checks, the machine, the commands), `--png FILE` (RSS, fds + connections, latency, requests/s by minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from bench.main import machine
from bench.procs import BenchError, GatewayProcess, group_processes, tail

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "locustfile.py"
PROBE = Path(__file__).with_name("soak_probe.py")
PAGE = os.sysconf("SC_PAGE_SIZE")
TCP_ESTABLISHED = "01"
OVERLOAD = "503"  # the failure kind counted apart: the gateway refusing work, expected under overload


def log(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


# -- the arguments ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/soak",
        description="Run the locust mix against the gateway for a while and check that RSS, file descriptors, "
        "connections, threads, latency and failures stop growing (see bench/README.md).",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run [10]")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per sample [60]")
    parser.add_argument("--users", type=int, default=50, help="locust users (-u) [50]")
    parser.add_argument("--spawn-rate", type=float, default=10.0, help="locust users started per second (-r) [10]")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes [1]")
    parser.add_argument("--registry", type=Path, help="registry YAML [the demo registry on embedded SQLite]")
    parser.add_argument(
        "--deadline-ms",
        type=float,
        default=1000.0,
        help="deadline_ms of each fetch; 0: none sent, the gateway's default applies [1000]",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the gateway (GATEWAY_* and OTEL_* are not inherited from the caller)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every sample and the verdict here")
    parser.add_argument("--png", type=Path, metavar="FILE", help="draw the curves here")
    parser.add_argument("--log-dir", type=Path, help="keep the gateway and locust logs here [a temporary folder]")
    rules = parser.add_argument_group("the verdict's tolerances (see bench/README.md)")
    rules.add_argument("--rss-mb-per-hour", type=float, default=10.0, help="RSS slope after warm-up [10]")
    rules.add_argument("--rss-slack-mb", type=float, default=2.0, help="last vs middle third RSS median [2]")
    rules.add_argument("--count-slack", type=int, default=10, help="fds, tcp, threads above their earlier max [10]")
    rules.add_argument("--latency-factor", type=float, default=1.5, help="last vs middle third latency [1.5]")
    rules.add_argument("--latency-slack-ms", type=float, default=2.0, help="... plus this [2]")
    rules.add_argument("--failure-slack", type=float, default=0.1, help="real failures, percentage points [0.1]")
    args = parser.parse_args(argv)
    if args.interval < 1 or args.minutes <= 0:
        parser.error("--interval is at least 1 (second) and --minutes is positive")
    args.samples = round(args.minutes * 60 / args.interval)
    if args.samples < 3:
        parser.error("the run needs at least 3 intervals (warm-up, baseline, judged): lengthen --minutes")
    if args.users < 1 or args.spawn_rate <= 0 or args.workers < 1:
        parser.error("--users, --spawn-rate and --workers are positive")
    for item in args.gateway_env:
        if "=" not in item:
            parser.error(f"--gateway-env takes KEY=VALUE, not {item!r}")
    return args


# -- what /proc says about the gateway --------------------------------------------------------------------


def tcp_states() -> dict[int, str]:
    """Socket inode -> TCP state (hex, 01 = ESTABLISHED) of this network namespace, IPv4 and IPv6."""
    states: dict[int, str] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9].isdigit() and fields[9] != "0":
                    states[int(fields[9])] = fields[3]
    return states


@dataclass(frozen=True, slots=True)
class ProcessSample:
    pid: int
    rss_mb: float
    fds: int
    sockets: int
    tcp: int
    threads: int


def sample_group(pgid: int) -> list[ProcessSample]:
    """RSS, fds, sockets, established TCP connections and threads of each process of the gateway's group."""
    states = tcp_states()
    found = []
    for pid, fields in group_processes(pgid):
        fds = sockets = tcp = 0
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                fds += 1
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        sockets += 1
                        tcp += states.get(int(target[8:-1])) == TCP_ESTABLISHED
        except OSError:
            continue  # gone meanwhile
        rss_mb = int(fields[21]) * PAGE / 2**20  # field 24: resident pages
        found.append(ProcessSample(pid, round(rss_mb, 2), fds, sockets, tcp, int(fields[17])))  # 20: threads
    return found


# -- one interval -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One interval: the gateway as /proc saw it at the interval's end, and locust's requests during it."""

    t_s: float  # since the test started, at the end of the interval
    duration_s: float
    rss_mb: float  # summed over the gateway's processes
    fds: int
    sockets: int
    tcp: int  # established TCP connections of the gateway's processes
    threads: int
    processes: list[ProcessSample]
    users: int
    requests: int
    rps: float
    ok: int
    failures: dict[str, int]  # kind -> count (bench/soak_probe.py)
    real_failures: int  # every kind but 503
    overload: int  # 503 answers
    examples: dict[str, str]
    by_name: dict[str, int]
    p50_ms: float | None  # over the interval's successful requests
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    load1: float

    @property
    def minute(self) -> float:
        return self.t_s / 60

    @classmethod
    def make(cls, window: dict[str, Any], processes: list[ProcessSample]) -> Sample:
        failures = {str(k): int(v) for k, v in window["failures"].items()}
        duration = float(window["duration_s"]) or 1.0
        return cls(
            t_s=float(window["t_s"]),
            duration_s=duration,
            rss_mb=round(sum(p.rss_mb for p in processes), 2),
            fds=sum(p.fds for p in processes),
            sockets=sum(p.sockets for p in processes),
            tcp=sum(p.tcp for p in processes),
            threads=sum(p.threads for p in processes),
            processes=processes,
            users=int(window["users"]),
            requests=int(window["requests"]),
            rps=round(int(window["requests"]) / duration, 1),
            ok=int(window["ok"]),
            failures=failures,
            real_failures=sum(n for kind, n in failures.items() if kind != OVERLOAD),
            overload=failures.get(OVERLOAD, 0),
            examples=dict(window["examples"]),
            by_name=dict(window["by_name"]),
            p50_ms=window["p50_ms"],
            p90_ms=window["p90_ms"],
            p99_ms=window["p99_ms"],
            max_ms=window["max_ms"],
            load1=round(os.getloadavg()[0], 2),
        )


# -- the verdict -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Verdict:
    ok: bool
    checks: list[Check]
    rss_mb_per_hour: float | None
    phases: dict[str, int]  # samples per third
    problems: list[str] = field(default_factory=list)  # the run itself went wrong (gateway died, ...)

    @property
    def summary(self) -> str:
        if self.problems:
            return "FAILED: " + "; ".join(self.problems)
        failed = [c.name for c in self.checks if not c.ok]
        return "no unbounded growth" if not failed else "GROWTH: " + ", ".join(failed)


def thirds(samples: Sequence[Sample], total_s: float) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Warm-up, middle, last third of the run by time: a sample belongs where its interval's middle falls (its
    end would put a tick that fired a millisecond late into the next third)."""
    parts: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
    for s in samples:
        parts[max(0, min(2, int(3 * (s.t_s - s.duration_s / 2) / total_s)))].append(s)
    return parts


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour; None under two distinct times."""
    if len(points) < 2:
        return None
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def judge(samples: Sequence[Sample], total_s: float, rules: argparse.Namespace) -> Verdict:
    """Apply the rules of the module docstring; `rules` holds the tolerances (the parsed arguments)."""
    warm, middle, last = thirds(samples, total_s)
    phases = {"warm_up": len(warm), "middle": len(middle), "last": len(last)}
    if not middle or not last:
        return Verdict(False, [], None, phases, ["too few samples to judge: each third needs one"])
    checks = []

    slope = slope_per_hour([(s.t_s, s.rss_mb) for s in middle + last])
    before, after = statistics.median(s.rss_mb for s in middle), statistics.median(s.rss_mb for s in last)
    rising = slope is not None and slope > rules.rss_mb_per_hour
    checks.append(
        Check(
            "RSS",
            not (rising and after - before > rules.rss_slack_mb),
            f"median {before:.1f} MB (middle) -> {after:.1f} MB (last), {after - before:+.1f} MB; "
            f"fit after warm-up {slope or 0:+.1f} MB/h (fails above {rules.rss_mb_per_hour:g} MB/h "
            f"and {rules.rss_slack_mb:g} MB)",
        )
    )

    for name, key in (("fds", "fds"), ("tcp conns", "tcp"), ("threads", "threads")):
        earlier = max(getattr(s, key) for s in warm + middle)
        high = max(getattr(s, key) for s in last)
        checks.append(
            Check(name, high <= earlier + rules.count_slack, f"max {earlier} before, {high} in the last third")
        )

    for name, key in (("p50", "p50_ms"), ("p99", "p99_ms")):
        base, judged = _median([getattr(s, key) for s in middle]), _median([getattr(s, key) for s in last])
        if base is None or judged is None:
            checks.append(Check(name, False, "no successful request in the middle or the last third"))
            continue
        limit = base * rules.latency_factor + rules.latency_slack_ms
        checks.append(
            Check(name, judged <= limit, f"median {base:.2f} ms (middle) -> {judged:.2f} ms (last), limit {limit:.2f}")
        )

    def rate(part: Sequence[Sample]) -> float:  # median per interval, in percent of its requests
        return statistics.median(100 * s.real_failures / s.requests if s.requests else 0.0 for s in part)

    before_rate, after_rate = rate(middle), rate(last)
    checks.append(
        Check(
            "failures",
            after_rate <= before_rate + rules.failure_slack,
            f"median {before_rate:.3f}% (middle) -> {after_rate:.3f}% (last) of an interval's requests, "
            f"503 not counted; {sum(s.real_failures for s in middle + last):,} after warm-up",
        )
    )
    return Verdict(all(c.ok for c in checks), checks, None if slope is None else round(slope, 2), phases)


# -- the table ----------------------------------------------------------------------------------------------

HEADER = (
    f"{'min':>6} {'RSS MB':>8} {'fds':>5} {'tcp':>5} {'thr':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'503':>6} {'failed':>6} {'load':>5}"
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def row(s: Sample) -> str:
    return (
        f"{s.minute:6.2f} {s.rss_mb:8.1f} {s.fds:5d} {s.tcp:5d} {s.threads:4d} {s.rps:7.1f} {_ms(s.p50_ms):>7} "
        f"{_ms(s.p99_ms):>7} {s.overload:6d} {s.real_failures:6d} {s.load1:5.2f}"
    )


def report(samples: Sequence[Sample], verdict: Verdict) -> str:
    """The lines printed after the table: failures by kind, the checks, the verdict."""
    lines = []
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for s in samples:
        kinds.update(s.failures)
        for kind, text in s.examples.items():
            examples.setdefault(kind, text)
    requests = sum(s.requests for s in samples)
    lines.append(
        f"{requests:,} requests; failures by kind: " + (", ".join(f"{k} {n:,}" for k, n in kinds.items()) or "none")
    )
    lines.extend(f"  first {kind}: {example}" for kind, example in examples.items())
    lines.append("thirds (samples): warm-up {warm_up}, middle {middle}, last {last}".format(**verdict.phases))
    lines.extend(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<9} {c.detail}" for c in verdict.checks)
    lines.append(f"verdict: {verdict.summary}")
    return "\n".join(lines)


# -- the plot -----------------------------------------------------------------------------------------------


def plot(samples: Sequence[Sample], verdict: Verdict, total_s: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.minute for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    rss, counts, latency, rate = axes
    panels: list[tuple[Any, str, list[tuple[str, list[float | None]]]]] = [
        (rss, "RSS, MB", [("all gateway processes", [s.rss_mb for s in samples])]),
        (
            counts,
            "count",
            [
                ("open fds", [s.fds for s in samples]),
                ("established TCP\nconnections", [s.tcp for s in samples]),
                ("threads", [s.threads for s in samples]),
            ],
        ),
        (latency, "latency, ms", [("p50", [s.p50_ms for s in samples]), ("p99", [s.p99_ms for s in samples])]),
        (rate, "per second", [("requests", [s.rps for s in samples])]),
    ]
    if any(s.real_failures or s.overload for s in samples):
        panels[3][2].append(("failures (not 503)", [s.real_failures / s.duration_s for s in samples]))
        panels[3][2].append(("503 answers", [s.overload / s.duration_s for s in samples]))
    for ax, unit, lines in panels:
        for label, values in lines:
            ax.plot(minutes, values, marker=".", label=label)
        top = max((v for _, values in lines for v in values if v is not None), default=1.0)
        ax.set_ylim(0, top * 1.15 or 1.0)
        ax.set_ylabel(unit)
        ax.axvspan(0, total_s / 180, color="0.92", zorder=0)
        ax.axvline(total_s / 180, color="0.6", linewidth=0.8)
        ax.axvline(2 * total_s / 180, color="0.6", linestyle="--", linewidth=0.8)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    rate.set_xlabel("minutes")
    rate.set_xlim(0, total_s / 60)
    for third, label in enumerate(("warm-up (not judged)", "baseline", "judged")):
        rss.text((2 * third + 1) * total_s / 360, 1.02, label, transform=rss.get_xaxis_transform(), ha="center")
    fig.suptitle(f"{title}\nverdict: {verdict.summary}", fontsize="medium", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the run ------------------------------------------------------------------------------------------------


class SoakError(RuntimeError):
    """The soak cannot run (exit 2)."""


def gateway_env(args: argparse.Namespace, demo_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    env["GATEWAY_DEMO_DIR"] = str(demo_dir)
    env |= dict(item.split("=", 1) for item in args.gateway_env)
    return env


def locust_command(args: argparse.Namespace, url: str, out: Path) -> list[str]:
    backstop = math.ceil(args.samples * args.interval + 2 * args.interval + 60)  # the soak stops it before
    return [
        sys.executable, "-m", "locust", "-f", f"{LOCUSTFILE},{PROBE}", "--headless",
        "-u", str(args.users), "-r", f"{args.spawn_rate:g}", "-t", f"{backstop}s", "--host", url,
        "--only-summary", "--soak-out", str(out), "--soak-interval", f"{args.interval:g}",
    ]  # fmt: skip


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _next_line(stream: IO[str]) -> str | None:
    """The next complete line of a file another process appends to, or None for now."""
    where = stream.tell()
    line = stream.readline()
    if line.endswith("\n"):
        return line
    stream.seek(where)
    return None


def soak(args: argparse.Namespace, log_dir: Path, meta: dict[str, Any], samples: list[Sample]) -> None:
    """Start the gateway and locust, append a Sample per interval; raise BenchError when the gateway dies."""
    gateway = GatewayProcess(args.registry, args.workers, gateway_env(args, log_dir / "demo"), log_dir / "gateway.log")
    locust: subprocess.Popen[bytes] | None = None
    out = log_dir / "intervals.jsonl"
    out.unlink(missing_ok=True)
    locust_log_path = log_dir / "locust.log"
    try:
        gateway.spawn()
        try:
            asyncio.run(gateway.wait_ready())
        except BenchError as exc:
            raise SoakError(str(exc)) from None
        workers = f"{args.workers} worker{'s' if args.workers > 1 else ''}"
        log(f"gateway up on {gateway.url} ({workers}, pid {gateway.proc.pid if gateway.proc else '?'})")
        command = locust_command(args, gateway.url, out)
        meta["locust_command"] = " ".join(command)
        env = dict(os.environ)
        if args.deadline_ms:
            env["FG_LOAD_DEADLINE_MS"] = f"{args.deadline_ms:g}"
        else:
            env.pop("FG_LOAD_DEADLINE_MS", None)
        with locust_log_path.open("wb") as locust_log:
            locust = subprocess.Popen(
                command, stdout=locust_log, stderr=subprocess.STDOUT, env=env, cwd=log_dir, start_new_session=True
            )
        log(f"locust: {args.users} users at {args.spawn_rate:g}/s for {args.minutes:g} min, a sample every "
            f"{args.interval:g} s")  # fmt: skip
        print(HEADER, flush=True)
        started = time.monotonic()
        while not out.exists():
            if locust.poll() is not None:
                raise SoakError(
                    f"locust exited ({locust.returncode}) before the test started:\n{tail(locust_log_path)}"
                )
            if time.monotonic() - started > 60:
                raise SoakError(f"locust did not start its test in 60 s:\n{tail(locust_log_path)}")
            time.sleep(0.1)
        with out.open(encoding="utf-8") as stream:
            while len(samples) < args.samples:
                line = _next_line(stream)
                if line is None:
                    gateway.check_alive()
                    if locust.poll() is not None:
                        raise SoakError(f"locust exited ({locust.returncode}) mid-run:\n{tail(locust_log_path)}")
                    if time.monotonic() - started > (len(samples) + 1) * args.interval + 60:
                        raise SoakError(f"no sample from locust for a long while:\n{tail(locust_log_path)}")
                    time.sleep(0.05)
                    continue
                assert gateway.proc is not None
                sample = Sample.make(json.loads(line), sample_group(gateway.proc.pid))
                gateway.check_alive()
                samples.append(sample)
                print(row(sample), flush=True)
        if "CPU usage above" in locust_log_path.read_text(errors="replace"):
            meta["notes"].append("locust's process reached 90% CPU: requests/s is bounded by the load generator")
    finally:
        if locust is not None:
            _stop(locust, 30)
        gateway.stop()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the gateway and locust on the way out
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="fg-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    registry = f"--registry {args.registry}" if args.registry else "(the demo registry)"
    meta: dict[str, Any] = machine() | {
        "args": {k: str(v) for k, v in vars(args).items()},
        "gateway": f"feature-gateway serve {registry} --workers {args.workers}",
        "notes": [],
    }
    samples: list[Sample] = []
    problems: list[str] = []
    status = 0
    try:
        soak(args, log_dir, meta, samples)
    except BenchError as exc:  # the gateway died or a worker restarted: a failed soak
        problems.append(str(exc))
        status = 1
    except SoakError as exc:
        problems.append(str(exc))
        status = 2
    except KeyboardInterrupt:
        problems.append("interrupted")
        status = 2
    total_s = args.samples * args.interval
    if samples:
        verdict = judge(samples, total_s, args)
    else:
        verdict = Verdict(False, [], None, {"warm_up": 0, "middle": 0, "last": 0})
    verdict.problems = problems + verdict.problems if problems else verdict.problems
    verdict.ok = verdict.ok and not problems
    meta["seconds"] = round(samples[-1].t_s, 1) if samples else 0
    meta["load_average_at_end"] = os.getloadavg()
    text = report(samples, verdict)
    print(text)
    title = (
        f"feature-gateway soak: {args.minutes:g} min, {args.users} users, {args.workers} worker"
        f"{'s' if args.workers > 1 else ''}, commit {meta['commit']}, {meta['cpus']} CPUs"
    )
    if args.json:
        document = {
            "meta": meta,
            "verdict": asdict(verdict) | {"summary": verdict.summary},
            "samples": [asdict(s) | {"minute": round(s.minute, 3)} for s in samples],
            "report": text,
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    if args.png and samples:
        plot(samples, verdict, total_s, title, args.png)
    if problems or not verdict.ok:
        for problem in problems:
            log(f"FAILED: {problem}")
        log(f"logs kept in {log_dir}")
        return status or 1
    if args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
