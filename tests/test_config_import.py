"""`qlorax config import` and other tools' key names: translation tables, the unmapped list,
the unknown-key hints. No training here: tests/test_training_options.py trains the TRL, axolotl
QLoRA and TrainingArguments imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURES, REPO, assert_no_traceback, run_cli
from qlorax.config import parse_config
from qlorax.config_hints import TABLES
from qlorax.config_import import import_config, read_foreign_config
from qlorax.errors import ConfigError

IMPORTS = FIXTURES / "import"
AXOLOTL = IMPORTS / "axolotl-tinyllama-qlora.yml"
TRL = IMPORTS / "trl-sft.yaml"
HF = IMPORTS / "hf-training-args.json"


def unmapped_keys(report: object) -> set[str]:
    return {line.split(":", 1)[0] for line in report.unmapped}  # type: ignore[attr-defined]


def test_axolotl_qlora_tinyllama_layout_translates_and_lists_the_rest() -> None:
    report = import_config("axolotl", read_foreign_config(AXOLOTL))
    cfg = parse_config(report.config)
    assert cfg.model.name_or_path == "TinyLlama/TinyLlama_v1.1"
    assert (cfg.model.quantization, cfg.model.double_quant) == ("nf4", True)  # axolotl's 4-bit load
    assert (cfg.data.path, cfg.data.format, cfg.data.eval_fraction) == ("data/alpaca_2k.jsonl", "alpaca", 0.05)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 16.0, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (2, 4)  # micro_batch_size
    assert (cfg.training.num_epochs, cfg.training.max_steps) == (4, None)
    assert (cfg.training.lr_scheduler_type, cfg.training.learning_rate, cfg.training.warmup_steps) == \
        ("cosine", 2e-4, 10)
    assert cfg.data.max_length == 4096 and cfg.data.train_on_inputs is False and cfg.model.gradient_checkpointing
    assert cfg.training.packing is True  # sample_packing
    assert {"flash_attention", "bf16", "wandb_project", "output_dir", "evals_per_epoch",
            "special_tokens", "model_type", "strict"} <= unmapped_keys(report)
    every = set(read_foreign_config(AXOLOTL))
    listed = {line.split(":", 1)[0] for line in report.translated} | unmapped_keys(report)
    assert every <= listed  # every key of the file is accounted for


def test_trl_sft_config_translates() -> None:
    report = import_config("trl", read_foreign_config(TRL))
    cfg = parse_config(report.config)
    assert (cfg.model.name_or_path, cfg.data.path, cfg.data.max_length) == ("Qwen/Qwen2-0.5B", "data/chat.jsonl", 512)
    assert cfg.data.train_on_inputs is False  # completion_only_loss: true
    assert (cfg.training.num_epochs, cfg.training.warmup_ratio, cfg.training.warmup_steps) == (1, 0.1, 0)
    assert (cfg.lora.r, cfg.lora.use_rslora, cfg.training.seed) == (16, True, 7)
    assert len(cfg.lora.target_modules) == 7  # all-linear
    assert {"logging_steps", "report_to", "output_dir", "eval_strategy"} == unmapped_keys(report)


def test_training_arguments_json_uses_hf_defaults_for_what_it_leaves_out() -> None:
    report = import_config("hf", read_foreign_config(HF))
    cfg = parse_config(report.config)
    training = cfg.training
    assert (training.batch_size, training.eval_batch_size, training.gradient_accumulation_steps) == (4, 8, 2)
    assert (cfg.training.max_steps, cfg.training.num_epochs) == (2, None)  # max_steps > 0 wins, as in HF
    assert any(line.startswith("num_train_epochs: 3.0: max_steps > 0") for line in report.unmapped)
    assert {"jit_mode_eval", "lr_scheduler_kwargs", "bf16", "full_determinism"} <= unmapped_keys(report)
    bare = parse_config(import_config("hf", {"per_device_train_batch_size": 2}).config)
    assert (bare.training.learning_rate, bare.training.warmup_steps, bare.training.num_epochs) == (5e-5, 0, 3.0)


def test_untranslatable_values_are_listed_not_guessed() -> None:
    report = import_config("axolotl", {"datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}],
                                       "optimizer": "lion_8bit", "lr_scheduler": "one_cycle", "val_set_size": 200,
                                       "batch_size": 16, "micro_batch_size": 4, "adapter": "llama-adapter"})
    assert report.config == {"training": {"batch_size": 4, "gradient_accumulation_steps": 4, "warmup_steps": 0}}
    reasons = " ".join(report.unmapped)
    for fragment in ("not a local JSONL file", "not AdamW", "one_cycle", "example count", "LoRA adapters only"):
        assert fragment in reasons


def test_every_table_target_is_a_qlorax_key() -> None:
    schema = {f"{section}.{key}" for section, keys in parse_config({}).canonical().items() for key in keys}
    for table in TABLES.values():
        assert {rule.target for rule in table.values() if rule.target} <= schema


def test_cli_writes_a_validating_config_and_reports_without_torch(tmp_path: Path) -> None:
    out = tmp_path / "imported.yaml"
    argv = ["qlorax", "config", "import", "--from", "axolotl", str(AXOLOTL), "-o", str(out)]
    code = (f"import sys; from qlorax.cli import main; sys.argv = {argv!r}\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    code = e.code\nsys.stderr.write('TORCH' if 'torch' in sys.modules else 'NOTORCH'); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith("NOTORCH"), result.stderr  # config import must not load torch
    assert "base_model: 'TinyLlama/TinyLlama_v1.1' -> model.name_or_path" in result.stdout
    assert "sample_packing: True -> training.packing" in result.stdout
    assert parse_config(yaml.safe_load(out.read_text())).model.quantization == "nf4"


def test_cli_refuses_a_result_that_does_not_validate(tmp_path: Path) -> None:
    bad = tmp_path / "args.json"
    bad.write_text('{"learning_rate": 5, "per_device_train_batch_size": 4}')
    out = tmp_path / "out.yaml"
    result = run_cli("config", "import", "--from", "hf", str(bad), "-o", str(out))
    assert result.returncode == 2 and "training.learning_rate" in result.stderr
    assert_no_traceback(result)
    assert not out.exists()
    with pytest.raises(ConfigError, match="expected one of axolotl, trl, hf"):
        import_config("ludwig", {})


@pytest.mark.parametrize(("section", "key", "expected"), [
    ("training", "per_device_train_batch_size",
     "'per_device_train_batch_size' is the HF and TRL name; in qlorax it is 'training.batch_size' (micro-batch)"),
    (None, "base_model", "'base_model' is the axolotl name; in qlorax it is 'model.name_or_path'"),
    ("lora", "lora_r", "'lora_r' is the TRL and axolotl name; in qlorax it is 'lora.r'"),
    ("data", "sample_packing", "'sample_packing' is the axolotl name; in qlorax it is 'training.packing'"),
    ("data", "pad_to_sequence_len", "'pad_to_sequence_len' is the axolotl name; qlorax has no equivalent: qlorax pads"),
    ("training", "learnin_rate", "did you mean 'learning_rate'?"),
])
def test_unknown_keys_get_their_qlorax_name(section: str | None, key: str, expected: str) -> None:
    data = {section: {key: 1}} if section else {key: 1}
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert expected in error.value.message


@pytest.mark.parametrize(("section", "key"), [(None, "adapterz"), ("training", "schedule"), ("lora", "rank"),
                                              ("data", "datasett")])
def test_unrelated_keys_get_no_suggestion(section: str | None, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({section: {key: 1}} if section else {key: 1})
    assert "did you mean" not in error.value.message and "valid keys:" in error.value.message


def test_committed_config_reference_is_the_generated_one() -> None:
    from qlorax.config_reference import render_config_reference

    committed = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == render_config_reference(), "run `qlorax config reference -o docs/config-reference.md`"
    for key in parse_config({}).training.model_fields:
        assert f"| `{key}`" in committed
