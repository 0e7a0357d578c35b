"""Evaluate a gaze model on held-out data; results in MLflow. See evaluation/cli.py.

python jobs/evaluate.py --model PATH_OR_MLFLOW_URI --shards ... [--gaze-top-k K | --keep-ratio R] [--attn dense]
"""

from evaluation.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
