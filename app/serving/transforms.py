"""On-demand features: a registry function called once per request on columns of stored values and context.

The function gets one mapping, input name -> a list with one item per entity row (stored inputs carry their
served value, which is the default where the value was not PRESENT), and returns output name -> a sequence of
the same length (lists, tuples or numpy arrays). What it returns is checked like a write: every output present,
the right length, every value of its dtype (None or NaN: no value, served as the default with status MISSING,
or its inputs' status when that is worse; numpy scalars are taken as their Python values). An
exception or a wrong answer makes that transform's outputs UNAVAILABLE with their defaults and the answer
degraded; the error is reported in the answer, never raised.

An output computed from an input that was not PRESENT carries that input's status (the worst of its inputs,
EXPIRED < MISSING < UNAVAILABLE), so a model never takes a value computed from defaults for a real one.

The function runs on the event loop, as Feast's Python-mode on-demand views run in its server: a transform is
expected to take microseconds per row (it is timed in Server-Timing as `transform`); one that blocks for
milliseconds holds every request of its worker for as long.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status as SpanStatus
from opentelemetry.trace import StatusCode

from app.errors import ValidationFailed, describe_error
from app.registry.model import Feature
from app.serving.plan import SEVERITY, Plan, TransformPlan
from app.serving.statuses import MISSING, PRESENT, Cell, Outcome
from app.storage.codec import CodecError

if TYPE_CHECKING:
    from app.serving.gateway import Gateway


@dataclass(slots=True)
class TransformOutcome:
    """One transform in one request: how it went, how long it took."""

    status: Outcome = Outcome.OK
    ms: float = 0.0
    error: str | None = None
    # Every output's status per row, when the function gave every value (the usage counts read it in C)
    rows: list[str] | None = None


class TransformFailed(Exception):
    """The function's answer does not fit its declared outputs."""


def check_context(context: Mapping[str, list[Any]] | None, plan: Plan, n_rows: int) -> dict[str, list[Any]]:
    """The `context` columns the plan's transforms read, each as long as the entity lists and of its declared
    dtype (values in their served form); a ValidationFailed naming the field otherwise."""
    given = context or {}
    for name in given:
        if name not in plan.context:
            wanted = ", ".join(plan.context) or "none"
            raise ValidationFailed(
                f"no requested on-demand feature reads this field; the request's fields are: {wanted}",
                field=f"context.{name}",
            )
    checked: dict[str, list[Any]] = {}
    for name, dtype in plan.context.items():
        values = given.get(name)
        if values is None:
            raise ValidationFailed(
                f"the requested on-demand features need {name} ({dtype.name}), one per entity row",
                field=f"context.{name}",
            )
        if len(values) != n_rows:
            raise ValidationFailed(f"{len(values)} values; give one per entity row ({n_rows})", field=f"context.{name}")
        out = dtype.served_column(values) if values else values
        if out is None:
            out = []
            for i, value in enumerate(values):
                if value is None:
                    raise ValidationFailed("a context value is required (null given)", field=f"context.{name}[{i}]")
                try:
                    out.append(dtype.output(dtype.check(value)))
                except CodecError as exc:
                    raise ValidationFailed(str(exc), field=f"context.{name}[{i}]") from None
        checked[name] = out
    return checked


def run_transforms(
    gw: Gateway, plan: Plan, columns: list[list[Cell]], context: Mapping[str, list[Any]], n_rows: int
) -> dict[str, TransformOutcome]:
    """Appends each transform's cells (one per row) to `columns`; answers how each went."""
    outcomes = {}
    for tp in plan.transforms:
        outcome = outcomes[tp.view.name] = TransformOutcome()
        columns.append(_run(gw, tp, columns, context, n_rows, outcome))
    return outcomes


def _run(
    gw: Gateway,
    tp: TransformPlan,
    columns: list[list[Cell]],
    context: Mapping[str, list[Any]],
    n_rows: int,
    outcome: TransformOutcome,
) -> list[Cell]:
    inputs: dict[str, list[Any]] = {}
    worst = [PRESENT] * n_rows
    for name, group_index, offset in tp.stored:
        column = columns[group_index]
        inputs[name] = [cell.values[offset] for cell in column]
        statuses = [cell.statuses[offset] for cell in column]
        if statuses.count(PRESENT) == n_rows:
            continue
        for r, status in enumerate(statuses):
            if status is not PRESENT and SEVERITY[status] > SEVERITY[worst[r]]:
                worst[r] = status
    for name, field in tp.request:
        inputs[name] = list(context[field])  # a copy: the function may change what it is given
    view = tp.view
    with gw.span(f"transform {view.name}") as span:
        if span.is_recording():
            span.set_attribute("transform.function", view.function_ref)
            span.set_attribute("feature.rows", n_rows)
        started = time.perf_counter()
        try:
            outputs = _outputs(view.function(inputs), view.outputs, n_rows)
        except Exception as exc:  # noqa: BLE001 (a user's function: any failure degrades, never a 500)
            outcome.ms = (time.perf_counter() - started) * 1000
            outcome.status = Outcome.ERROR
            outcome.error = describe_error(exc) if not isinstance(exc, TransformFailed) else str(exc)
            span.record_exception(exc)
            span.set_status(SpanStatus(StatusCode.ERROR, type(exc).__name__))
            return [tp.unavailable] * n_rows
        outcome.ms = (time.perf_counter() - started) * 1000
    marked = tp.statuses
    if not any(None in column for column in outputs):  # every value given: one status per row
        outcome.rows = worst
        return [
            Cell(values, marked[status], None) for values, status in zip(zip(*outputs, strict=True), worst, strict=True)
        ]
    cells = []
    for values, status in zip(zip(*outputs, strict=True), worst, strict=True):
        if None in values:
            served = [d if v is None else v for v, d in zip(values, tp.defaults, strict=True)]
            missing = MISSING if SEVERITY[status] < SEVERITY[MISSING] else status  # never better than its inputs
            marks = [missing if v is None else status for v in values]
            cells.append(Cell(tuple(served), tuple(marks), None))
        else:
            cells.append(Cell(values, marked[status], None))
    return cells


def _outputs(answer: Any, outputs: Sequence[Feature], n_rows: int) -> list[list[Any]]:
    """The function's answer, checked against the declared outputs: one served-form list per output."""
    if not isinstance(answer, Mapping):
        raise TransformFailed(f"returned {type(answer).__name__}, not a mapping of output name -> values")
    columns = []
    for feature in outputs:
        values = answer.get(feature.name)
        if values is None:
            raise TransformFailed(f"returned no {feature.name!r}; it returned {', '.join(map(str, answer)) or 'none'}")
        if hasattr(values, "tolist"):  # numpy: its scalars become Python's, which the dtype checks know
            values = values.tolist()
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TransformFailed(f"{feature.name}: returned {type(values).__name__}, not a sequence of values")
        if len(values) != n_rows:
            raise TransformFailed(f"{feature.name}: returned {len(values)} values for {n_rows} rows")
        dtype = feature.dtype
        fast = dtype.served_column(list(values))
        if fast is not None:
            columns.append(fast)
            continue
        checked: list[Any] = []
        for i, value in enumerate(values):
            if hasattr(value, "item") and not isinstance(value, str | bytes):
                value = value.item()  # a numpy scalar in a list: its Python value
            if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: numpy's "no value"
                checked.append(None)
                continue
            try:
                checked.append(dtype.output(dtype.check(value)))
            except CodecError as exc:
                raise TransformFailed(f"{feature.name}[{i}]: {exc}") from None
        columns.append(checked)
    return columns
