"""Quality gates: turn a reproducibility report into a pass/fail a CI job can act on.

Same interface as the user's guide (`QualityGates().gates`, `evaluate_run(results)` ->
(passed, issues)) with two fixes: every blocking gate fails the run (the guide's sketch only
failed on the score), and a missing value fails its gate instead of silently defaulting.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.errors import QloraxError
from qlorax.layout import report_get

# gate name -> default bound, blocking flag, weight (kept from the guide) and the result keys
# that may carry its value (the first present wins).
DEFAULT_GATES: dict[str, dict[str, Any]] = {
    "reproducibility_score": {"min": 1.0, "weight": 1.0, "blocking": True},
    "training_time": {"max": 300, "weight": 0.5, "blocking": True},  # seconds
    "memory_usage": {"max": 8192, "weight": 0.3, "blocking": True},  # MB
    "artifact_count": {"min": 6, "weight": 0.2, "blocking": True},
}
RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "reproducibility_score": ("reproducibility_score",),
    "training_time": ("training_duration", "training_time", "duration_seconds"),
    "memory_usage": ("peak_memory_mb", "memory_usage"),
    "artifact_count": ("artifact_count",),
}
UNITS = {"training_time": "s", "memory_usage": "MB"}
GATE_KEYS = ("min", "max", "blocking", "weight")
FLAT_KEYS = ("reproducibility_score", "training_duration", "peak_memory_mb", "artifact_count")


@dataclass
class GateResult:
    """One gate's verdict: the value, the bound it was held to, and a sentence saying why."""

    name: str
    value: Any
    limit: float | None
    comparison: str  # ">=" for a min bound, "<=" for a max bound
    passed: bool
    blocking: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unknown(given: Any, known: Any) -> str:
    """The names in `given` that are not in `known`, sorted and comma-joined ('' when none)."""
    return ", ".join(sorted(str(k) for k in given if k not in known))


def validate_thresholds(thresholds: Any, source: str = "thresholds") -> dict[str, dict[str, Any]]:
    """Check a thresholds mapping; unknown gates or keys are errors naming them and the source."""
    if thresholds is None:
        return {}
    if not isinstance(thresholds, dict):
        raise QloraxError(f"{source}: expected a mapping of gate names ({', '.join(DEFAULT_GATES)}) to "
                          f"settings such as {{min: 1.0}}, got {type(thresholds).__name__}.")
    if unknown := _unknown(thresholds, DEFAULT_GATES):
        raise QloraxError(f"{source}: unknown gate(s) {unknown}; known gates are {', '.join(DEFAULT_GATES)}.")
    clean: dict[str, dict[str, Any]] = {}
    for name, settings in thresholds.items():
        if not isinstance(settings, dict):
            raise QloraxError(f"{source}: gate {name} must be a mapping with keys from "
                              f"{', '.join(GATE_KEYS)}, got {settings!r}.")
        if bad := _unknown(settings, GATE_KEYS):
            raise QloraxError(f"{source}: gate {name} has unknown key(s) {bad}; allowed keys are "
                              f"{', '.join(GATE_KEYS)}.")
        for key in ("min", "max", "weight"):
            if key in settings and not (_is_number(settings[key]) and math.isfinite(settings[key])):
                raise QloraxError(f"{source}: {name}.{key} must be a number, got {settings[key]!r}.")
        if "blocking" in settings and not isinstance(settings["blocking"], bool):
            raise QloraxError(
                f"{source}: {name}.blocking must be true or false, got {settings['blocking']!r}."
            )
        clean[name] = dict(settings)
    return clean


def load_thresholds(path: Path) -> dict[str, dict[str, Any]]:
    """Read a thresholds YAML such as `{reproducibility_score: {min: 1.0}, training_time: {max: 600}}`."""
    import yaml

    from qlorax.strict_input import load_yaml_unique

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QloraxError(f"{path}: cannot read the thresholds file ({exc.strerror or exc}).") from exc
    try:
        data = load_yaml_unique(text, str(path))
    except yaml.YAMLError as exc:
        raise QloraxError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}).") from exc
    return validate_thresholds(data if data is not None else {}, source=str(path))


def gates_from_report(report: dict[str, Any], source: str = "report") -> dict[str, Any]:
    """The flat results gates need, from a report's `summary` (or a dict that is already flat);
    errors name `source`, the file the report was read from."""
    if not isinstance(report, dict):
        raise QloraxError(f"{source}: not a qlorax report: expected a JSON object.")
    summary = report_get(report, layout.REPORT_SUMMARY, None)
    if isinstance(summary, dict):
        flat = dict(summary)
        if "reproducibility_score" not in flat:
            try:
                flat["reproducibility_score"] = report_get(report, layout.REPORT_SCORE)
            except KeyError:
                pass
        return flat
    aliases = {k for keys in RESULT_KEYS.values() for k in keys}
    if aliases & set(report):
        return dict(report)
    try:
        score = report_get(report, layout.REPORT_SCORE)
    except KeyError:
        raise QloraxError(f"{source}: not a qlorax report: it has no 'summary' section and none of the keys "
                          f"{', '.join(FLAT_KEYS)}.") from None
    return {"reproducibility_score": score}


class QualityGates:
    """Quality gates for reproducible training; all gates block by default."""

    def __init__(self, thresholds: dict[str, Any] | None = None):
        self.gates: dict[str, dict[str, Any]] = copy.deepcopy(DEFAULT_GATES)
        for name, settings in validate_thresholds(thresholds).items():
            self.gates[name].update(settings)

    @classmethod
    def from_file(cls, path: Path) -> QualityGates:
        """Gates with the overrides of a thresholds YAML."""
        return cls(load_thresholds(path))

    def evaluate(self, results: dict[str, Any]) -> list[GateResult]:
        """One GateResult per bound of every gate (normally one per gate); a whole report works too."""
        if isinstance(report_get(results, layout.REPORT_SUMMARY, None), dict):
            results = gates_from_report(results)
        out: list[GateResult] = []
        for name, gate in self.gates.items():
            key = next((k for k in RESULT_KEYS[name] if results.get(k) is not None), None)
            value = results.get(key) if key else None
            blocking = bool(gate.get("blocking", True))
            unit = UNITS.get(name, "")
            for bound, comparison in (("min", ">="), ("max", "<=")):
                if bound not in gate:
                    continue
                limit = gate[bound]
                if value is None:
                    passed = False
                    message = (f"{name}: value missing from the results (expected key "
                               f"{' or '.join(RESULT_KEYS[name])}); the gate needs "
                               f"{comparison} {limit}{unit}")
                elif not _is_number(value) or not math.isfinite(value):
                    passed = False
                    message = f"{name}: value {value!r} is not a finite number"
                else:
                    passed = value >= limit if bound == "min" else value <= limit
                    verb = "meets" if passed else ("is below" if bound == "min" else "exceeds")
                    message = f"{name}: {value}{unit} {verb} the {bound}imum {limit}{unit}"
                out.append(GateResult(name=name, value=value, limit=limit, comparison=comparison,
                                      passed=passed, blocking=blocking, message=message))
        return out

    def evaluate_run(self, results: dict[str, Any]) -> tuple[bool, list[str]]:
        """(passed, issues): fails when any blocking gate fails; non-blocking failures are issues too."""
        issues = []
        passed = True
        for result in self.evaluate(results):
            if result.passed:
                continue
            if result.blocking:
                passed = False
                issues.append(result.message)
            else:
                issues.append(f"{result.message} (non-blocking)")
        return passed, issues
