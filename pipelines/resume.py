"""Exact data resume: the samples a resumed epoch must skip, shared by every process of a job.

A checkpoint records the data position: the epoch and the ids (``sample_id``: tar and key)
of the samples that every rank trained on in it so far. A resumed worker group sets those
ids on the job's ``ResumeState`` actor (rank 0, before any rank reads data) and reads the
rest of that epoch from the ``resume`` dataset (``build_dataset(..., resume=True)``), whose
first stage drops the ids the actor holds, before the split: the ranks share what is left
of the epoch evenly. Later epochs read the full ``train`` dataset.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.accounting import NAMESPACE

RESUME_ACTOR = "gazeattn-data-resume"
_OWNED = None


@ray.remote(num_cpus=0)
class ResumeState:
    def __init__(self) -> None:
        self.skip: frozenset[str] = frozenset()

    def set(self, ids: list[str]) -> None:
        self.skip = frozenset(ids)

    def get(self) -> frozenset[str]:
        return self.skip


def resume_state(create: bool = False):
    """The job's resume actor (created on this node when ``create``), or None."""
    global _OWNED
    if create:
        if _OWNED is None or resume_state() is None:
            # like the drop counter: owned by the driver, on the driver's node
            here = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
            _OWNED = ResumeState.options(
                name=RESUME_ACTOR, namespace=NAMESPACE, get_if_exists=True, scheduling_strategy=here
            ).remote()
        return _OWNED
    try:
        return ray.get_actor(RESUME_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


def set_skip(ids: list[str]) -> None:
    """The ids the next reading of the ``resume`` dataset drops."""
    state = resume_state()
    if state is None:
        raise RuntimeError("no resume state actor: build the dataset with resume=True first")
    ray.get(state.set.remote(list(ids)))


class SkipConsumed:
    """A Ray Data stage (one actor per reading): raw rows whose id the resume state holds are
    dropped. The ids are fetched once, when the reading starts."""

    def __init__(self) -> None:
        state = resume_state()
        self.skip = pa.array(sorted(ray.get(state.get.remote())) if state else [], pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        if len(self.skip) == 0 or batch.num_rows == 0:
            return batch
        ids = pc.binary_join_element_wise(batch["url"], batch["key"], "#")
        return batch.filter(pc.invert(pc.is_in(ids, value_set=self.skip)))
