"""The run-directory contract: every file name, trace key and report key path, spelled once.

A run directory (`qlorax train`) and a verification directory (`qlorax verify`) are the
interface between the training process, the analysis, the gates, the cache and the user's
own tools. Everything that reads or writes one takes its names from here, so that adding an
artifact is one line in this module. Pure Python, no imports beyond the standard library.
"""

from __future__ import annotations

from typing import Any

# --------------------------------------------------------------------------- run directory

MANIFEST = "artifact_summary.json"
MANIFEST_FORMAT = "qlorax-artifact-summary/1"
LOCK = ".qlorax.lock"

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TRAINING_ARGS = "training_args.json"
RESOLVED_CONFIG = "resolved_config.json"
RESULTS = "results.json"
TRACE = "trace.jsonl"
SAMPLES = "samples.jsonl"

ENV = "env.json"
METADATA = "training_metadata.json"
TRAIN_LOG = "train.log"

# Files whose bytes must be identical across runs of the same config.
DETERMINISTIC_FILES = (
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    TRAINING_ARGS,
    RESULTS,
    TRACE,
    *TOKENIZER_FILES[:2],
    RESOLVED_CONFIG,
    SAMPLES,
    *TOKENIZER_FILES[2:],
)
# Files that describe where and when a run happened; they may differ between runs.
INFORMATIONAL_FILES = (ENV, METADATA, TRAIN_LOG)
# An export directory (`qlorax export`): the adapter (or the merged model), the tokenizer,
# export.json naming the run it came from, and a manifest of its own. All deterministic.
EXPORT_RECORD = "export.json"
EXPORT_FORMAT = "qlorax-export/1"
MERGED_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
MERGED_SHARD_PATTERN = r"model-\d{5}-of-\d{5}\.safetensors"
EXPORT_FILES = (EXPORT_RECORD, *MERGED_MODEL_FILES)
# Any one of these makes a directory look like a run directory (finished or not).
RUN_MARKERS = (MANIFEST, RESULTS, TRACE, METADATA)

# --------------------------------------------------------------------------- published snapshot
# `qlorax publish` uploads a run directory as a snapshot that `qlorax check` still verifies: the
# run's files and manifest, minus the informational files that hold local paths and host names
# (withheld), plus the model card and the verification report (added), described by a
# publication record. Hub housekeeping files are ignored in a snapshot (and only there).

PUBLICATION = "qlorax_publication.json"
PUBLICATION_FORMAT = "qlorax-publication/1"
MODEL_CARD = "README.md"
PUBLISHED_REPORT = "verification/reproducibility_analysis_report.json"
WITHHELD_FROM_PUBLICATION = (METADATA, TRAIN_LOG)
HUB_HOUSEKEEPING_FILES = (".gitattributes",)
HUB_HOUSEKEEPING_DIRS = (".cache",)  # huggingface_hub's local_dir download metadata (.cache/huggingface/)

# --------------------------------------------------------------------------- checkpoints

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_CONFIG = "config.json"  # checkpoints/config.json: the config `qlorax resume` reuses
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_TRACE = "trace.jsonl"
CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
CHECKPOINT_FORMAT = "qlorax-checkpoint/1"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


# --------------------------------------------------------------------------- verification directory

REPORT_JSON = "reproducibility_analysis_report.json"
REPORT_MARKDOWN = "report.md"
LOSS_PLOT = "loss_curves.png"
REPORT_HTML = "report.html"  # the self-contained page `qlorax report` and `verify` write
LOGS_DIR = "logs"
AUDIT_LOG = "audit.jsonl"


def verification_run_name(index: int) -> str:
    """run-01, run-02, ...: the run directories of one verification."""
    return f"run-{index:02d}"


# --------------------------------------------------------------------------- trace records
# One JSON object per optimizer step in trace.jsonl.

TRACE_STEP = "step"
TRACE_LOSS = "loss"
TRACE_LOSS_BITS = "loss_bits"
TRACE_LR = "lr"
TRACE_GRAD_NORM = "grad_norm"
TRACE_GRAD_NORM_BITS = "grad_norm_bits"
TRACE_TOKENS = "tokens"
TRACE_TARGET_TOKENS = "target_tokens"
TRACE_LORA_SHA256 = "lora_sha256"
TRACE_EVAL_LOSS = "eval_loss"
# Compared per step, in this order: the first differing one is "the" divergent field.
# (field, key holding its exact value)
TRACE_COMPARED_FIELDS = (
    (TRACE_LOSS, TRACE_LOSS_BITS),
    (TRACE_GRAD_NORM, TRACE_GRAD_NORM_BITS),
    (TRACE_LR, TRACE_LR),
    (TRACE_TOKENS, TRACE_TOKENS),
    (TRACE_LORA_SHA256, TRACE_LORA_SHA256),
)
TRACE_SHOWN_KEYS = (TRACE_STEP, TRACE_LOSS, TRACE_LOSS_BITS, TRACE_GRAD_NORM, TRACE_GRAD_NORM_BITS, TRACE_LR,
                    TRACE_TOKENS, TRACE_LORA_SHA256)

# --------------------------------------------------------------------------- report key paths
# reproducibility_analysis_report.json, as read by gates, verify, the renderers and users' CI.

REPORT_METADATA = ("analysis_metadata",)
REPORT_TOTAL_RUNS = ("analysis_metadata", "total_runs_analyzed")
REPORT_OVERALL = ("overall_analysis",)
REPORT_METRICS = ("overall_analysis", "metrics_reproducibility")
REPORT_SCORE = ("overall_analysis", "metrics_reproducibility", "reproducibility_score")
REPORT_REFERENCE_RUN = ("overall_analysis", "metrics_reproducibility", "reference_run")
REPORT_ARTIFACT_AGREEMENT = ("overall_analysis", "artifact_agreement")
REPORT_CROSS_ENVIRONMENT = ("cross_environment_analysis",)
REPORT_ATTRIBUTION = ("cross_environment_analysis", "attribution")
REPORT_CONCLUSIONS = ("conclusions",)
REPORT_RUNS = ("runs",)
REPORT_DIVERGENCE = ("divergence",)
REPORT_SUMMARY = ("summary",)
REPORT_FILES = ("report_files",)  # written by write_reports, beside the analysis
REPORT_CURVES_PLOTTED = ("report_files", "loss_curves_plotted")

_MISSING = object()


def report_get(report: dict[str, Any], path: tuple[str, ...], default: Any = _MISSING) -> Any:
    """The value at a report key path; KeyError naming the dotted path unless a default is given."""
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            if default is _MISSING:
                raise KeyError(".".join(path))
            return default
        node = node[key]
    return node


def report_set(report: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set the value at a report key path, creating the mappings on the way."""
    node = report
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)
