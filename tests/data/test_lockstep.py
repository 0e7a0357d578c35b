"""Ranks that lose different numbers of samples at encode time still take the same steps."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import pyarrow as pa
    import torch.distributed as dist
    from gazeattn.processing import GazeProcessor
    from pipelines.config import DataConfig
    from pipelines.dataset import DECODED_SCHEMA, iter_train_batches

    class Shard:
        def __init__(self, rows):
            self.rows = rows
        def iter_batches(self, **_):
            yield pa.Table.from_pylist(self.rows, schema=DECODED_SCHEMA)

    def row(i, media):
        value = "<image> colour?" if media else "colour?"
        record = {"conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "red"}]}
        return {"key": f"{i:03d}", "url": "x.tar", "record": json.dumps(record),
                "num_images": int(media), "video_frames": [], "media_shapes": [[16, 16]] * int(media),
                "media": np.zeros((int(media), 16, 16, 3), np.uint8).tobytes()}

    tiny, out, distributed = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    rank = int(os.environ["RANK"])
    if distributed:
        dist.init_process_group("gloo")
    # rank 1 has two text-only rows, dropped by text_only="drop": 3 local batches vs 2
    rows = [row(i, media=not (rank == 1 and i in (1, 4))) for i in range(6)]
    cfg = DataConfig(text_only="drop")
    processor = GazeProcessor.from_pretrained(tiny)
    steps = sum(1 for _ in iter_train_batches(Shard(rows), processor, cfg, batch_size=2, epoch=0))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(steps, f)
    if distributed:
        dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gazeattn.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), image_size=16, patch_size=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tiny: Path, out: Path, distributed: bool) -> list[int]:
    script = out / "worker.py"
    script.write_text(WORKER)
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
    }
    args = [str(tiny), str(out), "1" if distributed else "0"]
    procs = [
        subprocess.Popen([sys.executable, str(script), *args], env={**env, "RANK": str(rank)})
        for rank in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=180) == 0
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_ranks_stop_together(tiny, tmp_path):
    (tmp_path / "solo").mkdir()
    (tmp_path / "dist").mkdir()
    # alone, the ranks would take different numbers of steps (a ZeRO-3 hang) ...
    assert run_ranks(tiny, tmp_path / "solo", distributed=False) == [3, 2]
    # ... together they agree before every step and stop at the shorter one
    assert run_ranks(tiny, tmp_path / "dist", distributed=True) == [2, 2]
