"""Training data: read and validate a data file, render prompts, tokenize, mask, split, batch.

What a row holds and how it is cut into prompt and completion is its format's (qlorax.formats).

Reading and validation need no torch, so the CLI checks data before it launches a
training process; a malformed line is an error naming file:line (or the row and column of a
Parquet, Arrow or CSV file) — never a silent skip.
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

from qlorax.artifacts import sha256_file
from qlorax.config import DataSection
from qlorax.errors import DataError
from qlorax.formats import data_format, encode, type_name, wraps_in_bos_eos
from qlorax.formats.files import file_type_of, iter_rows

IGNORE_INDEX = -100


@dataclass
class Record:
    """One validated example and where it came from."""

    line: int  # the JSONL line, or the row number in other files
    fields: dict[str, Any]
    where: str = ""  # `file:line` or `file row N`: how errors name it


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
    checkout of that commit; `hf://datasets/ORG/NAME@COMMIT/PATH` → the file downloaded at that
    commit (qlorax.datasource); anything else is a path. Returns (path, display name)."""
    from qlorax.datasource import checkout_git_source, download_hub_source, is_git_source, is_hub_source

    if is_git_source(spec):
        return checkout_git_source(spec, allow_moving_ref).file, spec
    if is_hub_source(spec):
        return download_hub_source(spec, allow_moving_ref).file, spec
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


def _validate_record(obj: Any, section: DataSection, where: str) -> dict[str, Any]:
    """A row must be an object; its columns are renamed as data.columns says; what it must hold
    is the format's to say."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(obj)}")
    if section.columns:
        missing = [column for column in section.columns.values() if column not in obj]
        if missing:
            field = next(f for f, c in section.columns.items() if c == missing[0])
            raise DataError(f"{where}: has no column '{missing[0]}' (data.columns.{field}); its columns are "
                            f"{', '.join(map(str, obj)) or 'none'}")
        obj = {**{k: v for k, v in obj.items() if k not in section.columns},
               **{field: obj[column] for field, column in section.columns.items()}}
    return data_format(section.format).validate(obj, where)


def _open_failure(display: str, exc: OSError) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return DataError(f"data file {display} does not exist (data.path)")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"data file {display} is a directory; data.path must name a file")
    return DataError(f"data file {display} cannot be read: {exc.strerror}")


def read_data_file(section: DataSection) -> DataFile:
    """Read and validate every row, streamed (qlorax.formats.files); the first problem raises
    DataError naming file:line or the row. The identity is the SHA-256 of the file's bytes."""
    path, display = resolve_data_path(section.path, section.allow_moving_ref)
    file_type = file_type_of(path, section.file_type)
    try:
        sha256 = sha256_file(path)
        records = [Record(number, _validate_record(obj, section, where), where)
                   for number, (where, obj) in enumerate(iter_rows(path, file_type, display), start=1)]
    except OSError as exc:
        raise _open_failure(display, exc) from None
    if not records:
        raise DataError(f"data file {display} contains no examples")
    return DataFile(path=path, display=display, sha256=sha256, records=records, commit=git_commit(section))


def git_commit(section: DataSection) -> str | None:
    """The commit a git or Hub data source resolves to (None for other data)."""
    from qlorax.datasource import hub_commit, is_git_source, is_hub_source, resolve_commit

    if is_hub_source(section.path):
        return hub_commit(section.path, section.allow_moving_ref)
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
    examples, truncated = tokenize_examples(data, section, tokenizer)
    return split_dataset(examples, truncated, data, section, seed)


def tokenize_examples(data: DataFile, section: DataSection, tokenizer: Any) -> tuple[list[TokenizedExample], int]:
    """Every record tokenized and masked, in file order, cut to max_length (or refused: too_long);
    returns them and how many were cut (qlorax.tokenized_cache keeps this per file content)."""
    fmt = data_format(section.format)
    examples: list[TokenizedExample] = []
    truncated = 0
    for record in data.records:
        where = record.where or f"{data.display}:{record.line}"
        wrap = wraps_in_bos_eos(fmt, record.fields)
        ids: list[int] = []
        labels: list[int] = []
        if wrap and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for text, is_completion in fmt.segments(record.fields, tokenizer, where):
            piece = encode(tokenizer, text)
            ids.extend(piece)
            keep = is_completion or section.train_on_inputs
            labels.extend(piece if keep else [IGNORE_INDEX] * len(piece))
        if wrap and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if len(ids) > section.max_length:
            if section.too_long == "reject":
                raise DataError(f"{where}: example is {len(ids)} tokens, longer than data.max_length="
                                f"{section.max_length} (set data.too_long: truncate to cut it instead)")
            ids, labels = ids[: section.max_length], labels[: section.max_length]
            truncated += 1
        examples.append(TokenizedExample(record.line, ids, labels))
    return examples, truncated


def split_dataset(examples: list[TokenizedExample], truncated: int, data: DataFile, section: DataSection,
                  seed: int) -> Dataset:
    """The tokenized examples split into train and eval (seeded), with the data's identity and stats."""
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


def collate(examples: list[TokenizedExample], pad_id: int, packed: bool = False) -> dict[str, Any]:
    """Right-pad to the longest example; padding is masked out of attention and loss. `packed`
    (training.packing): the examples joined into one row instead (`pack`)."""
    import torch

    if packed:
        return pack(examples)
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


def pack(examples: list[TokenizedExample]) -> dict[str, Any]:
    """The examples joined into one row without padding (HF's DataCollatorWithFlattening): position
    ids restart at each example, which the model turns into attention kept inside each example,
    and each example's first token is no target (it would be predicted from the previous one's
    last token). No attention_mask: that is what tells the model the row is packed."""
    import torch

    ids = torch.tensor([[token for e in examples for token in e.input_ids]], dtype=torch.long)
    labels = torch.tensor([[label for e in examples for label in [IGNORE_INDEX] * min(1, len(e.labels)) + e.labels[1:]]
                           ], dtype=torch.long)
    positions = torch.tensor([[position for e in examples for position in range(len(e.input_ids))]],
                             dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def input_tokens(batch: dict[str, Any]) -> int:
    """The real (non-padding) tokens of a collated batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
