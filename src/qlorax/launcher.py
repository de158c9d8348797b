"""Run a job (train, env, ...) in a fresh child process with the determinism pins in its environment.

Thread pools, MKL's CNR mode and the instruction set are fixed when torch loads, so they
cannot be set from inside a process that already imported it. The launcher computes the
pins for the profile, removes any conflicting numeric variables the user had set
(recording their names, never their values), starts `python -m qlorax.worker` with the job
as JSON on stdin, forwards SIGINT/SIGTERM and returns the child's exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qlorax import interrupts, settings
from qlorax.config import QloraxConfig
from qlorax.determinism import child_environment
from qlorax.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S
from qlorax.errors import EXIT_SIGINT, EXIT_SIGTERM
from qlorax.inputs import ResolvedInputs, resolve_inputs

WORKER_COMMAND = (sys.executable, "-m", "qlorax.worker")


def default_threads() -> int:
    """The cores this process may use (its CPU affinity), at least 1: one thread each."""
    return settings.usable_cores()


def job_environment(profile: str, threads: int, extra_env: Mapping[str, str] | None = None
                    ) -> tuple[dict[str, str], list[str]]:
    """The child's environment (this process's, pinned) and the names of the variables removed."""
    parent_env = dict(os.environ)
    parent_env.update(extra_env or {})
    return child_environment(parent_env, profile, threads)


def _prepare_job(kind: str, payload: Mapping[str, Any], profile: str, threads: int,
                 extra_env: Mapping[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The child's pinned environment and the JSON job it reads on stdin."""
    env, removed = job_environment(profile, threads, extra_env)
    return env, json.dumps({**payload, "kind": kind, "threads": threads, "removed_env": removed})


class _Children:
    """The live children of this process and the signal that asked them to stop: a signal
    reaching the parent (main thread) is forwarded to every child, including those a verify
    pool started from worker threads, and no new child starts after it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen[str]] = set()
        self.stopping: int | None = None

    def forward(self, signum: int, _frame: Any) -> None:
        self.stopping = signum
        with self.lock:
            live = list(self.live)
        for process in live:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    process.send_signal(signum)


CHILDREN = _Children()


@contextlib.contextmanager
def forwarding_signals() -> Iterator[None]:
    """While open (in the main thread), SIGINT/SIGTERM go to the children instead of ending
    this process; nested use keeps the outer forwarding."""
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGTERM) == CHILDREN.forward):
        yield
        return
    CHILDREN.stopping = interrupts.requested
    previous = interrupts.install(CHILDREN.forward)
    try:
        yield
    finally:
        interrupts.restore(previous)


def stop_requested() -> bool:
    """Whether SIGINT/SIGTERM reached this process (forwarded to its children): a child that
    then exits 130/143 stopped because the user asked, not because it was lost."""
    return CHILDREN.stopping is not None


def launch_job(kind: str, payload: Mapping[str, Any], profile: str, threads: int, *,
               extra_env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None,
               wrapper: Sequence[str] = (), inherited_fds: Sequence[int] = ()) -> int:
    """Run one job of `kind` in a pinned child; returns its exit code (0, 1, 2, 130, 143, ...).
    SIGINT/SIGTERM sent to this process are forwarded to the child, which stops cleanly; a
    child killed by a signal returns 128 + its number, with one line saying so. `wrapper`
    prefixes the child's command line (e.g. `qemu-x86_64 -cpu Haswell-v4`, which runs the
    same Python on an emulated processor)."""
    env, message = _prepare_job(kind, payload, profile, threads, extra_env)
    with forwarding_signals():
        if CHILDREN.stopping is not None:  # asked to stop before this child started
            return interrupts.exit_code_for(CHILDREN.stopping)
        process = subprocess.Popen((*wrapper, *WORKER_COMMAND), stdin=subprocess.PIPE, env=env, stdout=stdout,
                                   stderr=stderr, text=True, pass_fds=tuple(inherited_fds))
        with CHILDREN.lock:
            CHILDREN.live.add(process)
        try:
            if CHILDREN.stopping is not None:
                process.send_signal(CHILDREN.stopping)
            assert process.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # the child may already have stopped
                process.stdin.write(message)
                process.stdin.close()
            returncode = process.wait()
        finally:
            with CHILDREN.lock:
                CHILDREN.live.discard(process)
    if returncode < 0:
        print(f"the {kind} process was killed by {interrupts.signal_name(-returncode)} before it could stop "
              "cleanly", file=stderr if hasattr(stderr, "write") else sys.stderr, flush=True)
    return interrupts.code_of_child(returncode)


def run_job_captured(kind: str, payload: Mapping[str, Any], profile: str, threads: int, *,
                     extra_env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()
                     ) -> subprocess.CompletedProcess[str]:
    """Run a short job (e.g. env) in a pinned child (under `wrapper`) and capture what it prints."""
    env, message = _prepare_job(kind, payload, profile, threads, extra_env)
    return subprocess.run((*wrapper, *WORKER_COMMAND), input=message, env=env, capture_output=True, text=True,
                          check=False)


def launch_training(config: QloraxConfig, output_dir: Path, threads: int, *, resume: bool = False,
                    extra_env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None,
                    wrapper: Sequence[str] = (), workers: int = 1,
                    worker_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                    inputs: ResolvedInputs | None = None, extras: Mapping[str, Any] | None = None) -> int:
    """Train in a child process (under `wrapper`, see launch_job), or in `workers` data-parallel
    children of `threads` threads each (launch_workers); returns the exit code. The inputs the
    parent resolved travel in the payload, so the child does not resolve them again; so do
    `extras` (durable storage and its credentials, earlier restarts, the executor's facts)."""
    payload = {**training_payload(config, output_dir, resume, inputs), **(extras or {})}
    if workers > 1:
        return launch_workers(payload, config.determinism.profile, threads, workers, extra_env=extra_env,
                              stdout=stdout, stderr=stderr, wrapper=wrapper, timeout_s=worker_timeout_s)
    return launch_job("train", payload, config.determinism.profile, threads, extra_env=extra_env,
                      stdout=stdout, stderr=stderr, wrapper=wrapper)


def training_payload(config: QloraxConfig, output_dir: Path | str, resume: bool,
                     inputs: ResolvedInputs | None = None) -> dict[str, Any]:
    """A train job's payload: the config, the resolved inputs, where to write, whether to resume."""
    inputs = inputs or resolve_inputs(config)
    return {"config": config.canonical(), "inputs": inputs.to_json(), "output_dir": str(Path(output_dir).resolve()),
            "resume": resume}


def loopback_listener() -> socket.socket:
    """A socket listening on 127.0.0.1 at a port the kernel picked: rank 0's rendezvous store
    takes it over (its file descriptor is inherited), so no other run can take the port
    between choosing and binding it, and the store never listens on another interface."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.set_inheritable(True)
    return listener


def world_payload(payload: Mapping[str, Any], rank: int, size: int, address: str, port: int,
                  timeout_s: float, executor: str = "local") -> dict[str, Any]:
    """One worker's train job: the run's payload plus its place in the world."""
    return {**payload, "executor": executor,
            "world": {"rank": rank, "size": size, "address": address, "port": port, "timeout_s": timeout_s}}


# A local run's workers talk over loopback only: gloo's connection listener binds the
# interface named here (without it, every interface: `*:port`), as the TCPStore binds 127.0.0.1.
LOOPBACK_ONLY = {"GLOO_SOCKET_IFNAME": "lo"}


def launch_workers(payload: Mapping[str, Any], profile: str, threads: int, workers: int, *,
                   extra_env: Mapping[str, str] | None = None, stdout: Any = None, stderr: Any = None,
                   wrapper: Sequence[str] = (), timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> int:
    """Start `workers` pinned train children on this machine, joined in one torch.distributed
    (gloo) process group through rank 0's store on a free loopback port; returns rank 0's exit code.

    The launcher starts the processes itself, as torchrun would (one per rank, the rendezvous
    address in the job), because each needs the determinism pins before torch loads, its job on
    stdin and our one-line errors. Only rank 0 writes the run directory; rank 0 prints, the
    others' output is dropped except their errors. Supervision, so that a dead worker never
    leaves the others waiting: when any worker exits with an error the others are stopped
    (ranks > 0 write nothing, so they are killed at once; rank 0 gets `timeout_s` to notice,
    mark the run failed and exit); after rank 0 ends, the others get a few seconds."""
    listener = loopback_listener()
    port = int(listener.getsockname()[1])
    processes: list[subprocess.Popen[str]] = []
    with forwarding_signals():
        if CHILDREN.stopping is not None:
            listener.close()
            return interrupts.exit_code_for(CHILDREN.stopping)
        for rank in range(workers):
            job = world_payload(payload, rank, workers, "127.0.0.1", port, timeout_s)
            inherited = (listener.fileno(),) if rank == 0 else ()
            if rank == 0:
                job["world"]["listen_fd"] = listener.fileno()
            env_rank, message = _prepare_job("train", job, profile, threads, {**(extra_env or {}), **LOOPBACK_ONLY})
            process = subprocess.Popen((*wrapper, *WORKER_COMMAND), stdin=subprocess.PIPE, env=env_rank,
                                       stdout=stdout if rank == 0 else subprocess.DEVNULL, stderr=stderr, text=True,
                                       pass_fds=inherited)
            processes.append(process)
            with CHILDREN.lock:
                CHILDREN.live.add(process)
            if CHILDREN.stopping is not None:
                process.send_signal(CHILDREN.stopping)
            assert process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(message)
                process.stdin.close()
        listener.close()  # rank 0 holds it now
        try:
            codes, first_failure = supervise(processes, timeout_s)
        finally:
            with CHILDREN.lock:
                CHILDREN.live.difference_update(processes)
    out = stderr if hasattr(stderr, "write") else sys.stderr
    if first_failure is not None and first_failure != 0:
        rank, code = first_failure, codes[first_failure]
        how = (f"was killed by {interrupts.signal_name(-code)}" if code < 0 else f"exited with code {code}")
        print(f"worker {rank} of {workers} {how}; the run's workers were stopped", file=out, flush=True)
        record_root_cause(Path(payload["output_dir"]), f"worker {rank} of {workers} {how}")
    elif codes[0] < 0:
        print(f"the train process was killed by {interrupts.signal_name(-codes[0])} before it could stop "
              "cleanly", file=out, flush=True)
    return interrupts.code_of_child(codes[0])


def record_root_cause(output_dir: Path, cause: str) -> None:
    """Put the first worker's failure ahead of rank 0's own error in training_metadata.json (rank 0
    only saw its peers vanish): what a restart records as its cause."""
    from qlorax.artifacts import read_json
    from qlorax.layout import METADATA
    from qlorax.rundir import mark_failed

    try:
        seen = read_json(output_dir / METADATA).get("error")
    except (OSError, ValueError, AttributeError):
        seen = None
    mark_failed(output_dir, f"{cause}; rank 0: {seen}" if seen else cause)


# Seconds the workers of rank > 0 may outlive rank 0 (they only leave the process group).
WORKER_EXIT_GRACE_S = 10.0
# Seconds rank 0 gets to notice a lost peer and mark the run failed itself before it is killed:
# a collective fails at once when the peer's connection closes, but a rendezvous (the peer lost
# while loading) would wait for the whole collective timeout. Its checkpoints are whole either way.
PEER_FAILURE_GRACE_S = 30.0


def supervise(processes: list[subprocess.Popen[str]], timeout_s: float) -> tuple[list[int], int | None]:
    """Wait for every worker; (exit codes by rank, the rank > 0 that failed first or None).

    A failed worker of rank > 0 stops the other ranks > 0 at once (SIGKILL: they write
    nothing) and leaves rank 0 PEER_FAILURE_GRACE_S to see its collective fail and exit; rank 0
    failing stops the others at once, rank 0 finishing leaves them WORKER_EXIT_GRACE_S. A worker
    that exits 130/143 stopped on a signal with all the others (they agree on the step)."""
    codes: list[int | None] = [None] * len(processes)
    first_failure: int | None = None
    deadline: float | None = None
    while any(code is None for code in codes):
        for rank, process in enumerate(processes):
            if codes[rank] is None and (code := process.poll()) is not None:
                codes[rank] = code
                stopped = code in (EXIT_SIGINT, EXIT_SIGTERM)  # asked to stop with the others: not a failure
                if code != 0 and not stopped and rank > 0 and first_failure is None and codes[0] is None:
                    first_failure = rank
                    _kill(processes[1:])
                    deadline = time.monotonic() + min(timeout_s, PEER_FAILURE_GRACE_S)
                if rank == 0 and code != 0:
                    _kill(processes[1:])
                elif rank == 0:
                    deadline = min(deadline or float("inf"), time.monotonic() + WORKER_EXIT_GRACE_S)
        if deadline is not None and time.monotonic() > deadline:
            _kill(processes)
        time.sleep(0.05)
    return [int(code) for code in codes if code is not None], first_failure


def _kill(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
