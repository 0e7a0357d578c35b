"""Per-reason counts of dropped samples, shared by every process of a Ray job.

Decoding runs in Ray Data tasks and encoding in the Ray Train workers, so the
counts live in one named actor (``DROPS_ACTOR`` in namespace ``NAMESPACE``),
created by ``build_train_dataset`` in the driver, which owns it, on the driver's node. Each bad
sample is counted and logged once per (tar, key, reason), however many epochs
re-read it. ``drop_counts()`` reads the counts from any process of the job
(an empty dict when no counter exists), e.g. to log them to MLflow as
``data/dropped/<reason>``.
"""

from __future__ import annotations

import logging
from collections import Counter

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "gazeattn"
DROPS_ACTOR = "gazeattn-data-drops"
# counted like a reason, but the sample was kept (cut to max_length), not dropped
TRUNCATED = "truncated"
log = logging.getLogger("pipelines.data")
_OWNED = None


@ray.remote(num_cpus=0)
class DropCounter:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()
        self.counts: Counter[str] = Counter()
        logging.basicConfig(level=logging.INFO)

    def add(self, events: list[tuple[str, str, str, str]]) -> None:
        """(tar, key, reason, detail) events; a repeated (tar, key, reason) is ignored."""
        for url, key, reason, detail in events:
            if (url, key, reason) in self.seen:
                continue
            self.seen.add((url, key, reason))
            self.counts[reason] += 1
            log.warning("%s %s key=%s %s", reason, url, key, detail)

    def get(self) -> dict[str, int]:
        return dict(self.counts)

    def reset(self) -> None:
        self.seen.clear()
        self.counts.clear()


def drop_counter(create: bool = False):
    """The job's counter actor (created when ``create``), or None when there is none."""
    global _OWNED
    if create:
        # a named actor dies with its creator's handle (handles from get_actor do not keep
        # it alive), so the creating process keeps that handle for the life of its job
        found = drop_counter()
        if _OWNED is None or found is None or found._actor_id != _OWNED._actor_id:
            # on the creator's node: it lives as long as the job's driver, whatever other node
            # of the cluster fails (unpinned, it may land on a node that dies mid-run)
            here = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
            _OWNED = DropCounter.options(
                name=DROPS_ACTOR, namespace=NAMESPACE, get_if_exists=True, scheduling_strategy=here
            ).remote()
        return _OWNED
    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(DROPS_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


def report_drops(counter, events: list[tuple[str, str, str, str]]) -> None:
    """Send events to the counter and wait (bad samples are rare; a count is never lost in
    flight); log locally when there is no counter."""
    if not events:
        return
    if counter is None:
        for url, key, reason, detail in events:
            log.warning("%s %s key=%s %s", reason, url, key, detail)
        return
    ray.get(counter.add.remote(events))


def _counts() -> dict[str, int]:
    counter = drop_counter()
    return ray.get(counter.get.remote()) if counter is not None else {}


def drop_counts() -> dict[str, int]:
    """Dropped samples per reason so far in this Ray job (empty without a counter)."""
    return {k: v for k, v in _counts().items() if k != TRUNCATED}


def truncated_count() -> int:
    """Samples kept but cut to ``max_length`` so far in this Ray job."""
    return _counts().get(TRUNCATED, 0)


def reset_drop_counts() -> None:
    """Forget every count (e.g. between evaluation runs in one job, or tests)."""
    counter = drop_counter()
    if counter is not None:
        ray.get(counter.reset.remote())
