"""Saved configs without the process's settings.

transformers and peft write some of the *loading* options of a process into the configs they
save: `tokenizer_config.json` records `local_files_only` (true whenever HF_HUB_OFFLINE or
TRANSFORMERS_OFFLINE is set) and `is_local`, and other versions have written cache paths,
tokens, proxies or the hub commit hash. None of these changes a computation, but every one
changes the bytes of a deterministic artifact, so a run in a container (offline by default)
would get another manifest than the same run outside. These keys are left out of every saved
`*config.json` before it is written as an artifact.

Pure functions on bytes; no torch or transformers import.
"""

from __future__ import annotations

import json
from typing import Any

# Top-level keys that describe how (and from where) a process loaded a model or tokenizer,
# never what it is.
ENVIRONMENT_KEYS = frozenset({
    "local_files_only",
    "is_local",
    "cache_dir",
    "token",
    "use_auth_token",
    "force_download",
    "resume_download",
    "proxies",
    "user_agent",
    "_commit_hash",
    "_from_auto",
    "_from_pipeline",
    "name_or_path",
    "_name_or_path",
    "tokenizer_file",
    "special_tokens_map_file",
})


def is_saved_config(name: str) -> bool:
    """Whether an artifact file name is a JSON config that transformers/peft save
    (tokenizer_config.json, adapter_config.json, config.json, generation_config.json)."""
    return name.endswith("config.json")


def without_environment_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in ENVIRONMENT_KEYS}


def normalised_bytes(name: str, data: bytes) -> bytes:
    """The bytes to write for the saved file `name`: unchanged unless it is a JSON config
    holding an environment key; then the same JSON without those keys, in the layout
    transformers writes (2-space indent, sorted keys, UTF-8, trailing newline)."""
    if not is_saved_config(name):
        return data
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data
    if not isinstance(config, dict) or not ENVIRONMENT_KEYS.intersection(config):
        return data
    return (json.dumps(without_environment_keys(config), indent=2, sort_keys=True, ensure_ascii=False)
            + "\n").encode("utf-8")
