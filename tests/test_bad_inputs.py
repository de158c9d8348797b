"""Bad input never produces a traceback or a directory that looks like a finished run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, BackgroundCli, assert_no_traceback, run_cli
from qlorax.artifacts import read_json
from qlorax.layout import MANIFEST
from small_disk import SmallDisk

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi there, reproducible world."}


def jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def many_good(count: int = 12) -> list[dict[str, str]]:
    return [{**GOOD, "instruction": f"Say hi number {i}."} for i in range(count)]


@dataclass
class Case:
    name: str
    config: str | None = None  # YAML text; {data} is replaced by the data file path
    data: str | bytes | None = None  # data file content (written to data.jsonl)
    args: tuple[str, ...] = ()
    prepare: Callable[[Path], None] | None = None
    fragment: str = ""
    exit_code: int = 2


def _finished_output(out: Path) -> None:
    out.mkdir()
    (out / MANIFEST).write_text("{}")


CASES = [
    Case("invalid yaml", config="training: [max_steps: 3\n", fragment="invalid YAML at line"),
    Case("top level not a mapping", config="- a\n- b\n", fragment="top level must be a mapping"),
    Case("section not a mapping", config="training: 5\n", fragment="section 'training' must be a mapping"),
    Case("unknown section", config="trainig:\n  max_steps: 3\n", fragment="did you mean 'training'"),
    Case("misspelled key", config="lora:\n  rank: 4\n", fragment="unknown key 'rank' in section 'lora'"),
    Case("wrong type", config="training:\n  max_steps: ten\n", fragment="training.max_steps"),
    Case("zero steps", config="training:\n  max_steps: 0\n", fragment="greater than or equal to 1"),
    Case("negative learning rate", config="training:\n  learning_rate: -0.1\n",
         fragment="training.learning_rate: Input should be greater than 0"),
    Case("dropout out of range", config="lora:\n  dropout: 1.5\n", fragment="lora.dropout"),
    Case("unknown format", config="data:\n  format: csv\n", fragment="data.format"),
    Case("missing config file", args=("--config", "/nonexistent/qlorax.yaml"), fragment="does not exist"),
    Case("missing target modules", config="lora:\n  target_modules: [query, value]\n",
         fragment="its linear modules are: down_proj, gate_proj"),
    Case("missing data file", config="data:\n  path: /nonexistent/data.jsonl\n",
         fragment="data file /nonexistent/data.jsonl does not exist"),
    Case("empty data file", config="data:\n  path: {data}\n", data="", fragment="contains no examples"),
    Case("invalid json", config="data:\n  path: {data}\n", data=jsonl(GOOD, '{"instruction": "x",'),
         fragment="data.jsonl:2: invalid JSON"),
    Case("missing field", config="data:\n  path: {data}\n", data=jsonl(GOOD, {"instruction": "x"}),
         fragment="data.jsonl:2: missing required field 'output'"),
    Case("wrong field type", config="data:\n  path: {data}\n", data=jsonl(GOOD, {"instruction": 3, "output": "y"}),
         fragment="data.jsonl:2: field 'instruction' must be a string, got integer"),
    Case("not utf-8", config="data:\n  path: {data}\n",
         data=jsonl(GOOD).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
         fragment="data.jsonl:2: not valid UTF-8"),
    Case("chat without assistant", config="data:\n  path: {data}\n  format: chat\n",
         data=jsonl({"messages": [{"role": "user", "content": "hi"}]}), fragment="data.jsonl:1: the last message"),
    Case("raw missing text", config="data:\n  path: {data}\n  format: raw\n", data=jsonl({"body": "x"}),
         fragment="data.jsonl:1: missing required field 'text'"),
    Case("example too long (reject)", config="data:\n  path: {data}\n  max_length: 16\n  too_long: reject\n",
         data=jsonl(*many_good()), fragment="longer than data.max_length=16"),
    Case("too few examples for a batch", config="data:\n  path: {data}\ntraining:\n  batch_size: 64\n",
         data=jsonl(*many_good()), fragment="fewer than training.batch_size=64"),
    Case("missing model path", config="model:\n  name_or_path: /nonexistent/model\n",
         fragment="the local model /nonexistent/model does not exist"),
    Case("model dir without config.json", config="model:\n  name_or_path: {tmp}\n",
         fragment="is neither a Hugging Face model directory (no config.json) nor a GGUF file"),
    Case("unwritable output directory", args=("--output-dir", "{tmp}/file/run"),
         prepare=lambda tmp: (tmp / "file").write_text("x"), fragment="is not writable"),
    Case("finished output directory", args=("--output-dir", "{tmp}/done"),
         prepare=lambda tmp: _finished_output(tmp / "done"), fragment="refusing to overwrite"),
    Case("bad --set", args=("--set", "max_steps=3"), fragment="expected section.key=value"),
]


def case_args(case: Case, tmp_path: Path) -> list[str]:
    """Write the case's files into tmp_path; the `qlorax train` arguments that read them."""
    data_path = tmp_path / "data.jsonl"
    if case.data is not None:
        data_path.write_bytes(case.data if isinstance(case.data, bytes) else case.data.encode())
    if case.prepare:
        case.prepare(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    if case.config is not None:
        config = tmp_path / "config.yaml"
        config.write_text(case.config.replace("{data}", str(data_path)).replace("{tmp}", str(tmp_path)))
        args = ["--config", str(config), *args]
    output = tmp_path / "run"
    if "--output-dir" not in args:
        args += ["--output-dir", str(output)]
    if "--config" not in args:
        args += ["--config", str(TINY_CONFIG)]
    return args


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, BackgroundCli]]]:
    """Every case's `qlorax train` started at once, each in its own folder and fresh interpreter
    (most stop in the parent within a second; the few that reach the training child overlap)."""
    started = {}
    for index, case in enumerate(CASES):
        folder = tmp_path_factory.mktemp(f"bad-input-{index:02d}")
        started[case.name] = (folder, BackgroundCli("train", *case_args(case, folder)))
    yield started
    for _, command in started.values():
        if command.process.poll() is None:  # a test failed before waiting for it
            command.process.terminate()
            command.result(timeout=120)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, launched: dict[str, tuple[Path, BackgroundCli]]) -> None:
    tmp_path, command = launched[case.name]
    result = command.result(timeout=600)
    assert result.returncode == case.exit_code, result.stderr
    assert_no_traceback(result)
    assert case.fragment in " ".join(result.stderr.split()), result.stderr
    assert len(result.stderr.strip().splitlines()) <= 8, "one paragraph, not a dump"
    for manifest in tmp_path.rglob(MANIFEST):
        assert manifest.parent.name == "done", f"{manifest} looks like a finished run"


def test_truncation_is_counted_in_results(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(*many_good(12)))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {data}\n  max_length: 12\n  eval_fraction: 0.2\n  train_on_inputs: true\n"
                      "training:\n  max_steps: 2\n  batch_size: 4\n  warmup_steps: 0\n")
    result = run_cli("train", "--config", str(config), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert read_json(tmp_path / "run" / "results.json")["truncated_examples"] == 12


def test_full_disk_is_exit_2_and_leaves_no_finished_run(tmp_path: Path) -> None:
    """A run on a 400 KiB tmpfs (mounted in a user namespace where this user may not mount one):
    the disk fills before the first checkpoint; exit 2, one paragraph, no manifest."""
    disk = SmallDisk(tmp_path / "small", "400k")
    try:
        result = disk.run_cli("train", "--config", str(TINY_CONFIG), "--output-dir", str(disk.path / "run"))
        assert result.returncode == 2, result.stderr
        assert_no_traceback(result)
        message = " ".join(result.stderr.split())
        assert f"the disk is full while writing into {disk.path / 'run'}" in message, result.stderr
        assert len(result.stderr.strip().splitlines()) <= 8, "one paragraph, not a dump"
        assert (disk.view / "run").is_dir() and not (disk.view / "run" / MANIFEST).exists()
    finally:
        disk.close()
