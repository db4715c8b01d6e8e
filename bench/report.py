"""Results: the run's record (JSON), its one markdown table, and a before/after comparison of two records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

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
            rows.append(row)
        _against_tracing_off(rows)
        _against_base(rows)
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
    ("bytes_per_value", "B/value"),
)


def compare(before_path: Path, after_path: Path) -> str:
    """A table of every measure two `--json` records share: before, after, and after / before."""
    before = {r["measure"]: r for r in json.loads(before_path.read_text())["summary"]}
    after = json.loads(after_path.read_text())["summary"]
    lines = ["| measure | metric | before | after | after / before |", "|---|---|--:|--:|--:|"]
    for row in after:
        old = before.get(row["measure"])
        if old is None:
            continue
        for key, label in _METRICS:
            if key not in row or key not in old:
                continue
            a, b = row[key], old[key]
            ratio = f"{a / b:.2f}x" if b else ""
            lines.append(f"| {row['measure']} | {label} | {_number(key, b)} | {_number(key, a)} | {ratio} |")
    return "\n".join(lines)
