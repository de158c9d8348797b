"""A base model is one model however it is named (issue 21 item 4): the preset's name, a
byte-identical copy of its directory, the `sha256:` identity a run records, or (for SmolLM2) the
GGUF file the preset is built from give one config hash, the same deterministic files and one
cache key. How the config named it goes to the informational files only.

Real CLI runs of the tiny config (2 steps, 2 sampled tokens) with the cache off, except where a
test turns it on for itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, BackgroundCli, assert_no_traceback, run_cli
from qlorax.artifacts import load_manifest, read_json
from qlorax.config import load_config
from qlorax.inputs import config_hash, portable_form

TINY = "qlorax/tiny-llama"
SMOLLM2 = "qlorax/smollm2-135m-instruct"
SHORT = ("--set", "training.max_steps=2", "--set", "training.sample_max_new_tokens=2", "--threads", "1")


def preset_path(name: str) -> Path:
    result = run_cli("model", "path", name)
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    return Path(result.stdout.strip().splitlines()[-1])


def hash_of(name_or_path: str | Path, **training: int) -> str:
    overrides = {"model": {"name_or_path": str(name_or_path)}, "training": training}
    return config_hash(load_config(TINY_CONFIG, overrides))


def deterministic_digests(run_dir: Path) -> dict[str, str]:
    manifest = load_manifest(run_dir)
    assert manifest is not None, f"{run_dir} has no manifest"
    return {name: entry["sha256"] for name, entry in manifest["files"].items() if entry["kind"] == "deterministic"}


def train(run_dir: Path, model: str | Path) -> list[str]:
    return ["train", "--config", str(TINY_CONFIG), "--output-dir", str(run_dir),
            "--set", f"model.name_or_path={model}", *SHORT]


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-identical copy of the materialised tiny preset, under another name."""
    copy = tmp_path_factory.mktemp("exported") / "my-team-model"
    shutil.copytree(preset_path(TINY), copy)
    return copy


def test_preset_and_a_copy_of_its_directory_have_one_config_hash(tiny_copy: Path) -> None:
    by_name = hash_of(TINY)
    assert hash_of(tiny_copy) == by_name
    recorded = portable_form(load_config(TINY_CONFIG, {"model": {"name_or_path": str(tiny_copy)}}))
    identity = recorded["model"]["name_or_path"]
    assert identity.startswith("sha256:") and str(tiny_copy) not in json.dumps(recorded)
    by_preset = portable_form(load_config(TINY_CONFIG, {"model": {"name_or_path": TINY}}))
    assert by_preset["model"]["name_or_path"] == identity
    assert hash_of(identity) == by_name  # the recorded identity names the preset again: it trains again


def test_only_the_files_that_define_the_model_count(tiny_copy: Path, tmp_path: Path) -> None:
    """Documentation, licences, hidden files, qlorax's marker and the loading settings that
    transformers writes into a saved config (local_files_only: HF_HUB_OFFLINE at save time) are
    not the model; the weights, config and tokenizer are."""
    by_name = hash_of(TINY)
    decorated = tmp_path / "decorated"
    shutil.copytree(tiny_copy, decorated)
    (decorated / "README.md").write_text("# my copy\n")
    (decorated / "LICENSE").write_text("Apache-2.0\n")
    (decorated / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (decorated / "qlorax_model.json").write_text(json.dumps({"id": "team/renamed", "provenance": {}}))
    tokenizer_config = json.loads((decorated / "tokenizer_config.json").read_text())
    (decorated / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "local_files_only": True}))
    assert hash_of(decorated) == by_name
    for name, change in (("tokenizer.json", lambda text: text.replace("<|eos|>", "<|end|>")),
                         ("config.json", lambda text: text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))):
        changed = tmp_path / f"changed-{name}"
        shutil.copytree(tiny_copy, changed)
        text = (changed / name).read_text()
        assert change(text) != text
        (changed / name).write_text(change(text))
        assert hash_of(changed) != by_name, name


def test_the_smollm2_preset_and_its_gguf_file_are_one_model(tmp_path: Path) -> None:
    """Known without building either: the preset's pinned content digest is the GGUF's conversion."""
    from qlorax.model_presets import smollm2_gguf_file

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "renamed.gguf").symlink_to(smollm2_gguf_file())
    assert hash_of(SMOLLM2) == hash_of(folder / "renamed.gguf") == hash_of(folder)
    assert hash_of(SMOLLM2) != hash_of(TINY)


def test_a_built_preset_holds_the_content_its_identity_names(tmp_path: Path) -> None:
    """The tiny preset built here is the pinned one; a preset directory whose weights or config
    changed is refused (exit 2) instead of training under an identity that names other bytes."""
    from qlorax.identity import model_content_digest
    from qlorax.model_presets import PRESETS

    built = preset_path(TINY)
    assert model_content_digest(built) == PRESETS[TINY].content_digest
    home = tmp_path / "home"
    tampered = home / "models" / built.name
    shutil.copytree(built, tampered)
    (tampered / "config.json").write_text((tampered / "config.json").read_text().replace("1e-05", "1e-06"))
    result = run_cli("model", "path", TINY, env={"QLORAX_HOME": str(home)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    assert f"is not the preset {TINY}" in result.stderr and f"Remove {tampered}" in result.stderr


def test_training_by_preset_name_or_by_directory_gives_the_same_bits_and_a_cache_hit(
        tiny_copy: Path, tmp_path: Path) -> None:
    """Two real runs side by side, one naming the preset (with the cache on: it stores its
    entry), one the copied directory (cache off: it trains): the same config hash,
    resolved_config.json, results.json and deterministic digest; the naming is in
    training_metadata.json. Then a run naming the directory, with the cache on, is a hit."""
    by_name, by_dir, from_cache = tmp_path / "by-name", tmp_path / "by-dir", tmp_path / "from-cache"
    cache = {"QLORAX_CACHE": "on", "QLORAX_CACHE_DIR": str(tmp_path / "cache")}
    started = [BackgroundCli(*train(by_name, TINY), env=cache), BackgroundCli(*train(by_dir, tiny_copy))]
    for result in [command.result() for command in started]:
        assert result.returncode == 0, result.stdout + result.stderr
        assert_no_traceback(result)
        assert "cache hit" not in result.stdout + result.stderr
    for name in ("resolved_config.json", "results.json", "adapter_config.json", "adapter_model.safetensors"):
        assert (by_name / name).read_bytes() == (by_dir / name).read_bytes(), name
    assert deterministic_digests(by_name) == deterministic_digests(by_dir)
    assert load_manifest(by_name)["deterministic_digest"] == load_manifest(by_dir)["deterministic_digest"]
    results = read_json(by_name / "results.json")
    trained = {"max_steps": 2, "sample_max_new_tokens": 2}  # SHORT
    assert results["config_hash"] == hash_of(TINY, **trained) == hash_of(tiny_copy, **trained)
    assert results["base_model"]["id"] == TINY  # named by content: the copy holds the tiny preset's bytes
    assert read_json(by_dir / "adapter_config.json")["base_model_name_or_path"] == TINY
    named = {run: read_json(run / "training_metadata.json") for run in (by_name, by_dir)}
    assert named[by_name]["base_model_name_or_path"] == TINY
    assert named[by_dir]["base_model_name_or_path"] == str(tiny_copy)
    assert named[by_dir]["base_model_dir"] == str(tiny_copy) != named[by_name]["base_model_dir"]
    for name in ("resolved_config.json", "results.json", "adapter_config.json"):
        assert str(tiny_copy) not in (by_dir / name).read_text(), name

    hit = run_cli(*train(from_cache, tiny_copy), env=cache)
    assert hit.returncode == 0, hit.stdout + hit.stderr
    assert "cache hit" in hit.stdout + hit.stderr
    assert deterministic_digests(from_cache) == deterministic_digests(by_dir)
    assert run_cli("check", str(from_cache)).returncode == 0
