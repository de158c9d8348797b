"""The S3 test store itself (tests/object_store.py) and scripts/object_store.sh, through
pyarrow.fs as qlorax uses it: objects round-trip, a wrong secret is refused, a stop and start
keep the objects, and nothing of weed listens beyond 127.0.0.1."""

from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from pyarrow import fs

from conftest import REPO
from object_store import SeaweedS3, _port_is_free  # the s3_server fixture comes through conftest's pytest_plugins

SCRIPT = REPO / "scripts" / "object_store.sh"


def listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP/UDP socket the given processes listen on, from `ss`."""
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, timeout=30, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            local = line.split()[4]
            address, _, port = local.rpartition(":")
            found.append((address.strip("[]"), int(port)))
    return found


def group_pids(pgid: int) -> set[int]:
    pids = set()
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                pids.add(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return pids


def test_put_and_read_back(s3_server: SeaweedS3) -> None:
    bucket = s3_server.make_bucket("roundtrip")
    client = s3_server.filesystem()
    payload = os.urandom(3 * 1024 * 1024 + 17)  # above pyarrow's part size: a multipart upload
    with client.open_output_stream(f"{bucket}/runs/a/checkpoint.bin") as stream:
        stream.write(payload)
    assert client.open_input_stream(f"{bucket}/runs/a/checkpoint.bin").read() == payload
    listed = client.get_file_info(fs.FileSelector(bucket, recursive=True))
    assert f"{bucket}/runs/a/checkpoint.bin" in {info.path for info in listed}
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    assert s3_server.env() == {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                               "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                               "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": "us-east-1"}


def test_a_wrong_secret_is_refused_and_not_echoed(s3_server: SeaweedS3) -> None:
    bucket = s3_server.make_bucket("refusals")
    wrong = "WRONG" + s3_server.secret_key[5:]
    intruder = s3_server.filesystem(secret_key=wrong)
    with pytest.raises(OSError) as write_error:
        with intruder.open_output_stream(f"{bucket}/x") as stream:
            stream.write(b"x")
    with pytest.raises(OSError) as read_error:
        intruder.get_file_info(fs.FileSelector(bucket))
    messages = [str(write_error.value), str(read_error.value)]
    # Measured with pyarrow 25 and weed 4.48: the write says SIGNATURE_DOES_NOT_MATCH, the listing
    # ACCESS_DENIED or SIGNATURE_DOES_NOT_MATCH; neither message carries a key.
    assert "SIGNATURE_DOES_NOT_MATCH" in messages[0], messages[0]
    assert re.search(r"SIGNATURE_DOES_NOT_MATCH|ACCESS_DENIED", messages[1]), messages[1]
    for message in messages:
        assert wrong not in message and s3_server.secret_key not in message
    assert s3_server.filesystem().get_file_info(f"{bucket}/x").type == fs.FileType.NotFound
    log = s3_server.log_path.read_text(errors="replace")
    assert s3_server.secret_key not in log and wrong not in log


def test_stop_and_start_keep_the_objects_on_the_same_endpoint(s3_server: SeaweedS3) -> None:
    bucket = s3_server.make_bucket("durable")
    client = s3_server.filesystem()
    with client.open_output_stream(f"{bucket}/kept") as stream:
        stream.write(b"before the stop")
    endpoint, ports = s3_server.endpoint, dict(s3_server.ports)
    s3_server.stop(grace=0)  # a hard kill, as a lost node
    try:
        with pytest.raises(OSError):
            client.open_input_stream(f"{bucket}/kept").read()
    finally:
        s3_server.start()
    assert (s3_server.endpoint, s3_server.ports) == (endpoint, ports)
    assert client.open_input_stream(f"{bucket}/kept").read() == b"before the stop"
    with client.open_output_stream(f"{bucket}/after") as stream:  # writable at once after a restart
        stream.write(b"after")
    assert s3_server.start_seconds[-1] < 30, s3_server.start_seconds


def test_every_listening_socket_is_loopback(s3_server: SeaweedS3) -> None:
    assert s3_server.pid is not None
    found = listeners(group_pids(s3_server.pid))
    assert found, "weed listens on nothing?"
    assert all(address == "127.0.0.1" for address, _ in found), found
    assert {port for _, port in found} == set(s3_server.ports.values()), found


def script_ports() -> int:
    """An S3 port for the script whose companions (next three, and all four + 10000) are free."""
    for base in range(21000, 29000, 7):
        if all(_port_is_free(p) for p in (*range(base, base + 4), *range(base + 10000, base + 10004))):
            return base
    raise RuntimeError("no free port block for scripts/object_store.sh")


def read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The script's output up to the line holding `marker` (or all of it at the timeout)."""
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    text, deadline = "", time.monotonic() + timeout
    while marker not in text and time.monotonic() < deadline:
        try:
            text += lines.get(timeout=0.5)
        except queue.Empty:
            if process.poll() is not None and lines.empty():
                break
    return text


def test_the_user_script_serves_a_bucket_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = script_ports()
    data = tmp_path / "store"
    env = {**os.environ, "QLORAX_OBJECT_STORE_PORT": str(port)}
    process = subprocess.Popen(["bash", str(SCRIPT), str(data)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)
    try:
        text = read_until(process, "Ctrl-C stops the store", timeout=90)
        assert "Ctrl-C stops the store" in text, text
        exports = dict(re.findall(r"^export (AWS_[A-Z_]+)=(\S+)$", text, re.M))
        assert set(exports) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert "qlorax train --storage s3://qlorax/runs/demo" in text
        for secret_file in ("credentials.env", "identities.json"):
            assert stat.S_IMODE((data / secret_file).stat().st_mode) == 0o600, secret_file
        client = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                 access_key=exports["AWS_ACCESS_KEY_ID"],
                                 secret_key=exports["AWS_SECRET_ACCESS_KEY"])
        with client.open_output_stream("qlorax/runs/demo/hello.txt") as stream:
            stream.write(b"hello")
        assert client.open_input_stream("qlorax/runs/demo/hello.txt").read() == b"hello"
        assert exports["AWS_SECRET_ACCESS_KEY"] not in (data / "weed.log").read_text(errors="replace")
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
        try:
            rc = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert rc == 130
    time.sleep(0.2)
    assert _port_is_free(port), "weed still listens after the script stopped"
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers
    assert (data / "data").is_dir()  # the objects stay
