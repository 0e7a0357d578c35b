"""Typed configuration of gaze attention (DESIGN.md sections 1-2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

Routing = Literal["kv_head", "query_head"]
Backend = Literal["auto", "reference", "triton", "dense"]

ROUTINGS: tuple[str, ...] = ("kv_head", "query_head")
BACKENDS: tuple[str, ...] = ("auto", "reference", "triton", "dense")
ALL = "all"


@dataclass(kw_only=True, frozen=True)
class GazeConfig:
    """How a text query selects visual regions.

    Exactly one budget is given: ``top_k`` regions in total over every segment
    visible to the query (an int, or ``"all"``), or ``keep_ratio``, read as
    ``K = max(1, ceil(keep_ratio * visible regions))``.
    """

    region_size: tuple[int, int, int] = (1, 6, 6)
    top_k: int | Literal["all"] | None = None
    keep_ratio: float | None = None
    num_context_tokens: int = 4
    routing: Routing = "kv_head"
    backend: Backend = "auto"
    # an evaluation ablation: route to pseudo-random visible regions (seeded) at the same
    # budget and heads, so accuracy can be compared with where the model would have looked
    random_routing_seed: int | None = None

    def __post_init__(self) -> None:
        region = tuple(self.region_size)
        if len(region) != 3 or any(not isinstance(s, int) or s < 1 for s in region):
            raise ValueError(
                f"region_size must be three ints >= 1 as (t, h, w), got {self.region_size!r}"
            )
        object.__setattr__(self, "region_size", region)
        if (self.top_k is None) == (self.keep_ratio is None):
            raise ValueError(
                "give exactly one of top_k or keep_ratio (set the other to null), got "
                f"top_k={self.top_k!r}, keep_ratio={self.keep_ratio!r}"
            )
        if self.top_k is not None and self.top_k != ALL:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ValueError(f"top_k must be an int >= 1 or 'all', got {self.top_k!r}")
        if self.keep_ratio is not None and not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if not isinstance(self.num_context_tokens, int) or self.num_context_tokens < 0:
            raise ValueError(
                f"num_context_tokens must be an int >= 0, got {self.num_context_tokens!r}"
            )
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        seed = self.random_routing_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"random_routing_seed must be an int >= 0 or None, got {seed!r}")

    @property
    def region_tokens(self) -> int:
        """Tokens in a full (non-edge) region."""
        return math.prod(self.region_size)

    def budget(self, visible_regions: int) -> int:
        """K for a query that sees ``visible_regions`` regions (0 when it sees none)."""
        if visible_regions <= 0:
            return 0
        if self.top_k == ALL:
            return visible_regions
        if self.top_k is not None:
            return min(self.top_k, visible_regions)
        # float noise is removed before rounding up, as in routing.budgets
        k = math.ceil(self.keep_ratio * visible_regions - 1e-9)
        return min(visible_regions, max(1, k))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["region_size"] = list(self.region_size)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> GazeConfig:
        data = dict(data)
        if "region_size" in data:
            data["region_size"] = tuple(data["region_size"])
        return cls(**data)


def dense_twin(config: GazeConfig) -> GazeConfig:
    """The dense baseline of ``config`` (the paper's "dense twin"): the same regions and context
    tokens, every visual entry attended (``top_k="all"``) through the dense backend.

    Training (``model.attn: dense``), evaluation (``--attn dense``) and serving
    (``gaze.attn: dense``) all build their dense runs with this function."""
    return replace(config, top_k=ALL, keep_ratio=None, backend="dense")


def at_budget(
    config: GazeConfig,
    *,
    top_k: int | str | None = None,
    keep_ratio: float | None = None,
    random_routing_seed: int | None = None,
) -> GazeConfig:
    """``config`` routed at this budget (one of ``top_k`` / ``keep_ratio``).

    A dense twin (backend ``dense``) is routed too, through the default backend: a budget
    asked for is a budget applied (evaluating a dense-trained model sparsely is a baseline),
    never silently dense. ``random_routing_seed``: the same budget routed to pseudo-random
    regions (an evaluation ablation). Evaluation, serving and ``set_gaze_budget`` all go
    through here."""
    backend = "auto" if config.backend == "dense" else config.backend
    return replace(
        config,
        top_k=top_k,
        keep_ratio=keep_ratio,
        backend=backend,
        random_routing_seed=random_routing_seed,
    )
