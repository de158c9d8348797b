"""What a container changes and must not: the process's loading settings in saved configs, and
the place (native or container) of a run in `qlorax analyze` (docs/container.md). The live
container test is tests/test_container.py (`make container-test`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qlorax.analysis import analyze_runs, discover_runs
from qlorax.artifacts import canonical_json, pretty_json, write_manifest
from qlorax.saved_configs import ENVIRONMENT_KEYS, normalised_bytes
from synthetic_runs import make_runs

OFFLINE = {"backend": "tokenizers", "bos_token": "<|bos|>", "is_local": True, "local_files_only": True,
           "model_max_length": 512, "tokenizer_class": "TokenizersBackend"}


def transformers_layout(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def test_offline_and_online_tokenizer_configs_save_the_same_bytes() -> None:
    online = {**OFFLINE, "is_local": True, "local_files_only": False, "cache_dir": "/home/u/.cache/huggingface",
              "token": True, "_commit_hash": "0" * 40}
    a = normalised_bytes("tokenizer_config.json", transformers_layout(OFFLINE))
    b = normalised_bytes("tokenizer_config.json", transformers_layout(online))
    assert a == b
    assert not ENVIRONMENT_KEYS & set(json.loads(a))
    assert json.loads(a)["model_max_length"] == 512 and a.endswith(b"}\n")


def test_files_without_settings_are_written_unchanged() -> None:
    clean = transformers_layout({"r": 8, "target_modules": ["q_proj"], "revision": None})
    assert normalised_bytes("adapter_config.json", clean) is clean
    weights = b"\x00\x01local_files_only"
    assert normalised_bytes("adapter_model.safetensors", weights) is weights
    assert normalised_bytes("tokenizer.json", b'{"local_files_only": true}') == b'{"local_files_only": true}'
    assert normalised_bytes("tokenizer_config.json", b"not json") == b"not json"


def _move_to_python(run: Path, version: str) -> None:
    """Rewrite a synthetic run's env.json as if its interpreter were `version` (manifest renewed)."""
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    env["fingerprint"]["python"] = version
    env["fingerprint_sha256"] = hashlib.sha256(canonical_json(env["fingerprint"]).encode()).hexdigest()
    (run / "env.json").write_text(pretty_json(env), encoding="utf-8")
    write_manifest(run)


def test_native_and_container_runs_with_the_same_pins_are_one_environment(tmp_path: Path) -> None:
    make_runs(tmp_path / "native", ["n1", "n2"], environment="native")
    for run in make_runs(tmp_path / "docker", ["d1", "d2"], environment="docker"):
        _move_to_python(run, "3.11.2")  # the base image's CPython patch release
    report = analyze_runs(discover_runs([tmp_path / "native", tmp_path / "docker"]))
    cross = report["cross_environment_analysis"]
    assert cross["attribution"] == "none"
    [group] = cross["groups"]
    assert group["environments"] == ["docker", "native"] and len(group["runs"]) == 4
    assert group["label"].startswith("docker+native / ")


def test_a_container_with_other_library_versions_is_another_environment(tmp_path: Path) -> None:
    make_runs(tmp_path / "native", ["n1", "n2"], environment="native")
    make_runs(tmp_path / "docker", ["d1", "d2"], environment="docker", torch_version="2.12.0+cpu", adapter_seed=3)
    cross = analyze_runs(discover_runs([tmp_path / "native", tmp_path / "docker"]))["cross_environment_analysis"]
    assert len(cross["groups"]) == 2 and cross["attribution"] == "environment_drift"
    assert "environment" not in cross["drift_keys"] and "torch" in cross["drift_keys"]
