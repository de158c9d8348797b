"""The `env` job: the environment fingerprint and determinism validation, as a training
process would see them (same pins, same child), printed as JSON on stdout."""

from __future__ import annotations

import json
import os
from typing import Any

from qlorax.determinism import DeterministicConfig, pinned_environment, torch_fingerprint
from qlorax.fingerprint import build_env_record
from qlorax.profiles import PROFILE_ENV


def run(payload: dict[str, Any]) -> int:
    profile = os.environ[PROFILE_ENV]
    threads = int(payload["threads"])
    DeterministicConfig.setup_deterministic_environment(42, profile, threads)
    validation = DeterministicConfig.validate_deterministic_setup()
    pins = {k: os.environ.get(k, "") for k in pinned_environment(profile, threads)}
    record = build_env_record(profile, threads, pins, list(payload.get("removed_env", [])), torch_fingerprint(),
                              validation)
    print(json.dumps(record))
    return 0
