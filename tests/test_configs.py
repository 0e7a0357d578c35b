"""Every shipped config loads, and every path the manifests name exists in the repository."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from training.config import load_config

REPO = Path(__file__).resolve().parent.parent
JOB_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
ALL_YAML = sorted(
    p for p in REPO.rglob("*.yaml") if ".venv" not in p.parts and "outputs" not in p.parts
)


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_configs_load(path):
    config = load_config(path)
    ds = REPO / config.train.deepspeed_config
    assert ds.exists(), f"{path.name} names a missing DeepSpeed config {ds}"
    json.loads(ds.read_text())


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs)


def _entrypoints() -> list[tuple[str, str]]:
    found = []
    for path in (REPO / "infra").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            entry = (doc or {}).get("spec", {}).get("entrypoint") if isinstance(doc, dict) else None
            if entry:
                found.append((path.name, entry))
    return found


@pytest.mark.parametrize("manifest,entrypoint", _entrypoints())
def test_manifest_entrypoints_exist(manifest, entrypoint):
    words = shlex.split(entrypoint)
    for word in words:
        if re.fullmatch(r"(jobs|configs)/[\w./-]+", word):
            assert (REPO / word).exists(), f"{manifest}: {word} does not exist"
    config = words[words.index("--config") + 1] if "--config" in words else None
    if config:
        load_config(REPO / config)


def test_dockerfile_installs_the_lock_and_the_whole_project():
    """The image installs requirements/lock.txt, then the project as a package from a context
    that keeps every package pyproject.toml lists (tests/test_packaging.py imports every job
    from that wheel in a clean venv)."""
    import fnmatch
    import tomllib

    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^COPY --chown=\S+ requirements requirements$", text, re.MULTILINE)
    assert "pip install -r requirements/lock.txt" in text
    assert re.search(r"^COPY --chown=\S+ \. \.$", text, re.MULTILINE)
    assert "pip install --no-deps ." in text
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in find["packages"]["find"]["include"]]
    for needed in [*packages, "requirements", "configs", "jobs", "infra", "pyproject.toml"]:
        assert (REPO / needed).exists(), needed
        hits = [pattern for pattern in ignored if fnmatch.fnmatch(needed, pattern)]
        assert not hits, f".dockerignore drops {needed} ({hits})"


def test_rayservice_serves_the_gpu_serve_config():
    service = yaml.safe_load((REPO / "infra" / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "infra" / "serve_config_gpu.yaml").read_text())
    # only the model location may differ: a path on the cluster's shared storage
    embedded["applications"][0]["args"].pop("model")
    local["applications"][0]["args"].pop("model")
    assert embedded == local
    import_path = local["applications"][0]["import_path"]
    module, _, attr = import_path.partition(":")
    assert hasattr(__import__(module, fromlist=[attr]), attr)


def test_the_gpu_serve_config_is_the_cpu_one_with_a_gpu_per_replica():
    """The GPU manifests ask for a GPU per replica (and their nodes offer them); the CPU
    config, for machines like ours, asks for none; nothing else differs."""
    cpu = yaml.safe_load((REPO / "infra" / "serve_config.yaml").read_text())
    gpu = yaml.safe_load((REPO / "infra" / "serve_config_gpu.yaml").read_text())
    options = gpu["applications"][0]["deployments"][0]["ray_actor_options"]
    assert options["num_gpus"] == 1
    assert cpu["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
    cpu["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = 1
    assert cpu == gpu
    assert gpu["applications"][0]["args"]["device"] == "auto"
    service = yaml.safe_load((REPO / "infra" / "kuberay" / "rayservice.yaml").read_text())
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= options["num_gpus"]


def test_rayjob_runs_the_readme_command():
    job = yaml.safe_load((REPO / "infra" / "kuberay" / "rayjob-finetune.yaml").read_text())
    readme = (REPO / "README.md").read_text()
    assert job["spec"]["entrypoint"] in readme


def _manifests() -> list[tuple[str, dict]]:
    return [
        (str(path.relative_to(REPO)), doc)
        for path in sorted((REPO / "infra").rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and "kind" in doc
    ]


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def test_no_manifest_ships_a_secret_value():
    """Secrets are created by the operator (README "Securing a deployment"), never written in
    a manifest: no Secret objects, no literal passwords or keys in an env value."""
    for name, doc in _manifests():
        assert doc["kind"] != "Secret", f"{name} ships a Secret"
        for node in _walk(doc):
            if isinstance(node, dict) and "value" in node and "name" in node:
                key = str(node["name"]).upper()
                if any(w in key for w in ("PASSWORD", "SECRET", "TOKEN", "API_KEY")):
                    assert not node["value"], f"{name}: {node['name']} has a literal value"
    text = "\n".join(p.read_text() for p in (REPO / "infra").rglob("*.yaml"))
    assert "change-me" not in text


def test_secret_references_are_required():
    """A replica without its API key would serve every route to anyone: the key's secret (and
    every other) is required, never optional."""
    for name, doc in _manifests():
        for node in _walk(doc):
            if isinstance(node, dict) and "secretKeyRef" in node:
                assert not node["secretKeyRef"].get("optional"), f"{name}: {node}"


def test_ray_clusters_require_ray_tokens():
    for name, doc in _manifests():
        spec = doc.get("spec", {})
        cluster = {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig"),
        }.get(doc["kind"])
        if cluster is None:
            continue
        if cluster.get("authOptions", {}).get("mode") == "token":
            continue
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}"
                assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], f"{name}"


def test_the_network_policy_keeps_ray_ports_to_ray_pods():
    (policy,) = [d for _, d in _manifests() if d["kind"] == "NetworkPolicy"]
    ray_pods = {"ray.io/is-ray-node": "yes"}
    assert policy["spec"]["podSelector"]["matchLabels"] == ray_pods
    for rule in policy["spec"]["ingress"]:
        if "from" in rule:
            assert rule["from"] == [{"podSelector": {"matchLabels": ray_pods}}]
        else:  # open to the cluster: Serve's port only
            assert [p["port"] for p in rule["ports"]] == [8000]


def test_mlflow_runs_with_basic_auth():
    (server,) = [
        d
        for _, d in _manifests()
        if d["metadata"]["name"] == "mlflow" and d["kind"] == "Deployment"
    ]
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert "--app-name basic-auth" in " ".join(container["args"])
    env = {e["name"]: e for e in container["env"]}
    for key in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert "secretKeyRef" in env[key]["valueFrom"]
    for _, doc in _manifests():
        if doc["kind"] in ("RayCluster", "RayJob"):
            names = {n.get("name") for n in _walk(doc) if isinstance(n, dict)}
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names
