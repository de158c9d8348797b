"""The model card: metadata in huggingface_hub's ModelCardData, text from one template.

The card proves the snapshot: its digests, what the verification covered, and how to check and
reproduce it. huggingface_hub is imported only inside `model_card`; torch never.
"""

from __future__ import annotations

from typing import Any

from qlorax import __version__, layout
from qlorax.model import preset_named
from qlorax.publish.evidence import Evidence
from qlorax.publish.hub import is_hub_id
from qlorax.publish.source import PublishSource


def base_model_hub_id(results: dict[str, Any], resolved_config: dict[str, Any]) -> str | None:
    """The base model's id on the Hugging Face Hub, when there is one: the origin a preset records
    (SmolLM2: HuggingFaceTB/SmolLM2-135M-Instruct), or the hub id the config named. A preset built
    by qlorax itself (the tiny one) and a local model have none."""
    from qlorax.model_presets import PRESETS

    base = results.get("base_model") or {}
    origin = (base.get("provenance") or {}).get("origin")
    if isinstance(origin, str) and is_hub_id(origin):
        return origin
    stable_id = base.get("id")
    named = ((resolved_config.get("config") or {}).get("model") or {})
    if (isinstance(stable_id, str) and stable_id not in PRESETS and is_hub_id(stable_id)
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
{{ report_summary }}
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


def _fact_rows(source: PublishSource, evidence: Evidence) -> list[tuple[str, str]]:
    results, env = source.results, source.env
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


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def report_summary(evidence: Evidence) -> str:
    """The verification report in short, for the card: verdict, score, runs and digests ('' unverified)."""
    from qlorax.artifacts import read_json

    if not evidence.verified or evidence.report_path is None:
        return ""
    try:
        report = read_json(evidence.report_path)
    except (OSError, ValueError):
        return ""
    score = layout.report_get(report, layout.REPORT_SCORE, None)
    metrics = layout.report_get(report, layout.REPORT_METRICS, {}) or {}
    agreement = layout.report_get(report, layout.REPORT_ARTIFACT_AGREEMENT, {}) or {}
    adapters = {name: digest for digest, names in ((agreement.get(layout.ADAPTER_WEIGHTS) or {}).get("digests")
                                                   or {}).items() for name in names}
    verdict = "reproducible" if score == 1.0 else "not reproducible"
    lines = [
        "## Verification report", "",
        f"**Verdict: {verdict}**: reproducibility score {score:.3f}, {metrics.get('matching_runs', '?')} of "
        f"{evidence.runs} runs bit-identical (reference run {_md(metrics.get('reference_run') or '-')}, "
        f"deterministic digest `{metrics.get('reference_digest') or '-'}`). The whole report is "
        f"`{layout.PUBLISHED_REPORT}`; `qlorax report DIR --html report.html` renders it as one page.", "",
        "| run | threads | workers | environment | adapter sha256 | deterministic digest | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in layout.report_get(report, layout.REPORT_RUNS, []) or []:
        name = str(run.get("name"))
        lines.append(f"| {_md(name)} | {_md(run.get('threads'))} | {_md(run.get('workers') or 1)} | "
                     f"{_md(run.get('environment'))}/{_md(run.get('profile'))} | `{adapters.get(name, '-')}` | "
                     f"`{run.get('deterministic_digest') or '-'}` | {_md(run.get('duration_seconds'))} |")
    return "\n".join(lines) + "\n"


def _card_data(source: PublishSource, evidence: Evidence, repo_id: str, license_id: str | None,
               datasets: list[str] | None, tags: list[str] | None) -> Any:
    """The card's metadata: base model, license, tags, eval results and qlorax's digests."""
    from huggingface_hub import EvalResult, ModelCardData

    results = source.results
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
    return ModelCardData(
        base_model=base_model_hub_id(results, source.resolved_config),
        library_name="peft",
        license=license_id or str((base.get("provenance") or {}).get("license", "other")).lower(),
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


def _inputs_note(source: PublishSource) -> str:
    """What a reproducer needs besides the config: local data or a local model, named by digest."""
    config = source.resolved_config.get("config") or {}
    inputs = []
    if str((source.results.get("data") or {}).get("path", "")).startswith("sha256:"):
        inputs.append("The training data was a local file: you need the file with the data sha256 above.")
    model_name = str((config.get("model") or {}).get("name_or_path", ""))
    if model_name.startswith("sha256:") and preset_named(model_name) is None:  # a preset is rebuilt anywhere
        inputs.append("The base model was a local directory: you need the model with the digest above.")
    return " ".join(inputs)


def _text_values(source: PublishSource, evidence: Evidence, repo_id: str,
                 registered_model: str | None) -> dict[str, Any]:
    """The template's variables: the title, how to load, check and reproduce the snapshot."""
    import yaml

    base_id = base_model_hub_id(source.results, source.resolved_config)
    base = source.results.get("base_model") or {}
    threads = ",".join(evidence.threads) or "1,2"
    profile = (evidence.profiles or [str(source.env.get("profile", "strict"))])[0]
    base_note = ("" if base_id else
                 f"The base model `{base.get('id', '?')}` is not on the Hub: qlorax builds it locally "
                 f"(`qlorax model path {base.get('id', '?')}` prints its directory; load from there).")
    return dict(
        title=repo_id.split("/")[-1], kind="adapter" if source.relation == "adapter" else "merged model",
        base_label=base_id or str(base.get("id", "?")), base_load=base_id or f"<directory of {base.get('id', '?')}>",
        base_note=base_note, qlorax_version=__version__, verified=evidence.verified, runs=evidence.runs,
        score=f"{evidence.score:.3f}" if evidence.score is not None else "", report_file=layout.PUBLISHED_REPORT,
        load_from="snapshot" if registered_model else repo_id,
        download_command=(f"mlflow artifacts download --artifact-uri models:/{registered_model}/latest "
                          "--dst-path snapshot" if registered_model else
                          f"hf download {repo_id} --local-dir snapshot"),
        metrics=_metric_rows(source.results), facts=_fact_rows(source, evidence),
        reproduce_command=(f"qlorax verify --config config.yaml --runs {max(evidence.runs, 2)} --threads {threads} "
                           f"--profile {profile} --output-dir reproduce"),
        inputs_note=_inputs_note(source), report_summary=report_summary(evidence),
        config_yaml=yaml.safe_dump(source.resolved_config.get("config") or {}, sort_keys=True),
    )


def model_card(source: PublishSource, evidence: Evidence, repo_id: str, *, license_id: str | None = None,
               datasets: list[str] | None = None, tags: list[str] | None = None,
               registered_model: str | None = None) -> Any:
    """The card as a huggingface_hub ModelCard: metadata in ModelCardData, text from a template.
    `repo_id` names the Hub repository; with `registered_model` the snapshot goes to the MLflow
    Model Registry instead, and the card says how to download it from there."""
    from huggingface_hub import ModelCard

    return ModelCard.from_template(_card_data(source, evidence, repo_id, license_id, datasets, tags),
                                   template_str=_CARD_TEMPLATE,
                                   **_text_values(source, evidence, repo_id, registered_model))
