"""Publish target `mlflow`: the snapshot as a new version of a model in the MLflow Model Registry.

The snapshot becomes the artifacts of an MLflow run and a model version tagged with the run's
digests, linked to the training run `train --mlflow-uri` logged with the same digest. The client
(credentials kept out of mlflow's messages) is `qlorax.tracking`'s; mlflow is imported only there
and inside `register_model_version`.
"""

from __future__ import annotations

from pathlib import Path

from qlorax.errors import QloraxError
from qlorax.publish.target import Published, PublishRequest, Snapshot
from qlorax.tracking import experiment_id, mlflow_client, shown_uri, tags_of

ARTIFACT_MODEL = "model"  # where publish puts the snapshot it registers


def register_model_version(uri: str, staging: Path, files: list[str], model_name: str, tags: dict[str, str],
                           description: str) -> tuple[str, str]:
    """Log the snapshot as the artifacts of an MLflow run and register them as a new version of
    `model_name` (created when missing), tagged with the digests. Returns (version, run id)."""
    with mlflow_client(uri) as client:
        from mlflow.exceptions import MlflowException

        experiment = experiment_id(client)
        digest = tags.get("qlorax.deterministic_digest")
        trained = client.search_runs([experiment], f"tags.`qlorax.deterministic_digest` = '{digest}'",
                                     max_results=1) if digest else []
        if trained:
            tags = {**tags, "qlorax.training_run_id": trained[0].info.run_id}
        run = client.create_run(experiment, run_name=f"qlorax publish {model_name}",
                                tags={"qlorax.kind": "publish", **tags})
        for rel in files:
            parent = Path(rel).parent.as_posix()
            client.log_artifact(run.info.run_id, str(Path(staging) / rel),
                                ARTIFACT_MODEL if parent == "." else f"{ARTIFACT_MODEL}/{parent}")
        client.set_terminated(run.info.run_id, "FINISHED")
        try:
            client.create_registered_model(model_name, description="LoRA adapters published by qlorax")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(model_name, source=f"{run.info.artifact_uri}/{ARTIFACT_MODEL}",
                                              run_id=run.info.run_id, tags=tags, description=description)
        return str(version.version), run.info.run_id


class MlflowTarget:
    """`--to mlflow`: a registered model on the tracking server --mlflow-uri."""

    audit_name = "mlflow"

    def check(self, request: PublishRequest) -> None:
        """--mlflow-uri is required."""
        if not request.mlflow_uri:
            raise QloraxError("--to mlflow needs --mlflow-uri URI (the tracking server).")

    def card_names(self, request: PublishRequest) -> tuple[str, str | None]:
        """The registered name: --model-name, else the NAME of --repo-id, else the run directory's name."""
        registered = request.model_name or (request.repo_id or str(Path(request.run_dir).resolve().name)).split("/")[-1]
        return request.repo_id or f"qlorax/{registered}", registered

    def publish(self, snapshot: Snapshot, request: PublishRequest) -> Published:
        """A new model version, tagged with the digests and whether a report verified it."""
        assert request.mlflow_uri is not None and snapshot.registered_model is not None
        source = snapshot.source
        tags = {**tags_of(source.results, source.manifest, source.env),
                "qlorax.verified": str(snapshot.evidence.verified).lower()}
        version, mlflow_run = register_model_version(
            request.mlflow_uri, snapshot.directory, sorted(snapshot.files), snapshot.registered_model, tags,
            description=f"qlorax adapter {source.adapter_sha256[:12]} from {snapshot.name}")
        server = shown_uri(request.mlflow_uri)
        return Published(
            rows=[("registered model", snapshot.registered_model), ("version", version), ("MLflow run", mlflow_run),
                  ("server", server)],
            audit={"tracking_uri": server, "model_name": snapshot.registered_model, "model_version": version,
                   "mlflow_run_id": mlflow_run},
        )


TARGET = MlflowTarget()
