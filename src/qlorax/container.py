"""Which container (if any) a run happened in: informational, recorded in env.json outside the
fingerprint, so a run in a container and a native run with the same pins and library versions
stay one environment for `qlorax analyze`.

Read from what the engines themselves leave in a container (podman's /run/.containerenv,
docker's /.dockerenv, the cgroup path of PID 1) and from $QLORAX_IMAGE_ID, which whoever
starts the container may set to the image id or digest (an image cannot know its own id).
Only those named facts are kept; nothing else of the environment is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qlorax import settings

_CONTAINERENV = Path("/run/.containerenv")
_DOCKERENV = Path("/.dockerenv")
_CGROUP = Path("/proc/1/cgroup")
# Keys of podman's /run/.containerenv worth recording (its container name and id are not).
_CONTAINERENV_KEYS = ("engine", "image", "imageid", "rootless")
# What a cgroup path of PID 1 says about the engine (cgroup v1; under v2 the path is "/").
# podman leaves no /run/.containerenv in a --read-only container, but its cgroup says libpod.
_CGROUP_MARKERS = (("kubepods", "kubernetes"), ("libpod", "podman"), ("docker", "docker"),
                   ("containerd", "containerd"), ("crio", "cri-o"))
_ID = re.compile(r"^(sha256:)?[0-9a-f]{12,64}$|^[\w./:@-]{1,256}$")


def image_id_setting() -> str | None:
    """$QLORAX_IMAGE_ID, when it looks like an image id, digest or reference."""
    value = (settings.image_id() or "").strip()
    return value if value and _ID.match(value) else None


def _containerenv() -> dict[str, str]:
    try:
        text = _CONTAINERENV.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    facts = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in _CONTAINERENV_KEYS:
            value = value.strip().strip('"')
            if value:
                facts[key.strip()] = value
    return facts


def _cgroup_runtime() -> str | None:
    try:
        text = _CGROUP.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for marker, runtime in _CGROUP_MARKERS:
        if marker in text:
            return runtime
    return None


def container_record() -> dict[str, Any] | None:
    """{"runtime", "image", "image_id", ...} inside a container; None natively."""
    podman = _containerenv() if _CONTAINERENV.exists() else None
    if podman is not None:
        runtime = podman.get("engine") or "podman"
    elif _DOCKERENV.exists():
        runtime = "docker"
    else:
        runtime = _cgroup_runtime()
    if runtime is None:
        return None
    podman = podman or {}
    record: dict[str, Any] = {
        "runtime": runtime,
        "image": podman.get("image"),
        "image_id": image_id_setting() or podman.get("imageid"),
    }
    if "rootless" in podman:
        record["rootless"] = podman["rootless"] == "1"
    return record
