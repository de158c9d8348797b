"""One reader of finished runs: `FinishedRun.open(path)`.

It checks the run against its manifest once and loads what the run recorded (results,
metadata, env, manifest, the config it trained with) once, through the same reading code
analysis uses for every run (qlorax.analysis.runs.load_run, which tolerates broken runs;
this reader refuses them). Inference, publishing, tracking, metrics and the cache read
finished runs through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax.analysis.runs import RunFacts, integrity_problems, load_run
from qlorax.artifacts import read_json
from qlorax.config import QloraxConfig, parse_config
from qlorax.errors import EXIT_CHECK_FAILED, ModelError, OutputError, QloraxError
from qlorax.layout import ADAPTER_WEIGHTS, CHECKPOINT_CONFIG, CHECKPOINTS_DIR, MANIFEST, RESOLVED_CONFIG
from qlorax.model import preset_named

CONTENT_ID_PREFIXES = ("sha256:", "gguf-sha256:")


@dataclass
class FinishedRun:
    """A finished, intact run directory and what it recorded."""

    run_dir: Path
    results: dict[str, Any]
    manifest: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    facts: RunFacts | None = None

    @classmethod
    def open(cls, run_dir: Path | str) -> FinishedRun:
        """The run, after re-hashing it against its manifest: a directory that is not a
        finished run is exit 2, one whose files differ from the manifest exit 1."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise OutputError(f"{run_dir}: no such run directory. Pass a run directory written by `qlorax train`.")
        facts = load_run(run_dir, run_dir.name)
        if not facts.integrity["has_manifest"]:
            raise OutputError(f"{run_dir}: no {MANIFEST}; not a finished run (train or resume it first)")
        if not facts.integrity["intact"]:
            problems = [*facts.integrity["altered"], *facts.integrity["missing"], *facts.integrity["extra"],
                        *facts.integrity.get("manifest_errors", [])]
            raise QloraxError(f"{run_dir} does not match its manifest ({', '.join(problems[:4])}); "
                              f"`qlorax check {run_dir}` lists what changed", exit_code=EXIT_CHECK_FAILED)
        return cls.from_facts(facts)

    @classmethod
    def from_facts(cls, facts: RunFacts) -> FinishedRun:
        """The run as `load_run` read it, once the caller's own integrity refusals passed."""
        if facts.results is None:
            raise OutputError(f"{facts.path}: its results.json is missing or unreadable; not a training run")
        return cls(facts.path, facts.results, facts.manifest or {}, facts.metadata or {}, facts.env or {}, facts)

    @property
    def digest(self) -> str:
        """The run's deterministic digest: the name of its result."""
        return str(self.manifest["deterministic_digest"])

    @property
    def adapter_sha256(self) -> str | None:
        return self.manifest.get("files", {}).get(ADAPTER_WEIGHTS, {}).get("sha256")

    @property
    def base_digest(self) -> str:
        return str(self.results["base_model"]["digest"])

    def training_config(self) -> QloraxConfig:
        """The config it trained with, loadable here: checkpoints/config.json keeps local paths;
        else resolved_config.json, whose model is a preset or hub id unless it names a local
        model by content only (then its base model cannot be found: exit 2)."""
        recorded = self.run_dir / CHECKPOINTS_DIR / CHECKPOINT_CONFIG
        source = recorded if recorded.is_file() else self.run_dir / RESOLVED_CONFIG
        config = parse_config(read_json(source)["config"], str(source))
        named = config.model.name_or_path
        if named.startswith(CONTENT_ID_PREFIXES) and preset_named(named) is None:  # a preset is rebuilt anywhere
            raise ModelError(f"{source}: the run names its local base model only by content "
                             f"({config.model.name_or_path[:20]}…) and its original path is not recorded "
                             f"({recorded} is missing), so its base model cannot be found")
        return config

    def problems(self) -> list[str]:
        return integrity_problems(self.facts.integrity) if self.facts else []
