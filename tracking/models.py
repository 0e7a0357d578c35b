"""The exported gaze model as an MLflow model: logged into the training run and registered
(``log_model``), and found again (``resolve_model``) by the serving and evaluation jobs.

The logged model is a portable pyfunc: it carries its code (``gazeattn`` and this package,
as ``code_paths``), a signature with an input example that holds an image, and pip
requirements that install on a CPU or a GPU machine (torch without a ``+cpu`` local
version). ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` then answers image
questions in any environment with those requirements, without this repository.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

MODEL_ARTIFACT = "model_dir"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# what the pyfunc imports at load and predict time (gazeattn and this package's own)
REQUIREMENTS = (
    "torch", "transformers", "tokenizers", "safetensors", "numpy", "pillow", "pyyaml",
    "mlflow", "pandas",
)  # fmt: skip
DEFAULT_MAX_NEW_TOKENS = 32


class UnsafeModelPath(ValueError):
    """An MLmodel file that points its model directory outside the downloaded model (an
    absolute path, ``..``, a symlink): a model must not make its loader read another path."""


class GazePyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the HF-format export with ``gazeattn.load_model``; answers questions about images.

    Input: a DataFrame (or list of dicts) with a ``prompt`` column and an optional ``image``
    column (base64 of an image file, or a ``data:image/...;base64,`` URL; empty or missing:
    a text-only question). Param ``max_new_tokens``. Output: the answers, one per row.
    """

    def load_context(self, context) -> None:
        from gazeattn import load_model

        self.model, self.processor = load_model(context.artifacts[MODEL_ARTIFACT])
        self.model.eval()

    # the DataFrame hint (a list of dicts works too) keeps MLflow's own signature, which
    # has the image example, and stops its "add type hints" warning at every import
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from gazeattn.generation import GenerationRequest, generate_batch

        rows = (
            model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        )
        max_new = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        requests = [_request(row, max_new, GenerationRequest) for row in rows]
        return [r.text for r in generate_batch(self.model, self.processor, requests)]


def _request(row: dict, max_new: int, request_type):
    image = decode_image(row.get("image"))
    content = [{"type": "text", "text": str(row["prompt"])}]
    if image is not None:
        content.insert(0, {"type": "image"})
    return request_type(
        messages=[{"role": "user", "content": content}],
        images=[image] if image is not None else [],
        max_new_tokens=max_new,
    )


def decode_image(value):
    """An image column value (base64 string, data URL, raw bytes, None/NaN/"") -> RGB PIL image."""
    from PIL import Image

    if value is None or isinstance(value, float) or (isinstance(value, str) and not value):
        return None  # pandas gives NaN for a missing value
    if isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        value = base64.b64decode(data, validate=True)
    with Image.open(io.BytesIO(value)) as image:
        return image.convert("RGB")


def encode_image(image) -> str:
    """A PIL image or HWC uint8 array -> the base64 PNG string the ``image`` column takes."""
    import numpy as np
    from PIL import Image

    if not hasattr(image, "save"):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def input_example():
    """One image question: a red square on grey, 32 x 32 pixels."""
    import numpy as np
    import pandas as pd

    pixels = np.full((32, 32, 3), 90, np.uint8)
    pixels[8:24, 8:24] = (220, 30, 30)
    return pd.DataFrame([{"prompt": "What colour is the square?", "image": encode_image(pixels)}])


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )


def pip_requirements() -> list[str]:
    """Pinned to what is installed here, without local versions: ``torch==2.13.0`` (not
    ``2.13.0+cpu``) installs the CPU build or the CUDA build, as the machine's index gives."""
    return [f"{name}=={_public_version(metadata.version(name))}" for name in REQUIREMENTS]


def _public_version(version: str) -> str:
    return re.sub(r"\+.*$", "", version)


def code_paths() -> list[str]:
    """The packages the pyfunc imports: ``gazeattn`` and this one (``tracking``)."""
    import gazeattn

    return [str(Path(gazeattn.__file__).parent), str(Path(__file__).parent)]


def model_dir_of(local_root: str | Path) -> Path:
    """Where the HF export lies inside a downloaded MLflow model of this kind: the path its
    MLmodel file gives the ``model_dir`` artifact (MLflow copies a directory artifact under
    the source directory's name, not under its key), else ``artifacts/model_dir``."""
    root = Path(local_root)
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        entry = (flavors.get("python_function", {}).get("artifacts") or {}).get(MODEL_ARTIFACT)
        if entry and entry.get("path"):
            return _inside(root, root / str(entry["path"]), f"{mlmodel}'s {MODEL_ARTIFACT}")
    return root / "artifacts" / MODEL_ARTIFACT


def _inside(root: Path, path: Path, what: str) -> Path:
    """``path`` when it resolves (symlinks followed) inside ``root``; UnsafeModelPath if not."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeModelPath(f"{what} is {path}, outside the model's artifacts {root}")
    return path


@dataclass(kw_only=True)
class ResolvedModel:
    uri: str  # as given
    path: Path  # an HF-format directory for gazeattn.load_model
    run_id: str | None = None  # the MLflow run that logged it, when known


def resolve_model(model: str, tracking_uri: str | None = None) -> ResolvedModel:
    """A local model directory as is; a model on object storage (``s3://...``, any URI
    ``tracking.storage`` opens) copied into the local cache; an MLflow URI (models:/, runs:/,
    mlflow-artifacts:/) downloaded first, from ``tracking_uri`` when given (it becomes the
    process's tracking URI, as with ``mlflow.set_tracking_uri``: MLflow resolves logged models
    through that one), else from MLflow's own (MLFLOW_TRACKING_URI).

    In an MLflow download: the pyfunc model's HF export (``model_dir_of``), else the shallowest
    directory holding a config.json. A ``runs:/RUN/NAME`` that names an MLflow 3 logged
    model rather than run artifacts is looked up among the run's logged models.
    """
    if not model.startswith(MLFLOW_SCHEMES):
        from tracking.storage import StorageError, local_copy

        try:
            path = local_copy(model)
        except (FileNotFoundError, StorageError) as err:
            raise FileNotFoundError(
                f"{model} is not a model directory (no config.json) nor an MLflow URI: {err}"
            ) from None
        return ResolvedModel(uri=model, path=path)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    pinned = _pinned(client, model)
    cached = _download_dir(pinned, _identity(client, pinned))
    if _is_immutable(pinned) and (cached / RESOLVED).is_file():
        found = cached / json.loads((cached / RESOLVED).read_text())["model_dir"]
        return ResolvedModel(uri=model, path=found, run_id=_run_of(client, model))
    for uri in _download_candidates(client, pinned):
        found = _download(uri, cached)
        if found is not None:
            return ResolvedModel(uri=model, path=found, run_id=_run_of(client, model))
    raise FileNotFoundError(f"no model directory (config.json) in the download of {model}")


# in a cached download: where its model directory lies, written once the download is whole
RESOLVED = "gazeattn-resolved.json"


def _download_dir(uri: str, identity: str = "") -> Path:
    """This node's one cache directory of an MLflow model URI (per tracking server and
    ``identity``, ``_identity``)."""
    from tracking.storage import cache_root

    text = f"{mlflow.get_tracking_uri()} {uri} {identity}"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", uri.split(":/", 1)[-1]).strip("-")[-48:]
    return cache_root() / "mlflow" / f"{name}-{key}"


def _is_immutable(uri: str) -> bool:
    """Whether ``uri`` names one content for ever: not a stage or ``latest`` of a registered
    model (an alias is pinned to its version first, ``_pinned``)."""
    if not uri.startswith("models:/"):
        return True
    name, _, version = uri[len("models:/") :].partition("/")
    return not version or version.isdigit()


def _identity(client: MlflowClient, uri: str) -> str:
    """What tells a registered version from another of the same name and number (a store
    made again behind the same server address): its run and creation time. Run and logged
    model ids are unique already."""
    name, _, version = uri[len("models:/") :].partition("/")
    if not (uri.startswith("models:/") and version.isdigit()):
        return ""
    try:
        found = client.get_model_version(name, version)
    except (MlflowException, OSError):  # the download names what is wrong
        return ""
    return f"{found.run_id} {found.creation_timestamp}"


def _pinned(client: MlflowClient, uri: str) -> str:
    """``models:/NAME@ALIAS`` as the version the alias points at now; other URIs as given."""
    ref = uri[len("models:/") :] if uri.startswith("models:/") else ""
    if "@" not in ref:
        return uri
    name, alias = ref.split("@", 1)
    try:
        return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
    except (MlflowException, OSError):  # the download names what is wrong
        return uri


def _download(uri: str, out: Path) -> Path | None:
    """``uri`` downloaded into ``out`` (replacing an older download there), its model directory
    returned; None (and nothing left behind) when it cannot be downloaded or holds none."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)).resolve()
    try:
        try:
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except (MlflowException, OSError):  # a runs:/ URI of an MLflow 3 logged model: next
            return None
        found = _model_dir_in(root)
        if found is None:
            return None
        relative = str(found.relative_to(tmp))
        (tmp / RESOLVED).write_text(json.dumps({"uri": uri, "model_dir": relative}))
        _replace_dir(tmp, out)
        return out / relative
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, out: Path) -> None:
    """Put the directory ``new`` at ``out`` by renames (a reader never sees half of one)."""
    try:
        os.rename(new, out)
        return
    except OSError:
        if not out.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    try:
        os.rename(out, old / "dir")
        os.rename(new, out)
    except OSError:
        # another process of this node put its own download there first: keep that one
        if not (out / RESOLVED).is_file():
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _model_dir_in(root: Path) -> Path | None:
    """The pyfunc model's export, else the shallowest directory with a config.json (inside
    ``root``: ``model_dir_of`` refuses an MLmodel path that leaves it)."""
    pyfunc = model_dir_of(root)
    if (pyfunc / "config.json").is_file():
        return pyfunc
    found = sorted(
        (p.parent for p in root.rglob("config.json") if p.resolve().is_relative_to(root.resolve())),
        key=lambda p: len(p.parts),
    )
    return found[0] if found else None


def _download_candidates(client: MlflowClient, uri: str):
    """``uri`` itself; then, only if that is asked for (a generator), for ``runs:/RUN/NAME``
    the MLflow 3 logged models named NAME whose source run is RUN."""
    yield uri
    if not uri.startswith("runs:/"):
        return
    run_id, _, name = uri[len("runs:/") :].partition("/")
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'"
    )
    yield from (f"models:/{m.model_id}" for m in found if not name or m.name == name.strip("/"))


def _run_of(client: MlflowClient, uri: str) -> str | None:
    """The run that logged the model: runs:/RUN/..., models:/NAME/VERSION, models:/NAME@ALIAS,
    models:/MODEL_ID (an MLflow 3 logged model); None for other forms (e.g. a stage)."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/")[0]
    ref = uri[len("models:/") :] if uri.startswith("models:/") else ""
    name, _, version = ref.partition("/")
    try:
        if "@" in ref:
            return client.get_model_version_by_alias(*ref.split("@", 1)).run_id
        if version.isdigit():
            return client.get_model_version(name, version).run_id
        if ref and not version:
            return client.get_logged_model(ref).source_run_id
    except (MlflowException, OSError):  # the link is a nicety; the model itself was found
        return None
    return None


def log_model(uri: str, run_id: str, export_dir: Path, registered_name: str | None) -> str:
    """Log ``export_dir`` into run ``run_id`` as the portable pyfunc model (registered under
    ``registered_name`` when given); returns the model's URI."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
            # MLflow stores a directory artifact under its own name: stage it as MODEL_ARTIFACT
            staged = Path(tmp) / MODEL_ARTIFACT
            shutil.copytree(export_dir, staged)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=GazePyfuncModel(),
                artifacts={MODEL_ARTIFACT: str(staged)},
                code_paths=code_paths(),
                signature=signature(),
                input_example=input_example(),
                pip_requirements=pip_requirements(),
                registered_model_name=registered_name,
            )
    finally:
        # the global tracking URI is process state: give back what the caller had
        mlflow.set_tracking_uri(previous)
    print(f"[finetune] MLflow model: {info.model_uri}", flush=True)
    return info.model_uri
