"""QLoRA: a 4-bit (bitsandbytes) base under float32 LoRA weights, as reproducible as plain LoRA
(repeats, thread counts, SIGKILL+resume), with the quantized base's digest in env.json; and the
refusal of a LoRA on a module tied to the input embeddings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

# bitsandbytes is installed by `make test` (requirements.lock): without it this module fails to
# import, loudly, instead of skipping the whole QLoRA area.
import bitsandbytes  # noqa: F401
import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli, run_clis
from qlorax.analysis import analyze_runs, discover_runs
from qlorax.artifacts import canonical_json, load_manifest, read_json, sha256_bytes, write_json_atomic, write_manifest
from qlorax.config import load_config
from qlorax.inputs import config_hash
from qlorax.quantization import packs_4bit_weights_here
from synthetic_runs import make_runs
from test_resume import det_digests, wait_for_checkpoint

# On an AVX512-BF16 processor bitsandbytes repacks 4-bit weights in 32-row blocks and the tiny
# model's 688-row MLP layers do not divide: qlorax refuses such a run in one paragraph (tested in
# test_training_options.py), so the tests that train the tiny model in 4 bits run on other
# processors. A condition on the processor, asked of bitsandbytes; everything else here runs
# everywhere.
TRAINS_TINY_MODEL_IN_4_BITS = pytest.mark.skipif(
    packs_4bit_weights_here(), reason="AVX512-BF16: bitsandbytes cannot repack the tiny model's 4-bit layers "
                                      "(the refusal is tested in test_training_options.py)")

NF4 = ["--config", str(TINY_CONFIG), "--set", "model.quantization=nf4", "--set", "model.double_quant=true",
       "--set", "training.max_steps=4", "--set", "training.save_steps=2", "--set", "training.trace_every=1",
       "--set", "data.max_length=64"]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def train(run_dir: Path, threads: int, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run_cli("train", "--output-dir", str(run_dir), "--threads", str(threads), *NF4, *extra)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def nf4_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same QLoRA config in two processes, with 1 and 2 threads, side by side (separate pinned
    processes: neither one's bits depend on the other)."""
    root = tmp_path_factory.mktemp("qlora")
    runs = {"t1": root / "t1", "t2": root / "t2"}
    results = run_clis(*(["train", "--output-dir", str(run), "--threads", name[1:], *NF4]
                         for name, run in runs.items()))
    for result in results:
        assert result.returncode == 0, result.stderr
    (root / "t1.stderr").write_text(results[0].stderr)
    return runs


@TRAINS_TINY_MODEL_IN_4_BITS
def test_nf4_runs_are_bit_identical_across_processes_and_threads(nf4_runs: dict[str, Path]) -> None:
    first, second = det_digests(nf4_runs["t1"]), det_digests(nf4_runs["t2"])
    assert "adapter_model.safetensors" in first
    assert first == second
    assert read_json(nf4_runs["t1"] / "resolved_config.json")["config"]["model"]["quantization"] == "nf4"


@TRAINS_TINY_MODEL_IN_4_BITS
def test_env_records_quantized_digest_and_bitsandbytes_version(nf4_runs: dict[str, Path]) -> None:
    envs = [read_json(run / "env.json") for run in nf4_runs.values()]
    digests = {env["fingerprint"]["quantized_base_sha256"] for env in envs}
    assert len(digests) == 1 and HEX64.match(digests.pop())
    assert envs[0]["fingerprint"]["packages"]["bitsandbytes"] == metadata.version("bitsandbytes")


@TRAINS_TINY_MODEL_IN_4_BITS
def test_library_import_noise_stays_off_the_console(nf4_runs: dict[str, Path]) -> None:
    stderr = (nf4_runs["t1"].parent / "t1.stderr").read_text()
    assert not [line for line in stderr.splitlines() if re.search(r"warn|bitsandbytes|gguf|%\|", line, re.I)], stderr


@TRAINS_TINY_MODEL_IN_4_BITS
def test_sigkill_then_resume_with_a_quantized_base_is_bit_identical(tmp_path: Path,
                                                                     nf4_runs: dict[str, Path]) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", "from qlorax.cli import main; main()", "train", "--output-dir", str(run_dir),
         "--threads", "1", *NF4], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_checkpoint(run_dir, 2, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert load_manifest(run_dir) is None
    resumed = run_cli("resume", str(run_dir), "--threads", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint" in resumed.stdout + resumed.stderr
    assert det_digests(run_dir) == det_digests(nf4_runs["t1"])
    assert read_json(run_dir / "env.json")["fingerprint"]["quantized_base_sha256"] == read_json(
        nf4_runs["t1"] / "env.json")["fingerprint"]["quantized_base_sha256"]


@TRAINS_TINY_MODEL_IN_4_BITS
def test_fp4_bfloat16_compute_has_its_own_base_digest_and_float32_lora(tmp_path: Path,
                                                                       nf4_runs: dict[str, Path]) -> None:
    run_dir = tmp_path / "fp4"
    train(run_dir, 1, "--set", "model.quantization=fp4", "--set", "model.compute_dtype=bfloat16",
          "--set", "training.max_steps=2")
    fp4 = read_json(run_dir / "env.json")["fingerprint"]["quantized_base_sha256"]
    nf4 = read_json(nf4_runs["t1"] / "env.json")["fingerprint"]["quantized_base_sha256"]
    assert HEX64.match(fp4) and fp4 != nf4
    header = (run_dir / "adapter_model.safetensors").read_bytes()
    size = int.from_bytes(header[:8], "little")
    dtypes = {v["dtype"] for k, v in json.loads(header[8:8 + size]).items() if k != "__metadata__"}
    assert dtypes == {"F32"}


def test_every_quantization_setting_changes_the_config_hash() -> None:
    plain = config_hash(load_config(TINY_CONFIG))
    variants = [{"quantization": "nf4"}, {"quantization": "fp4"}, {"quantization": "nf4", "double_quant": True},
                {"quantization": "nf4", "compute_dtype": "bfloat16"}, {"gradient_checkpointing": True}]
    hashes = {config_hash(load_config(TINY_CONFIG, {"model": v})) for v in variants}
    assert plain not in hashes and len(hashes) == len(variants)
    assert config_hash(load_config(TINY_CONFIG, {"model": {"quantization": "none"}})) == plain


def test_quantization_options_without_a_quantization_are_exit_2() -> None:
    result = run_cli("config", "show", "--set", "model.double_quant=true")
    assert result.returncode == 2 and "model.quantization" in result.stderr
    assert_no_traceback(result)


def _with_quantized_digest(run: Path, digest: str) -> None:
    env = read_json(run / "env.json")
    env["fingerprint"]["quantized_base_sha256"] = digest
    env["fingerprint_sha256"] = sha256_bytes(canonical_json(env["fingerprint"]).encode())
    write_json_atomic(run / "env.json", env)
    write_manifest(run)


def test_a_different_quantized_base_is_environment_drift(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for run in make_runs(root, ["bnb-a-1", "bnb-a-2"]):
        _with_quantized_digest(run, "a" * 64)
    for run in make_runs(root, ["bnb-b-1", "bnb-b-2"], adapter_seed=3):
        _with_quantized_digest(run, "b" * 64)
    cross = analyze_runs(discover_runs([root]))["cross_environment_analysis"]
    assert cross["attribution"] == "environment_drift"
    assert cross["drift_keys"] == ["quantized_base_sha256"]


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose lm_head is tied to its input embeddings (as SmolLM2's is)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlorax.model_presets import materialize_preset

    tokenizer = AutoTokenizer.from_pretrained(materialize_preset())
    target = tmp_path_factory.mktemp("tied") / "tied-llama"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def tied_results(tied_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The tied model's three commands side by side: `train` with the default targets (lm_head
    included) unquantized and NF4, and with q_proj and v_proj only (1 step)."""
    root = tmp_path_factory.mktemp("tied-runs")
    model = ["--config", str(TINY_CONFIG), "--set", f"model.name_or_path={tied_model}"]
    results = run_clis(*(["train", "--output-dir", str(root / quantization), *model,
                          "--set", f"model.quantization={quantization}"] for quantization in ("none", "nf4")),
                       ["train", "--output-dir", str(root / "without-lm-head"), *model,
                        "--set", "lora.target_modules=[q_proj, v_proj]", "--set", "training.max_steps=1"])
    return dict(zip(("none", "nf4", "without-lm-head"), results, strict=True))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lora_on_a_module_tied_to_the_embeddings_is_exit_2(tied_results: dict[str, object],
                                                           quantization: str) -> None:
    result = tied_results[quantization]
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 2, result.stderr
    assert_no_traceback(result)
    assert "lora.target_modules" in result.stderr and "'lm_head'" in result.stderr
    assert "embeddings" in result.stderr and "remove" in result.stderr


def test_the_tied_model_trains_without_lm_head(tied_results: dict[str, object]) -> None:
    result = tied_results["without-lm-head"]
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_smollm2_qlora_preset_is_bit_identical_across_threads(tmp_path: Path) -> None:
    """The shipped QLoRA preset on the real SmolLM2-135M-Instruct, shortened: 1 vs 2 threads."""
    preset = Path(str(resources.files("qlorax") / "presets" / "smollm2-qlora.yaml"))
    short = ["--config", str(preset), "--set", "training.max_steps=2", "--set", "training.eval_steps=2",
             "--set", "training.save_steps=2", "--set", "data.max_length=64", "--set", "data.eval_fraction=0.02",
             "--set", "training.sample_max_new_tokens=4"]
    for result in run_clis(*(["train", "--output-dir", str(tmp_path / f"t{threads}"), "--threads", str(threads),
                              *short] for threads in (1, 2))):  # side by side
        assert result.returncode == 0, result.stderr
    assert det_digests(tmp_path / "t1") == det_digests(tmp_path / "t2")
    env = read_json(tmp_path / "t1" / "env.json")["fingerprint"]
    assert HEX64.match(env["quantized_base_sha256"])
    assert env["quantized_base_sha256"] == read_json(tmp_path / "t2" / "env.json")["fingerprint"][
        "quantized_base_sha256"]
