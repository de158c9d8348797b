"""`qlorax publish`: a checked, verified run directory as a snapshot with a model card that proves it.

The steps, each a function: re-check the run's manifest (`qlorax check`'s machinery); read the
verification report and refuse a run it does not prove (`load_evidence`); write the card with
huggingface_hub's ModelCard/ModelCardData (`model_card`); lay out the snapshot — the run's files
minus the informational ones that hold local paths, plus the card, the report and a publication
record — and check it as `qlorax check` will on a downloaded copy (`stage_snapshot`); then upload
it with huggingface_hub (`upload_to_hub`) or register it in MLflow (`qlorax.tracking`).

A source is a run directory (an adapter, `base_model_relation: adapter`); an export directory
(`qlorax export --merge`, a merged model) becomes another `PublishSource` with relation `merge`
and the same card, staging and upload. huggingface_hub is imported only inside the functions
that talk to the Hub; torch never.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorax import __version__, layout
from qlorax.artifacts import (
    check_run_dir,
    load_manifest,
    read_json,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from qlorax.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_RESOURCES, QloraxError

DEFAULT_ENDPOINT = "https://huggingface.co"
WITHHELD_REASON = "informational: holds local paths, the host name and timestamps; not needed by `qlorax check`"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PublishRefused(QloraxError):
    """The run is not fit to publish: its manifest does not check, or the report does not prove it."""

    exit_code = EXIT_CHECK_FAILED


class PublishError(QloraxError):
    """The Hub or the registry could not be reached, or refused the upload."""

    exit_code = EXIT_RESOURCES


@dataclass
class PublishSource:
    """What is published: a directory with a manifest and what the card says it is."""

    directory: Path
    manifest: dict[str, Any]
    relation: str  # "adapter" (a run directory) or "merge" (an export directory, later)
    results: dict[str, Any]
    resolved_config: dict[str, Any]

    @property
    def adapter_sha256(self) -> str:
        return str(self.manifest["files"].get(layout.ADAPTER_WEIGHTS, {}).get("sha256", ""))

    @property
    def deterministic_digest(self) -> str:
        return str(self.manifest.get("deterministic_digest", ""))


@dataclass
class Evidence:
    """What the verification report proves about the source (or that nothing does)."""

    verified: bool
    report_path: Path | None = None
    score: float | None = None
    runs: int = 0
    threads: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    environments: list[str] = field(default_factory=list)
    processors: list[str] = field(default_factory=list)


def checked_run(run_dir: Path) -> PublishSource:
    """The run directory, re-checked against its manifest first; PublishRefused naming what fails."""
    from qlorax.commands.analysis import run_check

    run_dir = Path(run_dir)
    integrity = run_check(run_dir)
    if not integrity["has_manifest"]:
        raise QloraxError(f"{run_dir}: no {layout.MANIFEST}; only a finished run directory can be published.")
    if not integrity["intact"]:
        found = [f"{kind} {', '.join(integrity[kind])}" for kind in ("altered", "missing", "extra")
                 if integrity[kind]] + list(integrity.get("manifest_errors") or [])
        raise PublishRefused(f"{run_dir}: refusing to publish: the run does not match its manifest "
                             f"({'; '.join(found)}). Run `qlorax check {run_dir}` for details.")
    manifest = load_manifest(run_dir) or {}
    if layout.ADAPTER_WEIGHTS not in manifest.get("files", {}):
        raise QloraxError(f"{run_dir}: the manifest lists no {layout.ADAPTER_WEIGHTS}; nothing to publish.")
    return PublishSource(run_dir, manifest, "adapter", read_json(run_dir / layout.RESULTS),
                         read_json(run_dir / layout.RESOLVED_CONFIG))


def load_evidence(report_path: Path | None, source: PublishSource, allow_unverified: bool) -> Evidence:
    """The verification report's proof for this source: score 1.0 over at least two runs whose
    adapter and deterministic digests are this run's. Without a report: refused (exit 2) unless
    --allow-unverified; a report that does not prove this run: refused (exit 1), naming why."""
    if report_path is None:
        if not allow_unverified:
            raise QloraxError(
                f"{source.directory}: refusing to publish an unverified run. Pass --report with the "
                f"{layout.REPORT_JSON} of a `qlorax verify` of this config (score 1.0), or --allow-unverified "
                "to publish without proof (the card then says it is unverified).", EXIT_BAD_INPUT)
        return Evidence(verified=False)
    report = _read_report(Path(report_path))
    from qlorax.verify import summarise

    score = layout.report_get(report, layout.REPORT_SCORE, None)
    runs = layout.report_get(report, layout.REPORT_TOTAL_RUNS, 0)
    if not isinstance(score, int | float) or not isinstance(runs, int):
        raise QloraxError(f"{report_path}: not a qlorax reproducibility report (no "
                          f"{layout.dotted(layout.REPORT_SCORE)}).")
    adapter = summarise(report, {})["adapter_sha256"]
    reference = layout.report_get(report, layout.REPORT_METRICS, {}).get("reference_digest")
    why = None
    if score != 1.0:
        why = f"its reproducibility score is {score:.3f}, not 1.0"
    elif runs < 2:
        why = f"it analysed {runs} run; a verification needs at least 2 runs to prove anything"
    elif adapter != source.adapter_sha256:
        why = (f"it verified adapter {str(adapter)[:16]}…, but this run's {layout.ADAPTER_WEIGHTS} is "
               f"{source.adapter_sha256[:16]}…")
    elif reference != source.deterministic_digest:
        why = (f"it verified deterministic digest {str(reference)[:16]}…, but this run's is "
               f"{source.deterministic_digest[:16]}…")
    if why:
        raise PublishRefused(f"{report_path}: refusing to publish {source.directory}: the report does not prove "
                             f"this run ({why}).")
    entries = layout.report_get(report, layout.REPORT_RUNS, [])
    groups = layout.report_get(report, layout.REPORT_CROSS_ENVIRONMENT, {}).get("groups", [])
    processors = sorted({f"{g['fingerprint'].get('cpu_model', '?')} ({g['fingerprint'].get('cpu_capability', '?')})"
                         for g in groups if isinstance(g.get("fingerprint"), dict)})
    return Evidence(
        verified=True, report_path=Path(report_path), score=float(score), runs=runs,
        threads=sorted({str(e.get("threads")) for e in entries if e.get("threads") is not None}, key=int),
        profiles=sorted({str(e["profile"]) for e in entries if e.get("profile")}),
        environments=sorted({str(e["environment"]) for e in entries if e.get("environment")}),
        processors=processors,
    )


def _read_report(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / layout.REPORT_JSON
    try:
        report = read_json(path)
    except FileNotFoundError:
        raise QloraxError(f"--report {path}: no such file.") from None
    except (OSError, ValueError) as exc:
        raise QloraxError(f"--report {path}: not readable JSON ({exc.__class__.__name__}).") from None
    if not isinstance(report, dict):
        raise QloraxError(f"--report {path}: not a qlorax reproducibility report.")
    return report


# --------------------------------------------------------------------------- the model card

def base_model_hub_id(results: dict[str, Any], resolved_config: dict[str, Any]) -> str | None:
    """The base model's id on the Hugging Face Hub, when there is one: the origin a preset records
    (SmolLM2: HuggingFaceTB/SmolLM2-135M-Instruct), or the hub id the config named. A preset built
    by qlorax itself (the tiny one) and a local model have none."""
    from qlorax.model_presets import PRESETS

    base = results.get("base_model") or {}
    origin = (base.get("provenance") or {}).get("origin")
    if isinstance(origin, str) and _HUB_ID.match(origin):
        return origin
    stable_id = base.get("id")
    named = ((resolved_config.get("config") or {}).get("model") or {})
    if (isinstance(stable_id, str) and stable_id not in PRESETS and _HUB_ID.match(stable_id)
            and stable_id in (named.get("name_or_path"), named.get("base_model_id"))):
        return stable_id
    return None


_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A LoRA {{ kind }} for **{{ base_label }}**, trained with [qlorax](https://pypi.org/project/qlorax/)
{{ qlorax_version }}: bit-reproducible fine-tuning whose every artifact is listed with its SHA-256 in
`artifact_summary.json`.

{% if verified -%}
**Verified**: {{ runs }} independent training runs in fresh processes gave bit-identical artifacts
(reproducibility score {{ score }}); the report is `{{ report_file }}`.
{%- else -%}
**Unverified**: published with `--allow-unverified`; no verification report proves that this
training reproduces.
{%- endif %}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{{ base_load }}")
model = PeftModel.from_pretrained(base, "{{ load_from }}")
tokenizer = AutoTokenizer.from_pretrained("{{ load_from }}")
```

{{ base_note }}

## Results

| metric | value |
|---|---|
{% for name, value in metrics -%}
| {{ name }} | {{ value }} |
{% endfor %}
## Reproducibility

| what | value |
|---|---|
{% for name, value in facts -%}
| {{ name }} | {{ value }} |
{% endfor %}
Check this snapshot (every file against `artifact_summary.json`; the card, the report and
`qlorax_publication.json` are the publication's own files):

```bash
{{ download_command }}
qlorax check snapshot
```

Reproduce it: save the resolved config below as `config.yaml`, then

```bash
{{ reproduce_command }}
```

and compare the adapter sha256 above with `qlorax verify`'s (or run `qlorax analyze` over your runs and
this snapshot). {{ inputs_note }}

```yaml
{{ config_yaml }}```

"""


def _metric_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, label in (("eval_loss", "eval loss (held-out split, nats/token)"), ("eval_perplexity", "eval perplexity"),
                       ("train_loss", "train loss (last window)"), ("steps", "optimizer steps"),
                       ("train_tokens", "training tokens")):
        if isinstance(results.get(key), int | float):
            value = results[key]
            rows.append((label, f"{value:.4f}" if isinstance(value, float) else str(value)))
    return rows


def _data_commit(data: dict[str, Any]) -> str | None:
    """The data's git commit, when the run recorded one (git data sources); read defensively."""
    for key in ("commit", "git_commit", "resolved_commit"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    git = data.get("git")
    if isinstance(git, dict) and isinstance(git.get("commit"), str):
        return git["commit"]
    return None


def _fact_rows(source: PublishSource, evidence: Evidence, env: dict[str, Any]) -> list[tuple[str, str]]:
    results = source.results
    base = results.get("base_model") or {}
    data = results.get("data") or {}
    rows = [
        ("config hash", f"`{results.get('config_hash', '?')}`"),
        ("data", f"`{data.get('path', '?')}` ({data.get('format', '?')})"),
        ("data sha256", f"`{data.get('sha256', '?')}`"),
    ]
    commit = _data_commit(data)
    if commit:
        rows.append(("data git commit", f"`{commit}`"))
    rows += [
        ("base model", f"`{base.get('id', '?')}`"),
        ("base model digest", f"`{base.get('digest', '?')}`"),
        ("adapter sha256", f"`{source.adapter_sha256}`"),
        ("deterministic digest", f"`{source.deterministic_digest}`"),
        ("determinism profile (this run)", str(env.get("profile", "?"))),
        ("qlorax version", str(((env.get("fingerprint") or {}).get("packages") or {}).get("qlorax", __version__))),
    ]
    if evidence.verified:
        rows += [
            ("verification", f"score {evidence.score:.3f} over {evidence.runs} runs"),
            ("threads verified", ", ".join(evidence.threads) or "?"),
            ("profiles verified", ", ".join(evidence.profiles) or "?"),
            ("environments verified", ", ".join(evidence.environments) or "?"),
            ("processors verified", ", ".join(evidence.processors) or "?"),
        ]
    else:
        rows.append(("verification", "none (published with --allow-unverified)"))
    return rows


def model_card(source: PublishSource, evidence: Evidence, repo_id: str, *, license_id: str | None = None,
               datasets: list[str] | None = None, tags: list[str] | None = None,
               registered_model: str | None = None) -> Any:
    """The card as a huggingface_hub ModelCard: metadata in ModelCardData, text from a template.
    `repo_id` names the Hub repository; with `registered_model` the snapshot goes to the MLflow
    Model Registry instead, and the card says how to download it from there."""
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results, config = source.results, source.resolved_config.get("config") or {}
    base_id = base_model_hub_id(results, source.resolved_config)
    base = results.get("base_model") or {}
    data = results.get("data") or {}
    dataset_id = (datasets or [None])[0] or f"qlorax-data-sha256-{str(data.get('sha256', ''))[:16]}"
    eval_results = [EvalResult(task_type="text-generation", dataset_type=dataset_id,
                               dataset_name=f"held-out split of {data.get('path', 'the training data')}",
                               dataset_split="eval", metric_type=metric, metric_name=label,
                               metric_value=round(float(results[key]), 6))
                    for key, metric, label in (("eval_loss", "loss", "eval loss"),
                                               ("eval_perplexity", "perplexity", "eval perplexity"))
                    if isinstance(results.get(key), int | float)]
    license_id = license_id or str((base.get("provenance") or {}).get("license", "other")).lower()
    card_data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        license=license_id,
        datasets=list(datasets) if datasets else None,
        tags=sorted({"qlorax", "lora", "peft", "reproducible", "verified" if evidence.verified else "unverified",
                     *(tags or [])}),
        pipeline_tag="text-generation",
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
        base_model_relation=source.relation,
        qlorax={"config_hash": results.get("config_hash"), "adapter_sha256": source.adapter_sha256,
                "deterministic_digest": source.deterministic_digest, "data_sha256": data.get("sha256"),
                "base_model_digest": base.get("digest"), "verified": evidence.verified,
                "verification_runs": evidence.runs, "reproducibility_score": evidence.score},
    )
    env = read_json(source.directory / layout.ENV) if (source.directory / layout.ENV).is_file() else {}
    threads = ",".join(evidence.threads) or "1,2"
    profile = (evidence.profiles or [str(env.get("profile", "strict"))])[0]
    inputs = []
    if str(data.get("path", "")).startswith("sha256:"):
        inputs.append("The training data was a local file: you need the file with the data sha256 above.")
    if str((config.get("model") or {}).get("name_or_path", "")).startswith("sha256:"):
        inputs.append("The base model was a local directory: you need the model with the digest above.")
    base_label = base_id or str(base.get("id", "?"))
    base_note = ("" if base_id else
                 f"The base model `{base.get('id', '?')}` is not on the Hub: qlorax builds it locally "
                 f"(`qlorax model path {base.get('id', '?')}` prints its directory; load from there).")
    return ModelCard.from_template(
        card_data, template_str=_CARD_TEMPLATE,
        title=repo_id.split("/")[-1], kind="adapter" if source.relation == "adapter" else "merged model",
        base_label=base_label, base_load=base_id or f"<directory of {base.get('id', '?')}>", base_note=base_note,
        qlorax_version=__version__, verified=evidence.verified, runs=evidence.runs,
        score=f"{evidence.score:.3f}" if evidence.score is not None else "", report_file=layout.PUBLISHED_REPORT,
        load_from="snapshot" if registered_model else repo_id,
        download_command=(f"mlflow artifacts download --artifact-uri models:/{registered_model}/latest "
                          "--dst-path snapshot" if registered_model else
                          f"hf download {repo_id} --local-dir snapshot"),
        metrics=_metric_rows(results), facts=_fact_rows(source, evidence, env),
        reproduce_command=(f"qlorax verify --config config.yaml --runs {max(evidence.runs, 2)} --threads {threads} "
                           f"--profile {profile} --output-dir reproduce"),
        inputs_note=" ".join(inputs),
        config_yaml=yaml.safe_dump(config, sort_keys=True),
    )


# --------------------------------------------------------------------------- the snapshot

def stage_snapshot(source: PublishSource, evidence: Evidence, card_text: str, staging: Path) -> dict[str, str]:
    """Lay out the snapshot in `staging` and check it as `qlorax check` will check a download of
    it; returns {path in snapshot: sha256}. The run's informational files that hold local paths
    (training_metadata.json, train.log) are withheld; the card, the report and the publication
    record are added."""
    staging = Path(staging)
    withheld = {rel: WITHHELD_REASON for rel in source.manifest["files"] if rel in layout.WITHHELD_FROM_PUBLICATION}
    for rel in [*source.manifest["files"], layout.MANIFEST]:
        if rel in withheld:
            continue
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.directory / rel, target)
    write_text_atomic(staging / layout.MODEL_CARD, card_text)
    added = {layout.MODEL_CARD: sha256_file(staging / layout.MODEL_CARD)}
    if evidence.report_path is not None:
        report = evidence.report_path if evidence.report_path.is_file() else evidence.report_path / layout.REPORT_JSON
        (staging / layout.PUBLISHED_REPORT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report, staging / layout.PUBLISHED_REPORT)
        added[layout.PUBLISHED_REPORT] = sha256_file(staging / layout.PUBLISHED_REPORT)
    write_json_atomic(staging / layout.PUBLICATION, {
        "format": layout.PUBLICATION_FORMAT,
        "relation": source.relation,
        "manifest_sha256": sha256_file(staging / layout.MANIFEST),
        "deterministic_digest": source.deterministic_digest,
        "adapter_sha256": source.adapter_sha256,
        "verified": evidence.verified,
        "withheld": withheld,
        "added": added,
        "qlorax_version": __version__,
    })
    integrity = check_run_dir(staging)
    if not integrity.intact:  # our own layout failed our own check: a bug, never an upload
        raise PublishRefused(f"the staged snapshot does not pass `qlorax check` ({integrity.to_dict()}); "
                             "nothing was uploaded.")
    return {path.relative_to(staging).as_posix(): sha256_file(path)
            for path in sorted(staging.rglob("*")) if path.is_file()}


# --------------------------------------------------------------------------- the Hub

def check_repo_id(repo_id: str) -> None:
    """OWNER/NAME, or exit 2 before anything is read or sent."""
    if not _HUB_ID.match(repo_id):
        raise QloraxError(f"--repo-id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.').")


@dataclass
class HubCommit:
    """What the Hub answered: the commit id and its URL, and what the commit changed."""

    oid: str
    url: str
    uploaded: list[str]
    deleted: list[str]


def upload_to_hub(staging: Path, files: dict[str, str], repo_id: str, token: str, *, private: bool = False,
                  revision: str | None = None, endpoint: str | None = None) -> HubCommit:
    """One commit that makes `revision` hold exactly the snapshot: create the repo (and branch) when
    missing, add every staged file, delete files an earlier publish left that this snapshot lacks
    (the Hub's own .gitattributes stays). PublishError (exit 3; 2 for a refused token) on failure."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token, library_name="qlorax", library_version=__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision))
        stale = sorted(p for p in remote - set(files) if p not in layout.HUB_HOUSEKEEPING_FILES)
        operations: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(Path(staging) / rel))
                                 for rel in sorted(files)]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        message = f"qlorax publish: adapter {files.get(layout.ADAPTER_WEIGHTS, '')[:12]}"
        commit = api.create_commit(repo_id, operations, revision=revision, commit_message=message)
    except OfflineModeIsEnabled:
        raise PublishError("cannot publish: HF_HUB_OFFLINE is set (publishing needs the Hub); unset it.") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        code = EXIT_BAD_INPUT if status in (401, 403) else EXIT_RESOURCES
        raise PublishError(f"the Hub refused the publish to {repo_id} (HTTP {status}): {_first_line(exc)}",
                           code) from None
    except (OSError, httpx2.TransportError) as exc:  # connection refused, DNS, time-outs
        raise PublishError(f"cannot reach the Hub at {endpoint or DEFAULT_ENDPOINT}: {_first_line(exc)}") from None
    except ValueError as exc:  # the client's own checks (e.g. metadata the Hub's validation rejected)
        raise PublishError(f"publishing to {repo_id} failed: {_first_line(exc)}", EXIT_BAD_INPUT) from None
    return HubCommit(oid=str(commit.oid), url=str(commit.commit_url), uploaded=sorted(files), deleted=stale)


def _first_line(exc: BaseException) -> str:
    from qlorax.ops.secrets import scrub_text

    text = str(exc).strip().splitlines()
    return scrub_text(text[0] if text else exc.__class__.__name__)
