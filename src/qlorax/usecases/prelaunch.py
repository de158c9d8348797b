"""The checks every launch makes once, in the parent, before anything is written.

`train`, `resume` and `verify` share them: the data source pinned to a commit, the token
read and registered as a secret, no secret in the config, the data parsed and the model
path checked, the tracking server's extra present, the worker count possible; then the
inputs resolved once (qlorax.inputs) for the payload, the cache key and the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlorax import settings
from qlorax.config import QloraxConfig, parse_config
from qlorax.data import DataFile, read_data_file
from qlorax.datasource import hub_commit, is_git_source, is_hub_source, parse_hub_source, pinned_spec
from qlorax.errors import ConfigError
from qlorax.inputs import ResolvedInputs, resolve_inputs
from qlorax.model import local_model_dir
from qlorax.usecases import runops


@dataclass
class Launch:
    """What the checks established: the config to run (data pinned), its resolved inputs, and
    the secret environment the child gets."""

    config: QloraxConfig
    inputs: ResolvedInputs
    secrets: dict[str, str]


def pin_data_source(config: QloraxConfig) -> QloraxConfig:
    """A git data source named by a tag, a short sha or (with allow_moving_ref) a branch,
    replaced by its full commit sha: the training process, the recorded config and a later
    `qlorax resume` then read exactly the commit this process resolved, even if the ref moves."""
    if is_hub_source(config.data.path):  # a Hub revision that moves: replaced by the commit it names now
        repo, revision, inner = parse_hub_source(config.data.path)
        commit = hub_commit(config.data.path, config.data.allow_moving_ref)
        if commit == revision:
            return config
        form = config.canonical()
        form["data"]["path"] = f"hf://datasets/{repo}@{commit}/{inner}"
        return parse_config(form, "resolved config")
    if not is_git_source(config.data.path):
        return config
    form = config.canonical()
    form["data"]["path"] = pinned_spec(config.data.path, config.data.allow_moving_ref)
    return parse_config(form, "resolved config")


def check_inputs(config: QloraxConfig) -> DataFile:
    """Fail fast, before launching: the data file parses and the model path exists."""
    data = read_data_file(config.data)
    local_model_dir(config.model)
    return data


def check_workers(config: QloraxConfig, workers: int) -> None:
    """Data-parallel training shares out each step's micro-batches: more workers than
    gradient_accumulation_steps would leave some idle (and is refused, exit 2)."""
    accumulation = config.training.gradient_accumulation_steps
    if workers > accumulation:
        raise ConfigError(f"--workers {workers}: training.gradient_accumulation_steps is {accumulation}, and the "
                          f"workers share out each optimizer step's {accumulation} micro-batch(es), so at most "
                          f"{accumulation} worker(s) can train this config. Raise gradient_accumulation_steps (and "
                          "lower batch_size to keep the effective batch) or use fewer workers.")


def prepare_launch(config: QloraxConfig, options: runops.RunOptions, workers: int = 1) -> Launch:
    """Every pre-launch check, once; the inputs resolved once from the data this process read."""
    check_workers(config, workers)
    secrets = runops.secret_environment(options)
    with settings.temporary_environ(secrets):  # the --token-file token, for a private Hub dataset
        config = pin_data_source(config)
        runops.refuse_secrets_in_config(config)
        data = check_inputs(config)
    runops.check_tracking(options)
    return Launch(config, resolve_inputs(config, data.sha256), secrets)
