"""Config resolution and the three data formats (fast: no training here except one chat run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIXTURES, TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.config import DataSection, default_config_path, load_config
from qlorax.data import IGNORE_INDEX, read_data_file, split_indices, tokenize_records
from qlorax.errors import ConfigError
from qlorax.formats.alpaca import render_alpaca_prompt
from qlorax.inputs import config_hash


def test_shipped_default_file_equals_the_built_in_defaults() -> None:
    assert load_config(default_config_path()).canonical() == load_config(None).canonical()
    assert config_hash(load_config(default_config_path())) == config_hash(load_config(None))


def test_config_hash_changes_with_inputs_not_with_profile() -> None:
    base = load_config(None)
    assert config_hash(load_config(None, {"training": {"seed": 7}})) != config_hash(base)
    assert config_hash(load_config(None, {"determinism": {"profile": "portable"}})) == config_hash(base)


def test_misspelled_key_names_section_and_closest_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  max_lenght: 64\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "unknown key 'max_lenght' in section 'data'; did you mean 'max_length'?" in error.value.message


def test_out_of_range_names_key_and_range() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, {"data": {"eval_fraction": 1.5}})
    assert "data.eval_fraction" in error.value.message and "less than 1" in error.value.message


def test_config_show_and_schema_commands() -> None:
    shown = run_cli("config", "show", str(TINY_CONFIG), "--json")
    assert shown.returncode == 0, shown.stderr
    resolved = json.loads(shown.stdout)
    assert resolved["config"]["training"]["max_steps"] == 6
    assert resolved["config_hash"] == config_hash(load_config(TINY_CONFIG))
    schema = run_cli("config", "schema")
    assert schema.returncode == 0
    properties = json.loads(schema.stdout)["properties"]
    assert {"model", "data", "lora", "training", "determinism"} <= set(properties)
    bad = run_cli("config", "show", "/nonexistent.yaml")
    assert bad.returncode == 2
    assert_no_traceback(bad)


def test_split_is_deterministic_and_disjoint() -> None:
    train, evaluation = split_indices(100, 0.1, seed=42)
    assert (train, evaluation) == split_indices(100, 0.1, seed=42)
    assert len(evaluation) == 10 and not set(train) & set(evaluation) and len(train) + len(evaluation) == 100
    assert split_indices(100, 0.1, seed=43)[1] != evaluation


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qlorax.model import materialize_preset

    return AutoTokenizer.from_pretrained(materialize_preset())


def test_alpaca_prompt_has_an_input_block_only_when_the_input_is_not_blank() -> None:
    assert render_alpaca_prompt("Add {x}.") == "### Instruction:\nAdd {x}.\n\n### Response:\n"
    assert render_alpaca_prompt("Add.", "  ") == render_alpaca_prompt("Add.")
    assert render_alpaca_prompt("Add.", "1, 2") == "### Instruction:\nAdd.\n\n### Input:\n1, 2\n\n### Response:\n"


def test_alpaca_masks_the_prompt_unless_train_on_inputs(tokenizer) -> None:
    section = DataSection()
    data = read_data_file(section)
    masked = tokenize_records(data, section, tokenizer, seed=42)
    example = masked.train[0]
    first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(example.input_ids[:first_label])
    assert "### Instruction:" in prompt and prompt.rstrip().endswith("### Response:")
    unmasked = tokenize_records(data, DataSection(train_on_inputs=True), tokenizer, seed=42)
    assert unmasked.train[0].trainable_tokens > example.trainable_tokens


def test_chat_labels_only_assistant_turns(tokenizer) -> None:
    section = DataSection(path=str(FIXTURES / "chat_sample.jsonl"), format="chat", eval_fraction=0.0)
    dataset = tokenize_records(read_data_file(section), section, tokenizer, seed=1)
    records = [json.loads(line) for line in (FIXTURES / "chat_sample.jsonl").read_text().splitlines()]
    by_line = {example.line: example for example in dataset.train}
    for number, record in enumerate(records, start=1):
        example = by_line[number]
        learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                                    if label != IGNORE_INDEX])
        for message in record["messages"]:
            if message["role"] == "assistant":
                assert message["content"].strip()[:20] in learned
            else:
                assert message["content"].strip()[:20] not in learned


def test_raw_text_labels_every_token(tokenizer) -> None:
    section = DataSection(path=str(FIXTURES / "raw_sample.jsonl"), format="raw")
    dataset = tokenize_records(read_data_file(section), section, tokenizer, seed=1)
    for example in dataset.train:
        assert example.labels[1:] == example.input_ids[1:]


def test_training_on_chat_format_end_to_end(tmp_path: Path) -> None:
    result = run_cli("train", "--config", str(TINY_CONFIG), "--output-dir", str(tmp_path / "run"),
                     "--set", f"data.path={FIXTURES / 'chat_sample.jsonl'}", "--set", "data.format=chat",
                     "--set", "training.max_steps=3")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["format"] == "chat" and results["steps"] == 3


def test_unavailable_hub_model_offline_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("train", "--config", str(TINY_CONFIG), "--output-dir", str(tmp_path / "run"),
                     "--set", "model.name_or_path=example-org/missing-model", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "hub model 'example-org/missing-model' is not available" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr
