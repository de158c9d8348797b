"""What a run's inputs *are*, independent of where they lie: content identities.

A base model or a data file given by a local path is identified by the SHA-256 of its
bytes, never by the path: the same model copied to another directory or machine gives the
same config hash and the same deterministic artifacts. Presets and hub ids are names that
already mean the same bytes everywhere (a preset is materialised byte-identically; a hub id
is pinned by its revision). Torch-free: the CLI computes identities before it launches.
Digests of large directories are cached per process, keyed by each file's size and mtime.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from qlorax.artifacts import canonical_json, read_json, sha256_bytes, sha256_file

# Written by qlorax into every model directory it creates (presets, GGUF conversions):
# the stable id runs record for the model, and where its weights came from.
MODEL_MARKER = "qlorax_model.json"
GGUF_SUFFIX = ".gguf"


def _file_stats(directory: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (path.relative_to(directory).as_posix(), path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    )


@functools.lru_cache(maxsize=16)
def _directory_digest_cached(directory: Path, _stats: tuple[tuple[str, int, int], ...]) -> str:
    entries = {rel: sha256_file(directory / rel) for rel, _, _ in _stats}
    return sha256_bytes(canonical_json(entries).encode())


def directory_digest(directory: Path) -> str:
    """SHA-256 over (relative path, file digest) of every file: one name for a model's bytes."""
    directory = Path(directory).resolve()
    return _directory_digest_cached(directory, _file_stats(directory))


@functools.lru_cache(maxsize=32)
def _file_digest_cached(path: Path, _size: int, _mtime: int) -> str:
    return sha256_file(path)


def file_digest(path: Path) -> str:
    """SHA-256 of one file (cached per process while its size and mtime are unchanged)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _file_digest_cached(path, stat.st_size, stat.st_mtime_ns)


def gguf_file_in(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only .gguf in a folder without a
    config.json. None when `path` is not a GGUF model."""
    if path.is_file() and path.name.endswith(GGUF_SUFFIX):
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.name.endswith(GGUF_SUFFIX) and p.is_file())
        if len(found) == 1:
            return found[0]
    return None


@dataclass(frozen=True)
class ModelMarker:
    """The contents of qlorax_model.json."""

    stable_id: str
    provenance: dict[str, str]


def read_model_marker(directory: Path) -> ModelMarker | None:
    path = Path(directory) / MODEL_MARKER
    if not path.is_file():
        return None
    data = read_json(path)
    return ModelMarker(stable_id=str(data["id"]), provenance=dict(data.get("provenance", {})))


def local_model_identity(path: Path) -> str:
    """`sha256:<digest>` of a local model directory's files, or `gguf-sha256:<digest>` of a GGUF file."""
    gguf = gguf_file_in(path)
    if gguf is not None:
        return f"gguf-sha256:{file_digest(gguf)}"
    return f"sha256:{directory_digest(path)}"


def local_data_identity(path: Path) -> str:
    """`sha256:<digest>` of a local data file."""
    return f"sha256:{file_digest(path)}"
