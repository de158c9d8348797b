"""Ops around real training runs: Prometheus, Pushgateway, secrets, cache, admission."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qlorax.artifacts import load_manifest
from qlorax.ops.audit import verify_log

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"


def qlorax(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from qlorax.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def digests(run_dir: Path) -> dict[str, str]:
    manifest = load_manifest(run_dir)
    assert manifest is not None
    return {k: v["sha256"] for k, v in manifest["files"].items() if v["kind"] == "deterministic"}


def test_prometheus_scrapes_serve_after_a_real_training_run(tmp_path: Path, prometheus_server, qlorax_serve,
                                                             pushgateway_server) -> None:
    runs = tmp_path / "runs"
    result = qlorax("train", "--config", str(TINY), "--output-dir", str(runs / "run-a"),
                    "--pushgateway", pushgateway_server.url)
    assert result.returncode == 0, result.stderr
    # The batch run pushed its metrics to a real Pushgateway.
    pushed = pushgateway_server.metrics_text()
    assert 'reproducible_training_runs_total{' in pushed and 'job="qlorax"' in pushed
    assert 'status="success"' in pushed
    # A long-running `qlorax serve` exposes the run; a real Prometheus scrapes it.
    serve = qlorax_serve(watch_dir=runs)
    prometheus = prometheus_server([serve.metrics_target])
    series = prometheus.wait_for('reproducible_training_runs_total{status="success"}', timeout=60)
    assert float(series[0]["value"][1]) >= 1.0
    assert prometheus.wait_for("reproducible_training_peak_memory_bytes", timeout=30)


def test_planted_secrets_leave_no_trace(tmp_path: Path) -> None:
    env_token = "hf_" + secrets.token_hex(16)
    file_token = "hf_" + secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(file_token + "\n")
    token_file.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text(TINY.read_text() + f"model:\n  base_model_id: null\n# api_token: {env_token}\n")
    workdir = tmp_path / "work"
    env = {"HUGGINGFACE_TOKEN": env_token, "QLORAX_CACHE": "on", "QLORAX_CACHE_DIR": str(workdir / "cache")}
    outputs = []
    # `env` and `config show` need nothing from the run: they run beside the training.
    beside = [subprocess.Popen([sys.executable, "-c", "from qlorax.cli import main; main()", *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
              for command in (["env", "--json"], ["config", "show", str(config)])]
    for command in (["train", "--config", str(config), "--output-dir", str(workdir / "run"),
                     "--token-file", str(token_file), "--metrics-textfile", str(workdir / "metrics.prom")],
                    ["analyze", str(workdir / "run"), "--output-dir", str(workdir / "report")]):
        result = qlorax(*command, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    for process in beside:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        outputs.append(stdout + stderr)
    written = [p for p in workdir.rglob("*") if p.is_file()] + [tmp_path / "audit.jsonl"]
    assert any(p.name == "env.json" for p in written) and any(p.name == "audit.jsonl" for p in written)
    for token in (env_token, file_token):
        for text in outputs:
            assert token not in text
        for path in written:
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"{token[:5]}... found in {path}"


@pytest.fixture(scope="module")
def cached_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny config trained twice through the CLI with the cache on: `a` trains and stores the
    entry, `b` is a cache hit. `cache ls` (table and JSON) is taken before anything else touches
    the cache (the corruption test below drops the entry)."""
    root = tmp_path_factory.mktemp("cache-e2e")
    env = {"QLORAX_CACHE": "on", "QLORAX_CACHE_DIR": str(root / "cache")}
    first = qlorax("train", "--config", str(TINY), "--output-dir", str(root / "a"), env=env)
    second = qlorax("train", "--config", str(TINY), "--output-dir", str(root / "b"), env=env)
    listing = qlorax("cache", "ls", "--cache-dir", str(root / "cache"))
    listing_json = qlorax("cache", "ls", "--cache-dir", str(root / "cache"), "--json")
    return {"root": root, "env": env, "first": first, "second": second, "listing": listing,
            "listing_json": listing_json}


def test_cache_hit_returns_identical_digests_and_a_corrupt_entry_retrains(cached_pair: dict[str, Any]) -> None:
    tmp_path, env = cached_pair["root"], cached_pair["env"]
    first, second = cached_pair["first"], cached_pair["second"]
    assert first.returncode == 0 and "cache hit" not in first.stderr + first.stdout
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stdout + second.stderr
    assert digests(tmp_path / "b") == digests(tmp_path / "a")
    assert qlorax("check", str(tmp_path / "b")).returncode == 0
    # Corrupt the stored adapter: the entry is detected, dropped, and the run retrains.
    stored = [p for p in (tmp_path / "cache").rglob("adapter_model.safetensors")]
    assert len(stored) == 1
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0x01
    stored[0].write_bytes(bytes(data))
    third = qlorax("train", "--config", str(TINY), "--output-dir", str(tmp_path / "c"), env=env)
    assert third.returncode == 0, third.stderr
    assert "cache hit" not in third.stdout + third.stderr
    assert digests(tmp_path / "c") == digests(tmp_path / "a")
    ok, problems = verify_log(tmp_path / "audit.jsonl")
    assert ok, problems


def test_unsatisfiable_resource_wait_times_out_with_exit_3(tmp_path: Path) -> None:
    result = qlorax("train", "--config", str(TINY), "--output-dir", str(tmp_path / "run"),
                    "--min-memory-gb", "100000", "--resource-timeout", "0.02")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "resources unavailable" in result.stderr and "waiting for resources" in result.stderr
    assert not (tmp_path / "run").exists()


def test_verify_metrics_textfile_passes_promtool(tiny_verification, service_binaries) -> None:
    """The session's shared tiny verification (tests/conftest.py) wrote its textfile."""
    from conftest import tiny_verification_textfile

    out, command = tiny_verification
    result = command.result()
    assert result.returncode == 0, result.stderr
    text = tiny_verification_textfile(out).read_text()
    assert 'reproducible_training_runs_total{environment="' in text and 'status="success"} 2.0' in text
    assert "reproducibility_score{" in text
    lint = subprocess.run([service_binaries["promtool"], "check", "metrics"], input=text, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_cache_ls_shows_the_key_material_of_runs_trained_through_the_cli(cached_pair: dict[str, Any]) -> None:
    """`qlorax train` computes the key and stores the run in separate steps; the entry must still
    record the profile and config hash that `qlorax cache ls` shows (not `?`)."""
    first, second = cached_pair["first"], cached_pair["second"]
    assert first.returncode == 0, first.stderr
    assert "cache hit" not in first.stdout + first.stderr
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stdout + second.stderr
    shown = qlorax("config", "show", str(TINY), "--json")
    assert shown.returncode == 0, shown.stderr
    resolved = json.loads(shown.stdout)
    config_hash, profile = resolved["config_hash"], resolved["config"]["determinism"]["profile"]

    listing = cached_pair["listing"]
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines() if line.split()[:1] != ["key"]][1:]
    assert len(rows) == 1, listing.stdout
    assert rows[0][-2:] == [profile, config_hash[:12]], listing.stdout
    entries = json.loads(cached_pair["listing_json"].stdout)
    assert [(e["profile"], e["config_hash"]) for e in entries] == [(profile, config_hash)]
