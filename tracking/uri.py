"""Which MLflow tracking server a job talks to."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_tracking_uri(uri: str | None, base_dir: str | Path = ".") -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else the local sqlite store (absolute path)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(base_dir).resolve() / 'mlflow.db'}"
