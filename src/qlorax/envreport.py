"""`qlorax env` probe: runs in a pinned child so it reports what a training process sees."""

from __future__ import annotations

import os
from typing import Any

from qlorax.determinism import DeterministicConfig, pinned_environment, torch_fingerprint
from qlorax.fingerprint import build_env_record


def report() -> dict[str, Any]:
    profile = os.environ.get("QLORAX_PROFILE", "strict")
    threads = int(os.environ.get("QLORAX_THREADS", "1"))
    DeterministicConfig.setup_deterministic_environment(42, profile, threads)
    validation = DeterministicConfig.validate_deterministic_setup()
    pins = {k: os.environ.get(k, "") for k in pinned_environment(profile, threads)}
    return build_env_record(profile, threads, pins, [], torch_fingerprint(), validation)
