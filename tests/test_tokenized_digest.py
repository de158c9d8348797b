"""The digest of the token ids a run trained on, and the analysis naming a tokenizer change."""

from __future__ import annotations

from pathlib import Path

from qlorax.analysis import analyze_runs, discover_runs
from qlorax.artifacts import read_json, write_json_atomic, write_manifest
from qlorax.data import Dataset, TokenizedExample
from synthetic_runs import make_runs


def _dataset(first_id: int) -> Dataset:
    train = [TokenizedExample(line=1, input_ids=[first_id, 5, 6], labels=[-100, 5, 6]),
             TokenizedExample(line=2, input_ids=[7, 8], labels=[7, 8])]
    return Dataset(train=train, eval=[TokenizedExample(line=3, input_ids=[9], labels=[9])], data_sha256="d" * 64)


def test_tokenized_digest_follows_every_token_id_and_label() -> None:
    base = _dataset(4).tokenized_sha256()
    assert base == _dataset(4).tokenized_sha256()
    assert _dataset(3).tokenized_sha256() != base  # one id
    relabelled = _dataset(4)
    relabelled.train[0].labels[0] = 4  # one label (train_on_inputs)
    assert relabelled.tokenized_sha256() != base
    moved = _dataset(4)
    moved.eval.append(moved.train.pop())  # the same examples, another split
    assert moved.tokenized_sha256() != base


def _with_tokenized_digest(run: Path, digest: str) -> None:
    results = read_json(run / "results.json")
    results.setdefault("data", {})["tokenized_sha256"] = digest
    write_json_atomic(run / "results.json", results)
    write_manifest(run)


def test_other_token_ids_for_the_same_data_are_tokenization_drift(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for run in make_runs(root, ["tok-a-1", "tok-a-2"], adapter_seed=0):
        _with_tokenized_digest(run, "a" * 64)
    for run in make_runs(root, ["tok-b-1", "tok-b-2"], adapter_seed=5):
        _with_tokenized_digest(run, "b" * 64)
    report = analyze_runs(discover_runs([root]))
    assert report["cross_environment_analysis"]["attribution"] == "tokenization_drift"
    assert any("tokenization drift" in line for line in report["conclusions"])


def test_same_token_ids_with_other_bits_stay_nondeterminism(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = make_runs(root, ["same-1", "same-2"], adapter_seed=0) + make_runs(root, ["same-3"], adapter_seed=5)
    for run in runs:
        _with_tokenized_digest(run, "a" * 64)
    report = analyze_runs(discover_runs([root]))
    assert report["cross_environment_analysis"]["attribution"] == "nondeterminism"
