"""What a run's inputs *are*, independent of where they lie or how they are named.

A base model is identified by the content digest of the files that define it (weights, config,
tokenizer, chat template, generation config): the same bytes named as a preset, a directory,
the same preset's GGUF file or a copy in another directory give the same config hash and the
same deterministic artifacts. A hub id stays a name pinned by its revision. A data file is
identified by the SHA-256 of its bytes. Torch-free: the CLI computes identities before it
launches. Digests of large directories are cached per process, keyed by each file's size and
mtime.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from qlorax.artifacts import canonical_json, read_json, sha256_bytes, sha256_file
from qlorax.saved_configs import is_saved_config, normalised_bytes

# Written by qlorax into every model directory it creates (presets, GGUF conversions):
# the stable id runs record for the model, and where its weights came from.
MODEL_MARKER = "qlorax_model.json"
GGUF_SUFFIX = ".gguf"
CONTENT_PREFIX = "sha256:"


# Files a model directory may hold that no loader reads: documentation and licences (the model
# card), and qlorax's own marker (names and provenance). Hidden files and folders (.gitattributes,
# .git/, the .cache/ that `hf download --local-dir` writes) are never part of a model either.
DOCUMENTATION_STEMS = frozenset({"README", "LICENSE", "LICENCE", "NOTICE", "COPYING", "CITATION"})
DOCUMENTATION_SUFFIXES = (".md", ".markdown")


def is_model_content(relative: str) -> bool:
    """Whether a file (its path relative to the model directory) is part of the model's
    content: everything except hidden paths, documentation and licences, and qlorax's marker.
    The rule excludes what is known to be unread rather than listing what is read, so a file
    qlorax does not know about counts: two models can at worst look different, never alike."""
    parts = relative.split("/")
    name = parts[-1]
    if any(part.startswith(".") for part in parts) or relative == MODEL_MARKER:
        return False
    return not (name.lower().endswith(DOCUMENTATION_SUFFIXES) or name.split(".")[0].upper() in DOCUMENTATION_STEMS)


def _file_stats(directory: Path, content_only: bool) -> tuple[tuple[str, int, int], ...]:
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        counted = is_model_content(relative) if content_only else not path.name.startswith(".")
        if counted and path.is_file():
            found.append((relative, path.stat().st_size, path.stat().st_mtime_ns))
    return tuple(found)


def _content_file_digest(path: Path) -> str:
    """A content file's digest; a saved `*config.json` without the keys that say how a process
    loaded it (`local_files_only`, `is_local`, ...: qlorax.saved_configs), which change with
    HF_HUB_OFFLINE when the model is saved but never what it computes."""
    if is_saved_config(path.name):
        return sha256_bytes(normalised_bytes(path.name, path.read_bytes()))
    return sha256_file(path)


@functools.lru_cache(maxsize=16)
def _directory_digest_cached(directory: Path, stats: tuple[tuple[str, int, int], ...], content_only: bool) -> str:
    digest = _content_file_digest if content_only else sha256_file
    entries = {rel: digest(directory / rel) for rel, _, _ in stats}
    return sha256_bytes(canonical_json(entries).encode())


def directory_digest(directory: Path) -> str:
    """SHA-256 over (relative path, file digest) of every file but hidden ones, README and
    marker included: what runs recorded as their base model's digest before the content digest."""
    directory = Path(directory).resolve()
    return _directory_digest_cached(directory, _file_stats(directory, content_only=False), False)


def model_content_digest(directory: Path) -> str:
    """The model's identity: SHA-256 over (relative path, file digest) of its content files
    (`is_model_content`), saved configs without their loading settings. For a directory with
    neither documentation, marker nor such settings it equals `directory_digest`."""
    directory = Path(directory).resolve()
    return _directory_digest_cached(directory, _file_stats(directory, content_only=True), True)


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


def content_identity(digest: str) -> str:
    """How the config hash names a model's content."""
    return f"{CONTENT_PREFIX}{digest}"


def local_model_identity(path: Path) -> str:
    """`sha256:<content digest>` of a local model directory, or `gguf-sha256:<digest>` of a GGUF
    file (whose converted directory is known only once converted)."""
    gguf = gguf_file_in(path)
    if gguf is not None:
        return f"gguf-sha256:{file_digest(gguf)}"
    return content_identity(model_content_digest(path))


def local_data_identity(path: Path) -> str:
    """`sha256:<digest>` of a local data file."""
    return f"sha256:{file_digest(path)}"
