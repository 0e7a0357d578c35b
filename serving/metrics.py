"""Prometheus metrics of each replica, through Ray Serve's metrics API.

Ray exports them on every node's metrics endpoint (``ray_`` prefixed, e.g.
``ray_gazeattn_requests_total``), with the ``deployment``, ``replica`` and
``application`` tags Serve adds. Serve's own request metrics (``ray_serve_*``)
sit beside them.
"""

from __future__ import annotations

from ray.serve import metrics

# seconds; a first token waits for its prefill (long on CPU for multi-frame prompts)
TTFT_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


class ServeMetrics:
    """The app's metrics; ``status`` of a request is ok, client_error, server_error,
    rejected (over the queue limit) or cancelled (the client went away)."""

    def __init__(self):
        self.requests = metrics.Counter(
            "gazeattn_requests_total",
            description="Chat completion requests, by outcome.",
            tag_keys=("status",),
        )
        self.queue_length = metrics.Gauge(
            "gazeattn_queue_length", description="Requests waiting to be prefilled."
        )
        self.batch_size = metrics.Gauge(
            "gazeattn_running_batch_size", description="Sequences decoding together."
        )
        self.ttft = metrics.Histogram(
            "gazeattn_time_to_first_token_seconds",
            description="From a request's arrival to its first generated token.",
            boundaries=TTFT_BOUNDARIES,
        )
        self.itl = metrics.Histogram(
            "gazeattn_inter_token_latency_seconds",
            description="Between consecutive generated tokens of a request.",
            boundaries=ITL_BOUNDARIES,
        )
        self.generated = metrics.Counter(
            "gazeattn_generated_tokens_total", description="Completion tokens generated."
        )
        self.prompt = metrics.Counter(
            "gazeattn_prompt_tokens_total", description="Prompt tokens prefilled."
        )
        self.attended = metrics.Counter(
            "gazeattn_visual_entries_attended_total",
            description="Visual KV entries attended, summed over generated tokens "
            "(each token: mean over layers and heads).",
        )
        self.dense = metrics.Counter(
            "gazeattn_visual_entries_dense_total",
            description="Visual KV entries dense attention would read for the same tokens.",
        )
        self.cached = metrics.Counter(
            "gazeattn_prefix_cache_tokens_total",
            description="Prompt tokens whose prefill came from the prefix cache.",
        )
        self.prefix_hit_rate = metrics.Gauge(
            "gazeattn_prefix_cache_hit_rate",
            description="Prefix cache lookups that hit, of all (prompts with images or video).",
        )
        self.prefix_bytes = metrics.Gauge(
            "gazeattn_prefix_cache_bytes", description="Bytes of prefilled prefixes held."
        )
        self.prefix_entries = metrics.Gauge(
            "gazeattn_prefix_cache_entries", description="Prefilled prefixes held."
        )
        self.pixels_skipped = metrics.Counter(
            "gazeattn_prefix_pixels_skipped_total",
            description="Requests prepared without their pixel inputs (their prefix cached).",
        )
        self.prepared_again = metrics.Counter(
            "gazeattn_prefix_prepared_again_total",
            description="Of those, requests prepared again with their pixels (their prefix "
            "was evicted before the engine could hold it).",
        )
        self.media_hits = metrics.Counter(
            "gazeattn_media_cache_hits_total",
            description="Images and videos a preparing process found already processed "
            "(its media cache).",
        )
        self.media_misses = metrics.Counter(
            "gazeattn_media_cache_misses_total",
            description="Images and videos a preparing process processed (not in its media "
            "cache, or with none).",
        )
        self.chunks = metrics.Counter(
            "gazeattn_prefill_chunks_total",
            description="Chunks of prompts prefilled in chunks (one per engine step).",
        )
        self._chunks_seen = 0

    def outcome(self, status: str) -> None:
        self.requests.inc(tags={"status": status})

    def engine(self, engine) -> None:
        """The engine's queue, batch and prefix cache (after each step)."""
        self.queue_length.set(engine.num_waiting)
        self.batch_size.set(engine.num_running)
        if engine.chunks_run > self._chunks_seen:
            self.chunks.inc(float(engine.chunks_run - self._chunks_seen))
            self._chunks_seen = engine.chunks_run
        if engine.prefix_cache is not None:
            stats = engine.prefix_cache.stats
            lookups = stats.hits + stats.misses
            self.prefix_hit_rate.set(stats.hits / lookups if lookups else 0.0)
            self.prefix_bytes.set(stats.bytes)
            self.prefix_entries.set(stats.entries)

    def media(self, *, hits: int, misses: int) -> None:
        """What a request's preparation found in its process's media cache."""
        for counter, value in ((self.media_hits, hits), (self.media_misses, misses)):
            if value > 0:
                counter.inc(float(value))

    def finished(
        self, *, prompt: int, cached: int, generated: int, attended: float, dense: float
    ) -> None:
        for counter, value in (
            (self.prompt, prompt),
            (self.cached, cached),
            (self.generated, generated),
            (self.attended, attended),
            (self.dense, dense),
        ):
            if value > 0:
                counter.inc(float(value))
