"""The `env` job: the environment fingerprint and determinism validation, as a training
process would see them (same pins, same child), printed as JSON on stdout."""

from __future__ import annotations

import json
from typing import Any

from qlorax.determinism import (
    DeterministicConfig,
    pinned_environment,
    pinned_profile,
    pins_in_force,
    torch_fingerprint,
)
from qlorax.fingerprint import build_env_record


def run(payload: dict[str, Any]) -> int:
    profile = pinned_profile()
    threads = int(payload["threads"])
    DeterministicConfig.setup_deterministic_environment(42, profile, threads)
    validation = DeterministicConfig.validate_deterministic_setup()
    present = pins_in_force(profile, threads)
    pins = {key: present.get(key, "") for key in pinned_environment(profile, threads)}
    record = build_env_record(profile, threads, pins, list(payload.get("removed_env", [])), torch_fingerprint(),
                              validation)
    print(json.dumps(record))
    return 0
