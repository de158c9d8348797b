"""Compare run directories: which runs are bit-identical, where the others diverge, and why.

The proof of reproducibility is byte equality of the deterministic artifacts, checked through
the SHA-256 manifests (`runs`); everything else explains a failure well enough to act on it:
the first divergent trace step (`traces`), tensor ULP distances (`tensors`), environment
grouping and attribution (`environments`). `report` builds the report dict and `render` writes
it as JSON, Markdown and a loss-curve PNG. No torch: adapters are read with
`safetensors.numpy`, so analysis starts in a fraction of a second.
"""

from __future__ import annotations

from qlorax.analysis.environments import is_thread_key
from qlorax.analysis.render import count_run_curves, plot_loss_curves, render_markdown, write_reports
from qlorax.analysis.report import analyze_runs, load_report
from qlorax.analysis.runs import (
    STATUS_INCOMPLETE,
    STATUS_MISMATCH,
    STATUS_OK,
    discover_runs,
    is_run_dir,
    manifest_problems,
    verify_run_dir,
)
from qlorax.analysis.tensors import compare_adapters, ulp_distance
from qlorax.analysis.traces import compare_traces, read_trace

__all__ = [
    "STATUS_INCOMPLETE",
    "STATUS_MISMATCH",
    "STATUS_OK",
    "analyze_runs",
    "compare_adapters",
    "compare_traces",
    "count_run_curves",
    "discover_runs",
    "is_run_dir",
    "is_thread_key",
    "load_report",
    "manifest_problems",
    "plot_loss_curves",
    "read_trace",
    "render_markdown",
    "ulp_distance",
    "verify_run_dir",
    "write_reports",
]
