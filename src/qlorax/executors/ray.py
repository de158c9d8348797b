"""The Ray executor for `qlorax verify`: one fresh Ray worker process per run, on any node.

It mirrors `qlorax.executors.local.run_local` (same RunSpec in, same {run index: exit code} out) so
that the CLI analyses the run directories the same way whichever executor produced them.

Design, and why:

* Each run is a Ray core task with `max_calls=1`, so every run gets a fresh worker process,
  and `num_cpus=<threads of the run>`, so Ray's CPU accounting decides how many runs share a
  node. The task calls `qlorax.launcher.launch_training`, which starts its own pinned child
  (`python -m qlorax.worker`): Ray's own OMP_NUM_THREADS in the worker does not matter, the
  launcher replaces it, and the run records its thread count in env.json.
* The config travels as its canonical dict (plain JSON types) and is re-validated on the
  worker; the results come back as plain bytes. Nothing of ours is pickled.
* Every attempt of a run trains into a *fresh* directory of its own. Ray retries a task whose
  worker died (`max_retries=2`); the training child of a killed worker can outlive it for a
  moment (Ray kills the worker's process group, `process_group_cleanup_enabled` on clusters we
  start, but not instantly), and a fresh directory per attempt means such an orphan can never
  write into the directory of the attempt that succeeds. The driver only ever takes the files
  of the attempt whose result it received.
* Artifacts reach the driver's output directory in one of two ways:
  - without `shared_dir`, the task trains under the worker node's temp dir and returns the
    run directory's files as {relative path: bytes} through the object store (checkpoints/,
    the lock file and temp files excluded); the driver writes them under spec.run_dir,
    artifact_summary.json last, so an interrupted copy never looks like a finished run;
  - with `shared_dir` (a directory every node and the driver can read and write, e.g. NFS),
    the task trains into `shared_dir/.qlorax-ray-<id>/<run name>/attempt-*/` and returns only
    that path; the driver moves the files into spec.run_dir (a rename when both are on the
    same filesystem) and removes the attempt directories. Use it when adapters are too large
    for the object store.
  Either way the bytes are unchanged, so the manifest still matches (`qlorax check` passes);
  the driver re-checks every successful run against its manifest after materialising it.
* A run whose attempts all fail (worker crashes beyond the retries, node loss, an exception in
  the task) gets exit code 1 and the error in log_dir/<run name>.log; run_ray never raises for
  a failed run. It raises QloraxError only for problems found before anything starts (Ray not
  installed, an output directory refused, a thread count no node can satisfy).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlorax.artifacts import check_run_dir
from qlorax.errors import EXIT_CHECK_FAILED, QloraxError, ResourceError
from qlorax.executors.base import TrainRequest
from qlorax.executors.ray_common import (
    BASE_PREFIX,
    executor_facts,
    load_ray,
    move_files,
    prepare_shared_base,
    run_files,
    start_ray,
    write_files,
)
from qlorax.inputs import ResolvedInputs
from qlorax.verify import RunSpec

MAX_RETRIES = 2


class RayExecutor:
    """Ray tasks on an existing cluster (`address`) or on a local one started for the call."""

    name = "ray"
    supports_resume = False  # rank 0's checkpoints are removed with its node's working directory
    supports_emulation = False
    supports_worker_counts = False

    def __init__(self, address: str | None = None, shared_dir: Path | None = None) -> None:
        self.address, self.shared_dir = address, shared_dir

    def default_threads(self, workers: int) -> int:
        del workers
        return 1

    def capacity(self, threads: int) -> int | None:
        """Workers of `threads` CPUs the cluster's live nodes hold now (a cluster we start per
        call has its whole machine again: None)."""
        if not self.address:
            return None
        ray = load_ray(self.address)
        start_ray(ray, self.address, threads)
        return sum(int(node.get("Resources", {}).get("CPU", 0) // threads) for node in ray.nodes() if node.get("Alive"))

    def train_one(self, request: TrainRequest) -> int:
        from qlorax.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S
        from qlorax.executors.ray_workers import train_on_ray

        return train_on_ray(request, address=self.address, shared_dir=self.shared_dir,
                            timeout_s=DEFAULT_COLLECTIVE_TIMEOUT_S)

    def run_many(self, specs: list[RunSpec], jobs: int | None, log_dir: Path, force: bool,
                 extra_env: Mapping[str, str]) -> dict[int, int]:
        return run_ray(specs, jobs, log_dir, force, address=self.address, shared_dir=self.shared_dir,
                       secrets=extra_env)


def run_ray(specs: list[RunSpec], jobs: int | None, log_dir: Path, force: bool, *, address: str | None = None,
            shared_dir: Path | None = None, secrets: Mapping[str, str] | None = None) -> dict[int, int]:
    """Run every spec as a Ray task (a fresh worker process each); returns {run index: exit code}.

    `address`: an existing cluster ("auto", "ray://host:10001", ...); by default a small local
    cluster is started for this call and shut down at the end. `jobs`: at most this many runs
    at once (default: as many as the cluster's CPUs allow). `shared_dir`: see the module doc.
    """
    ray = load_ray(address)
    from qlorax.rundir import prepare_output_dir

    if not specs:
        return {}
    log_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        prepare_output_dir(spec.run_dir, resume=False, force=force)
    token = uuid.uuid4().hex[:12]
    shared_base = prepare_shared_base(shared_dir, token) if shared_dir is not None else None

    started = False
    try:
        started = start_ray(ray, address, max(spec.threads for spec in specs))
        _check_feasible(ray, specs)
        task = ray.remote(max_calls=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_train_task)
        job = {"token": token, "shared_base": str(shared_base) if shared_base else None, "cwd": os.getcwd(),
               "inputs": specs[0].inputs.to_json() if specs[0].inputs else None, "facts": executor_facts(address),
               # Each run's durable location (with its credentials: task arguments, never a file).
               "storage": {spec.run_dir.name: spec.storage.to_payload() for spec in specs if spec.storage},
               # the hub token (--token-file) for the training child: a task argument, never an env var
               "secrets": dict(secrets or {})}
        return _schedule(ray, task, specs, jobs, log_dir, job)
    finally:
        if started:
            ray.shutdown()
        if shared_base is not None:
            shutil.rmtree(shared_base, ignore_errors=True)


def _check_feasible(ray: Any, specs: list[RunSpec]) -> None:
    """Refuse up front a thread count that no live node has CPUs for: Ray would wait forever."""
    node_cpus = [node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    largest = max(node_cpus, default=0)
    needed = max(spec.threads for spec in specs)
    if needed > largest:
        raise ResourceError(f"--threads: a run needs {needed} CPUs on one node, but the largest node of the Ray "
                            f"cluster has {largest:g}; lower --threads or add a larger node")


def _schedule(ray: Any, task: Any, specs: list[RunSpec], jobs: int | None, log_dir: Path,
              job: dict[str, Any]) -> dict[int, int]:
    """Keep at most `jobs` tasks in flight (all of them when None: Ray's CPU accounting limits them)."""
    pending = list(specs)
    limit = jobs or len(specs)
    in_flight: dict[Any, RunSpec] = {}
    codes: dict[int, int] = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                spec = pending.pop(0)
                ref = task.options(num_cpus=spec.threads, name=f"qlorax-{spec.run_dir.name}").remote(
                    spec.config.canonical(), spec.run_dir.name, spec.threads, job)
                in_flight[ref] = spec
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                spec = in_flight.pop(ref)
                codes[spec.index] = _collect(ray, ref, spec, log_dir)
    finally:
        for ref in in_flight:  # only on an exception or Ctrl-C: do not leave runs behind on a shared cluster
            try:
                ray.cancel(ref, force=True)
            except Exception:  # the task may already be gone; cancelling is best-effort
                pass
    return codes


def _collect(ray: Any, ref: Any, spec: RunSpec, log_dir: Path) -> int:
    """Fetch one task's result, materialise its run directory, write its log; never raises."""
    log_path = log_dir / f"{spec.run_dir.name}.log"
    try:
        result = ray.get(ref)
    except Exception as exc:  # any Ray failure (worker crashed after retries, node died, task error)
        log_path.write_text(f"qlorax ray executor: {spec.run_dir.name} failed after up to {MAX_RETRIES + 1} "
                            f"attempts\nerror: {type(exc).__name__}: {exc}\n", encoding="utf-8")
        return EXIT_CHECK_FAILED
    header = (f"qlorax ray executor: {spec.run_dir.name}, attempt {result['attempt']} on node {result['node']} "
              f"(worker pid {result['pid']}, {spec.threads} threads), exit code {result['code']}\n")
    code = int(result["code"])
    try:
        if result.get("files") is not None:
            write_files(spec.run_dir, result["files"])
        elif result.get("attempt_dir"):
            move_files(Path(result["attempt_dir"]), spec.run_dir)
        if code == 0:
            integrity = check_run_dir(spec.run_dir)
            if not integrity.intact:
                code = EXIT_CHECK_FAILED
                header += f"error: the copied run does not match its manifest: {integrity.to_dict()}\n"
    except Exception as exc:  # a full disk or a shared dir the driver cannot see
        code = code or EXIT_CHECK_FAILED
        header += f"error: cannot copy the run's files to {spec.run_dir}: {type(exc).__name__}: {exc}\n"
    finally:
        if result.get("run_base"):
            shutil.rmtree(result["run_base"], ignore_errors=True)
    log_path.write_text(header + result["log"], encoding="utf-8")
    return code


def _train_task(config: dict[str, Any], run_name: str, threads: int, job: dict[str, Any]) -> dict[str, Any]:
    """The body of the Ray task: train one run in a fresh attempt directory and report back.

    Runs in a fresh worker process (max_calls=1), so changing its working directory is safe.
    Returns plain data: exit code, log text, attempt number on this node, and either the
    files (no shared dir) or the attempt directory's path (shared dir).
    """
    import ray

    from qlorax.config import QloraxConfig
    from qlorax.launcher import launch_training
    from qlorax.rundir import prepare_output_dir

    if job.get("cwd") and os.path.isdir(job["cwd"]):
        os.chdir(job["cwd"])  # relative data paths resolve as they would for the driver
    shared = job.get("shared_base")
    base = Path(shared) if shared else Path(tempfile.gettempdir()) / f"{BASE_PREFIX}{job['token']}"
    run_base = base / run_name
    run_base.mkdir(parents=True, exist_ok=True)
    attempt = _next_attempt(run_base)
    attempt_dir = Path(tempfile.mkdtemp(prefix=f"attempt-{attempt}-", dir=run_base))
    run_dir = attempt_dir / "run"
    log_path = attempt_dir / "train.out"
    result: dict[str, Any] = {"attempt": attempt, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                              "run_base": str(run_base) if shared else None}
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            prepare_output_dir(run_dir, resume=False, force=True)
            storage = (job.get("storage") or {}).get(run_name)
            resume = _continue_stored_run(storage, run_dir, log)
            inputs = ResolvedInputs.from_json(job["inputs"]) if job.get("inputs") else None
            code = launch_training(QloraxConfig.model_validate(config), run_dir, threads, stdout=log, stderr=log,
                                   inputs=inputs, resume=resume, extra_env=job.get("secrets") or None,
                                   extras={"executor": "ray", "executor_facts": job["facts"], "storage": storage})
        except QloraxError as exc:
            log.write(f"error: {exc.message}\n")
            code = exc.exit_code
    result["code"] = code
    result["log"] = log_path.read_text(encoding="utf-8", errors="replace")
    if shared:
        result["attempt_dir"] = str(run_dir)
    else:
        result["files"] = {rel: (run_dir / rel).read_bytes() for rel in run_files(run_dir)}
        shutil.rmtree(run_base, ignore_errors=True)  # this attempt's and any crashed attempt's directories
        try:
            base.rmdir()  # the last run to finish on this node removes the (then empty) per-call directory
        except OSError:
            pass
    return result


def _continue_stored_run(storage: dict[str, Any] | None, run_dir: Path, log: Any) -> bool:
    """A retried task of a durable run (its worker or node was lost) continues from the newest
    stored checkpoint instead of step 0; True when there is one to continue from."""
    if not storage:
        return False
    from qlorax.storage.runs import fetch_newest_checkpoint
    from qlorax.storage.store import RunStore, StorageSpec

    spec = StorageSpec.from_payload(storage)
    assert spec is not None
    name, warnings = fetch_newest_checkpoint(RunStore(spec), run_dir)
    for warning in warnings:
        log.write(f"warning: {warning}\n")
    if name:
        log.write(f"continuing from stored checkpoint {name}\n")
    log.flush()  # before the child writes into the same file
    return name is not None


def _next_attempt(run_base: Path) -> int:
    """Count this attempt in run_base/attempts (per node: Ray does not expose the attempt number)."""
    with open(run_base / "attempts", "a+", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        handle.seek(0)
        return len(handle.read().split())

