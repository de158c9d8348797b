"""Tokenize once per dataset content: a data file's tokenized examples, cached by digest.

Tokenizing (a chat template and a BPE pass per example) is repeated by every run of a
verification and every data-parallel worker, and grows with the data. The examples a config
makes from a file depend only on the file's bytes (its SHA-256), the tokenizer (the base model's
content digest covers its tokenizer files and chat template), the data keys that shape tokens
(format, columns, file_type, max_length, too_long, train_on_inputs) and the versions of the
code that renders and tokenizes (qlorax, transformers, tokenizers, jinja2). Those are the key;
the train/eval split (seed, eval_fraction) is made after, from the cached list.

Stored as safetensors (no pickle) under `<qlorax home>/tokenized/`, written atomically; a file
that is damaged or was made for another key is a miss, never an error, and an unwritable home
leaves the run uncached. `QLORAX_TOKENIZE_CACHE=off` turns it off. A hit gives the same token
ids and labels, so the same `tokenized_sha256` and the same training bits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from qlorax import __version__
from qlorax.artifacts import write_bytes_atomic
from qlorax.data import DataFile, Dataset, TokenizedExample, split_dataset, tokenize_examples
from qlorax.settings import tokenized_cache_dir

# The data section's keys that change which tokens an example becomes.
TOKEN_SHAPING_KEYS = ("format", "columns", "file_type", "max_length", "too_long", "train_on_inputs")
_LIBRARIES = ("transformers", "tokenizers", "jinja2")


def cache_key(data_sha256: str, tokenizer_digest: str, section: Any) -> str:
    """The SHA-256 naming one tokenization of one file."""
    versions = {name: _version(name) for name in _LIBRARIES}
    described = {"qlorax": __version__, "data_sha256": data_sha256, "tokenizer": tokenizer_digest,
                 "data": {key: getattr(section, key) for key in TOKEN_SHAPING_KEYS}, "libraries": versions}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


Tokenized = tuple[list[TokenizedExample], int]  # the examples in file order, how many were truncated


def tokenized_once(cache_dir: Path | None, key: str, tokenize: Callable[[], Tokenized]) -> tuple[Tokenized, bool]:
    """(the tokenization, whether it came from the cache): the cached tokenization `key` in
    `cache_dir`, else `tokenize()`, stored there for next time (cache_dir None: no cache)."""
    if cache_dir is None:
        return tokenize(), False
    path = cache_dir / f"{key}.safetensors"
    cached = _load(path, key)
    if cached is not None:
        return cached, True
    examples, truncated = tokenize()
    try:
        _store(path, key, examples, truncated)
    except OSError:  # a read-only or full home: this run goes on uncached
        pass
    return (examples, truncated), False


def tokenized_dataset(data: DataFile, section: Any, tokenizer: Any, tokenizer_digest: str,
                      seed: int) -> tuple[Dataset, bool]:
    """`data` tokenized as `section` says (or read back from the home's cache), split with `seed`;
    and whether it came from the cache."""
    key = cache_key(data.sha256, tokenizer_digest, section)
    (examples, truncated), cached = tokenized_once(tokenized_cache_dir(), key,
                                                   lambda: tokenize_examples(data, section, tokenizer))
    return split_dataset(examples, truncated, data, section, seed), cached


def _load(path: Path, key: str) -> Tokenized | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") != key:
                return None
            ids, labels = handle.get_tensor("input_ids").tolist(), handle.get_tensor("labels").tolist()
            lengths, lines = handle.get_tensor("lengths").tolist(), handle.get_tensor("lines").tolist()
            truncated = int(meta["truncated"])
    except Exception:  # a missing, damaged or foreign file (safetensors' own errors included) is a miss
        return None
    if len(ids) != len(labels) or sum(lengths) != len(ids) or len(lines) != len(lengths):
        return None
    examples, start = [], 0
    for line, length in zip(lines, lengths, strict=True):
        examples.append(TokenizedExample(line, ids[start : start + length], labels[start : start + length]))
        start += length
    return examples, truncated


def _store(path: Path, key: str, examples: list[TokenizedExample], truncated: int) -> None:
    import numpy as np
    from safetensors.numpy import save

    tensors = {
        "input_ids": np.array([token for e in examples for token in e.input_ids], dtype=np.int64),
        "labels": np.array([label for e in examples for label in e.labels], dtype=np.int64),
        "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int64),
        "lines": np.array([e.line for e in examples], dtype=np.int64),
    }
    write_bytes_atomic(path, save(tensors, metadata={"key": key, "truncated": str(truncated)}))
