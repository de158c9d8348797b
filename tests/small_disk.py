"""A small real tmpfs for the full-disk tests, mounted without needing root.

First in a user + mount namespace (util-linux `unshare`, which an unprivileged user may create
on most kernels): a holder process keeps the namespace and its tmpfs alive, commands that must
write there run inside it (`nsenter`), and the test reads and fills it through the holder's
view of the filesystem (/proc/PID/root). Else, where this process may mount (root with
CAP_SYS_ADMIN but no user namespaces), a plain mount. Neither: the test fails, saying why; a
skip would leave the full-disk promise untested wherever CI runs unprivileged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CLI = (sys.executable, "-c", "from qlorax.cli import main; main()")


class SmallDisk:
    """A tmpfs of `size` (mount's syntax: 400k, 16m) at `mount_point`.

    `path` is where commands see it (give it to qlorax); `view` is where this process reads and
    writes it; `command(argv)` is argv run where the tmpfs is mounted."""

    def __init__(self, mount_point: Path, size: str) -> None:
        mount_point.mkdir(parents=True, exist_ok=True)
        self.path = mount_point
        self.view = mount_point
        self.holder: subprocess.Popen[str] | None = None
        self.mounted_here = False
        why = [self._mount_in_a_namespace(size)]
        if self.holder is None:
            why.append(self._mount_here(size))
        if self.holder is None and not self.mounted_here:
            raise AssertionError("cannot mount a small tmpfs to fill: " + "; ".join(w for w in why if w))
        stat = os.statvfs(self.view)  # the small tmpfs, never the disk under it (the tests fill it)
        assert stat.f_blocks * stat.f_frsize <= 64 * 1024 * 1024, f"{self.view} is not the small tmpfs"

    def _mount_in_a_namespace(self, size: str) -> str | None:
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            return "no unshare/nsenter (util-linux) for a user namespace"
        script = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && echo mounted && exec cat'
        holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", size,
                                   str(self.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert holder.stdout is not None
        if holder.stdout.readline().strip() == "mounted":  # `cat` then holds it until stdin closes
            self.holder = holder
            self.view = Path(f"/proc/{holder.pid}/root{self.path}")
            return None
        _, stderr = holder.communicate(timeout=60)
        return f"user namespace: {stderr.strip() or holder.returncode}"

    def _mount_here(self, size: str) -> str | None:
        if shutil.which("mount") is None:
            return "no mount command"
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                                 capture_output=True, text=True, check=False)
        self.mounted_here = mounted.returncode == 0
        return None if self.mounted_here else f"mount as uid {os.getuid()}: {mounted.stderr.strip()}"

    def command(self, argv: list[str] | tuple[str, ...]) -> list[str]:
        if self.holder is None:
            return list(argv)
        return ["nsenter", f"--target={self.holder.pid}", "--user", "--mount", "--preserve-credentials",
                f"--wd={os.getcwd()}", *argv]

    def run_cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`qlorax ARGS` (fresh interpreter, real exit code) where the tmpfs is mounted."""
        return subprocess.run(self.command([*CLI, *args]), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def free_bytes(self) -> int:
        stat = os.statvfs(self.view)
        return stat.f_bavail * stat.f_frsize

    def close(self) -> None:
        if self.holder is not None:
            assert self.holder.stdin is not None
            self.holder.stdin.close()
            self.holder.wait(timeout=60)
        elif self.mounted_here:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
