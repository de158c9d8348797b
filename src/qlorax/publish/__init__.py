"""Publishing a finished run: a checked, verified snapshot with a model card that proves it.

The steps every target shares, each a module: the source re-checked against its manifest
(`source`), the verification report's proof (`evidence`), the card (`card`), the staged and
checked snapshot (`snapshot`). The targets, one module each behind one interface
(`target.PublishTarget`): `hub` (Hugging Face Hub) and `mlflow` (MLflow Model Registry); the two
ways they fail besides bad input are in `errors`.
A new target is one module plus one entry in TARGETS. The workflow that strings the steps
together is `qlorax.usecases.publish`. Never torch; the clients only inside the functions
that talk to the servers.
"""

from __future__ import annotations

from qlorax.errors import QloraxError
from qlorax.publish import hub, mlflow
from qlorax.publish.target import PublishTarget

TARGETS: dict[str, PublishTarget] = {"hub": hub.TARGET, "mlflow": mlflow.TARGET}


def target(name: str) -> PublishTarget:
    """The target called `name` (--to); exit 2 naming the known ones otherwise."""
    if name not in TARGETS:
        raise QloraxError(f"--to {name!r}: expected {' or '.join(TARGETS)}")
    return TARGETS[name]
