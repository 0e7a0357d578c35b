"""A multi-node Ray cluster on this machine, started the way a real one is: `ray start`.

Every node is its own raylet (own resources, own processes) on 127.0.0.1, joined to the
head through the GCS address; the head runs the dashboard, the job server and the state
API that the tests (and users) talk to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, wait_for

RAY = Path(sys.executable).parent / "ray"


@dataclass(kw_only=True)
class Node:
    name: str
    node_id: str


class LocalCluster:
    """``ray start --head`` plus worker nodes; ``stop()`` ends every Ray process here."""

    def __init__(self) -> None:
        # Ray's socket paths must stay under the OS limit: a short temp dir, not pytest's
        self.temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            # every worker line in a job's logs: Ray's dedup folds lines that differ only in
            # numbers and ids (the two ranks' "worker rank r on node N" lines among them)
            "RAY_DEDUP_LOGS": "0",
            # `python` in a job's entrypoint is this interpreter, as in an activated venv
            "PATH": os.pathsep.join([str(RAY.parent), os.environ.get("PATH", "")]),
        }
        self.nodes: list[Node] = []

    def _ray(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            [str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done.stdout

    def start_head(self, num_cpus: float, resources: dict) -> Node:
        self._ray(
            "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
            "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port), "--temp-dir", self.temp,
        )  # fmt: skip
        ids = wait_for(self.alive_ids, timeout=60)
        if not ids:
            raise TimeoutError("the head node is not listed alive")
        node = Node(name="head", node_id=next(iter(ids)))
        self.nodes.append(node)
        return node

    def add_node(self, name: str, num_cpus: float, resources: dict) -> Node:
        """A worker node joining the head; returns once the cluster lists it alive."""
        before = wait_for(self.alive_ids, timeout=60)
        if before is None:
            raise TimeoutError("the head's state API does not answer")
        # nodes on one machine need their own agent ports (the defaults are fixed numbers)
        self._ray(
            "start", "--address", self.address, "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
            "--dashboard-agent-listen-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--temp-dir", self.temp,
        )  # fmt: skip
        new = wait_for(lambda: (self.alive_ids() or before) - before, timeout=60)
        if len(new) != 1:
            raise TimeoutError(f"node {name} did not join the cluster (new alive nodes: {new})")
        node = Node(name=name, node_id=next(iter(new)))
        self.nodes.append(node)
        return node

    def api(self, path: str, timeout: float = 10):
        with urllib.request.urlopen(f"{self.dashboard}{path}", timeout=timeout) as resp:
            return json.load(resp)

    def alive_nodes(self) -> list[dict]:
        """The ALIVE nodes as dicts (node_id, is_head_node, resources_total, ...)."""
        from ray.util.state import list_nodes

        # filtered here, not by the server: once a node has died, a server-side ALIVE filter
        # returns fewer nodes than the cluster has, which the client reports as truncated
        # output and raises on
        nodes = list_nodes(address=self.dashboard, limit=1000, raise_on_missing_output=False)
        return [dict(n.__dict__) for n in nodes if n.state == "ALIVE"]

    def alive_ids(self) -> set[str] | None:
        """Ids of the ALIVE nodes; None while the head cannot say (its dashboard is busy)."""
        try:
            return {n["node_id"] for n in self.alive_nodes()}
        except Exception:  # noqa: BLE001 - any state API failure means "ask again"
            return None

    def raylet_pid(self, node: Node) -> int:
        """The pid of the node's raylet (its command line names the node id)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # the process ended while we looked
                continue
            if args and args[0].endswith(b"/raylet") and node.node_id.encode() in b" ".join(args):
                return int(entry.name)
        raise LookupError(f"no raylet process for node {node.name} ({node.node_id})")

    def kill_node(self, node: Node, timeout: float = 120) -> None:
        """SIGKILL the node's raylet and every process it started (its workers), as when a
        machine fails; returns once the head has marked the node dead (its GCS health check
        fails for a few periods). A worker whose raylet alone died can run on for a while."""
        raylet = self.raylet_pid(node)
        for pid in [raylet, *_descendants(raylet)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended by itself meanwhile
                pass
        dead = wait_for(lambda: node.node_id not in (self.alive_ids() or {node.node_id}), timeout)
        if not dead:
            raise TimeoutError(
                f"node {node.name} still listed alive {timeout}s after its raylet died"
            )
        self.nodes.remove(node)

    def actors(self, class_name: str) -> list:
        """Alive actors of a class, with their pid and node id."""
        from ray.util.state import list_actors

        return list_actors(
            address=self.dashboard,
            filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
            detail=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [str(RAY), "stop", "--force"], env=self.env, capture_output=True, timeout=120
        )
        shutil.rmtree(self.temp, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the field after the command (which may hold spaces) is the state, then the ppid
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out
