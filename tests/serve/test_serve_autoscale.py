"""Under bounded load (8 clients, at most 20 s on loopback) every request succeeds and the
deployment scales 1 -> 2 replicas and back; a killed replica is replaced."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gazeattn.ops import GazeConfig
from gazeattn.tiny import build_tiny
from serving.settings import ServeSettings
from tests.serve.harness import data_url, image_bytes, image_part, local_serve, user
from tests.servers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

APP, MODEL = "scaled", "gaze-tiny"
CLIENTS, LOAD_SECONDS = 8, 20
AUTOSCALING = dict(
    min_replicas=1,
    max_replicas=2,
    target_ongoing_requests=1,
    look_back_period_s=2,
    upscale_delay_s=1,
    downscale_delay_s=3,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve

    from serving.app import app

    model_dir = build_tiny(tmp_path_factory.mktemp("model"), gaze_config=GazeConfig(top_k=2))
    settings = ServeSettings(model=str(model_dir), model_name=MODEL, max_batch_size=4)
    options = dict(
        autoscaling_config=AUTOSCALING, max_ongoing_requests=4, ray_actor_options={"num_cpus": 1}
    )
    with local_serve() as url:
        serve.run(app(settings, **options), name=APP, route_prefix="/")
        yield url


def replicas() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[APP].deployments["GazeChat"].replica_states)


def ask(client: openai.OpenAI, seed: int):
    return client.chat.completions.create(
        model=MODEL,
        messages=user(image_part(data_url(image_bytes(seed)))),
        max_tokens=12,
        temperature=0,
    )


def test_load_scales_up_and_back(server):
    assert replicas() == {"RUNNING": 1}
    stop = threading.Event()
    deadline = time.monotonic() + LOAD_SECONDS
    done, failures = [], []

    def run_client(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0, timeout=60)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                out = ask(client, i)
                used = out.usage.completion_tokens
                # "length" exactly when the 12-token budget is used up, else an end token
                assert out.choices[0].finish_reason == ("length" if used == 12 else "stop")
                assert 1 <= used <= 12
                done.append(out)
            except Exception as err:  # noqa: BLE001 - every failure is reported below
                failures.append(repr(err))

    most = 1
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(run_client, i) for i in range(CLIENTS)]
        scaled_at = None
        while time.monotonic() < deadline:
            # the autoscaler's decision: a second replica exists (on a busy machine it may
            # still be starting when the load ends; requests are then served by the first)
            states = replicas()
            alive = sum(n for state, n in states.items() if state != "STOPPING")
            most = max(most, alive)
            if alive >= 2 and scaled_at is None:
                scaled_at = len(done)
            # keep the load until both replicas have served a few rounds
            if scaled_at is not None and len(done) >= scaled_at + 2 * CLIENTS:
                break
            time.sleep(0.5)
        stop.set()
        for future in futures:
            future.result()
    assert not failures, failures[:3]
    assert done and most == 2, f"{len(done)} requests, at most {most} replicas"
    assert wait_for(lambda: replicas() == {"RUNNING": 1}, timeout=60), replicas()


def test_killed_replica_is_replaced(server):
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#")
    ]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0, timeout=60)

    def answers() -> bool:
        try:
            return ask(client, 0).choices[0].message.content is not None
        except openai.APIError:
            return False

    assert wait_for(answers, timeout=90)
    assert wait_for(lambda: replicas() == {"RUNNING": 1}, timeout=30), replicas()
