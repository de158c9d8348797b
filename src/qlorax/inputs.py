"""A run's inputs, resolved once: what the model and the data *are*, and the config hash.

The parent resolves them before it launches (hashing the model directory and the data file
once), records them and puts them in the job payload; the child takes them from there and
checks them against the bytes it reads anyway (the data file's digest), instead of walking
the model directory and hashing the data again. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlorax.config import QloraxConfig
from qlorax.datasource import git_identity, hub_commit, is_git_source, is_hub_source, parse_hub_source
from qlorax.errors import DataError
from qlorax.identity import local_data_identity
from qlorax.model import model_identity


@dataclass(frozen=True)
class ResolvedInputs:
    """The identities a run records (deterministic files, cache key, audit log)."""

    model: str  # `sha256:<content digest>` whatever the naming, `gguf-sha256:` of another GGUF, or a hub id
    data: str  # a bundled dataset's name, `git:<commit>#<path>`, or `sha256:` of a local file
    config_hash: str
    data_sha256: str | None = None  # the data bytes the parent read (checked by the child)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResolvedInputs:
        return cls(model=str(data["model"]), data=str(data["data"]), config_hash=str(data["config_hash"]),
                   data_sha256=data.get("data_sha256"))

    def check_data(self, source: str, sha256: str) -> None:
        """The child read the data the parent resolved (not a file changed in between)."""
        if self.data_sha256 is not None and sha256 != self.data_sha256:
            raise DataError(f"{source} changed after the run was launched (sha256 {sha256[:12]}…, launched with "
                            f"{self.data_sha256[:12]}…); start the run again on the data you mean to train on")


def data_identity(spec: str, allow_moving_ref: bool = False) -> str:
    """What the config hash records for `data.path`: a bundled dataset's name, a git source's
    `git:<commit>#<path>`, a Hub dataset's `hf:<repo>@<commit>#<path>` (qlorax.datasource), or
    the content digest of a local file (a missing file keeps its name; reading it fails later,
    clearly)."""
    if spec.startswith("builtin:"):
        return spec
    if is_git_source(spec):
        return git_identity(spec, allow_moving_ref)
    if is_hub_source(spec):  # the repository, the commit the revision names now, the file
        repo, _, inner = parse_hub_source(spec)
        return f"hf:{repo}@{hub_commit(spec, allow_moving_ref)}#{inner}"
    path = Path(spec).expanduser()
    return local_data_identity(path) if path.is_file() else spec


def resolve_inputs(config: QloraxConfig, data_sha256: str | None = None) -> ResolvedInputs:
    """The identities of `config`'s model and data, and its config hash, computed once."""
    identities = _Identities(model_identity(config.model),
                             data_identity(config.data.path, config.data.allow_moving_ref))
    return ResolvedInputs(model=identities.model, data=identities.data,
                          config_hash=config.config_hash(identities), data_sha256=data_sha256)


def config_hash(config: QloraxConfig) -> str:
    """The config hash of `config` (resolving its inputs): for commands that only show it."""
    return resolve_inputs(config).config_hash


def portable_form(config: QloraxConfig, inputs: ResolvedInputs | None = None) -> dict[str, Any]:
    """The config as deterministic artifacts record it (local paths replaced by identities)."""
    return config.portable_form(inputs or resolve_inputs(config))


@dataclass(frozen=True)
class _Identities:
    model: str
    data: str
