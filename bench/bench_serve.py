"""Benchmark `qlorax serve` under a bounded loopback load: requests/s, latency percentiles, errors.

Starts `qlorax serve` (both ports on 127.0.0.1, free ports), then `--connections` client
threads (default 32) each keep one HTTP/1.1 connection and GET `--path` (default /metrics)
back to back for `--seconds` (default 10); a failed request reconnects and counts as an error.
The client runs on the same cores as the server, so the numbers are a floor for the server.

    .venv/bin/python bench/bench_serve.py [--seconds 10] [--connections 32] [--path /metrics] [--port metrics|health]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import qlorax_cli  # noqa: E402


def start_serve(workdir: Path) -> tuple[subprocess.Popen[str], dict[str, tuple[str, int]]]:
    process = subprocess.Popen(
        [*qlorax_cli(), "serve", "--metrics-port", "0", "--health-port", "0", "--artifact-dir", str(workdir),
         "--min-free-disk-mb", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    found = re.search(r"metrics=http://([\d.]+):(\d+)/metrics health=http://([\d.]+):(\d+)/health", line)
    if not found:
        process.kill()
        raise SystemExit(f"qlorax serve did not start: {line}{process.stdout.read()}")
    # Keep reading what it prints: a full pipe would block the server.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, {"metrics": (found[1], int(found[2])), "health": (found[3], int(found[4]))}


def client(address: tuple[str, int], path: str, deadline: float, latencies: list[float], errors: list[str]) -> None:
    connection = http.client.HTTPConnection(*address, timeout=30)
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"HTTP {response.status}")
            latencies.append(time.monotonic() - started)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(type(exc).__name__)
            connection.close()
            connection = http.client.HTTPConnection(*address, timeout=30)
    connection.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--path", default="/metrics")
    parser.add_argument("--port", choices=("metrics", "health"), default="metrics")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qlorax-bench-serve-") as tmp:
        process, addresses = start_serve(Path(tmp))
        try:
            latencies: list[float] = []
            errors: list[str] = []
            deadline = time.monotonic() + args.seconds
            threads = [threading.Thread(target=client, args=(addresses[args.port], args.path, deadline, latencies,
                                                             errors)) for _ in range(args.connections)]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
        finally:
            process.terminate()
            process.wait(timeout=15)
    result = {
        "path": args.path, "port": args.port, "connections": args.connections, "seconds": round(elapsed, 2),
        "requests": len(latencies), "errors": len(errors), "requests_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1), "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
    }
    print(f"{args.path} ({args.port} port), {args.connections} connections, {elapsed:.1f} s: "
          f"{result['requests_per_second']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
          f"max {result['max_ms']} ms, {result['errors']} errors")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
