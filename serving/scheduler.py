"""A replica's scheduler loop: one thread owns the model and steps the engine.

The event loop never runs the model. A request handler submits its request
(``Scheduler.submit``, cheap: the prompt is already encoded) and reads the
request's outputs from its own ``RequestStream`` as the scheduler thread
produces them (``loop.call_soon_threadsafe``). A handler that goes away (client
disconnect) cancels its stream; the engine frees the slot at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from gazeattn.engine import Engine, EngineSequence, StepOutput
from serving.requests import Prepared

logger = logging.getLogger("ray.serve")


class RequestStream:
    """The outputs of one request, read on the event loop with ``async for``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.sequence: EngineSequence | None = None
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        self.finished = out.finished
        return out


class Scheduler:
    """Steps ``engine`` in a daemon thread while there is work; ``on_step`` sees the engine
    after every step (metrics).

    A step that fails ends the requests in its batch (``Engine.abort``) and the loop goes on.
    If the loop itself dies (``abort`` failing too, e.g. after a sticky CUDA error), every
    request still open ends with the error, new ones are refused, and ``alive`` turns False
    (the deployment's health check, so that Serve replaces the replica).
    """

    def __init__(self, engine: Engine, on_step: Callable[[Engine], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self.failure: BaseException | None = None
        self._open: set[RequestStream] = set()  # submitted, not yet finished
        self._open_lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gazeattn-scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    def submit(self, prepared: Prepared) -> RequestStream:
        """Queue a validated request (call on the event loop)."""
        if not self.alive:
            raise RuntimeError(f"the scheduler loop is dead: {self.failure!r}")
        stream = RequestStream(asyncio.get_running_loop())
        with self._open_lock:
            self._open.add(stream)
        try:
            stream.sequence = self.engine.submit(
                prepared.generation, tag=stream, **prepared.engine_options()
            )
        except BaseException:
            with self._open_lock:
                self._open.discard(stream)
            raise
        return stream

    def cancel(self, stream: RequestStream) -> None:
        with self._open_lock:
            self._open.discard(stream)
        if stream.sequence is not None and not stream.finished:
            self.engine.cancel(stream.sequence)

    def close(self) -> None:
        self._closed.set()
        self.engine.wake()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - recorded, and every open request told
            self.failure = err
            logger.critical("the scheduler loop died; the replica is unhealthy", exc_info=err)
            with self._open_lock:
                streams, self._open = list(self._open), set()
            self._deliver([(s, StepOutput(sequence=s.sequence, error=err)) for s in streams])

    def _loop(self) -> None:
        while not self._closed.is_set():
            if not self.engine.wait_for_work(timeout=0.5):
                continue
            try:
                self.engine.step(emit=self._dispatch)
            except Exception as err:  # noqa: BLE001 - the loop must outlive a broken step
                logger.exception("an engine step failed; ending every request in the batch")
                self._dispatch(self.engine.abort(err))
            if self.on_step is not None:
                try:
                    self.on_step(self.engine)
                except Exception:  # noqa: BLE001 - metrics never stop decoding
                    logger.exception("recording engine metrics failed")

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        items = []
        for out in outputs:
            stream: RequestStream = out.sequence.tag
            if out.finished:
                with self._open_lock:
                    self._open.discard(stream)
            items.append((stream, out))
        self._deliver(items)

    @staticmethod
    def _deliver(items: list[tuple[RequestStream, StepOutput]]) -> None:
        """Each output into its stream's queue: one wake-up of each event loop per step, not
        one per stream (16 streams, 16 wake-ups a step before)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, out in items:
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                # the requests' event loop is closed (the replica is shutting down)
                for _, out in batch:
                    if out.sequence is not None:
                        out.sequence.cancelled = True


def _put_all(batch: list[tuple[RequestStream, StepOutput]]) -> None:
    for stream, out in batch:
        stream.queue.put_nowait(out)
