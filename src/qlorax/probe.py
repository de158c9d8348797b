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
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qlorax.config import QloraxConfig, parse_config
from qlorax.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_RESOURCES, ConfigError, QloraxError
from qlorax.settings import EMULATED_CPU_ENV

NATIVE = "native"
EMULATOR = "qemu-x86_64"
PROBE_REPORT = "probe_report.json"
PROBE_LOGS = "logs"
DEFAULT_BATCH = "2x32"
_CPU_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_cpus(text: str, option: str = "--cpu") -> list[str]:
    """Comma-separated processor names, in order, without repeats (`native` is the host)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{option} {text!r}: expected comma-separated processor names, e.g. native,Haswell-v4")
    for name in names:
        if not _CPU_NAME.match(name):
            raise ConfigError(f"{option} {text!r}: {name!r} is not a processor name (letters, digits, . _ -)")
    return list(dict.fromkeys(names))


def parse_batch(text: str) -> tuple[int, int]:
    """`SEQUENCESxTOKENS`, e.g. 2x32: the probe's batch size and max_length."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 2:
        raise ConfigError(f"--batch {text!r}: expected SEQUENCESxTOKENS with at least 1 sequence and 2 tokens, "
                          "e.g. 2x32")
    return int(match.group(1)), int(match.group(2))


def emulator_path() -> str:
    """qemu-x86_64 on PATH; exit 3 (environment) naming the package otherwise."""
    path = shutil.which(EMULATOR)
    if path is None:
        raise QloraxError(f"{EMULATOR} is not installed, so no other processor can be emulated: install Debian's "
                          "qemu-user package (sudo apt-get install -y qemu-user) or probe only --cpu native",
                          exit_code=EXIT_RESOURCES)
    return path


def known_cpu_models(qemu: str) -> set[str]:
    """The CPU model names this QEMU emulates (`qemu-x86_64 -cpu help`)."""
    listing = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=60, check=False).stdout
    models = set()
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":
            models.add(parts[1])
    return models


def emulator_wrappers(cpus: list[str]) -> dict[str, tuple[str, ...]]:
    """The command prefix per processor: none for native, `qemu-x86_64 -cpu NAME` otherwise
    (checked against the models this QEMU knows: a typo is exit 2, not a silent host run)."""
    emulated = [cpu for cpu in cpus if cpu != NATIVE]
    if not emulated:
        return {NATIVE: ()}
    qemu = emulator_path()
    known = known_cpu_models(qemu)
    unknown = [cpu for cpu in emulated if cpu not in known]
    if unknown:
        examples = ", ".join(m for m in ("Haswell-v4", "Skylake-Client-v4", "EPYC-Rome-v1", "Nehalem-v1") if m in known)
        raise ConfigError(f"--cpu: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a CPU model "
                          f"{EMULATOR} knows (see `{EMULATOR} -cpu help`; e.g. {examples})")
    return {cpu: () if cpu == NATIVE else (qemu, "-cpu", cpu) for cpu in cpus}


def emulation_env(cpu: str) -> dict[str, str]:
    """Tells the child which processor it is emulated as (recorded in env.json / probe results)."""
    return {} if cpu == NATIVE else {EMULATED_CPU_ENV: cpu}


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


def run_processors(config: QloraxConfig, cpus: list[str], wrappers: dict[str, tuple[str, ...]], output_dir: Path,
                   threads: int, jobs: int) -> dict[str, ProcessorRun]:
    """Launch the `probe` job once per processor, `jobs` at a time, each in a fresh pinned child;
    stale results of an earlier probe are removed first, so a failure cannot pass as a result."""
    from qlorax.artifacts import read_json
    from qlorax.launcher import launch_job

    log_dir = output_dir / PROBE_LOGS
    log_dir.mkdir(parents=True, exist_ok=True)
    for cpu in cpus:
        for stale in (result_path(output_dir, cpu), result_path(output_dir, cpu).with_suffix(".safetensors")):
            stale.unlink(missing_ok=True)

    def one(cpu: str) -> ProcessorRun:
        log = log_dir / f"{cpu}.log"
        payload = {"config": config.canonical(), "result": str(result_path(output_dir, cpu).resolve())}
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as handle:
            code = launch_job("probe", payload, config.determinism.profile, threads, extra_env=emulation_env(cpu),
                              stdout=handle, stderr=handle, wrapper=wrappers[cpu])
        run = ProcessorRun(cpu, code, round(time.perf_counter() - start, 1), log)
        written = read_json(result_path(output_dir, cpu)) if result_path(output_dir, cpu).is_file() else None
        if code == 0 and written is not None:
            run.record = written
        elif written is not None and "refused" in written:
            run.refusal = written
            run.message = written["refused"]
        else:
            run.message = last_error_line(log) or f"exit {code}; see {log}"
        return run

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        runs = list(pool.map(one, cpus))
    return {run.cpu: run for run in runs}


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


def run_probe(config: QloraxConfig, cpus: list[str], output_dir: Path, batch: tuple[int, int], threads: int = 1,
              jobs: int | None = None) -> ProbeOutcome:
    """Probe every processor (native always first: it is the reference), compare, write the report."""
    from qlorax.artifacts import write_json_atomic
    from qlorax.launcher import default_threads
    from qlorax.runs import check_inputs, prepare_base_model

    cpus = [NATIVE, *[cpu for cpu in cpus if cpu != NATIVE]]
    wrappers = emulator_wrappers(cpus)
    config = probe_config(config, batch)
    check_inputs(config)
    prepare_base_model(config)  # natively, once: an emulated child would build it ~100x slower
    # Native first and alone: it is the reference, and bad input (data, model, a batch too short
    # for any completion token) shows there in seconds rather than after minutes of emulation.
    runs = run_processors(config, [NATIVE], wrappers, Path(output_dir), threads, 1)
    native = runs[NATIVE]
    if native.record is None:
        code = native.exit_code if native.exit_code in (EXIT_BAD_INPUT, EXIT_RESOURCES) else EXIT_CHECK_FAILED
        raise QloraxError(f"the native probe failed, so no processor was emulated: {native.message}", exit_code=code)
    runs.update(run_processors(config, cpus[1:], wrappers, Path(output_dir), threads,
                               jobs or max(1, default_threads() // threads)))
    report, rows = build_report(config.determinism.profile, batch, runs, Path(output_dir))
    report_path = Path(output_dir) / PROBE_REPORT
    write_json_atomic(report_path, report)
    return ProbeOutcome(runs, report, report_path, rows)


def check_processors(config: QloraxConfig, cpus: list[str]) -> None:
    """Before a long emulated verification: each processor's CPUID, read in a child under its
    emulator (about a second each, no torch), must satisfy the profile; exit 2 otherwise."""
    from qlorax.launcher import run_job_captured

    wrappers = emulator_wrappers(cpus)
    for cpu in cpus:
        done = run_job_captured("probe", {"config": config.canonical()},
                                config.determinism.profile, 1, extra_env=emulation_env(cpu), wrapper=wrappers[cpu])
        if done.returncode != 0:
            errors = [line.removeprefix("error: ") for line in done.stderr.splitlines() if line.startswith("error: ")]
            raise QloraxError(f"--cpu {cpu}: {errors[-1] if errors else 'the processor check failed'}",
                              exit_code=done.returncode if done.returncode == EXIT_BAD_INPUT else EXIT_CHECK_FAILED)
