"""Hardening, bad input: non-finite numbers, duplicate keys, strict types, planted secrets,
condensed upstream errors and `gates` naming its file. Each case is one paragraph naming the
key (or file and lines) and exit 2, never a traceback, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.config import load_config, parse_config, parse_overrides
from qlorax.errors import ConfigError, QloraxError

# (name, YAML, fragments the message must hold)
CONFIG_CASES = [
    ("inf alpha", "lora:\n  alpha: .inf\n", ["lora.alpha = inf", "finite"]),
    ("inf max_grad_norm", "training:\n  max_grad_norm: .inf\n", ["training.max_grad_norm = inf"]),
    ("negative inf", "training:\n  weight_decay: -.inf\n", ["training.weight_decay = -inf"]),
    ("nan learning rate", "training:\n  learning_rate: .nan\n", ["training.learning_rate = nan"]),
    ("nan in a list", "lora:\n  target_modules: [q_proj, .nan]\n", ["lora.target_modules[1] = nan"]),
    ("nan in an unknown key", "training:\n  lerning_rate: .NaN\n", ["training.lerning_rate = nan"]),
    ("duplicate key", "training:\n  max_steps: 3\n  batch_size: 2\n  max_steps: 4\n",
     ["duplicate key 'max_steps' at line 4", "first set at line 2"]),
    ("duplicate section", "lora:\n  r: 4\ntraining:\n  seed: 1\nlora:\n  r: 8\n",
     ["duplicate key 'lora' at line 5", "first set at line 1"]),
    ("duplicate in a flow mapping", "training: {seed: 1, seed: 2}\n", ["duplicate key 'seed' at line 1, column"]),
    ("bool for an int", "training:\n  max_steps: true\n", ["training.max_steps: expected an integer, got a boolean"]),
    ("bool for a float", "lora:\n  alpha: false\n", ["lora.alpha: expected a number, got a boolean"]),
    ("fraction for an int", "training:\n  batch_size: 2.5\n", ["training.batch_size", "fractional part"]),
    ("number for a string", "model:\n  base_model_id: 12345\n",
     ["model.base_model_id: expected a string, got a number"]),
    ("number for a path", "data:\n  path: 7\n", ["data.path: expected a string, got a number"]),
    ("number for a bool", "data:\n  train_on_inputs: 1\n", ["data.train_on_inputs: expected true or false"]),
    ("string for a bool", "model:\n  gradient_checkpointing: 'yes'\n",
     ["model.gradient_checkpointing: expected true or false, got a string"]),
    ("number in a string list", "lora:\n  target_modules: [q_proj, 3]\n", ["lora.target_modules.1"]),
]


@pytest.mark.parametrize(("name", "text", "fragments"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_paragraph_naming_the_key(name: str, text: str, fragments: list[str],
                                                    tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = caught.value.message
    assert caught.value.exit_code == 2
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_what_strictness_still_accepts(tmp_path: Path) -> None:
    """An integral float is an integer, an int a float, and PyYAML's string `1e-3` a number."""
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  max_steps: 6.0\n  warmup_steps: 1\nlora:\n  alpha: 16\n")
    config = load_config(path, parse_overrides(["training.learning_rate=1e-3"]))
    assert config.training.max_steps == 6 and isinstance(config.training.max_steps, int)
    assert config.lora.alpha == 16.0 and config.training.learning_rate == 0.001


def test_overrides_and_recorded_configs_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"training.max_grad_norm = inf"):
        load_config(None, parse_overrides(["training.max_grad_norm=.inf"]))
    with pytest.raises(ConfigError, match="training.max_steps: expected an integer, got a boolean"):
        load_config(None, parse_overrides(["training.max_steps=true"]))
    with pytest.raises(ConfigError, match=r"resolved config: lora.alpha = nan"):
        parse_config({"lora": {"alpha": float("nan")}}, "resolved config")


def test_thresholds_file_with_a_duplicate_gate_is_refused(tmp_path: Path) -> None:
    from qlorax.gates import load_thresholds

    path = tmp_path / "gates.yaml"
    path.write_text("training_time:\n  max: 600\ntraining_time:\n  max: 60\n")
    with pytest.raises(QloraxError, match="duplicate key 'training_time' at line 3 .first set at line 1"):
        load_thresholds(path)


def test_cli_bad_inputs_exit_2_without_traceback(tmp_path: Path) -> None:
    """The same errors through the real CLI: exit 2, one paragraph, nothing created."""
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  max_steps: 3\n  max_steps: 3\n")
    out = tmp_path / "out"
    result = run_cli("train", "--config", str(config), "--output-dir", str(out))
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "duplicate key 'max_steps' at line 3 (first set at line 2)" in " ".join(result.stderr.split())
    assert not out.exists()
    nan = tmp_path / "nan.yaml"
    nan.write_text("lora:\n  alpha: .nan\n")
    shown = run_cli("config", "show", str(nan))
    assert shown.returncode == 2 and "lora.alpha = nan" in shown.stderr
    assert_no_traceback(shown)
    strict = run_cli("train", "--output-dir", str(out), "--set", "training.max_steps=true")
    assert strict.returncode == 2 and "expected an integer, got a boolean" in strict.stderr
    assert not out.exists()


def test_a_token_in_a_config_field_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    token = "hf_plantedTOKENvalue0123456789"
    out = tmp_path / "out"
    audit = tmp_path / "audit.jsonl"
    result = run_cli("train", "--config", str(TINY_CONFIG), "--output-dir", str(out), "--audit-log", str(audit),
                     "--set", f"model.base_model_id={token}", env={"HF_TOKEN": token})
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "model.base_model_id" in result.stderr and "secret" in result.stderr
    assert token not in result.stdout + result.stderr
    assert not out.exists() and not audit.exists()


def test_a_token_file_value_in_a_config_field_is_refused(tmp_path: Path) -> None:
    token = "hf_fromAFILEtokenvalue987654"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    out = tmp_path / "out"
    result = run_cli("verify", "--config", str(TINY_CONFIG), "--runs", "2", "--output-dir", str(out),
                     "--token-file", str(token_file), "--set", f"data.path=/data/{token}/train.jsonl")
    assert result.returncode == 2, result.stderr
    assert "data.path" in result.stderr and token not in result.stdout + result.stderr
    assert not out.exists()


def test_keys_holding_secrets_walks_every_value() -> None:
    from qlorax.ops.secrets import keys_holding_secrets

    token = "hf_abcdefghijklmnop"
    config = {"model": {"name_or_path": "x", "revision": f"main-{token}"}, "lora": {"target_modules": ["a", token]}}
    assert keys_holding_secrets(config, environ={"HUGGINGFACE_TOKEN": token}) == [
        "model.revision", "lora.target_modules[1]"]
    assert keys_holding_secrets(config, environ={}) == []
    assert keys_holding_secrets(config, environ={"HF_TOKEN": "no"}) == []  # too short to be a token


def test_an_unbuildable_tokenizer_is_one_condensed_paragraph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """transformers' five-line message becomes one line; the whole text is the detail, shown
    under --verbose (QLORAX_VERBOSE) and written to train.log by the job."""
    import shutil

    from qlorax.config import ModelSection
    from qlorax.errors import ModelError
    from qlorax.model import BaseModelInfo, load_base_model
    from qlorax.model_presets import materialize_preset

    preset = materialize_preset()  # built once per session; no tokenizer.json in the copy
    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(preset / name, broken / name)
    section = ModelSection(name_or_path=str(broken))
    info = BaseModelInfo(stable_id="broken", local_dir=broken, digest="0" * 64)
    with pytest.raises(ModelError) as caught:
        load_base_model(info, section)
    error = caught.value
    assert error.exit_code == 2
    assert error.message.startswith(f"model.name_or_path: cannot build the tokenizer of {broken} (it has no "
                                    "tokenizer.json): ")
    assert "\n" not in error.message and len(error.message) < 400
    assert error.detail is not None and error.detail.count("\n") >= 3
    monkeypatch.delenv("QLORAX_VERBOSE", raising=False)
    assert "--verbose" in error.render() and "\n" not in error.render()
    monkeypatch.setenv("QLORAX_VERBOSE", "1")
    assert error.render().endswith(error.detail)


def test_gates_names_the_file_it_read(tmp_path: Path) -> None:
    report = tmp_path / "not-a-report.json"
    report.write_text(json.dumps({"hello": 1}))
    result = run_cli("gates", str(report))
    assert result.returncode == 2
    assert_no_traceback(result)
    assert f"{report}: not a qlorax report" in " ".join(result.stderr.split())
    from qlorax.analysis.workflow import run_gates

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "reproducibility_analysis_report.json").write_text(json.dumps({"summary": None, "x": 1}))
    with pytest.raises(QloraxError, match=f"{folder / 'reproducibility_analysis_report.json'}: not a qlorax"):
        run_gates(folder)


def test_config_show_redacts_a_token_held_by_a_config_key(tmp_path: Path) -> None:
    """`config show` is what CI logs keep: a key holding HF_TOKEN's value is shown redacted and
    named on stderr (YAML and JSON alike); the token appears in no output."""
    token = "hf_" + "Zq8" * 10
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name_or_path: {token}\n", encoding="utf-8")
    for extra in ([], ["--json"]):
        result = run_cli("config", "show", str(config), *extra, env={"HF_TOKEN": token})
        assert result.returncode == 0, result.stderr
        assert token not in result.stdout + result.stderr
        assert "model.name_or_path" in result.stderr and "REDACTED" in result.stdout
