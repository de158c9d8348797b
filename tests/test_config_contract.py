"""The config's public contract: its hash is versioned, its schema and help carry no test
hooks, and determinism profiles come from one registry."""

from __future__ import annotations

import json

import pytest
from pydantic import Field, create_model

from conftest import run_cli
from qlorax.config import QloraxConfig, TrainingSection, added_in, load_config, parse_config
from qlorax.determinism import pinned_environment, validate_environment
from qlorax.inputs import config_hash
from qlorax.profiles import PROFILES

# The default config's hash. It changes only when a default of an existing key changes, a
# key is removed, or what a config trains changes (the test-only lr_override_* keys went in
# 0.2: 5dbc5f78… → 8b821a85…; training.lr_scheduler_type went into every config's hashed form
# when "linear" became transformers' schedule, whose warmup starts at 0: 8b821a85… → 86b5dd60…;
# the model is recorded by its content digest, not its name, so a preset and a copy of its
# directory are one model (issue 21 item 4): 86b5dd60… → this).
DEFAULT_CONFIG_HASH = "d0df9dc233ac26e1056459f2e7353ce93a20a01828102abf007452c3a1c2015c"


def test_default_config_hash_is_pinned() -> None:
    assert config_hash(load_config(None)) == DEFAULT_CONFIG_HASH


def _with_new_training_key(default: float) -> type[QloraxConfig]:
    """The config as a later schema would have it: one more training key, with a default."""
    training = create_model("TrainingV2", __base__=TrainingSection,
                            label_smoothing=(float, Field(default, json_schema_extra=added_in(2))))
    return create_model("QloraxConfigV2", __base__=QloraxConfig, training=(training, Field(default_factory=training)))


def test_adding_a_defaulted_key_leaves_existing_hashes_unchanged() -> None:
    later = _with_new_training_key(0.0)
    for overrides in ({}, {"training": {"max_steps": 7}}, {"lora": {"r": 4}, "data": {"max_length": 64}}):
        old = parse_config(overrides)
        new = later.model_validate(overrides)
        assert config_hash(new) == config_hash(old)
    assert config_hash(later.model_validate({})) == DEFAULT_CONFIG_HASH


def test_a_new_key_set_away_from_its_default_changes_the_hash() -> None:
    later = _with_new_training_key(0.0)
    assert config_hash(later.model_validate({"training": {"label_smoothing": 0.1}})) != DEFAULT_CONFIG_HASH


def test_every_value_of_an_original_key_counts() -> None:
    assert config_hash(parse_config({"training": {"learning_rate": 1e-3}})) != DEFAULT_CONFIG_HASH
    assert config_hash(parse_config({"determinism": {"profile": "portable"}})) == DEFAULT_CONFIG_HASH


def test_schema_and_help_show_no_test_hooks() -> None:
    schema = json.dumps(QloraxConfig.model_json_schema())
    assert "lr_override" not in schema
    for args in (("--help",), ("train", "--help"), ("verify", "--help")):
        result = run_cli(*args, env={"COLUMNS": "200"})
        assert result.returncode == 0, result.stderr
        assert "perturb" not in result.stdout and "lr_override" not in result.stdout


def test_an_unknown_profile_is_exit_2_listing_the_registry() -> None:
    result = run_cli("config", "show", "--set", "determinism.profile=fast")
    assert result.returncode == 2
    assert "determinism.profile" in result.stderr and all(name in result.stderr for name in PROFILES)


@pytest.mark.parametrize("name", list(PROFILES))
def test_each_profile_validates_exactly_its_own_pins(name: str) -> None:
    env = pinned_environment(name, 3)
    assert validate_environment(env) == (True, [f"profile {name}: all {len(env)} pins in force"])
    for key in (*PROFILES[name].pins, "OMP_NUM_THREADS"):
        valid, messages = validate_environment({**env, key: "tampered"})
        assert not valid and any(key in message for message in messages)


def test_portable_refuses_a_processor_without_avx2() -> None:
    old_cpu = {"machine": "x86_64", "cpu_model": "Intel Nehalem", "cpu_isa_flags": ["sse4_2"]}
    assert "avx2" in PROFILES["portable"].unsupported_cpu(old_cpu)
    assert PROFILES["strict"].unsupported_cpu(old_cpu) is None
    assert PROFILES["portable"].unsupported_cpu({**old_cpu, "cpu_isa_flags": ["avx2", "fma"]}) is None
