"""What the jobs on a finished run (generate, eval, export) share: the pinned set-up and the
run's base model with its adapter, loaded the plain PEFT way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlorax.config import QloraxConfig, parse_config
from qlorax.determinism import DeterministicConfig, pinned_profile
from qlorax.profiles import PROFILES


def open_run_model(payload: dict[str, Any]) -> tuple[QloraxConfig, Any, Any]:
    """(config, tokenizer, base + adapter in eval mode) for the run the parent checked."""
    from qlorax.model import load_trained_model

    config = parse_config(payload["config"], "the run's recorded config")
    profile = pinned_profile()
    DeterministicConfig.setup_deterministic_environment(config.training.seed, profile, int(payload["threads"]))
    tokenizer, model = load_trained_model(Path(payload["run_dir"]), config.model, str(payload["base_digest"]),
                                          exact_math=PROFILES[profile].exact_math)
    return config, tokenizer, model
