"""The project outside this checkout: the MLflow model in a fresh venv, and the wheel.

One clean venv for the module (pip's cache makes the installs local copies; torch is the CPU
wheel on disk, ``pip install torch==2.13.0``). The project itself is never installed into it:
the MLflow model brings its own code, and the wheel is unpacked into a separate directory
that only the wheel test puts on the path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted(f"jobs.{p.stem}" for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")


class CleanVenv:
    def __init__(self, root: Path):
        self.root = root
        venv.create(root, with_pip=True)
        self.python = str(root / "bin" / "python")
        self.install("torch==2.13.0")

    def env(self, **extra: str) -> dict[str, str]:
        keep = ("HOME", "PATH", "LANG", "TMPDIR", "PIP_FIND_LINKS", "PIP_CERT")
        env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PIP_")}
        return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}

    def install(self, *args: str) -> None:
        # --no-compile: Python compiles what the tests import; byte-compiling every installed
        # module (torch's among them) up front made this module 140 s instead of 92 s
        cmd = [self.python, "-m", "pip", "install", "-q", "--no-compile", *args]
        done = subprocess.run(cmd, env=self.env(DS_BUILD_OPS="0"), capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
        assert "+cpu" in self.version("torch"), "pip fetched a torch other than the on-disk wheel"

    def version(self, package: str) -> str:
        code = f"from importlib.metadata import version; print(version({package!r}))"
        return self.run(code).strip()

    def run(self, code: str, cwd: Path | None = None, **env: str) -> str:
        done = subprocess.run(
            [self.python, "-c", code],
            cwd=cwd or self.root,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"failed in the clean venv:\n{done.stdout}\n{done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory):
    return CleanVenv(tmp_path_factory.mktemp("clean") / "venv")


PREDICT = """
import json, sys
checkout = {checkout!r}
assert not any(p.startswith(checkout) for p in sys.path if p), sys.path
try:
    import gazeattn
except ImportError:
    pass
else:
    raise AssertionError("gazeattn importable before the model is loaded: " + gazeattn.__file__)
import mlflow.pyfunc
import pandas as pd
model = mlflow.pyfunc.load_model({uri!r})
import gazeattn
rows = pd.DataFrame(json.loads({rows!r}))
answers = model.predict(rows, params={{"max_new_tokens": 4}})
print(json.dumps({{"answers": list(answers), "gazeattn": gazeattn.__file__,
                   "inputs": model.metadata.get_input_schema().input_names()}}))
"""


def test_mlflow_model_loads_and_answers_in_a_fresh_venv(clean_venv, mlflow_server, tmp_path):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from gazeattn.generation import GenerationRequest, generate_batch
    from gazeattn.model import load_model
    from gazeattn.tiny import build_tiny
    from tracking.models import encode_image, log_model
    from training.tracking import resolve_run

    export = build_tiny(tmp_path / "export")
    run_id = resolve_run(mlflow_server.uri, "portable", "run")
    model_uri = log_model(mlflow_server.uri, run_id, export, "portable-tiny")
    registry = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    (version,) = registry.search_model_versions("name='portable-tiny'")
    uri = f"models:/portable-tiny/{version.version}"

    # requirements that install on a GPU machine too: pinned, no local (+cpu) versions
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        requirements_file = mlflow.pyfunc.get_model_dependencies(uri, format="pip")
        info = mlflow.models.get_model_info(model_uri)
    finally:
        mlflow.set_tracking_uri(before)
    requirements = Path(requirements_file).read_text()
    pins = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    assert "torch==2.13.0" in pins and not any("+" in p for p in pins), pins
    assert info.signature.inputs.input_names() == ["prompt", "image"]
    assert info.saved_input_example_info is not None

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    rows = [
        {"prompt": "What colour is the square?", "image": encode_image(image)},
        {"prompt": "Say hello.", "image": None},
    ]
    clean_venv.install("-r", requirements_file)
    out = json.loads(
        clean_venv.run(
            PREDICT.format(checkout=str(REPO), uri=uri, rows=json.dumps(rows)),
            cwd=tmp_path,
            MLFLOW_TRACKING_URI=mlflow_server.uri,
        ).splitlines()[-1]
    )
    # the model's own copy of the code, not this checkout's
    assert not out["gazeattn"].startswith(str(REPO)) and "/code/gazeattn/" in out["gazeattn"]
    assert out["inputs"] == ["prompt", "image"]

    # the answers are the checkout's model's greedy answers to the same image question
    model, processor = load_model(export)
    expected = generate_batch(
        model.eval(),
        processor,
        [
            GenerationRequest(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": rows[0]["prompt"]}],
                    }
                ],
                images=[image],
                max_new_tokens=4,
            ),
            GenerationRequest(
                messages=[{"role": "user", "content": [{"type": "text", "text": rows[1]["prompt"]}]}],
                max_new_tokens=4,
            ),
        ],
    )  # fmt: skip
    assert out["answers"] == [r.text for r in expected]


def test_every_job_imports_from_the_wheel(clean_venv, tmp_path):
    """What the Docker image does: the locked requirements, then the project as a wheel (no
    source tree on the path); every job module imports."""
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(REPO)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("gazeattn-*.whl")
    clean_venv.install("-r", str(REPO / "requirements" / "lock.txt"))
    target = tmp_path / "site"
    clean_venv.install("--no-deps", "--target", str(target), str(wheel))
    code = f"""
import importlib, sys
for name in {JOBS!r}:
    module = importlib.import_module(name)
    assert module.__file__.startswith({str(target)!r}), module.__file__
    print(name, "ok")
"""
    out = clean_venv.run(code, cwd=tmp_path, PYTHONPATH=str(target))
    assert out.split() == [w for name in JOBS for w in (name, "ok")]
