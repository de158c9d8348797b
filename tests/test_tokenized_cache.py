"""Tokenize once per dataset content (qlorax.tokenized_cache): a hit gives the very tokens."""

from __future__ import annotations

from pathlib import Path

from qlorax.config import DataSection
from qlorax.data import TokenizedExample, read_data_file, split_dataset, tokenize_examples, tokenize_records
from qlorax.tokenized_cache import TOKEN_SHAPING_KEYS, cache_key, tokenized_once

EXAMPLES = [TokenizedExample(1, [5, 6, 7], [-100, 6, 7]), TokenizedExample(3, [9], [9]),
            TokenizedExample(4, [1, 2, 3, 4], [-100, -100, 3, 4])]


def counting(result: tuple[list[TokenizedExample], int]) -> tuple[list[int], object]:
    calls: list[int] = []

    def tokenize() -> tuple[list[TokenizedExample], int]:
        calls.append(1)
        return result

    return calls, tokenize


def test_the_second_run_reads_the_first_run_s_tokens(tmp_path: Path) -> None:
    calls, tokenize = counting((EXAMPLES, 2))
    first, hit = tokenized_once(tmp_path, "k" * 64, tokenize)
    assert (first, hit, len(calls)) == ((EXAMPLES, 2), False, 1)
    second, hit = tokenized_once(tmp_path, "k" * 64, tokenize)
    assert (second, hit, len(calls)) == ((EXAMPLES, 2), True, 1)
    assert tokenized_once(tmp_path, "j" * 64, tokenize)[1] is False  # another key: tokenized again
    assert len(calls) == 2


def test_a_damaged_or_foreign_file_is_a_miss_and_an_unwritable_home_no_error(tmp_path: Path) -> None:
    calls, tokenize = counting((EXAMPLES, 0))
    tokenized_once(tmp_path, "k" * 64, tokenize)
    stored = tmp_path / f"{'k' * 64}.safetensors"
    stored.write_bytes(stored.read_bytes()[:-7])
    assert tokenized_once(tmp_path, "k" * 64, tokenize) == ((EXAMPLES, 0), False)
    assert tokenized_once(tmp_path, "k" * 64, tokenize)[1] is True  # rewritten whole
    (tmp_path / f"{'m' * 64}.safetensors").write_bytes(stored.read_bytes())  # written for another key
    assert tokenized_once(tmp_path, "m" * 64, tokenize)[1] is False
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert tokenized_once(blocked / "tokenized", "k" * 64, tokenize) == ((EXAMPLES, 0), False)
    assert tokenized_once(None, "k" * 64, tokenize) == ((EXAMPLES, 0), False)
    assert len(calls) == 5


def test_the_key_follows_what_shapes_tokens_and_nothing_else() -> None:
    section = DataSection()
    base = cache_key("d" * 64, "t" * 64, section)
    assert base == cache_key("d" * 64, "t" * 64, DataSection(eval_fraction=0.3, path="elsewhere.jsonl"))
    assert base != cache_key("e" * 64, "t" * 64, section) and base != cache_key("d" * 64, "u" * 64, section)
    changed = {"format": "raw", "columns": {"output": "answer"}, "file_type": "jsonl", "max_length": 64,
               "too_long": "reject", "train_on_inputs": True}
    assert set(changed) == set(TOKEN_SHAPING_KEYS)
    for key, value in changed.items():
        assert cache_key("d" * 64, "t" * 64, DataSection(**{key: value})) != base, key


def test_a_cached_tokenization_gives_the_same_dataset(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from qlorax.model_presets import materialize_preset

    tokenizer = AutoTokenizer.from_pretrained(materialize_preset())
    section = DataSection()
    data = read_data_file(section)
    direct = tokenize_records(data, section, tokenizer, seed=7)
    tokenized_once(tmp_path, "k" * 64, lambda: tokenize_examples(data, section, tokenizer))
    (examples, truncated), hit = tokenized_once(tmp_path, "k" * 64, lambda: (_ for _ in ()).throw(AssertionError))
    assert hit
    cached = split_dataset(examples, truncated, data, section, seed=7)
    assert cached.tokenized_sha256() == direct.tokenized_sha256()
    assert (cached.stats, cached.truncated, len(cached.train)) == (direct.stats, direct.truncated, len(direct.train))


def test_a_second_run_of_the_same_data_reads_its_tokens_and_trains_the_same_bits(tmp_path: Path) -> None:
    """Through the CLI: a data file no run has seen is tokenized by the first run and read back by
    the second (its data phase says so), with the same tokens and adapter."""
    from conftest import TINY_CONFIG, assert_no_traceback, run_cli
    from qlorax.artifacts import read_json
    from qlorax.data import bundled_path

    data = tmp_path / "alpaca.jsonl"
    data.write_text(bundled_path("reproducible_ml_alpaca.jsonl").read_text() + "\n")  # new bytes, same rows
    runs = [tmp_path / "first", tmp_path / "second"]
    for run in runs:
        result = run_cli("train", "-c", str(TINY_CONFIG), "--set", f"data.path={data}", "--set",
                         "training.max_steps=2", "--set", "training.sample_max_new_tokens=2", "--output-dir", str(run))
        assert result.returncode == 0, result.stdout + result.stderr
        assert_no_traceback(result)
    logs = [(run / "train.log").read_text() for run in runs]
    assert "examples/s, cached" not in logs[0] and "examples/s, cached" in logs[1]
    results = [read_json(run / "results.json") for run in runs]
    assert results[0]["data"]["tokenized_sha256"] == results[1]["data"]["tokenized_sha256"]
    summaries = [read_json(run / "artifact_summary.json")["files"]["adapter_model.safetensors"] for run in runs]
    assert summaries[0]["sha256"] == summaries[1]["sha256"]
