"""`qlorax train --executor ray --workers N`: one data-parallel run whose workers are Ray tasks.

Ray places the workers (a placement group of N bundles of `threads` CPUs, spread over the
cluster's nodes where it can) and runs each as a fresh Ray worker process that starts our
pinned train child, exactly as the local launcher does (qlorax.launcher.launch_job): the
determinism pins must be in the environment before torch loads, which a long-lived Ray worker
that already imported torch cannot give. The workers join one torch.distributed (gloo)
process group through rank 0's store, on rank 0's node at an address a first small task in
rank 0's bundle reports; from there on the training is qlorax.distributed's, the same bits as
one worker. Rank 0 trains into its node's temp dir (or `shared_dir`) and its finished files
come back to the driver (qlorax.executors.ray's transfer: object store or shared directory),
the manifest last and re-checked. No Ray Train: its TorchTrainer builds the process group
inside its own long-lived actors, after torch is loaded there.

A worker that fails ends every other (the others' collectives fail, or the launcher in their
task stops them), and the driver reports which one failed first; with no retries (a retried
rank would join a group that is gone). Checkpoints are not brought back (they are removed
with rank 0's working directory): a Ray-placed run that fails is trained again.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from qlorax.config import QloraxConfig
from qlorax.errors import EXIT_CHECK_FAILED, QloraxError, ResourceError
from qlorax.executors.base import TrainRequest
from qlorax.executors.ray_common import (
    BASE_PREFIX,
    LOOPBACK,
    executor_facts,
    load_ray,
    move_files,
    prepare_shared_base,
    run_files,
    start_ray,
    write_files,
)

PLACEMENT_TIMEOUT_S = 120


def train_on_ray(request: TrainRequest, *, address: str | None, shared_dir: Path | None, timeout_s: float) -> int:
    """Train one run with request.workers Ray-placed workers into request.output_dir; returns rank
    0's exit code. With durable storage, rank 0 persists every checkpoint there and, when the
    request resumes, first brings the newest stored one to whatever node it was placed on."""
    config, output_dir, threads, workers = request.config, request.output_dir, request.threads, request.workers
    ray = load_ray(address)
    token = uuid.uuid4().hex[:12]
    shared_base = prepare_shared_base(shared_dir, token) if shared_dir is not None else None
    started = start_ray(ray, address, threads)
    group = None
    try:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"CPU": threads}] * workers, strategy="SPREAD")
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise ResourceError(f"--workers {workers} --threads {threads}: the Ray cluster found no room for "
                                f"{workers} workers of {threads} CPU(s) within {PLACEMENT_TIMEOUT_S} s")

        def in_bundle(index: int) -> Any:
            return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)

        where = ray.remote(num_cpus=0)(_rendezvous_address)
        host, port = ray.get(where.options(scheduling_strategy=in_bundle(0)).remote())
        task = ray.remote(max_calls=1, max_retries=0)(_worker_task)
        job = {"token": token, "shared_base": str(shared_base) if shared_base else None, "cwd": os.getcwd(),
               "host": host, "port": port, "size": workers, "timeout_s": timeout_s, "threads": threads,
               "inputs": request.inputs.to_json(), "facts": executor_facts(address), "resume": request.resume,
               # Secrets (the hub token, storage credentials) travel in the task's arguments to our
               # child's stdin and environment: never in Ray's runtime_env, a command line or a file.
               "secrets": dict(request.extra_env), "extras": request.payload_extras()}
        refs = [task.options(num_cpus=threads, scheduling_strategy=in_bundle(rank),
                             name=f"qlorax-{output_dir.name}-rank{rank}").remote(config.canonical(), rank, job)
                for rank in range(workers)]
        results = _gather(ray, refs)
        return _materialise(results, output_dir, workers)
    finally:
        if group is not None:
            remove_placement_group(group)
        if started:
            ray.shutdown()
        if shared_base is not None:
            shutil.rmtree(shared_base, ignore_errors=True)


def _rendezvous_address() -> tuple[str, int]:
    """This node's address and a port free on it now (rank 0's store will listen there)."""
    import ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = int(probe.getsockname()[1])
    return ray.util.get_node_ip_address(), port


def _loopback_store_socket(port: int) -> socket.socket:
    """Rank 0's store socket on 127.0.0.1:port (the port _rendezvous_address found free), bound
    here and inherited by the child, so the store does not listen on every interface."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, port))
    listener.listen(64)
    listener.set_inheritable(True)
    return listener


def _prepare_run_dir(run_dir: Path, rank: int, job: dict[str, Any], log: Any) -> None:
    """Rank 0's fresh run directory on its node. A restarted run brings its newest complete
    checkpoint from durable storage first, to every worker (each restores the same state from
    it; the node that held the old one may be gone)."""
    from qlorax.rundir import prepare_output_dir
    from qlorax.storage.runs import fetch_newest_checkpoint
    from qlorax.storage.store import RunStore, StorageSpec

    if rank == 0:
        prepare_output_dir(run_dir, resume=False, force=True)
    spec = StorageSpec.from_payload(job["extras"].get("storage"))
    if job["resume"] and spec is not None:
        name, warnings = fetch_newest_checkpoint(RunStore(spec), run_dir)
        for warning in warnings:
            log.write(f"warning: {warning}\n")
        log.write(f"continuing from stored checkpoint {name}\n" if name else "no stored checkpoint: from step 0\n")


def _gather(ray: Any, refs: list[Any]) -> list[dict[str, Any]]:
    """Every worker's result, or a stand-in naming how it failed (the first failure noted)."""
    results: list[dict[str, Any] | None] = [None] * len(refs)
    pending = {ref: rank for rank, ref in enumerate(refs)}
    order = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        rank = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as exc:  # the worker process died, its node was lost, ...
            result = {"code": EXIT_CHECK_FAILED, "log": f"{type(exc).__name__}: {exc}"}
        results[rank] = {**result, "order": order}
        order += 1
        if rank == 0 and result["code"] != 0:  # the others may wait to join a group rank 0 never opened
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone: cancelling is best-effort
                    pass
    return [r for r in results if r is not None]


def _materialise(results: list[dict[str, Any]], output_dir: Path, workers: int) -> int:
    """Rank 0's files into output_dir (manifest last, re-checked); one line per failed worker."""
    from qlorax.artifacts import check_run_dir
    from qlorax.launcher import record_root_cause

    failed = sorted((r for r in results if r["code"] != 0), key=lambda r: r["order"])
    for rank, result in enumerate(results):
        if result["code"] != 0:
            lines = [line for line in result["log"].splitlines() if line.strip()]
            first = "first " if failed and result is failed[0] and len(failed) > 1 else ""
            last = lines[-1] if lines else "no output"
            line = f"worker {rank} of {workers} failed {first}(exit {result['code']}): {last}"
            print(line, flush=True)
            if result is failed[0]:
                record_root_cause(output_dir, line)
    lead = results[0]
    if lead.get("files") is not None:
        write_files(output_dir, lead["files"])
    elif lead.get("attempt_dir"):
        move_files(Path(lead["attempt_dir"]), output_dir)
    if lead.get("run_base"):
        shutil.rmtree(lead["run_base"], ignore_errors=True)
    print(lead.get("log", ""), end="", flush=True)
    if lead["code"] == 0 and not check_run_dir(output_dir).intact:
        print(f"error: the run copied to {output_dir} does not match its manifest", flush=True)
        return EXIT_CHECK_FAILED
    return int(lead["code"])


def _worker_task(config: dict[str, Any], rank: int, job: dict[str, Any]) -> dict[str, Any]:
    """One worker, in a fresh Ray worker process: start the pinned train child for `rank`."""
    from qlorax.launcher import LOOPBACK_ONLY, launch_job, world_payload

    if job.get("cwd") and os.path.isdir(job["cwd"]):
        os.chdir(job["cwd"])  # relative data paths resolve as they would for the driver
    shared = job.get("shared_base")
    base = Path(shared) if shared else Path(tempfile.gettempdir()) / f"{BASE_PREFIX}{job['token']}"
    run_base = base / f"rank-{rank}"
    run_base.mkdir(parents=True, exist_ok=True)
    run_dir = run_base / "run"
    log_path = run_base / "train.out"
    parsed = QloraxConfig.model_validate(config)
    payload = world_payload({"config": config, "inputs": job["inputs"], "output_dir": str(run_dir),
                             "resume": job["resume"], **(job["extras"] if rank == 0 else {})},
                            rank, job["size"], job["host"], job["port"], job["timeout_s"], executor="ray")
    payload["executor_facts"] = job["facts"]
    on_loopback = job["host"] == LOOPBACK  # a local cluster: every node is 127.0.0.1
    listener = _loopback_store_socket(job["port"]) if rank == 0 and on_loopback else None
    if listener is not None:
        payload["world"]["listen_fd"] = listener.fileno()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            _prepare_run_dir(run_dir, rank, job, log)
            code = launch_job("train", payload, parsed.determinism.profile, job["threads"], stdout=log, stderr=log,
                              extra_env={**job["secrets"], **(LOOPBACK_ONLY if on_loopback else {})},
                              inherited_fds=(listener.fileno(),) if listener is not None else ())
        except QloraxError as exc:
            log.write(f"error: {exc.message}\n")
            code = exc.exit_code
        finally:
            if listener is not None:
                listener.close()
    result: dict[str, Any] = {"code": code, "log": log_path.read_text(encoding="utf-8", errors="replace"),
                              "run_base": str(run_base) if shared else None}
    if rank == 0 and shared:
        result["attempt_dir"] = str(run_dir)
    elif rank == 0:
        result["files"] = {rel: (run_dir / rel).read_bytes() for rel in run_files(run_dir)} if code == 0 else {}
    if not shared:
        shutil.rmtree(run_base, ignore_errors=True)
        try:
            base.rmdir()
        except OSError:
            pass
    return result
