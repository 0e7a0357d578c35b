"""The jobs on a two-node Ray cluster, and the failures clusters have.

A head and a second node, each started by `ray start` with one `train_slot`, so the two
ZeRO-3 workers of the demo fine-tuning (each asking for a slot) must land on different
nodes. The job goes in through `ray job submit` as on a real cluster; the export is
served from the same cluster with `serve deploy`. Then the faults, each with its
expected outcome: a Serve replica killed under bounded load, and one run that loses first a
training worker (it resumes from its checkpoint) and then the second node, its raylet and
worker killed together (it resumes on a replacement node). The MLflow server stopping mid-run is tested on one node
(``tests/training/test_finetune.py``): the tracker that rides it out is the same code here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.cluster.harness import RAY, LocalCluster
from tests.serve.harness import data_url, image_bytes, image_part, user
from tests.servers import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
APP = "gazeattn"
REPLICA_CLASS = f"ServeReplica:{APP}:GazeChat"

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    nodes = LocalCluster()
    try:
        nodes.start_head(num_cpus=2, resources={"train_slot": 1})
        nodes.add_node("node-b", num_cpus=2, resources={"train_slot": 1})
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # generated once by the first job; later jobs find it in place
    return tmp_path_factory.mktemp("cluster-data")


def finetune_args(name: str, storage: Path, data: Path, uri: str | None, **sets) -> list[str]:
    """The README's fine-tuning command with small test settings."""
    overrides = {
        "run.name": name,
        "run.storage_path": storage,
        "data.synthetic_dir": data,
        "data.synthetic.n_train": 12,
        "data.synthetic.n_test": 2,
        "data.progress_bars": False,
        "train.micro_batch_size": 2,
        "train.log_every": 1,
        "top_k_schedule.warmup_steps": 2,
        # each worker takes the one train_slot its node has: one worker per node
        "scaling.resources_per_worker.train_slot": 1,
        "mlflow.experiment": "cluster",
        "mlflow.system_metrics": False,
        "mlflow.registered_model_name": "null",
        **({"mlflow.tracking_uri": uri} if uri else {"mlflow.enabled": False}),
        **sets,
    }
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    return ["python", "jobs/finetune.py", "--config", "configs/demo.yaml", *args]


def submit_command(cluster: LocalCluster, entrypoint: list[str], *options: str) -> list[str]:
    """`ray job submit` with the project's runtime_env, as the README writes it."""
    return [str(RAY), "job", "submit", "--address", cluster.dashboard, *options,
            "--working-dir", str(REPO), "--runtime-env", str(REPO / "runtime_env.yaml"),
            "--", *entrypoint]  # fmt: skip


def submit(cluster: LocalCluster, entrypoint: list[str]) -> str:
    """Submit without waiting; returns the job id."""
    cmd = submit_command(cluster, entrypoint, "--no-wait")
    done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    match = re.search(r"raysubmit_\w+", done.stdout + done.stderr)
    assert match, done.stdout
    return match.group(0)


def job_status(cluster: LocalCluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.dashboard).get_job_status(job_id).value)


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard).get_job_logs(job_id)


def wait_job(cluster: LocalCluster, job_id: str, timeout: float = 900) -> str:
    status = wait_for(
        lambda: (s := job_status(cluster, job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
        timeout=timeout,
        interval=2,
    )
    assert status, f"job {job_id} still {job_status(cluster, job_id)} after {timeout}s"
    return status


def worker_nodes(logs: str) -> dict[int, set[str]]:
    """rank -> the node ids it ran on, from the workers' start lines."""
    nodes: dict[int, set[str]] = {}
    for rank, node in re.findall(r"\[train\] worker rank (\d+)/\d+ on node (\w+)", logs):
        nodes.setdefault(int(rank), set()).add(node)
    return nodes


def head_id(cluster: LocalCluster) -> str:
    return next(n.node_id for n in cluster.nodes if n.name == "head")


def loss_steps(uri: str, run_name: str) -> list[int]:
    """The steps of the one MLflow run of that name that have a logged loss."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cluster")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`gazeattn.run_name` = '{run_name}'"
    )
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {run_name}"
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))


def committed_step(storage: Path, name: str) -> int | None:
    """The step of the run's latest checkpoint that Ray Train has registered (every rank
    reported it): what a restarted worker group resumes from."""
    try:
        snapshot = json.loads((storage / name / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get("step")


def start_fault_run(cluster, uri: str, data: Path, storage: Path, name: str, steps: int):
    """Submit a run and wait for its first registered checkpoint; returns (job id, its step)."""
    entry = finetune_args(name, storage, data, uri,
                          **{"train.max_steps": steps, "train.checkpoint_every": 4,
                             "run.max_failures": 3})  # fmt: skip
    job = submit(cluster, entry)
    saved = wait_for(lambda: committed_step(storage, name), timeout=600)
    assert saved, job_logs(cluster, job)[-3000:]
    assert job_status(cluster, job) == "RUNNING", "the run ended before the fault"
    return job, saved


def assert_resumed(cluster, job: str, saved: int, uri: str, name: str, steps: int) -> str:
    """The job succeeded after resuming from a checkpoint at or after ``saved``, in one MLflow
    run whose loss covers every step (replayed steps are logged again); returns the logs."""
    assert wait_job(cluster, job) == "SUCCEEDED", job_logs(cluster, job)[-3000:]
    logs = job_logs(cluster, job)
    resumed = [int(n) for n in re.findall(r"resumed from step (\d+)", logs)]
    assert resumed and min(resumed) >= saved, (saved, resumed, logs[-3000:])
    logged = loss_steps(uri, name)
    assert set(logged) == set(range(1, steps + 1)), logged
    return logs


@pytest.fixture(scope="module")
def demo_job(cluster, mlflow_server, data_dir, tmp_path_factory):
    """The demo fine-tuning through `ray job submit` (waiting, as a user would)."""
    storage = tmp_path_factory.mktemp("cluster-ray")
    entry = finetune_args(
        "two-nodes", storage, data_dir, mlflow_server.uri, **{"train.max_steps": 4}
    )
    cmd = submit_command(cluster, entry)  # waits for the job, printing its logs
    done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=900)
    return done, storage / "two-nodes" / "export"


def test_demo_job_runs_its_two_workers_on_two_nodes(cluster, demo_job, mlflow_server):
    done, export = demo_job
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    placed = worker_nodes(done.stdout)
    assert set(placed) == {0, 1}, placed
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    assert placed[0] | placed[1] == nodes and not placed[0] & placed[1], (placed, nodes)
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    steps = loss_steps(mlflow_server.uri, "two-nodes")
    assert steps == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def served(cluster, demo_job, tmp_path_factory):
    """The export deployed on the cluster from the project's serve config (2 replicas)."""
    _, export = demo_job
    config = yaml.safe_load((REPO / "infra" / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app["args"].update(model=str(export), model_name="demo", max_batch_size=4)
    deployment = app["deployments"][0]
    deployment["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    deployment["ray_actor_options"]["num_cpus"] = 0.5
    deployment["max_ongoing_requests"] = 4
    path = tmp_path_factory.mktemp("serve") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = str(RAY.parent / "serve")
    deploy = [serve, "deploy", "--address", cluster.dashboard, str(path)]
    done = subprocess.run(deploy, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_for(lambda: len(running_replicas(cluster)) == 2, timeout=300)
        assert ready, serve_status(cluster)
        yield url
    finally:
        subprocess.run([serve, "shutdown", "-y", "--address", cluster.dashboard],
                       env=cluster.env, capture_output=True, timeout=120)  # fmt: skip


def serve_status(cluster: LocalCluster) -> dict:
    try:
        return cluster.api("/api/serve/applications/")
    except OSError as err:
        return {"error": repr(err)}


def running_replicas(cluster: LocalCluster) -> set[str]:
    """Actor ids of the app's RUNNING replicas (empty while the app is not RUNNING)."""
    app = serve_status(cluster).get("applications", {}).get(APP)
    if not app or app["status"] != "RUNNING":
        return set()
    replicas = app["deployments"]["GazeChat"]["replicas"]
    return {r["actor_id"] for r in replicas if r["state"] == "RUNNING"}


def chat(url: str, messages: list[dict], timeout: float = 120) -> httpx.Response:
    body = {"model": "demo", "max_tokens": 4, "temperature": 0, "messages": messages}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def text(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_the_export_is_served_from_the_cluster(cluster, served):
    image = image_part(data_url(image_bytes(0)))
    reply = chat(served, user(image, text="What colour is the square?"))
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["model"] == "demo" and out["choices"][0]["finish_reason"] in ("stop", "length")
    # the image went through the vision tower: its tokens are in the prompt (the demo
    # checkpoint's 48 px image is 6 x 6 visual tokens and 4 context tokens, beside the text)
    assert out["usage"]["prompt_tokens"] > 6 * 6 + 4, out["usage"]
    assert len(cluster.actors(REPLICA_CLASS)) == 2


def test_a_killed_replica_under_load_fails_clearly_and_the_app_recovers(cluster, served):
    victim = cluster.actors(REPLICA_CLASS)[0]
    outcomes: list[object] = []
    stop = threading.Event()

    def client(i: int) -> None:
        # bounded: 3 clients, each with one request in flight, for at most 150 s
        deadline = time.monotonic() + 150
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                outcomes.append(chat(served, text(f"question {i}"), timeout=60))
            except httpx.HTTPError as err:
                outcomes.append(err)

    def ok(items) -> int:
        return sum(getattr(o, "status_code", 0) == 200 for o in items)

    def recovered() -> bool:
        replicas = running_replicas(cluster)
        return len(replicas) == 2 and victim.actor_id not in replicas

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: ok(outcomes) >= 3, 120), outcomes[:3]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = len(outcomes)
        # the load goes on while Serve notices the death and starts a replacement
        back = wait_for(recovered, timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert back, serve_status(cluster)
    failures = [o for o in outcomes if not (isinstance(o, httpx.Response) and o.status_code == 200)]
    for failure in failures:
        # no hang and no dropped connection: a server error with a body says what happened
        assert isinstance(failure, httpx.Response), repr(failure)
        assert failure.status_code in (500, 502, 503, 504) and failure.text, failure
    # only what the dead replica held can fail: at most one request per client
    assert len(failures) <= 3, [f.text[:200] for f in failures]
    # the other replica kept answering while the dead one was replaced
    assert ok(outcomes[killed_at:]) >= 6, outcomes[killed_at:]
    assert chat(served, text("What colour is the square?")).status_code == 200


def test_a_killed_worker_then_a_killed_node_each_resume_from_a_checkpoint(
    cluster, mlflow_server, data_dir, tmp_path
):
    """Two faults in one run (last in this module: the second node does not come back).
    First the training worker on the second node dies (SIGKILL) and Ray Train restarts the
    group on the same nodes; once that restarted group has committed a checkpoint of its
    own, the second node dies (its raylet and worker, SIGKILL) and the run resumes on a
    replacement node."""
    name, steps = "worker-then-node", 20
    job, saved = start_fault_run(cluster, mlflow_server.uri, data_dir, tmp_path, name, steps)
    head = head_id(cluster)
    victim = next(a for a in cluster.actors("RayTrainWorker") if a.node_id != head)
    os.kill(victim.pid, signal.SIGKILL)

    def restarted_and_saved() -> int | None:
        """The step of a checkpoint the restarted group committed itself (4 steps after the
        one it resumed from), once it has."""
        resumed = re.findall(r"resumed from step (\d+)", job_logs(cluster, job))
        step = committed_step(tmp_path, name)
        return step if resumed and step and step >= int(resumed[-1]) + 4 else None

    again = wait_for(restarted_and_saved, timeout=600, interval=1)
    assert again, job_logs(cluster, job)[-3000:]
    assert job_status(cluster, job) == "RUNNING", "the run ended before the second fault"
    second = next(n for n in cluster.nodes if n.name == "node-b")
    # the job's own actors live on the driver's node (the head), not on the one that dies
    assert {a.node_id for a in cluster.actors("DropCounter")} == {head}
    cluster.kill_node(second)
    # the run cannot place its second worker until a node with a train_slot joins, as one
    # started by the autoscaler would
    replacement = cluster.add_node("node-c", num_cpus=2, resources={"train_slot": 1})

    logs = assert_resumed(cluster, job, saved, mlflow_server.uri, name, steps)
    resumed = [int(n) for n in re.findall(r"resumed from step (\d+)", logs)]
    # each rank says where it resumed: two restarts, the second from the restarted group's
    # own checkpoint
    assert len(set(resumed)) >= 2 and max(resumed) >= again, (saved, again, resumed)
    assert replacement.node_id in set().union(*worker_nodes(logs).values()), logs[-3000:]
    assert (tmp_path / name / "export" / "config.json").exists()
