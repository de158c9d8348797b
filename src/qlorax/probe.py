"""`qlorax probe`: does the first training step give the same bits on other processors?

Each processor named with `--cpu` (`native`, or a CPU model QEMU emulates, e.g. Haswell-v4,
EPYC-Rome-v1) runs the `probe` job (qlorax.jobs.probe) in a pinned child; emulated ones run
the same venv Python under `qemu-x86_64 -cpu NAME`. The parent (this module, no torch)
compares every processor's loss bits, gradients and updated LoRA weights with the native
ones and reports per-tensor ULP distances where they differ.

Cost: emulation is ~100x slower per step and importing torch, transformers and peft takes
1-2 minutes, so probes use a small fixed batch (2 sequences x 32 tokens by default) and
verify --cpu suits tiny configs only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qlorax.config import QloraxConfig, parse_config
from qlorax.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, ConfigError

NATIVE = "native"
PROBE_REPORT = "probe_report.json"
PROBE_LOGS = "logs"
DEFAULT_BATCH = "2x32"


def parse_batch(text: str) -> tuple[int, int]:
    """`SEQUENCESxTOKENS`, e.g. 2x32: the probe's batch size and max_length."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 2:
        raise ConfigError(f"--batch {text!r}: expected SEQUENCESxTOKENS with at least 1 sequence and 2 tokens, "
                          "e.g. 2x32")
    return int(match.group(1)), int(match.group(2))


def probe_config(config: QloraxConfig, batch: tuple[int, int]) -> QloraxConfig:
    """The config with the probe's small fixed batch: one micro-batch of `batch` sequences
    truncated to `batch` tokens (everything else, the profile included, unchanged)."""
    data = config.canonical()
    sequences, tokens = batch
    data["training"].update(batch_size=sequences, gradient_accumulation_steps=1)
    data["data"].update(max_length=tokens, too_long="truncate")
    return parse_config(data, "probe config")


# --------------------------------------------------------------------------- running


@dataclass
class ProcessorRun:
    """One processor's probe: its exit code, wall time, log and (when it finished) results."""

    cpu: str
    exit_code: int
    seconds: float
    log: Path
    record: dict[str, Any] | None = None
    message: str | None = None
    # The profile refused this processor (from CPUID, before training): message and processor facts.
    refusal: dict[str, Any] | None = None


def result_path(output_dir: Path, cpu: str) -> Path:
    """<output>/<cpu>.json beside <cpu>.safetensors (the job writes both)."""
    return output_dir / f"{cpu}.json"


def last_error_line(log: Path) -> str | None:
    """The child's `error: ...` line, if it printed one."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else None


# --------------------------------------------------------------------------- comparing


def float_ulps(a_hex: str, b_hex: str) -> int:
    """ULP distance between two float32 values recorded as float.hex() strings."""
    from qlorax.analysis.tensors import ulp_distance

    a = np.array([float.fromhex(a_hex)], dtype=np.float32)
    b = np.array([float.fromhex(b_hex)], dtype=np.float32)
    return int(ulp_distance(a, b)[0])


def compare_results(reference: dict[str, Any], ref_tensors: dict[str, np.ndarray], other: dict[str, Any],
                    other_tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Where one processor's first step differs from the reference's: loss and grad-norm bits
    (with their ULP distance), then every differing tensor with its max ULP distance."""
    from qlorax.analysis.tensors import compare_adapters

    scalars = {}
    for key in ("loss_bits", "grad_norm_bits"):
        if reference[key] != other[key]:
            scalars[key] = {"reference": reference[key], "run": other[key],
                            "ulp_distance": float_ulps(reference[key], other[key])}
    tensors = compare_adapters(ref_tensors, other_tensors)
    differing = [{"name": t["name"], "max_ulp_distance": t.get("max_ulp_distance"),
                  "differing_elements": t.get("differing_elements"), "numel": t.get("numel"),
                  **({"problem": "missing or shape/dtype mismatch"} if "max_ulp_distance" not in t else {})}
                 for t in tensors["tensors"]]
    digests_agree = reference["tensor_sha256"] == other["tensor_sha256"]
    return {
        "agree": not scalars and not differing and digests_agree,
        "scalars": scalars,
        "tensors_compared": tensors["tensors_compared"],
        "tensors_differing": differing,
        "max_ulp_distance": max((t["max_ulp_distance"] or 0 for t in differing), default=0),
    }


def likely_cause(reference: dict[str, Any], other: dict[str, Any]) -> str:
    """Name the processor difference the probe saw (instruction set, vendor) as the likely cause."""
    ref_cpu, cpu = reference["processor"], other["processor"]
    ref_cap, cap = reference["torch"]["cpu_capability"], other["torch"]["cpu_capability"]
    if ref_cap != cap:
        return f"instruction set: ATen kernels {cap} vs {ref_cap} natively"
    if ref_cpu.get("cpu_isa_flags") != cpu.get("cpu_isa_flags"):
        added = sorted(set(ref_cpu.get("cpu_isa_flags", [])) ^ set(cpu.get("cpu_isa_flags", [])))
        return f"instruction set: flags {', '.join(added)} differ from the host's"
    if ref_cpu.get("vendor") != cpu.get("vendor"):
        return (f"vendor: {cpu.get('vendor')} vs {ref_cpu.get('vendor')} (MKL's AVX2 reproducibility branch is "
                "Intel's only; other vendors get its AUTO branch)")
    if ref_cpu.get("cpu_model") != cpu.get("cpu_model"):
        return (f"processor model: {cpu.get('cpu_model')} vs {ref_cpu.get('cpu_model')} with the same flags and "
                "vendor (a library dispatching by model, or an instruction the emulator computes differently)")
    return "same instruction set, vendor and model: not explained by the processor"


@dataclass
class ProbeOutcome:
    """Per-processor runs, the comparison with native and the exit code."""

    runs: dict[str, ProcessorRun]
    report: dict[str, Any]
    report_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 every processor agrees; 2 a processor was refused by the profile; 1 otherwise."""
        if any(row["status"] == "refused" for row in self.rows):
            return EXIT_BAD_INPUT
        return 0 if all(row["status"] == "agrees" for row in self.rows) else EXIT_CHECK_FAILED


def build_report(profile: str, batch: tuple[int, int], runs: dict[str, ProcessorRun], output_dir: Path
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report (deterministic: no times, no paths) and one table row per processor."""
    from qlorax.analysis.tensors import load_tensors

    reference = runs[NATIVE]
    ref_tensors = (load_tensors(result_path(output_dir, NATIVE).with_suffix(".safetensors"))
                   if reference.record else None)
    rows, processors = [], {}
    for cpu, run in runs.items():
        record = run.record
        row: dict[str, Any] = {"cpu": cpu, "seconds": run.seconds, "exit_code": run.exit_code,
                               "model": record["processor"]["cpu_model"] if record else None,
                               "capability": record["torch"]["cpu_capability"] if record else None}
        entry: dict[str, Any] = {"exit_code": run.exit_code}
        if run.refusal is not None:
            row.update(status="refused", detail=run.message, model=run.refusal["processor"]["cpu_model"])
            entry.update(status="refused", message=run.message, processor=run.refusal["processor"])
        elif record is None:
            row.update(status="failed", detail=run.message)
            entry.update(status="failed", message=run.message)
        elif cpu == NATIVE:
            row.update(status="agrees", detail="reference")
            entry.update(status="reference")
        elif reference.record is None or ref_tensors is None:
            row.update(status="failed", detail="no native result to compare with")
            entry.update(status="not compared")
        else:
            tensors = load_tensors(result_path(output_dir, cpu).with_suffix(".safetensors"))
            comparison = compare_results(reference.record, ref_tensors, record, tensors)
            entry.update(status="agrees" if comparison["agree"] else "differs", comparison=comparison)
            if comparison["agree"]:
                row.update(status="agrees", detail=f"{comparison['tensors_compared']} tensors bit-identical")
            else:
                cause = likely_cause(reference.record, record)
                entry["likely_cause"] = cause
                row.update(status="differs", detail=(f"{len(comparison['tensors_differing'])}/"
                                                     f"{comparison['tensors_compared']} tensors differ, max "
                                                     f"{comparison['max_ulp_distance']} ULP; {cause}"))
        if record is not None:
            entry.update(processor=record["processor"], torch=record["torch"], validation=record["validation"],
                         loss_bits=record["loss_bits"], grad_norm_bits=record["grad_norm_bits"],
                         batch_shape=record["batch_shape"])
            if not record["validation"]["valid"]:
                row["detail"] += "; determinism validation: " + "; ".join(record["validation"]["messages"])
        processors[cpu] = entry
        rows.append(row)
    report = {"format": "qlorax-probe/1", "profile": profile, "batch": {"sequences": batch[0], "tokens": batch[1]},
              "reference": NATIVE, "processors": processors,
              "all_agree": all(row["status"] == "agrees" for row in rows)}
    return report, rows
