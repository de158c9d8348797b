"""Training data: read and validate JSONL, render prompts, tokenize, mask, split, batch.

What a row holds and how it is cut into prompt and completion is its format's (qlorax.formats).

Reading and validation need no torch, so the CLI checks data before it launches a
training process; a malformed line is an error naming file:line — never a silent skip.
Tokenization happens in the training process with the base model's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qlorax.artifacts import sha256_bytes
from qlorax.config import DataSection
from qlorax.errors import DataError
from qlorax.formats import data_format, encode, type_name

IGNORE_INDEX = -100


@dataclass
class Record:
    """One validated example and where it came from."""

    line: int
    fields: dict[str, Any]


@dataclass
class DataFile:
    path: Path
    display: str
    sha256: str
    records: list[Record]
    commit: str | None = None  # the commit of a git source (qlorax.datasource)


@dataclass
class TokenizedExample:
    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class Dataset:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    data_sha256: str
    truncated: int = 0
    data_commit: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def tokenized_sha256(self) -> str:
        """SHA-256 of what the model is fed: every example's token ids and labels, train split
        then eval split, in order. Same file, other ids (a tokenizer or transformers change)
        shows up here, so the analysis can name it instead of a loss difference at step 1."""
        digest = hashlib.sha256()
        for split in (self.train, self.eval):
            for example in split:
                digest.update(json.dumps([example.input_ids, example.labels], separators=(",", ":")).encode())
                digest.update(b"\n")
            digest.update(b"--\n")
        return digest.hexdigest()


def resolve_data_path(spec: str, allow_moving_ref: bool = False) -> tuple[Path, str]:
    """`builtin:NAME` → the bundled file; `git+URL@REF#PATH` → the file in a clean, read-only
    checkout of that commit (qlorax.datasource); anything else is a path. Returns (path, display name)."""
    from qlorax.datasource import checkout_git_source, is_git_source

    if is_git_source(spec):
        return checkout_git_source(spec, allow_moving_ref).file, spec
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = Path(str(resources.files("qlorax") / "presets" / "data" / f"{name}.jsonl"))
        if not path.is_file():
            raise DataError(f"data.path: there is no bundled dataset named '{name}' "
                            "(try builtin:reproducible_ml_alpaca)")
        return path, spec
    return Path(spec), spec


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("qlorax") / "presets" / "data" / name))


def _validate_record(obj: Any, fmt: str, where: str) -> dict[str, Any]:
    """A JSONL line must be an object; what it must hold is the format's to say."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(obj)}")
    return data_format(fmt).validate(obj, where)


def read_data_file(section: DataSection) -> DataFile:
    """Read and validate every line; the first problem raises DataError naming file:line."""
    path, display = resolve_data_path(section.path, section.allow_moving_ref)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {display} does not exist (data.path)") from None
    except IsADirectoryError:
        raise DataError(f"data file {display} is a directory; data.path must name a JSONL file") from None
    except OSError as exc:
        raise DataError(f"data file {display} cannot be read: {exc.strerror}") from None
    records: list[Record] = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{display}:{number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not valid UTF-8 (byte 0x{line_bytes[exc.start]:02x} at column "
                            f"{exc.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        records.append(Record(number, _validate_record(obj, section.format, where)))
    if not records:
        raise DataError(f"data file {display} contains no examples")
    return DataFile(path=path, display=display, sha256=sha256_bytes(raw), records=records,
                    commit=git_commit(section))


def git_commit(section: DataSection) -> str | None:
    """The commit a git data source resolves to (None for other data)."""
    from qlorax.datasource import is_git_source, resolve_commit

    return resolve_commit(section.path, section.allow_moving_ref) if is_git_source(section.path) else None


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A train/eval split from a seeded PCG64 permutation (same on every platform)."""
    import numpy as np

    from qlorax.determinism import derive_seed

    eval_count = 0 if eval_fraction == 0 or count < 2 else max(1, math.floor(count * eval_fraction))
    permutation = np.random.Generator(np.random.PCG64(derive_seed(seed, "eval_split"))).permutation(count)
    eval_ids = sorted(int(i) for i in permutation[:eval_count])
    train_ids = sorted(int(i) for i in permutation[eval_count:])
    return train_ids, eval_ids


def tokenize_records(data: DataFile, section: DataSection, tokenizer: Any, seed: int) -> Dataset:
    """Tokenize, mask prompts (unless train_on_inputs), enforce max_length, split."""
    fmt = data_format(section.format)
    examples: list[TokenizedExample] = []
    truncated = 0
    for record in data.records:
        where = f"{data.display}:{record.line}"
        ids: list[int] = []
        labels: list[int] = []
        if fmt.adds_bos_eos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for text, is_completion in fmt.segments(record.fields, tokenizer, where):
            piece = encode(tokenizer, text)
            ids.extend(piece)
            keep = is_completion or section.train_on_inputs
            labels.extend(piece if keep else [IGNORE_INDEX] * len(piece))
        if fmt.adds_bos_eos and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if len(ids) > section.max_length:
            if section.too_long == "reject":
                raise DataError(f"{where}: example is {len(ids)} tokens, longer than data.max_length="
                                f"{section.max_length} (set data.too_long: truncate to cut it instead)")
            ids, labels = ids[: section.max_length], labels[: section.max_length]
            truncated += 1
        examples.append(TokenizedExample(record.line, ids, labels))
    train_ids, eval_ids = split_indices(len(examples), section.eval_fraction, seed)
    train = [examples[i] for i in train_ids]
    evaluation = [examples[i] for i in eval_ids]
    if not any(example.trainable_tokens for example in train):
        raise DataError(f"{data.display}: no training example has a completion token left after masking "
                        "and truncation (raise data.max_length or set train_on_inputs)")
    return Dataset(
        train=train,
        eval=evaluation,
        data_sha256=data.sha256,
        truncated=truncated,
        data_commit=data.commit,
        stats={
            "examples": len(examples),
            "train_examples": len(train),
            "eval_examples": len(evaluation),
            "truncated_examples": truncated,
            "max_tokens": max(len(e.input_ids) for e in examples),
        },
    )


# --------------------------------------------------------------------------- batches


def micro_batch_indices(num_examples: int, batch_size: int, seed: int, micro_batch: int) -> list[int]:
    """Example indices of the `micro_batch`-th micro-batch of the infinite, epoch-shuffled stream.

    A pure function of (seed, micro_batch): a resumed run draws the same batches without replay."""
    import torch

    from qlorax.determinism import derive_seed

    per_epoch = num_examples // batch_size
    epoch, position = divmod(micro_batch, per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, f"data_order:{epoch}"))
    order = torch.randperm(num_examples, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
