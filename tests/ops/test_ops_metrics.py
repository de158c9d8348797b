"""Metrics: names/labels of the user's guide, promtool lint, Pushgateway, textfile, Prometheus scrape."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlorax.fingerprint import detect_environment_kind
from qlorax.ops.audit import AuditLogger
from qlorax.ops.metrics import MetricsPushError, TrainingMetrics, run_summary


def _samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_guide_names_and_labels() -> None:
    metrics = TrainingMetrics()
    metrics.record_run("native", 12.5, True, score=1.0, tokens_per_second=5000.0, peak_memory_mb=512.0)
    metrics.record_run("native", 3.0, False)
    samples = _samples(metrics.exposition())
    assert (
        samples[("reproducible_training_runs_total", (("environment", "native"), ("status", "success")))] == 1
    )
    assert (
        samples[("reproducible_training_runs_total", (("environment", "native"), ("status", "failure")))] == 1
    )
    assert samples[("reproducible_training_duration_seconds_count", (("environment", "native"),))] == 2
    assert samples[("reproducible_training_duration_seconds_sum", (("environment", "native"),))] == 15.5
    assert samples[("reproducibility_score", (("environment", "native"),))] == 1.0
    assert samples[("reproducible_training_tokens_per_second", (("environment", "native"),))] == 5000.0
    assert samples[("reproducible_training_peak_memory_bytes", (("environment", "native"),))] == 512 * 2**20
    assert ("reproducible_training_last_success_timestamp_seconds", (("environment", "native"),)) in samples


def test_each_instance_has_its_own_registry() -> None:
    first, second = TrainingMetrics(), TrainingMetrics()
    first.record_run("docker", 1.0, True)
    assert b"docker" in first.exposition()
    assert b"docker" not in second.exposition()


def test_score_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="within"):
        TrainingMetrics().record_score("native", 1.5)


def test_env_json_metrics_and_audit_share_one_environment_detector(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, synthetic_run
) -> None:
    """env.json, the metrics label and the audit label all come from qlorax.fingerprint."""
    monkeypatch.setenv("QLORAX_ENVIRONMENT", "staging")
    assert detect_environment_kind() == "staging"
    monkeypatch.delenv("QLORAX_ENVIRONMENT")
    assert detect_environment_kind() in ("native", "docker", "kubernetes")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert detect_environment_kind() == "kubernetes"
    assert AuditLogger(tmp_path / "audit.jsonl").environment == "kubernetes"
    assert AuditLogger(tmp_path / "audit.jsonl", environment="prod").environment == "prod"  # --environment
    metrics = TrainingMetrics()
    assert metrics.record_run_dir(synthetic_run("unlabelled", environment=""))  # env.json names none
    assert b'environment="kubernetes"' in metrics.exposition()


def test_promtool_accepts_our_exposition(service_binaries: dict[str, str]) -> None:
    metrics = TrainingMetrics()
    metrics.record_run("native", 12.5, True, score=1.0, tokens_per_second=5000.0, peak_memory_mb=512.0)
    metrics.record_run("kubernetes", 30.0, False)
    result = subprocess.run(
        [service_binaries["promtool"], "check", "metrics"],
        input=metrics.exposition(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert not (result.stdout + result.stderr).strip(), (result.stdout + result.stderr).decode()


def test_textfile_is_written_atomically_and_lints(tmp_path: Path, service_binaries: dict[str, str]) -> None:
    metrics = TrainingMetrics()
    metrics.record_run("native", 7.0, True, score=1.0)
    target = tmp_path / "textfile" / "qlorax.prom"
    metrics.write_textfile(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["qlorax.prom"]  # no temp file left
    assert target.read_bytes() == metrics.exposition()
    result = subprocess.run(
        [service_binaries["promtool"], "check", "metrics"],
        input=target.read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_run_summary_of_finished_failed_and_running_runs(synthetic_run) -> None:
    done = run_summary(synthetic_run("done", environment="docker"))
    assert done is not None and done["success"] and done["environment"] == "docker"
    assert done["duration_s"] == 21.3 and done["peak_memory_mb"] == 612.4
    failed = run_summary(synthetic_run("failed", status="failed", finished=False))
    assert failed is not None and failed["success"] is False
    assert run_summary(synthetic_run("running", status="running", finished=False)) is None


def test_pushgateway_receives_our_series(pushgateway_server, synthetic_run, cli) -> None:
    metrics = TrainingMetrics()
    metrics.record_run("native", 12.5, True, score=1.0, tokens_per_second=4000.0)
    metrics.push(pushgateway_server.url, job="qlorax-test")
    text = pushgateway_server.metrics_text()
    runs = [line for line in text.splitlines() if line.startswith("reproducible_training_runs_total{")]
    assert any(
        'job="qlorax-test"' in line
        and 'status="success"' in line
        and 'environment="native"' in line
        and line.endswith(" 1")
        for line in runs
    ), runs
    assert re.search(r'^reproducibility_score\{[^}]*job="qlorax-test"[^}]*\} 1$', text, re.M), text[-2000:]

    # the batch CLI: record a finished run directory and push it under another job
    run = synthetic_run("batch", environment="docker")
    result = cli("metrics", "record", run, "--pushgateway", pushgateway_server.url, "--job", "qlorax-batch")
    assert result.exit_code == 0, result.stderr
    text = pushgateway_server.metrics_text()
    assert re.search(
        r'^reproducible_training_runs_total\{[^}]*environment="docker"[^}]*job="qlorax-batch"'
        r'[^}]*status="success"\} 1$',
        text,
        re.M,
    ), text[-2000:]


def test_push_to_nowhere_is_a_clear_error(free_port) -> None:
    with pytest.raises(MetricsPushError, match="could not push metrics"):
        TrainingMetrics().push(f"http://127.0.0.1:{free_port()}", timeout=2)


def test_prometheus_scrapes_qlorax_serve(
    prometheus_server, qlorax_serve, synthetic_run, tmp_path: Path
) -> None:
    watch = tmp_path / "watched"
    watch.mkdir()
    serve = qlorax_serve(watch_dir=watch)
    prometheus = prometheus_server([serve.metrics_target])
    synthetic_run("watched/run-1", environment="native")
    (watch / "verification_report.json").write_text(
        json.dumps({"reproducibility_score": 1.0, "environment": "native"})
    )

    series = prometheus.wait_for('reproducible_training_runs_total{status="success"}')
    assert series[0]["metric"]["environment"] == "native"
    assert series[0]["metric"]["job"] == "qlorax"
    assert float(series[0]["value"][1]) == 1.0
    score = prometheus.wait_for("reproducibility_score")
    assert float(score[0]["value"][1]) == 1.0
    assert all(t["health"] == "up" for t in prometheus.targets())
    assert serve.stop() == 0  # SIGTERM: a clean exit


def test_metrics_record_cli_textfile_and_stdout(cli, synthetic_run, tmp_path: Path) -> None:
    run = synthetic_run("run", environment="kubernetes")
    target = tmp_path / "node-exporter" / "qlorax.prom"
    result = cli("metrics", "record", run, "--textfile", target, "--score", "1.0")
    assert result.exit_code == 0, result.stderr
    samples = _samples(target.read_bytes())
    assert (
        samples[("reproducible_training_runs_total", (("environment", "kubernetes"), ("status", "success")))]
        == 1
    )
    printed = cli("metrics", "record", run)
    assert printed.exit_code == 0 and "reproducible_training_runs_total" in printed.stdout
    unfinished = cli("metrics", "record", synthetic_run("unfinished", finished=False, status="running"))
    assert unfinished.exit_code == 2 and "not a finished run" in unfinished.stderr
