"""The verification report's proof for a published run, or the refusal that names what is missing.

A run is published as verified only when a `qlorax verify` report scored 1.0 over at least two
runs whose adapter and deterministic digests are this run's; the card lists what it verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import layout
from qlorax.artifacts import read_json
from qlorax.errors import EXIT_BAD_INPUT, QloraxError
from qlorax.publish.errors import PublishRefused
from qlorax.publish.source import PublishSource


@dataclass
class Evidence:
    """What the verification report proves about the source (or that nothing does)."""

    verified: bool
    report_path: Path | None = None
    score: float | None = None
    runs: int = 0
    threads: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    environments: list[str] = field(default_factory=list)
    processors: list[str] = field(default_factory=list)


def load_evidence(report_path: Path | None, source: PublishSource, allow_unverified: bool) -> Evidence:
    """The verification report's proof for this source: score 1.0 over at least two runs whose
    adapter and deterministic digests are this run's. Without a report: refused (exit 2) unless
    --allow-unverified; a report that does not prove this run: refused (exit 1), naming why."""
    if report_path is None:
        if not allow_unverified:
            raise QloraxError(
                f"{source.directory}: refusing to publish an unverified run. Pass --report with the "
                f"{layout.REPORT_JSON} of a `qlorax verify` of this config (score 1.0), or --allow-unverified "
                "to publish without proof (the card then says it is unverified).", EXIT_BAD_INPUT)
        return Evidence(verified=False)
    report = _read_report(Path(report_path))
    score = layout.report_get(report, layout.REPORT_SCORE, None)
    runs = layout.report_get(report, layout.REPORT_TOTAL_RUNS, 0)
    if not isinstance(score, int | float) or not isinstance(runs, int):
        raise QloraxError(f"{report_path}: not a qlorax reproducibility report (no "
                          f"{layout.dotted(layout.REPORT_SCORE)}).")
    why = _why_not_proven(report, source, score, runs)
    if why:
        raise PublishRefused(f"{report_path}: refusing to publish {source.directory}: the report does not prove "
                             f"this run ({why}).")
    entries = layout.report_get(report, layout.REPORT_RUNS, [])
    groups = layout.report_get(report, layout.REPORT_CROSS_ENVIRONMENT, {}).get("groups", [])
    processors = sorted({f"{g['fingerprint'].get('cpu_model', '?')} ({g['fingerprint'].get('cpu_capability', '?')})"
                         for g in groups if isinstance(g.get("fingerprint"), dict)})
    return Evidence(
        verified=True, report_path=Path(report_path), score=float(score), runs=runs,
        threads=sorted({str(e.get("threads")) for e in entries if e.get("threads") is not None}, key=int),
        profiles=sorted({str(e["profile"]) for e in entries if e.get("profile")}),
        environments=sorted({str(e["environment"]) for e in entries if e.get("environment")}),
        processors=processors,
    )


def _why_not_proven(report: dict[str, Any], source: PublishSource, score: float, runs: int) -> str | None:
    """Why the report does not prove this source, or None when it does."""
    from qlorax.verify import summarise

    adapter = summarise(report, {})["adapter_sha256"]
    reference = layout.report_get(report, layout.REPORT_METRICS, {}).get("reference_digest")
    if score != 1.0:
        return f"its reproducibility score is {score:.3f}, not 1.0"
    if runs < 2:
        return f"it analysed {runs} run; a verification needs at least 2 runs to prove anything"
    if adapter != source.adapter_sha256:
        return (f"it verified adapter {str(adapter)[:16]}…, but this run's {layout.ADAPTER_WEIGHTS} is "
                f"{source.adapter_sha256[:16]}…")
    if reference != source.deterministic_digest:
        return (f"it verified deterministic digest {str(reference)[:16]}…, but this run's is "
                f"{source.deterministic_digest[:16]}…")
    return None


def _read_report(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / layout.REPORT_JSON
    try:
        report = read_json(path)
    except FileNotFoundError:
        raise QloraxError(f"--report {path}: no such file.") from None
    except (OSError, ValueError) as exc:
        raise QloraxError(f"--report {path}: not readable JSON ({exc.__class__.__name__}).") from None
    if not isinstance(report, dict):
        raise QloraxError(f"--report {path}: not a qlorax reproducibility report.")
    return report
