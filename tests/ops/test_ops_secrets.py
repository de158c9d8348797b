"""Secrets never reach what qlorax writes: redaction by key, scrubbing of known values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qlorax.errors import ConfigError
from qlorax.ops.audit import AuditLogger, verify_log
from qlorax.ops.secrets import (
    REDACTED,
    is_secret_key,
    read_token_file,
    redact,
    scrub_text,
    secret_env_values,
)

PLANTED = "hf_PlantedEnvToken_4f9c2a7e"
FROM_FILE = "hf_TokenFromFile_81b3d5c0"


@pytest.mark.parametrize(
    "key",
    [
        "HUGGINGFACE_TOKEN",
        "HF_TOKEN",
        "hf_token",
        "api_key",
        "apiKey",
        "password",
        "db_password",
        "AWS_SECRET_ACCESS_KEY",
        "client_secret",
        "Authorization",
        "auth",
        "model_encryption_key",
        "WANDB_API_KEY",
        "credentials",
        "hftoken",
        "private_key_path",
        "passwd",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "max_tokens",
        "max_new_tokens",
        "tokenizer",
        "tokenizer_config",
        "key_count",
        "token_file",
        "pad_token",
        "eos_token",
        "special_tokens",
        "cache_key",
        "sort_key",
        "public_key",
        "author",
        "keyboard",
        "monkey",
        "tokens",
        "PYTHONHASHSEED",
        "config_hash",
        "learning_rate",
    ],
)
def test_not_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_is_a_deep_copy_with_secret_values_replaced() -> None:
    config = {
        "model": {
            "name_or_path": "qlorax/tiny-llama",
            "hf_token": "hf_abcdefgh12345",
            "max_tokens": 256,
            "tokenizer": "fast",
            "pad_token": "<pad>",
        },
        "hub": {"credentials": {"user": "me", "password": "hunter22"}, "use_auth_token": True},
        "callbacks": [{"name": "wandb", "api_key": "wandb-key-123456"}, ("tuple", "kept")],
        "endpoint": "https://me:hunter22@hub.example.org/models",
        "empty_token": None,
    }
    redacted = redact(config)
    assert redacted["model"] == {
        "name_or_path": "qlorax/tiny-llama",
        "hf_token": REDACTED,
        "max_tokens": 256,
        "tokenizer": "fast",
        "pad_token": "<pad>",
    }
    assert redacted["hub"] == {"credentials": REDACTED, "use_auth_token": True}
    assert redacted["callbacks"] == [{"name": "wandb", "api_key": REDACTED}, ["tuple", "kept"]]
    assert redacted["endpoint"] == f"https://me:{REDACTED}@hub.example.org/models"
    assert redacted["empty_token"] is None
    assert config["model"]["hf_token"] == "hf_abcdefgh12345"  # the original is untouched


def test_token_file_is_read_stripped_and_scrubbed_everywhere(tmp_path: Path, caplog) -> None:
    token_file = tmp_path / "hf_token"
    token_file.write_text(f"  {FROM_FILE}\n")
    token_file.chmod(0o600)
    assert read_token_file(token_file) == FROM_FILE
    assert scrub_text(f"GET /api?token={FROM_FILE} ok") == f"GET /api?token={REDACTED} ok"
    # a registered secret is scrubbed even under an innocent-looking key
    assert redact({"note": f"used {FROM_FILE}"}) == {"note": f"used {REDACTED}"}
    token_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="qlorax.secrets"):
        read_token_file(token_file)
    assert "readable by group/others" in caplog.text and FROM_FILE not in caplog.text


@pytest.mark.parametrize("content, message", [("", "is empty"), ("a\nb\n", "more than one line")])
def test_bad_token_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_token_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_token_file(tmp_path / "missing")


def test_planted_env_token_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUGGINGFACE_TOKEN", PLANTED)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # secret-looking name, value too short to scrub
    assert PLANTED in secret_env_values()
    assert "1" not in secret_env_values()
    text = f"loading with {PLANTED} (step 1, loss 1.0)"
    assert scrub_text(text) == f"loading with {REDACTED} (step 1, loss 1.0)"
    assert redact({"model": {"revision": PLANTED}}) == {"model": {"revision": REDACTED}}


def test_audit_log_of_a_config_with_tokens_has_no_trace_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUGGINGFACE_TOKEN", PLANTED)
    token_file = tmp_path / "token"
    token_file.write_text(FROM_FILE + "\n")
    read_token_file(token_file)
    config = {
        "model": {
            "name_or_path": "meta/llama",
            "hf_token": "hf_ConfigInlineToken_99",
            "token_file": str(token_file),
        },
        "data": {"path": "train.jsonl", "note": f"fetched with {PLANTED}"},
        "hub_url": f"https://bot:{FROM_FILE}@hub.example.org",
    }
    log = AuditLogger(tmp_path / "audit.log", environment="native")
    log.log_training_start(config, "c" * 64, tmp_path / "run")
    log.log_training_complete(
        {"final_train_loss": 1.0, "auth_header": f"Bearer {FROM_FILE}"},
        {"adapter_model.safetensors": "d" * 64},
        tmp_path / "run",
    )
    log.log_event("note", message=f"pushed with {PLANTED}")
    raw = (tmp_path / "audit.log").read_text() + (tmp_path / "audit.log.head").read_text()
    for secret in (PLANTED, FROM_FILE, "hf_ConfigInlineToken_99"):
        assert secret not in raw
    assert REDACTED in raw and str(token_file) in raw  # the path is kept, the contents never
    assert verify_log(tmp_path / "audit.log") == (True, [])
