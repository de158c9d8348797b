"""CLI command `publish`: a checked, verified run to the Hugging Face Hub or the MLflow Model Registry.

Parses, calls the steps in `qlorax.publish` (and `qlorax.tracking` for MLflow), records the outcome in
the audit log, renders. Exit codes: 0 published; 1 the run fails its manifest check or the report
does not prove it; 2 bad input (no report without --allow-unverified, a bad repo id, a refused
token); 3 the Hub or the MLflow server cannot be reached or refused the upload.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from qlorax.errors import QloraxError

console = Console(stderr=True, highlight=False)
TARGETS = ("hub", "mlflow")


def register(app: typer.Typer) -> None:
    """Add this module's command to the top-level app."""

    @app.command()
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
        from qlorax import publish as steps
        from qlorax.runops import RunOptions, audit_logger

        if to not in TARGETS:
            raise QloraxError(f"--to {to!r}: expected {' or '.join(TARGETS)}")
        if to == "hub" and (repo_id is None or token_file is None):
            raise QloraxError("--to hub needs --repo-id OWNER/NAME and --token-file FILE (a token with write access).")
        if to == "hub":
            steps.check_repo_id(str(repo_id))
        if to == "mlflow" and not mlflow_uri:
            raise QloraxError("--to mlflow needs --mlflow-uri URI (the tracking server).")
        token = None
        if token_file is not None:
            from qlorax.ops.secrets import read_token_file

            token = read_token_file(token_file)  # registered: scrubbed from every message from now on
        if mlflow_uri:
            from qlorax.tracking import split_credentials

            split_credentials(mlflow_uri)  # registers a password in the URI before anything can print it
        source = steps.checked_run(run_dir)
        evidence = steps.load_evidence(report, source, allow_unverified)
        registered = (model_name or (repo_id or str(Path(run_dir).resolve().name)).split("/")[-1]
                      if to == "mlflow" else None)
        name = repo_id or f"qlorax/{registered}"
        card = steps.model_card(source, evidence, name, license_id=license_id, datasets=dataset,
                                registered_model=registered)
        audit = audit_logger(RunOptions(audit_log=audit_log), Path(run_dir).resolve().parent)
        record = {"run_dir": str(run_dir), "deterministic_digest": source.deterministic_digest,
                  "adapter_sha256": source.adapter_sha256, "verified": evidence.verified,
                  "report": str(evidence.report_path) if evidence.report_path else None}
        with tempfile.TemporaryDirectory(prefix="qlorax-publish-") as staging:
            files = steps.stage_snapshot(source, evidence, str(card), Path(staging))
            if to == "hub":
                assert repo_id is not None and token is not None
                commit = steps.upload_to_hub(Path(staging), files, repo_id, token, private=private,
                                             revision=revision, endpoint=endpoint)
                audit.log_event("publish", target="huggingface_hub", repo_id=repo_id, revision=revision or "main",
                                endpoint=endpoint or steps.DEFAULT_ENDPOINT, commit=commit.oid,
                                commit_url=commit.url, files=files, deleted=commit.deleted, **record)
                rows = [("repository", repo_id), ("revision", revision or "main"), ("commit", commit.oid),
                        ("url", commit.url)]
            else:
                from qlorax.tracking import register_model_version, run_tags, shown_uri

                assert mlflow_uri is not None and registered is not None
                tags = {**run_tags(source.directory), "qlorax.verified": str(evidence.verified).lower()}
                version, mlflow_run = register_model_version(mlflow_uri, Path(staging), sorted(files), registered,
                                                             tags, description=f"qlorax adapter "
                                                             f"{source.adapter_sha256[:12]} from {name}")
                audit.log_event("publish", target="mlflow", tracking_uri=shown_uri(mlflow_uri),
                                model_name=registered, model_version=version, mlflow_run_id=mlflow_run,
                                files=files, **record)
                rows = [("registered model", registered), ("version", version), ("MLflow run", mlflow_run),
                        ("server", shown_uri(mlflow_uri))]
        table = Table(title="qlorax publish", show_header=False)
        for label, value in [*rows, ("files", str(len(files))), ("adapter sha256", source.adapter_sha256),
                             ("verified", f"score {evidence.score:.3f} over {evidence.runs} runs"
                              if evidence.verified else "no (--allow-unverified)")]:
            table.add_row(label, value)
        Console().print(table)
        raise typer.Exit(0)
