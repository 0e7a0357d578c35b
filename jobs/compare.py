"""Dense vs gaze at several budgets on the same data: table, chart, one MLflow run per point.

python jobs/compare.py --model PATH_OR_MLFLOW_URI --shards ... [--points dense 0.5 0.25 0.125]
"""

from evaluation.cli import compare_main

if __name__ == "__main__":
    compare_main()
