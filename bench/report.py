"""Results: the run's record (JSON), its one markdown table, and a before/after comparison of two records."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, TypeGuard

from bench.measure import FloorResult, PgSize, WrkResult

GROUP_LABELS = {
    "live": "live on Redis (50 numeric)",
    "embed": "embed on Redis (one float32[32])",
    "history": "history on PostgreSQL (50 numeric)",
}


@dataclass
class Storage:
    group: str
    measured: str
    bytes: int
    values: int  # entities x features
    bytes_per_value: float


@dataclass
class Report:
    meta: dict[str, Any]
    workloads: list[WrkResult] = field(default_factory=list)  # every run, repeats included
    floor: list[FloorResult] = field(default_factory=list)
    storage: list[Storage] = field(default_factory=list)
    pg: PgSize | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the reader must know: a row skipped, an encoding not served

    def record(self, result: WrkResult | FloorResult) -> None:
        if isinstance(result, WrkResult):
            self.workloads.append(result)
        else:
            self.floor.append(result)
        self.problems += result.problems()

    def summary(self) -> list[dict[str, Any]]:
        """One row per measure, the median over repeats; the table and `compare` read these rows."""
        runs: dict[str, list[WrkResult]] = {}
        for w in self.workloads:
            runs.setdefault(w.workload, []).append(w)
        floors: dict[int, list[FloorResult]] = {}
        for f in self.floor:
            floors.setdefault(f.entities, []).append(f)
        rows: list[dict[str, Any]] = []
        for name, results in runs.items():
            row: dict[str, Any] = {
                "measure": name,
                "runs": len(results),
                "requests": sum(r.requests for r in results),
                "failed": sum(r.failures for r in results),
                "rps": median(r.rps for r in results),
                "p50_ms": median(r.p50_ms for r in results),
                "p99_ms": median(r.p99_ms for r in results),
            }
            cpu = [r.gateway_cpu_ms_per_request for r in results if r.gateway_cpu_ms_per_request is not None]
            if cpu:
                row["gateway_cpu_ms_per_request"] = median(cpu)
            floor = floors.get(results[0].entities) if results[0].connections == 1 else None
            if floor:
                row["floor_p50_ms"] = median(f.p50_ms for f in floor)
                row["floor_p99_ms"] = median(f.p99_ms for f in floor)
                row["overhead_p50_ms"] = row["p50_ms"] - row["floor_p50_ms"]
            spans = [r.spans_per_request for r in results if r.spans_per_request is not None]
            if spans:
                row["spans_per_request"] = median(spans)
            if results[0].accept is not None:
                row["accept"] = results[0].accept
                answered = {a for a in (r.answered() for r in results) if a is not None}
                if answered:
                    row["answered"] = ", ".join(sorted(answered))
            rows.append(row)
        _against_tracing_off(rows)
        _against_base(rows)
        _against_json(rows)
        _against_no_local_cache(rows)
        for s in self.storage:
            rows.append(
                {"measure": f"storage: {GROUP_LABELS.get(s.group, s.group)}", "bytes_per_value": s.bytes_per_value}
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"summary": self.summary(), "table": table(self.summary()), "ok": not self.problems}


def _against_tracing_off(rows: list[dict[str, Any]]) -> None:
    """Tracing rows (`..., tracing 100%`) gain their ratio to the `tracing off` row of the same run: req/s
    after / before and the p50 difference, medians of the interleaved runs."""
    by_name = {r["measure"]: r for r in rows}
    for row in rows:
        base, _, label = row["measure"].rpartition(", tracing ")
        off = by_name.get(f"{base}, tracing off")
        if not base or label == "off" or off is None:
            continue
        row["rps_vs_tracing_off"] = row["rps"] / off["rps"] if off["rps"] else None
        row["p50_ms_over_tracing_off"] = row["p50_ms"] - off["p50_ms"]


# Row suffix -> the suffix of the row it is measured against (serving per model, `--services`)
BASES = {", by service": ", by list", ", by service + 2 on-demand": ", by service"}


def _against_base(rows: list[dict[str, Any]]) -> None:
    """Service rows gain their gateway CPU per request as a ratio of their base row's and their p50 over it."""
    by_name = {r["measure"]: r for r in rows}
    for row in rows:
        for suffix, base_suffix in BASES.items():
            if not row["measure"].endswith(suffix):
                continue
            base = by_name.get(row["measure"].removesuffix(suffix) + base_suffix)
            if base is None:
                continue
            row["vs"] = base_suffix.removeprefix(", ")
            row["p50_ms_over_base"] = row["p50_ms"] - base["p50_ms"]
            cpu, base_cpu = row.get("gateway_cpu_ms_per_request"), base.get("gateway_cpu_ms_per_request")
            if cpu is not None and base_cpu:
                row["cpu_vs_base"] = cpu / base_cpu


MSGPACK_ROW = ", msgpack"  # suffix of the row asking `Accept: application/msgpack`; its base row is the name without it


def _against_json(rows: list[dict[str, Any]]) -> None:
    """The msgpack row gains its p50 and gateway CPU per request as ratios of the JSON row of the same run."""
    by_name = {r["measure"]: r for r in rows}
    for row in rows:
        base = by_name.get(row["measure"].removesuffix(MSGPACK_ROW)) if row["measure"].endswith(MSGPACK_ROW) else None
        if base is None:
            continue
        row["p50_vs_json"] = row["p50_ms"] / base["p50_ms"] if base["p50_ms"] else None
        cpu, base_cpu = row.get("gateway_cpu_ms_per_request"), base.get("gateway_cpu_ms_per_request")
        if cpu is not None and base_cpu:
            row["cpu_vs_json"] = cpu / base_cpu


NO_LOCAL_CACHE = ", no local cache"  # the Zipf rows: `<base>, no local cache` and `<base>, local cache N ms`
LOCAL_CACHE = ", local cache "


def _against_no_local_cache(rows: list[dict[str, Any]]) -> None:
    """Zipf rows with the per-worker cache gain their req/s as a ratio of the same workload's row without it."""
    by_name = {r["measure"]: r for r in rows}
    for row in rows:
        base_name, _, label = row["measure"].rpartition(LOCAL_CACHE)
        off = by_name.get(base_name + NO_LOCAL_CACHE) if base_name else None
        if off is None or not label:
            continue
        row["rps_vs_no_local_cache"] = row["rps"] / off["rps"] if off["rps"] else None
        row["p50_ms_over_no_local_cache"] = row["p50_ms"] - off["p50_ms"]


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| measure | result | p50 ms | p99 ms | floor p50 ms | floor p99 ms | overhead p50 ms | gateway CPU ms/req |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in summary:
        if "bytes_per_value" in row:
            lines.append(f"| {row['measure']} | {row['bytes_per_value']:,.1f} B/value | | | | | | |")
            continue
        result = f"{row['rps']:,.0f} req/s"
        if row.get("rps_vs_tracing_off") is not None:
            result += f" ({row['rps_vs_tracing_off']:.2f}x of off, p50 {row['p50_ms_over_tracing_off']:+.3f} ms)"
        if row.get("vs") is not None:
            result += f" (p50 {row['p50_ms_over_base']:+.3f} ms"
            if row.get("cpu_vs_base") is not None:
                result += f", CPU {row['cpu_vs_base']:.2f}x"
            result += f" of {row['vs']})"
        if row.get("p50_vs_json") is not None:
            result += f" (p50 {row['p50_vs_json']:.2f}x"
            if row.get("cpu_vs_json") is not None:
                result += f", CPU {row['cpu_vs_json']:.2f}x"
            result += " of JSON)"
        if row.get("rps_vs_no_local_cache") is not None:
            result += f" ({row['rps_vs_no_local_cache']:.2f}x of no local cache)"
        if row.get("accept") and row.get("answered") and not row["answered"].startswith(row["accept"]):
            result += f" (answered {row['answered']})"
        if row.get("failed"):
            result = f"FAILED: {row['failed']:,} of {row['requests']:,} requests"
        cells = [row["measure"], result, _ms(row["p50_ms"]), _ms(row["p99_ms"])]
        cells += [
            _ms(row.get(k)) for k in ("floor_p50_ms", "floor_p99_ms", "overhead_p50_ms", "gateway_cpu_ms_per_request")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption(report: Report) -> str:
    loads = [x for w in report.workloads for x in w.load_average] + [x for f in report.floor for x in f.load_average]
    meta, args = report.meta, report.meta["args"]
    load_text = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
    repeats = f", median of {args['repeat']} runs" if int(args["repeat"]) > 1 else ""
    repeats += f", nice {args['nice']}" if args.get("nice", "0") != "0" else ""
    return (
        f"{int(args['entities']):,} entities per group; {args['duration']} s measured per workload after "
        f"{args['warmup']} s warm-up{repeats}; wrk with random ids; gateway {meta.get('commit', '?')}; "
        f"{meta.get('cpus')} cores ({meta.get('cpu_model') or '?'}), 1-min load average {load_text} during the run"
    )


def _number(key: str, value: float) -> str:
    if key == "rps":
        return f"{value:,.0f}"
    if key == "bytes_per_value":
        return f"{value:,.1f}"
    return _ms(value)


# -- before/after ----------------------------------------------------------------------------------------

_METRICS = (
    ("rps", "req/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("overhead_p50_ms", "overhead p50 ms"),
    ("gateway_cpu_ms_per_request", "gateway CPU ms/req"),
    ("rps_vs_tracing_off", "req/s / tracing off"),
    ("cpu_vs_base", "CPU / base row"),
    ("p50_vs_json", "p50 / JSON row"),
    ("rps_vs_no_local_cache", "req/s / no local cache"),
    ("bytes_per_value", "B/value"),
)


def load_record(path: Path) -> dict[str, Any]:
    """A `--json` record, checked enough to compare: a JSON object with a `summary` list. Records of older
    benches (c26f67a's) have the same shape with fewer keys, which is fine."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable --json record: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("summary"), list):
        raise ValueError(f"{path}: not a bench --json record (no `summary` list)")
    return record


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rows_by_measure(summary: list[Any]) -> dict[str, dict[str, Any]]:
    return {r["measure"]: r for r in summary if isinstance(r, dict) and isinstance(r.get("measure"), str)}


def compare(before_path: Path, after_path: Path) -> str:
    """A table of every measure two `--json` records share: before, after, and after / before."""
    before, after = load_record(before_path), load_record(after_path)
    return compare_summaries(before["summary"], after["summary"], before.get("meta"), after.get("meta"))


def _describe(meta: Any) -> str:
    if not isinstance(meta, dict):
        return "?"
    load = meta.get("load_average_at_start")
    load_text = f", load average {load[0]:.1f} at start" if isinstance(load, list | tuple) and load else ""
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    shape = (
        f", {args.get('entities', '?')} entities, {args.get('duration', '?')} s per workload, "
        f"repeat {args.get('repeat', '?')}"
        if args
        else ""
    )
    return (
        f"commit {meta.get('commit', '?')}, {meta.get('started_at', '?')}, {meta.get('cpus', '?')} cores "
        f"({meta.get('cpu_model') or '?'}){load_text}{shape}"
    )


def compare_summaries(before: list[Any], after: list[Any], before_meta: Any = None, after_meta: Any = None) -> str:
    """Every metric of every row both summaries hold: before, after, after / before. A row only one of them has
    (a workload added since, or not run this time) is listed under the table, without a ratio; a metric one side
    lacks (an older bench wrote fewer) or that is not a number is left out."""
    old_rows, new_rows = _rows_by_measure(before), _rows_by_measure(after)
    lines = []
    if before_meta is not None or after_meta is not None:
        lines += [f"before: {_describe(before_meta)}", f"after: {_describe(after_meta)}", ""]
    lines += ["| measure | metric | before | after | after / before |", "|---|---|--:|--:|--:|"]
    for name, row in new_rows.items():
        old = old_rows.get(name)
        if old is None:
            continue
        for key, label in _METRICS:
            a, b = row.get(key), old.get(key)
            if _is_number(a) and _is_number(b):
                ratio = f"{a / b:.2f}x" if b else ""
                lines.append(f"| {name} | {label} | {_number(key, b)} | {_number(key, a)} | {ratio} |")
    only_after = [n for n in new_rows if n not in old_rows]
    only_before = [n for n in old_rows if n not in new_rows]
    if only_after:
        lines += ["", "Only in after (no ratio):", *(f"- {_brief(new_rows[n])}" for n in only_after)]
    if only_before:
        lines += ["", "Only in before (no ratio):", *(f"- {_brief(old_rows[n])}" for n in only_before)]
    return "\n".join(lines)


def _brief(row: dict[str, Any]) -> str:
    shown = [f"{label} {_number(key, row[key])}" for key, label in _METRICS[:5] if _is_number(row.get(key))]
    if _is_number(row.get("bytes_per_value")):
        shown.append(f"{_number('bytes_per_value', row['bytes_per_value'])} B/value")
    return f"{row['measure']} ({', '.join(shown)})" if shown else row["measure"]


# -- issue 15's targets -------------------------------------------------------------------------------------

ONE = "1 x 100, 1 conn, 1 worker"
HUNDRED = "100 x 100, 1 conn, 1 worker"
THROUGHPUT = re.compile(r"1 x 100, \d+ conns, 1 worker")
CPU_SLACK = 1.03  # no row more than 3% worse in CPU per request


def targets(before: list[Any], after: list[Any]) -> str:
    """Issue 15's targets, from a stored run (before: c26f67a) and this one; a target whose rows either run
    lacks is shown as not measured, never as met."""
    old_rows, new_rows = _rows_by_measure(before), _rows_by_measure(after)
    lines = ["| target | measured | goal | met |", "|---|--:|--:|---|"]

    def add(label: str, value: float | None, goal: str, met: bool | None, unit: str = "x") -> None:
        shown = "not measured" if value is None else f"{value:.3f} ms" if unit == "ms" else f"{value:.2f}x"
        lines.append(
            f"| {label} | {shown} | {goal} | {'' if met is None or value is None else 'yes' if met else 'NO'} |"
        )

    def ratio(name: str, key: str) -> float | None:
        a, b = new_rows.get(name, {}).get(key), old_rows.get(name, {}).get(key)
        return a / b if _is_number(a) and _is_number(b) and b else None

    cpu = ratio(ONE, "gateway_cpu_ms_per_request")
    add(f"gateway CPU/req, {ONE}, vs before", cpu, "<= 0.6x", cpu is not None and cpu <= 0.6)
    busy = next((n for n in new_rows if THROUGHPUT.fullmatch(n) and n in old_rows), None)
    rps = ratio(busy, "rps") if busy else None
    add(f"req/s, {busy or '1 x 100, N conns, 1 worker'}, vs before", rps, ">= 1.6x", rps is not None and rps >= 1.6)
    p50 = ratio(HUNDRED, "p50_ms")
    add(f"p50, {HUNDRED} (JSON), vs before", p50, "<= 0.8x", p50 is not None and p50 <= 0.8)
    packed = new_rows.get(HUNDRED + MSGPACK_ROW, {}).get("p50_vs_json")
    answered = new_rows.get(HUNDRED + MSGPACK_ROW, {}).get("answered", "")
    add(
        f"p50, {HUNDRED}{MSGPACK_ROW} / JSON, same run" + (f" (answered {answered})" if answered else ""),
        packed,
        "<= 0.5x",
        packed is not None and packed <= 0.5 and "msgpack" in answered,
    )
    overhead = new_rows.get(ONE, {}).get("overhead_p50_ms")
    add(f"overhead p50 over the floor, {ONE}", overhead, "<= 0.150 ms", _is_number(overhead) and overhead <= 0.15, "ms")
    zipf = next((r for r in new_rows.values() if _is_number(r.get("rps_vs_no_local_cache"))), None)
    add(
        f"req/s, {zipf['measure'] if zipf else 'zipf, local cache'} / no local cache, same run",
        zipf["rps_vs_no_local_cache"] if zipf else None,
        ">= 2x",
        zipf is not None and zipf["rps_vs_no_local_cache"] >= 2,
    )
    cpus = {n: ratio(n, "gateway_cpu_ms_per_request") for n in old_rows if n in new_rows}
    shared = {n: r for n, r in cpus.items() if r is not None}
    worst = max(shared, key=lambda n: shared[n]) if shared else None
    add(
        f"worst gateway CPU/req of the {len(shared)} rows both runs have" + (f" ({worst})" if worst else ""),
        shared[worst] if worst else None,
        f"<= {CPU_SLACK:.2f}x",
        worst is not None and shared[worst] <= CPU_SLACK,
    )
    return "\n".join(lines)
