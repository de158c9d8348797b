"""Use cases on a finished run: generate, evaluate, export.

Each checks its inputs here (no torch): the run directory is finished and intact against
its manifest, the base model is named loadably, prompts and data parse. Then the heavy
work runs in a pinned child (jobs/generate.py, jobs/evaluate.py, jobs/export.py) that loads
the base model — checked to be the one the run trained on — and attaches the adapter the
plain PEFT way. Nothing is written into the run directory: it stays intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax import __version__
from qlorax.artifacts import (
    default_dir_mode,
    read_json,
    sha256_bytes,
    write_bytes_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from qlorax.config import QloraxConfig, parse_config
from qlorax.errors import ConfigError, DataError, OutputError
from qlorax.finished_run import FinishedRun
from qlorax.launcher import default_threads, launch_job
from qlorax.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPORT_FORMAT,
    EXPORT_RECORD,
    TOKENIZER_FILES,
)


@dataclass
class RunToUse:
    """A finished run and the config it trained with, as the jobs on it need them."""

    finished: FinishedRun
    config: QloraxConfig

    @property
    def run_dir(self) -> Path:
        return self.finished.run_dir

    @property
    def results(self) -> dict[str, Any]:
        return self.finished.results

    @property
    def manifest(self) -> dict[str, Any]:
        return self.finished.manifest

    @property
    def digest(self) -> str:
        return self.finished.digest

    def job_payload(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir.resolve()), "config": self.config.canonical(),
                "base_digest": self.finished.base_digest, "run_digest": self.digest}


def open_finished_run(run_dir: Path) -> RunToUse:
    """The run checked against its manifest (qlorax.finished_run), with its training config."""
    finished = FinishedRun.open(run_dir)
    return RunToUse(finished, finished.training_config())


def _launch(kind: str, run: RunToUse, payload: dict[str, Any], threads: int | None) -> int:
    return launch_job(kind, {**run.job_payload(), **payload}, run.config.determinism.profile,
                      threads or default_threads())


# --------------------------------------------------------------------------- generate


def prompt_records(texts: list[str] | None, prompts_file: Path | None) -> list[dict[str, Any]]:
    """Prompt records ({"id", "instruction", "input"}) from --prompt texts and/or a JSONL
    file of objects with `instruction` (and optional `input`, `id`); errors name file:line."""
    records = [{"id": f"prompt-{i}", "instruction": text, "input": ""} for i, text in enumerate(texts or [], 1)]
    if prompts_file is not None:
        try:
            lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"--prompts {prompts_file}: cannot be read ({exc})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{prompts_file}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("instruction"), str):
                raise DataError(f"{where}: expected an object with a string field 'instruction' (and optionally "
                                "'input' and 'id')")
            if not isinstance(obj.get("input", ""), str):
                raise DataError(f"{where}: field 'input' must be a string")
            records.append({"id": obj.get("id", f"line-{number}"), "instruction": obj["instruction"],
                            "input": obj.get("input", "")})
    if not records:
        raise DataError("nothing to generate: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    return records


@dataclass
class GenerateOutcome:
    exit_code: int
    records: list[dict[str, Any]]
    sha256: str = ""


def generate(run_dir: Path, prompts: list[dict[str, Any]], *, max_new_tokens: int | None = None,
             temperature: float | None = None, top_p: float = 1.0, seed: int | None = None,
             threads: int | None = None, output: Path | None = None) -> GenerateOutcome:
    """Completions of `prompts` by the run's base + adapter (greedy unless a temperature > 0
    is given); written to `output` as JSON Lines with a `.sha256` file beside it."""
    run = open_finished_run(run_dir)
    if temperature is None or temperature == 0:
        if top_p != 1.0 or seed is not None:
            raise ConfigError("--top-p and --seed apply only to sampling; give --temperature T > 0 as well")
        sampling = None
    else:
        sampling = {"temperature": temperature, "top_p": top_p,
                    "seed": run.config.training.seed if seed is None else seed}
    tokens = max_new_tokens or run.config.training.sample_max_new_tokens
    with tempfile.TemporaryDirectory(prefix="qlorax-generate-") as scratch:
        result = Path(scratch) / "completions.jsonl"
        code = _launch("generate", run, {"prompts": prompts, "max_new_tokens": tokens, "sampling": sampling,
                                         "result": str(result)}, threads)
        if code != 0:
            return GenerateOutcome(code, [])
        data = result.read_bytes()
    digest = sha256_bytes(data)
    if output is not None:
        write_bytes_atomic(output, data)
        write_text_atomic(output.with_name(output.name + ".sha256"), f"{digest}  {output.name}\n")
    return GenerateOutcome(0, [json.loads(line) for line in data.decode("utf-8").splitlines()], digest)


# --------------------------------------------------------------------------- evaluate


def evaluate(run_dir: Path, data_spec: str, data_format: str | None = None,
             threads: int | None = None) -> tuple[int, dict[str, Any]]:
    """Loss and perplexity of a data file under the base model and under base + adapter:
    (exit code, result). Every example counts (no split); the run's max_length,
    truncation and prompt masking apply."""
    from qlorax.data import read_data_file

    run = open_finished_run(run_dir)
    values = {**run.config.data.model_dump(), "path": data_spec, "eval_fraction": 0.0}
    if data_format is not None:
        values["format"] = data_format
    section = parse_config({"data": values}, "--data").data
    read_data_file(section)  # a malformed file fails here, naming file:line, before a process starts
    with tempfile.TemporaryDirectory(prefix="qlorax-eval-") as scratch:
        result = Path(scratch) / "eval.json"
        code = _launch("eval", run, {"data_section": section.model_dump(mode="json"), "result": str(result)},
                       threads)
        return code, (read_json(result) if code == 0 else {})


# --------------------------------------------------------------------------- export


@dataclass
class ExportOutcome:
    exit_code: int
    output: Path
    manifest: dict[str, Any]


def export_run(run_dir: Path, output: Path, *, merge: bool = False, force: bool = False,
               threads: int | None = None) -> ExportOutcome:
    """A self-contained export of a run: the adapter alone, or (merge) the base model with
    the adapter merged in, loadable by plain `AutoModelForCausalLM.from_pretrained`; plus the
    tokenizer, export.json naming the run, and a manifest of its own. Built in a staging
    directory beside `output` and renamed into place, so nothing half-written is left."""
    run = open_finished_run(run_dir)
    output = Path(output)
    if output.resolve() == run.run_dir.resolve() or run.run_dir.resolve() in output.resolve().parents:
        raise OutputError(f"--output {output}: must not be inside the run directory {run.run_dir}")
    if output.exists() and not force:
        raise OutputError(f"--output {output} already exists; pass --force to replace it")
    if merge and run.config.model.quantization != "none":
        raise ConfigError(f"{run_dir}: the base model is loaded in 4 bits (model.quantization="
                          f"{run.config.model.quantization}); merging into it would round the adapter away. "
                          "Export without --merge.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        os.chmod(staging, default_dir_mode())
        if merge:
            code = _launch("export", run, {"output": str(staging)}, threads)
            if code != 0:
                return ExportOutcome(code, output, {})
        else:
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                shutil.copyfile(run.run_dir / name, staging / name)
        for name in TOKENIZER_FILES:
            if (run.run_dir / name).is_file():
                shutil.copyfile(run.run_dir / name, staging / name)
        for path in staging.iterdir():  # safetensors writes 0600; an export is for sharing
            path.chmod(0o666 & default_dir_mode())
        write_json_atomic(staging / EXPORT_RECORD, export_record(run, merge))
        manifest = write_manifest(staging, annotations={"source_run_digest": run.digest})
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportOutcome(0, output, manifest)


def export_record(run: RunToUse, merged: bool) -> dict[str, Any]:
    """export.json: what this directory holds and the run it came from (no paths, no times)."""
    run_files = run.manifest.get("files", {})
    return {
        "format": EXPORT_FORMAT,
        "kind": "merged" if merged else "adapter",
        "dtype": "float32" if merged else None,
        "source_run": {
            "deterministic_digest": run.digest,
            "config_hash": run.results.get("config_hash"),
            "adapter_sha256": run_files.get(ADAPTER_WEIGHTS, {}).get("sha256"),
            "base_model": run.results.get("base_model"),
            "data": run.results.get("data"),
        },
        "qlorax_version": __version__,
    }
