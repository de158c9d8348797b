"""The data users already have (issue 25, part 1): Parquet, Arrow, CSV and JSON files, the
sharegpt and prompt_completion formats, column mapping and a Hub dataset at a commit.

Every training run here is a real `qlorax train` (2 steps of the tiny config), all started at
once; the Hub dataset comes from the local stand-in (tests/hub_standin.py), never the real Hub."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_clis
from hub_standin import HubStandIn
from qlorax.config import DataSection
from qlorax.data import IGNORE_INDEX, bundled_path, read_data_file, tokenize_records
from qlorax.errors import DataError

TOKEN = "hf_datasetstandintoken0123456789"
FAST = ("--set", "training.max_steps=2", "--set", "training.sample_max_new_tokens=2")


def _alpaca_rows(count: int = 24) -> list[dict[str, Any]]:
    lines = bundled_path("reproducible_ml_alpaca.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def _chat_rows(count: int = 24) -> list[list[dict[str, str]]]:
    lines = bundled_path("reproducible_ml_chat.jsonl").read_text().splitlines()[:count]
    return [json.loads(line)["messages"] for line in lines]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 8) -> Path:
    """Several row groups, so the reader's batches are exercised; a blank input is a null."""
    columns = {key: [row.get(key) or None if key == "input" else row.get(key) for row in rows]
               for key in ("instruction", "input", "output")}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _sharegpt(messages: list[dict[str, str]]) -> dict[str, Any]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


@pytest.fixture(scope="module")
def hub():
    server = HubStandIn(TOKEN).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory, hub: HubStandIn) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("data-formats")
    rows = _alpaca_rows()
    jsonl_rows = [{k: v for k, v in row.items() if k != "input" or v.strip()} for row in rows]
    chats = _chat_rows()
    with (root / "qa.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "answer"])
        writer.writerows([i, row["instruction"], row["output"]] for i, row in enumerate(rows))
    parquet = _parquet(root / "alpaca.parquet", rows)
    commit = hub.add_dataset("org/reproducible", {"data/train.parquet": parquet.read_bytes()})
    hub.add_dataset("org/reproducible", {"data/train.parquet": parquet.read_bytes(), "x": b""}, branch="dev")
    return {
        "root": root,
        "parquet": parquet,
        "jsonl": _jsonl(root / "alpaca.jsonl", jsonl_rows),
        "sharegpt": _jsonl(root / "sharegpt.jsonl", [_sharegpt(m) for m in chats]),
        "prompt_completion": _jsonl(root / "pc.jsonl", [
            {"prompt": f"Question: {row['instruction']}\nAnswer: ", "completion": row["output"]} for row in rows]),
        "conversational": _jsonl(root / "pc_chat.jsonl", [
            {"prompt": m[:-1], "completion": m[-1:]} for m in chats]),
        "csv": root / "qa.csv",
        "hub": f"hf://datasets/org/reproducible@{commit}/data/train.parquet",
        "commit": commit,
    }


def _hub_env(hub: HubStandIn) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def trained(data_files: dict[str, Any], hub: HubStandIn) -> dict[str, dict[str, Any]]:
    """Each data file trained 2 steps, all at once; name -> results.json."""
    root = data_files["root"]
    runs = {
        "parquet": ["--set", "data.format=alpaca"],
        "jsonl": ["--set", "data.format=alpaca"],
        "sharegpt": ["--set", "data.format=sharegpt"],
        "prompt_completion": ["--set", "data.format=prompt_completion"],
        "conversational": ["--set", "data.format=prompt_completion"],
        "csv": ["--set", "data.columns={instruction: question, output: answer}"],
        "hub": ["--set", "data.format=alpaca"],
    }
    commands = [["train", "--config", str(TINY_CONFIG), "--output-dir", str(root / f"run-{name}"), *FAST,
                 "--set", f"data.path={data_files[name]}", *extra] for name, extra in runs.items()]
    results = run_clis(*commands, env=_hub_env(hub))
    found = {}
    for name, result in zip(runs, results, strict=True):
        assert result.returncode == 0, f"{name}: {result.stderr}"
        found[name] = json.loads((root / f"run-{name}" / "results.json").read_text())
    return found


def test_a_parquet_file_trains_as_alpaca(trained: dict[str, dict[str, Any]], data_files: dict[str, Any]) -> None:
    import hashlib

    results = trained["parquet"]
    assert results["steps"] == 2 and results["data"]["format"] == "alpaca"
    assert results["data"]["sha256"] == hashlib.sha256(data_files["parquet"].read_bytes()).hexdigest()
    assert results["train_examples"] + results["eval_examples"] == 24


def test_the_same_rows_as_jsonl_and_parquet_train_identically(trained: dict[str, dict[str, Any]]) -> None:
    """Other bytes (so another data digest and config hash), the same tokens: the same training."""
    parquet, jsonl = trained["parquet"], trained["jsonl"]
    assert parquet["data"]["sha256"] != jsonl["data"]["sha256"]
    assert parquet["data"]["tokenized_sha256"] == jsonl["data"]["tokenized_sha256"]
    for key in ("initial_train_loss", "final_train_loss", "eval_loss", "train_tokens", "eval_tokens"):
        assert parquet[key] == jsonl[key], key


def test_sharegpt_and_prompt_completion_files_train(trained: dict[str, dict[str, Any]]) -> None:
    for name, fmt in (("sharegpt", "sharegpt"), ("prompt_completion", "prompt_completion"),
                      ("conversational", "prompt_completion")):
        assert trained[name]["steps"] == 2 and trained[name]["data"]["format"] == fmt
    # the conversational rows are the bundled chat rows: the same tokens as sharegpt's
    assert trained["conversational"]["data"]["tokenized_sha256"] == trained["sharegpt"]["data"]["tokenized_sha256"]


def test_a_csv_file_with_other_column_names_trains_with_data_columns(trained: dict[str, dict[str, Any]]) -> None:
    assert trained["csv"]["steps"] == 2 and trained["csv"]["train_examples"] + trained["csv"]["eval_examples"] == 24


def test_a_hub_dataset_pinned_to_a_commit_trains_from_the_stand_in(
        trained: dict[str, dict[str, Any]], data_files: dict[str, Any], hub: HubStandIn) -> None:
    results = trained["hub"]
    assert results["data"]["commit"] == data_files["commit"]
    assert results["data"]["sha256"] == trained["parquet"]["data"]["sha256"]
    assert results["data"]["tokenized_sha256"] == trained["parquet"]["data"]["tokenized_sha256"]
    assert any(path.startswith("/datasets/org/reproducible/resolve/") for _, path, _ in hub.requests)
    metadata = json.loads((data_files["root"] / "run-hub" / "training_metadata.json").read_text())
    source = metadata["data_source"]
    assert (source["kind"], source["repo"], source["commit"]) == ("hub", "org/reproducible", data_files["commit"])
    assert Path(source["file"]).is_relative_to(Path(os.environ["QLORAX_HOME"]) / "hub")


def test_sharegpt_and_conversational_labels_are_the_assistant_turns(data_files: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    from qlorax.model import materialize_preset

    tokenizer = AutoTokenizer.from_pretrained(materialize_preset())
    for name, fmt in (("sharegpt", "sharegpt"), ("conversational", "prompt_completion"),
                      ("prompt_completion", "prompt_completion")):
        section = DataSection(path=str(data_files[name]), format=fmt, eval_fraction=0.0)
        dataset = tokenize_records(read_data_file(section), section, tokenizer, seed=1)
        rows = _alpaca_rows()
        for example in dataset.train[:4]:
            learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                                        if label != IGNORE_INDEX])
            row = rows[example.line - 1]
            assert row["output"].strip()[:20] in learned, name
            assert row["instruction"].strip()[:20] not in learned, name


def _bad_parquet(path: Path) -> Path:
    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "output": ["x", "y", None]}), path)
    return path


def test_bad_rows_and_refs_are_exit_2_naming_them(data_files: dict[str, Any], hub: HubStandIn) -> None:
    root = data_files["root"]
    (root / "short.csv").write_text("question,answer\nq1,a1\nq2,a2\nq3\n")
    role = _jsonl(root / "role.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    private = hub.add_dataset("org/private", {"train.jsonl": data_files["jsonl"].read_bytes()}, private=True)
    cases = {
        "parquet-null": (["--set", f"data.path={_bad_parquet(root / 'bad.parquet')}"],
                         ["bad.parquet row 3", "'output'"]),
        "csv-short": (["--set", f"data.path={root / 'short.csv'}",
                       "--set", "data.columns={instruction: question, output: answer}"],
                      ["short.csv line 4", "has 1 column(s) where the header has 2 (question, answer)"]),
        "csv-unmapped": (["--set", f"data.path={data_files['csv']}"], ["qa.csv row 1", "'instruction'"]),
        "csv-missing-column": (["--set", f"data.path={data_files['csv']}",
                                "--set", "data.columns={instruction: prompt, output: answer}"],
                               ["qa.csv row 1", "no column 'prompt' (data.columns.instruction)"]),
        "sharegpt-role": (["--set", f"data.path={role}", "--set", "data.format=sharegpt"],
                          ["role.jsonl:1", "conversations[0].from is 'bot'"]),
        "hub-branch": (["--set", f"data.path={data_files['hub'].replace(data_files['commit'], 'dev')}"],
                       ["'dev' is not a 40-hex commit", "data.allow_moving_ref"]),
        "hub-private-no-token": (["--set", f"data.path=hf://datasets/org/private@{private}/train.jsonl"],
                                 ["does not exist (or is private: pass --token-file)"]),
    }
    commands = [["train", "--config", str(TINY_CONFIG), "--output-dir", str(root / f"bad-{name}"), *FAST, *extra]
                for name, (extra, _) in cases.items()]
    for (name, (_, expected)), result in zip(cases.items(), run_clis(*commands, env=_hub_env(hub)), strict=True):
        assert result.returncode == 2, f"{name}: {result.stderr}"
        assert_no_traceback(result)
        for text in expected:
            assert text in result.stderr, f"{name}: {result.stderr}"
        assert not (root / f"bad-{name}").exists(), name


def test_every_file_type_reads_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON arrays (decoded across small chunks, multi-byte characters split between them), Arrow
    IPC files and streams, Parquet and CSV give the rows JSONL gives; no torch needed."""
    from qlorax.formats import files

    monkeypatch.setattr(files, "_CHUNK_BYTES", 7)
    rows = [{"instruction": f"Übersetze {i} → ✓", "output": f"résumé {i}"} for i in range(5)]
    table = pa.table({"instruction": [r["instruction"] for r in rows], "output": [r["output"] for r in rows]})
    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    with pa.OSFile(str(tmp_path / "stream.bin"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    (tmp_path / "rows.json").write_text(" [\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    with (tmp_path / "rows.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["instruction", "output"], *[[r["instruction"], r["output"]] for r in rows]])
    expected = [dict(r, input="") for r in rows]
    for name, file_type in (("rows.json", "auto"), ("rows.arrow", "auto"), ("stream.bin", "arrow"),
                            ("rows.parquet", "auto"), ("rows.csv", "auto"), ("rows.json", "json")):
        data = read_data_file(DataSection(path=str(tmp_path / name), file_type=file_type))
        assert [record.fields for record in data.records] == expected, name
    assert read_data_file(DataSection(path=str(tmp_path / "rows.json"))).records[4].where.endswith("element 5")
    (tmp_path / "open.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"')
    with pytest.raises(DataError, match=r"open\.json element 2: invalid JSON"):
        read_data_file(DataSection(path=str(tmp_path / "open.json")))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        read_data_file(DataSection(path=str(tmp_path / "fake.parquet")))


def test_csv_from_a_spreadsheet_reads_as_text(tmp_path: Path) -> None:
    """A byte-order mark, a blank line, a quoted newline, an empty field and a field longer than
    csv's default 128 KiB limit: all read as the text a spreadsheet shows."""
    from qlorax.formats.files import iter_rows

    long_text = "x" * (200 << 10)
    path = tmp_path / "sheet.csv"
    path.write_bytes(("\ufeffinstruction,output\r\n\"two\nlines\",\r\n\r\n" f"long,{long_text}\r\n").encode())
    rows = list(iter_rows(path, "csv", "sheet.csv"))
    assert rows == [("sheet.csv row 1", {"instruction": "two\nlines", "output": ""}),
                    ("sheet.csv row 2", {"instruction": "long", "output": long_text})]
    path.write_bytes(b'instruction,output\n"open quote,x\n')
    with pytest.raises(DataError, match=r"sheet.csv line \d: cannot be read as CSV"):
        list(iter_rows(path, "csv", "sheet.csv"))
