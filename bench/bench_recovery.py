"""Benchmark automatic recovery and durable storage: time to recover, bytes per checkpoint,
checkpoint upload time as a share of training.

Runs `qlorax train --workers 2 --threads 1 --max-restarts 1 --storage URI` and SIGKILLs the
worker of rank 1 once the step-`--kill-after` checkpoint is on storage; the run restarts by
itself. From the run's own records (training_metadata.json's restart entry, train.log's
timestamps) it prints:

- detection: SIGKILL → the restart decided (the parent saw the loss and its cause);
- recovery: SIGKILL → training again (the restarted run restored its checkpoint);
- the restarted run's total wall time against an uninterrupted one (same command, no kill);
- bytes per checkpoint and upload seconds / training seconds (storage record), with the bits
  of both runs compared.

The store is a SeaweedFS S3 server on 127.0.0.1 (`--store s3`, the tests' fixture class) or a
directory (`--store path`). The last line is one JSON object with every number.

    .venv/bin/python bench/bench_recovery.py [--store s3|path] [--config tests/fixtures/tiny.yaml]
        [--steps 12] [--kill-after 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import qlorax_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the SeaweedFS server class the tests use


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def log_time(run_dir: Path, marker: str, after: float) -> float | None:
    """The first train.log line containing `marker` stamped after `after` (epoch seconds)."""
    for line in (run_dir / "train.log").read_text(encoding="utf-8").splitlines():
        when, _, message = line.partition(" ")
        if marker in message and stamp(when) >= after:
            return stamp(when)
    return None


def helper_pid(parent: int) -> int:
    """The launcher's worker of rank 1: its stdout is /dev/null (rank 0 keeps the pipe)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return next(int(pid) for pid in children if os.readlink(f"/proc/{pid}/fd/1") == "/dev/null")


def stored(where: dict[str, Any], key: str) -> bool:
    if where["kind"] == "path":
        return (Path(where["root"]) / key).is_file()
    from pyarrow import fs

    return where["server"].filesystem().get_file_info(f"{where['root']}/{key}").type == fs.FileType.File


def run(cli: list[str], args: list[str], env: dict[str, str], kill: tuple[dict[str, Any], str] | None) -> dict:
    started = time.time()
    process = subprocess.Popen([*cli, "train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    killed_at = None
    if kill is not None:
        where, key = kill
        while not stored(where, key):
            if process.poll() is not None:
                raise SystemExit(f"the run ended before {key} was stored: {process.communicate()}")
            time.sleep(0.02)
        killed_at = time.time()
        os.kill(helper_pid(process.pid), signal.SIGKILL)
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"train failed ({process.returncode}):\n{out}\n{err}")
    return {"wall": time.time() - started, "killed_at": killed_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("s3", "path"), default="s3")
    parser.add_argument("--config", type=Path, default=REPO / "tests" / "fixtures" / "tiny.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill-after", type=int, default=3, help="kill once this step's checkpoint is stored")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qlorax-bench-recovery-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QLORAX_HOME": str(root / "home"), "QLORAX_CACHE": "off"}
    common = ["--config", str(args.config.resolve()), "--set", f"training.max_steps={args.steps}",
              "--set", f"training.save_steps={args.kill_after}", "--set", "training.gradient_accumulation_steps=4",
              "--set", "training.batch_size=2", "--workers", "2", "--threads", "1"]
    server = None
    cli = qlorax_cli()
    try:
        if args.store == "s3":
            from object_store import SeaweedS3

            server = SeaweedS3(root / "s3").start()
            env.update(server.env())
            bucket = server.make_bucket("bench")
            places = {name: {"kind": "s3", "server": server, "root": f"{bucket}/{name}",
                             "uri": f"s3://{bucket}/{name}"} for name in ("plain", "killed")}
        else:
            places = {name: {"kind": "path", "root": str(root / "store" / name), "uri": str(root / "store" / name)}
                      for name in ("plain", "killed")}
        subprocess.run([*cli, "model", "path"], env=env, check=True, capture_output=True)
        plain = run(cli, [*common, "-o", str(root / "plain"), "--storage", places["plain"]["uri"]], env, None)
        key = f"checkpoints/step-{args.kill_after:08d}/checkpoint_manifest.json"
        killed = run(cli, [*common, "-o", str(root / "killed"), "--storage", places["killed"]["uri"],
                           "--max-restarts", "1"], env, (places["killed"], key))
        report(root, plain, killed, args)
    finally:
        if server is not None:
            server.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def report(root: Path, plain: dict, killed: dict, args: argparse.Namespace) -> None:
    meta = json.loads((root / "killed" / "training_metadata.json").read_text())
    plain_meta = json.loads((root / "plain" / "training_metadata.json").read_text())
    [restart] = meta["restarts"]
    decided = stamp(restart["time"])
    training_again = log_time(root / "killed", "resumed from step-", decided)
    manifests = [json.loads((root / name / "artifact_summary.json").read_text()) for name in ("plain", "killed")]
    same_bits = manifests[0]["deterministic_digest"] == manifests[1]["deterministic_digest"]
    storage = plain_meta["storage"]
    numbers = {
        "store": args.store, "config": str(args.config), "steps": args.steps, "workers": 2,
        "detection_seconds": round(decided - killed["killed_at"], 2),
        "recovery_seconds": round(training_again - killed["killed_at"], 2) if training_again else None,
        "uninterrupted_wall_seconds": round(plain["wall"], 1), "restarted_wall_seconds": round(killed["wall"], 1),
        "bytes_per_checkpoint": storage["bytes_per_checkpoint"],
        "checkpoints_uploaded": storage["checkpoints_uploaded"],
        "upload_seconds": storage["upload_seconds"], "upload_share_of_training": storage["upload_share_of_training"],
        "restart_cause": restart["cause"], "same_bits": same_bits,
    }
    print(f"store {args.store}, {args.steps} steps, 2 workers x 1 thread, killed after the stored step "
          f"{args.kill_after} checkpoint")
    print(f"  detection (kill -> restart decided):   {numbers['detection_seconds']} s")
    print(f"  recovery  (kill -> training again):    {numbers['recovery_seconds']} s")
    print(f"  wall: uninterrupted {numbers['uninterrupted_wall_seconds']} s, with the restart "
          f"{numbers['restarted_wall_seconds']} s")
    print(f"  checkpoint: {numbers['bytes_per_checkpoint']} bytes, upload {numbers['upload_seconds']} s for "
          f"{numbers['checkpoints_uploaded']} = {numbers['upload_share_of_training']} of training")
    print(f"  same bits as the uninterrupted run: {same_bits}")
    print(json.dumps(numbers, sort_keys=True))


if __name__ == "__main__":
    main()
