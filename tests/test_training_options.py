"""The HF-named training options, trained: an imported TRL config with num_epochs,
warmup_ratio, cosine, rsLoRA plus DoRA and modules_to_save (twice, 2 and 1 threads), an
imported axolotl QLoRA config, 2-4 steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import FIXTURES, assert_no_traceback, run_cli, run_clis
from qlorax.artifacts import read_json
from qlorax.config import parse_config
from qlorax.inputs import config_hash
from qlorax.quantization import packs_4bit_weights_here
from test_train import deterministic_digests

IMPORTS = FIXTURES / "import"
# Short runs: the tiny model, short examples, a small eval split, one generated token per sample.
TINY_MODEL = ("--set", "model.name_or_path=qlorax/tiny-llama", "--set", "data.max_length=96",
              "--set", "data.eval_fraction=0.02", "--set", "training.sample_max_new_tokens=1")
# The TRL import, on the tiny model and the bundled chat data, for 0.05 epochs, with DoRA and a
# fully trained embedding on top of the file's rsLoRA, cosine schedule and warmup ratio.
OPTIONS = (*TINY_MODEL, "--set", "data.path=builtin:reproducible_ml_chat", "--set", "data.format=chat",
           "--set", "training.num_epochs=0.05", "--set", "training.gradient_accumulation_steps=1",
           "--set", "lora.use_dora=true",
           "--set", "lora.modules_to_save=[embed_tokens]", "--set", "training.eval_steps=100")


def imported(tool: str, name: str, out: Path) -> Path:
    result = run_cli("config", "import", "--from", tool, str(IMPORTS / name), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def option_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("options")
    config = imported("trl", "trl-sft.yaml", root / "trl.yaml")
    runs = {f"t{threads}": root / f"t{threads}" for threads in (2, 1)}
    for result in run_clis(*(["train", "--config", str(config), "--output-dir", str(run), "--threads", name[1:],
                              *OPTIONS] for name, run in runs.items())):  # side by side
        assert result.returncode == 0, result.stderr
    return runs


def hf_lr(name: str, base: float, warmup: int, total: int, taken: int) -> float:
    """transformers' schedule formulas, written out: the lr of the step after `taken` steps."""
    if taken < warmup:
        return base * (taken / max(1, warmup))
    progress = (taken - warmup) / max(1, total - warmup)
    factor = {"linear": max(0.0, (total - taken) / max(1, total - warmup)),
              "cosine": max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))}[name]
    return base * factor


def test_epochs_warmup_ratio_and_cosine_resolve_as_documented(option_runs: dict[str, Path]) -> None:
    results = read_json(option_runs["t2"] / "results.json")
    args = read_json(option_runs["t2"] / "training_args.json")
    # 0.05 epochs of (train examples // 4) micro-batches, one per optimizer step; warmup ceil(0.1 * steps).
    steps = math.ceil(0.05 * (results["train_examples"] // 4) / 1)
    assert results["steps"] == args["total_steps"] == steps == 4
    assert args["resolved_warmup_steps"] == math.ceil(0.1 * steps) == 1
    trace = [json.loads(line) for line in (option_runs["t2"] / "trace.jsonl").read_text().splitlines()]
    cosine, linear = ([hf_lr(name, 2e-4, 1, steps, taken) for taken in range(steps)] for name in ("cosine", "linear"))
    assert [record["lr"] for record in trace] == pytest.approx(cosine, rel=1e-12, abs=0.0)
    assert cosine != pytest.approx(linear)
    assert trace[0]["lr"] == 0.0  # HF's warmup starts at 0


def test_dora_rslora_and_modules_to_save_reach_the_adapter(option_runs: dict[str, Path]) -> None:
    from safetensors import safe_open

    adapter_config = read_json(option_runs["t2"] / "adapter_config.json")
    assert adapter_config["use_dora"] is True and adapter_config["use_rslora"] is True
    assert adapter_config["modules_to_save"] == ["embed_tokens"]
    with safe_open(option_runs["t2"] / "adapter_model.safetensors", "np") as tensors:
        names = list(tensors.keys())
    assert any("lora_magnitude_vector" in name for name in names)
    assert any("embed_tokens" in name for name in names)


def test_the_options_are_bit_reproducible_across_threads(option_runs: dict[str, Path]) -> None:
    assert deterministic_digests(option_runs["t2"]) == deterministic_digests(option_runs["t1"])


def test_each_new_option_changes_the_config_hash() -> None:
    base = parse_config({})
    for overrides in ({"training": {"lr_scheduler_type": "cosine"}}, {"training": {"num_epochs": 1}},
                      {"training": {"warmup_ratio": 0.1}}, {"lora": {"use_dora": True}},
                      {"lora": {"use_rslora": True}}, {"lora": {"modules_to_save": ["embed_tokens"]}}):
        assert config_hash(parse_config(overrides)) != config_hash(base), overrides


def test_imported_axolotl_qlora_config_trains(tmp_path: Path) -> None:
    """The axolotl QLoRA layout, imported, trains (NF4 on the tiny model); the TRL import trains
    above, the TrainingArguments import below (test_config_import.py checks the translations)."""
    axolotl = imported("axolotl", "axolotl-tinyllama-qlora.yml", tmp_path / "axolotl.yaml")
    short = ("--set", "training.num_epochs=null", "--set", "training.max_steps=2", "--set", "training.warmup_steps=1",
             "--set", "data.path=builtin:reproducible_ml_alpaca")
    run = tmp_path / axolotl.stem
    result = run_cli("train", "--config", str(axolotl), "--output-dir", str(run), "--threads", "2", *TINY_MODEL,
                     *short)
    if packs_4bit_weights_here():
        # An AVX512-BF16 processor: bitsandbytes cannot repack the tiny model's 688-row MLP layers,
        # so the run is refused before it trains, in one paragraph (test_qlora's 4-bit trainings skip here).
        assert result.returncode == 3, result.stdout + result.stderr
        assert_no_traceback(result)
        assert "gate_proj (688), up_proj (688)" in result.stderr and "model.quantization=none" in result.stderr
        assert not (run / "artifact_summary.json").exists()
        assert read_json(run / "training_metadata.json")["status"] == "failed"
        return
    assert result.returncode == 0, result.stderr
    assert read_json(run / "results.json")["steps"] == 2
    assert read_json(tmp_path / "axolotl" / "resolved_config.json")["config"]["model"]["quantization"] == "nf4"


def test_imported_training_arguments_config_trains_two_steps(tmp_path: Path) -> None:
    """The TrainingArguments JSON, imported, trains as the file says: its max_steps (2, over its
    3 epochs), micro-batch 4 with accumulation 2, its lr and cosine schedule, on qlorax's default
    model and data (the file names neither)."""
    config = imported("hf", "hf-training-args.json", tmp_path / "hf.yaml")
    run = tmp_path / "hf"
    result = run_cli("train", "--config", str(config), "--output-dir", str(run), "--threads", "2", *TINY_MODEL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_traceback(result)
    results, args = read_json(run / "results.json"), read_json(run / "training_args.json")
    assert results["steps"] == args["total_steps"] == 2
    assert read_json(run / "training_metadata.json")["status"] == "complete"
    assert len((run / "trace.jsonl").read_text().splitlines()) == 2
    training = read_json(run / "resolved_config.json")["config"]["training"]
    assert (training["batch_size"], training["gradient_accumulation_steps"]) == (4, 2)
    assert (training["learning_rate"], training["lr_scheduler_type"], training["num_epochs"]) == (1e-4, "cosine", None)
