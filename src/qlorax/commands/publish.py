"""CLI command `publish`: a checked, verified run to the Hugging Face Hub or the MLflow Model Registry.

Parses its options into a PublishRequest, calls the use case `qlorax.usecases.publish` (which checks,
stages, uploads and audits) and renders what it returns. Exit codes: 0 published; 1 the run fails its
manifest check or the report does not prove it; 2 bad input (no report without --allow-unverified, a
bad repo id, a refused token); 3 the Hub or the MLflow server cannot be reached or refused the upload.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def publish(
    run_dir: Path = typer.Argument(..., help="The finished run directory to publish."),
    to: str = typer.Option("hub", "--to", help="hub (Hugging Face Hub) or mlflow (MLflow Model Registry)."),
    repo_id: str | None = typer.Option(None, "--repo-id", help="Hub repository OWNER/NAME (--to hub)."),
    token_file: Path | None = typer.Option(None, "--token-file",
                                           help="File holding a Hub token with write access (--to hub)."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repository private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to commit to (default: main; "
                                        "created from main when missing)."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="Hub URL (default: $HF_ENDPOINT, else "
                                        "https://huggingface.co)."),
    report: Path | None = typer.Option(None, "--report", help="The verification report (from `qlorax "
                                       "verify`) that proves this run: score 1.0, this run's digests."),
    allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                          help="Publish without a verification report (the card says so)."),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", help="MLflow tracking server (--to mlflow)."),
    model_name: str | None = typer.Option(None, "--model-name", help="Registered model name (--to mlflow; "
                                          "default: the NAME of --repo-id, else the run directory's name)."),
    license_id: str | None = typer.Option(None, "--license", help="License id for the card (default: the "
                                          "base model's, else 'other')."),
    dataset: list[str] | None = typer.Option(None, "--dataset", help="Hub dataset id the data came from "
                                             "(repeatable; goes to the card's metadata)."),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="Audit log (default: audit.jsonl beside "
                                          "the run directory)."),
) -> None:
    """Publish a checked, verified run with a model card that proves its reproducibility."""
    from qlorax.publish.target import PublishRequest
    from qlorax.usecases.publish import publish_run

    outcome = publish_run(PublishRequest(
        run_dir=run_dir, to=to, repo_id=repo_id, token_file=token_file, private=private, revision=revision,
        endpoint=endpoint, report=report, allow_unverified=allow_unverified, mlflow_uri=mlflow_uri,
        model_name=model_name, license_id=license_id, datasets=dataset, audit_log=audit_log))
    evidence = outcome.evidence
    table = Table(title="qlorax publish", show_header=False)
    for label, value in [*outcome.published.rows, ("files", str(len(outcome.files))),
                         ("adapter sha256", outcome.source.adapter_sha256),
                         ("verified", f"score {evidence.score:.3f} over {evidence.runs} runs"
                          if evidence.verified else "no (--allow-unverified)")]:
        table.add_row(label, value)
    Console().print(table)
    raise typer.Exit(0)


def register(app: typer.Typer) -> None:
    """Add this module's command to the top-level app."""
    app.command()(publish)
