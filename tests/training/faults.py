"""Step hooks for the fine-tuning tests (``run_finetune(hooks=...)``): a trace of the samples
of every step, and a worker process killed once at a step (fault injection).

Ray sends the hooks to its workers, which cannot import ``tests``: this module is pickled by
value.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle

from training.loop import StepEvent

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class TraceSteps:
    """The sample ids of each optimizer step, one file per rank under ``directory``, with the
    process id (which tells a restarted attempt's run of a step from the failed one's)."""

    directory: str

    def __call__(self, event: StepEvent) -> None:
        with open(Path(self.directory) / f"rank{event.rank}.tsv", "a") as f:
            f.writelines(
                f"{event.step}\t{event.epoch}\t{os.getpid()}\t{i}\n" for i in event.sample_ids
            )


@dataclass(frozen=True)
class CrashOnce:
    """The process of ``rank`` dies once at ``step`` (``marker`` records that it did)."""

    rank: int
    step: int
    marker: str

    def __call__(self, event: StepEvent) -> None:
        marker = Path(self.marker)
        if event.rank != self.rank or event.step != self.step or marker.exists():
            return
        marker.write_text(str(os.getpid()))
        os._exit(1)
