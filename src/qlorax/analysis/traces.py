"""Per-step traces: where two runs first part ways, and on which field.

trace.jsonl records every optimizer step with the loss and grad norm as exact float.hex bits,
so the first divergent step is found by equality, never by a tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlorax import layout


def read_trace(path: Path) -> list[dict[str, Any]] | None:
    """The per-step records of trace.jsonl, or None when the file is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError):
        return None
    return [r for r in records if isinstance(r, dict)]


def _trace_value(record: dict[str, Any], name: str, key: str) -> Any:
    """The exact value of a field; older traces without *_bits fall back to float.hex of the value."""
    if key in record:
        return record[key]
    if name in record and key.endswith("_bits"):
        try:
            return float.hex(float(record[name]))
        except (TypeError, ValueError):
            return record[name]
    return record.get(name)


def _step_values(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {k: record[k] for k in layout.TRACE_SHOWN_KEYS if k in record}


def _step_of(record: dict[str, Any], index: int) -> int:
    step = record.get(layout.TRACE_STEP)
    return step if isinstance(step, int) and not isinstance(step, bool) else index + 1


def _divergence_at(step: int, fields: list[str], a: dict[str, Any] | None,
                   b: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "first_divergent_step": step,
        "first_divergent_field": fields[0] if fields else None,
        "differing_fields": fields,
        "reference_values": _step_values(a),
        "run_values": _step_values(b),
    }


def compare_traces(reference: list[dict[str, Any]], run: list[dict[str, Any]]) -> dict[str, Any]:
    """First step where the traces differ, and which field differed first at that step.

    Fields are compared exactly (loss and grad norm through their float.hex bits) in the
    order loss, grad_norm, lr, tokens, lora_sha256; a trace that ends early diverges at the
    first step it lacks ("trace_length").
    """
    ref_by = {_step_of(r, i): r for i, r in enumerate(reference)}
    run_by = {_step_of(r, i): r for i, r in enumerate(run)}
    for step in sorted(set(ref_by) | set(run_by)):
        a, b = ref_by.get(step), run_by.get(step)
        if a is None or b is None:
            shorter = "run" if b is None else "reference"
            return {**_divergence_at(step, ["trace_length"], a, b),
                    "note": f"the {shorter} trace has no step {step}"}
        differing = [name for name, key in layout.TRACE_COMPARED_FIELDS
                     if _trace_value(a, name, key) != _trace_value(b, name, key)]
        if differing:
            return _divergence_at(step, differing, a, b)
    return {"first_divergent_step": None, "first_divergent_field": None, "differing_fields": [],
            "reference_values": None, "run_values": None}
