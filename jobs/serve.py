"""Serve a gaze model locally: an OpenAI-compatible endpoint on 127.0.0.1.

    python jobs/serve.py --model DIR [--port 8000] [--config infra/serve_config.yaml]

The deployment options (autoscaling, actor resources, max_ongoing_requests) and
the app's settings come from the config's first application; --model and
--model-name replace its model. Ctrl-C (SIGINT) or SIGTERM stops Serve.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

import ray
import yaml
from ray import serve

from serving.app import app
from serving.settings import ServeSettings

CONFIG = Path(__file__).resolve().parents[1] / "infra" / "serve_config.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="gaze model directory or MLflow model URI")
    parser.add_argument(
        "--model-name", default=None, help="name clients send (default: the directory's)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()

    # Ctrl-C (and SIGTERM) stop Serve cleanly, also when this was started as a background
    # job of a shell, which starts it with SIGINT ignored (Python then raises nothing on it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    application = yaml.safe_load(args.config.read_text())["applications"][0]
    settings = ServeSettings.model_validate(
        {**application.get("args", {}), "model": args.model, "model_name": args.model_name}
    )
    options = {k: v for k, v in application["deployments"][0].items() if k != "name"}
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(app(settings, **options), name="gazeattn", route_prefix="/")
        print(
            f"serving {settings.model} at http://127.0.0.1:{args.port}/v1 (Ctrl-C stops)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
