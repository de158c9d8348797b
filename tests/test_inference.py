"""generate, eval and export on one finished tiny run (trained once for the module, on data
from a git tag: its commit is recorded, the recorded config is pinned to it, and a dirty
checkout is refused).

generate: the same bytes for 1 and 2 threads, and the run's own samples for the bundled
prompts. eval: the adapter's loss on the run's eval split equals the run's recorded eval loss
bit for bit. export: twice gives identical bytes; the merged model, loaded by plain
transformers in a fresh process, gives base + adapter's logits within 1e-5 relative.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.artifacts import load_manifest, read_json, sha256_file
from qlorax.config import load_config
from qlorax.data import bundled_path, split_indices
from qlorax.datasource import checkout_dir
from qlorax.inputs import config_hash
from qlorax.model_presets import TINY_PRESET, preset_dir
from test_git_data import DATA_IN_REPO, make_data_repo, source

EVAL_PROMPTS = bundled_path("eval_prompts.jsonl")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A data repository whose tag v1 holds the bundled training data byte for byte."""
    bundled = bundled_path("reproducible_ml_alpaca.jsonl").read_text(encoding="utf-8")
    return make_data_repo(tmp_path_factory.mktemp("repo"), bundled, bundled.replace("LoRA", "QLoRA"))


@pytest.fixture(scope="module")
def run_dir(repo: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's one run: the tiny config (its lm_head LoRA included), 3 steps, 1 thread,
    trained on the bundled data from a git tag (so the git source is exercised end to end)."""
    path = tmp_path_factory.mktemp("inference") / "run"
    result = run_cli("train", "-c", str(TINY_CONFIG), "-o", str(path), "--threads", "1",
                     "--set", "training.max_steps=3", "--set", f"data.path={source(repo, 'v1')}")
    assert result.returncode == 0, result.stderr
    return path


def held_out_split(directory: Path) -> tuple[Path, int]:
    """The run's eval split (the default data, split as training splits it) as a file."""
    lines = [line for line in bundled_path("reproducible_ml_alpaca.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    _, eval_ids = split_indices(len(lines), 0.1, 42)
    path = directory / "held_out.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in eval_ids), encoding="utf-8")
    return path, len(eval_ids)


@pytest.fixture(scope="module")
def done(run_dir: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every heavy command of this module, started at once (each is its own pinned process,
    so running them side by side changes no bit; it only saves wall time on a shared machine)."""
    out = run_dir.parent
    held_out, _ = held_out_split(out)
    commands = {
        "generate-1": ("generate", str(run_dir), "--prompts", str(EVAL_PROMPTS), "--threads", "1",
                       "-o", str(out / "threads-1.jsonl")),
        "generate-2": ("generate", str(run_dir), "--prompts", str(EVAL_PROMPTS), "--threads", "2",
                       "-o", str(out / "threads-2.jsonl")),
        "eval": ("eval", str(run_dir), "--data", str(held_out), "--threads", "2", "--json"),
        "merged-1": ("export", str(run_dir), "--merge", "-o", str(out / "merged-1"), "--threads", "1"),
        "merged-2": ("export", str(run_dir), "--merge", "-o", str(out / "merged-2"), "--threads", "2"),
    }
    started = {name: subprocess.Popen([sys.executable, "-c", "from qlorax.cli import main; main()", *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=900)
        results[name] = subprocess.CompletedProcess(commands[name], process.returncode, stdout, stderr)
    return results


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_is_thread_invariant_and_reproduces_the_runs_samples(run_dir: Path, done: dict) -> None:
    outputs = []
    for threads in ("1", "2"):
        assert done[f"generate-{threads}"].returncode == 0, done[f"generate-{threads}"].stderr
        output = run_dir.parent / f"threads-{threads}.jsonl"
        assert (output.parent / f"{output.name}.sha256").read_text() == f"{sha256_file(output)}  {output.name}\n"
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]  # two processes, 1 and 2 threads: the same bytes
    generated = read_lines(run_dir.parent / "threads-1.jsonl")
    samples = read_lines(run_dir / "samples.jsonl")
    assert [(g["id"], g["completion"], g["token_ids"]) for g in generated] == [
        (s["id"], s["completion"], s["token_ids"]) for s in samples]
    digest = load_manifest(run_dir)["deterministic_digest"]
    assert all(g["generation"] == {"run": digest, "max_new_tokens": 24, "decoding": {"mode": "greedy"}}
               for g in generated)
    assert all(len(g["token_ids"]) == 24 for g in generated)


def test_bad_prompts_and_a_tampered_run_are_refused(run_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n', encoding="utf-8")
    bad = run_cli("generate", str(run_dir), "--prompts", str(prompts))
    assert bad.returncode == 2 and f"{prompts}:2" in bad.stderr, bad.stderr
    neither = run_cli("generate", str(run_dir))
    assert neither.returncode == 2 and "--prompt" in neither.stderr
    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered)
    weights = tampered / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    refused = run_cli("export", str(tampered), "-o", str(tmp_path / "out"))
    assert refused.returncode == 1 and "adapter_model.safetensors" in refused.stderr, refused.stderr
    assert not (tmp_path / "out").exists()
    for result in (bad, neither, refused):
        assert_no_traceback(result)


def test_eval_on_the_runs_eval_split_reproduces_its_eval_loss(run_dir: Path, done: dict) -> None:
    result = done["eval"]
    assert result.returncode == 0, result.stderr
    eval_count = held_out_split(run_dir.parent)[1]
    report = json.loads(result.stdout)
    recorded = read_json(run_dir / "results.json")
    assert report["adapter"]["loss"] == recorded["eval_loss"]  # bit for bit, through plain PEFT loading
    assert report["data"]["target_tokens"] == recorded["eval_tokens"]
    assert report["data"]["examples"] == recorded["eval_examples"] == eval_count
    assert report["base"]["loss"] != report["adapter"]["loss"]
    assert report["run"] == load_manifest(run_dir)["deterministic_digest"]


LOGITS_SCRIPT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
merged_dir, base_dir, run_dir = sys.argv[1:4]
batch = torch.tensor([[0, 5, 17, 300, 42, 1999, 7, 64], [0, 900, 3, 3, 811, 12, 1500, 9]])
with torch.no_grad():
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=batch).logits
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    plain = base(input_ids=batch).logits
    adapted = PeftModel.from_pretrained(base, run_dir).eval()(input_ids=batch).logits
scale = adapted.abs().max()
print(json.dumps({"merged_vs_adapter": float((merged - adapted).abs().max() / scale),
                  "adapter_vs_base": float((adapted - plain).abs().max() / scale)}))
"""


def test_export_twice_is_byte_identical_and_the_merge_is_exact(run_dir: Path, done: dict, tmp_path: Path) -> None:
    merged = [run_dir.parent / "merged-1", run_dir.parent / "merged-2"]  # exported with 1 and 2 threads
    for name in ("merged-1", "merged-2"):
        assert done[name].returncode == 0, done[name].stderr
    names = sorted(p.name for p in merged[0].iterdir())
    assert names == sorted(p.name for p in merged[1].iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "export.json", "artifact_summary.json"} <= set(names)
    assert all((merged[0] / n).read_bytes() == (merged[1] / n).read_bytes() for n in names)
    manifest, run_manifest = load_manifest(merged[0]), load_manifest(run_dir)
    assert manifest["source_run_digest"] == run_manifest["deterministic_digest"]
    assert read_json(merged[0] / "export.json")["source_run"]["deterministic_digest"] == manifest["source_run_digest"]
    assert all(entry["kind"] == "deterministic" for entry in manifest["files"].values())
    assert run_cli("check", str(merged[0])).returncode == 0
    assert str(run_dir.parent) not in "".join((merged[0] / n).read_text() for n in names if n.endswith(".json"))

    adapter_only = tmp_path / "adapter"
    result = run_cli("export", str(run_dir), "-o", str(adapter_only))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in adapter_only.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "export.json", "artifact_summary.json"])
    assert sha256_file(adapter_only / "adapter_model.safetensors") == run_manifest["files"][
        "adapter_model.safetensors"]["sha256"]
    again = run_cli("export", str(run_dir), "-o", str(adapter_only))
    assert again.returncode == 2 and "--force" in again.stderr

    compared = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(merged[0]), str(preset_dir(TINY_PRESET)),
                               str(run_dir)], capture_output=True, text=True, timeout=300, check=False)
    assert compared.returncode == 0, compared.stderr
    differences = json.loads(compared.stdout.strip().splitlines()[-1])
    assert differences["merged_vs_adapter"] <= 1e-5, differences
    assert differences["adapter_vs_base"] > 1e-3, differences  # the adapter really changes the logits


def test_the_run_names_the_commit_it_trained_on_and_a_dirty_checkout_is_refused(
        repo: dict[str, str], run_dir: Path, done: dict, tmp_path: Path) -> None:
    results = read_json(run_dir / "results.json")
    bundled = bundled_path("reproducible_ml_alpaca.jsonl")
    tokenized = results["data"].pop("tokenized_sha256")
    assert len(tokenized) == 64
    assert results["data"] == {"path": f"git:{repo['a']}#{DATA_IN_REPO}", "commit": repo["a"],
                               "sha256": sha256_file(bundled), "format": "alpaca"}
    by_sha = load_config(TINY_CONFIG, {"training": {"max_steps": 3}, "data": {"path": source(repo, repo["a"])}})
    assert results["config_hash"] == config_hash(by_sha)  # the tag and its commit: one config hash
    assert repo["root"] not in (run_dir / "resolved_config.json").read_text()  # no repository path
    # The recorded config names the commit, not the tag: a resume reads exactly this data.
    assert read_json(run_dir / "checkpoints" / "config.json")["config"]["data"]["path"] == source(repo, repo["a"])
    provenance = read_json(run_dir / "training_metadata.json")["data_source"]
    assert (provenance["kind"], provenance["commit"], provenance["url"]) == ("git", repo["a"], repo["url"])

    checkout = checkout_dir(repo["a"]) / DATA_IN_REPO  # last: the other tests' commands are done with it
    assert not checkout.stat().st_mode & 0o222  # checked out read-only
    checkout.chmod(0o644)
    checkout.write_text(checkout.read_text() + "\n", encoding="utf-8")
    dirty = run_cli("train", "-c", str(TINY_CONFIG), "-o", str(tmp_path / "again"), "--set",
                    f"data.path={source(repo, repo['a'])}")
    assert dirty.returncode == 2, dirty.stderr
    assert f"checkout of commit {repo['a']}" in dirty.stderr and "dirty" in dirty.stderr
    assert_no_traceback(dirty)
