"""The engine's sampler: the next token of every running sequence from one step's logits.

Each row samples as its request's ``SamplingParams`` say: penalties on the tokens it
generated so far and its logit bias adjust the logits, then greedy (temperature 0) or
temperature and nucleus sampling with the row's own generator, and its logprobs when asked.
Placeholder tokens that only the processor may place (and padding) are never sampled. A
row whose logits are not finite is reported as broken, to end alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class NonFiniteLogits(RuntimeError):
    """The model's logits for a sequence hold NaN or +inf (a fault of the model, not the request)."""


@dataclass(kw_only=True)
class TokenLogprob:
    """The log-probability of a generated token under the model, and the most likely tokens.

    Log-probabilities are those of the model's distribution at that step (log-softmax of the
    logits, with the never-generated placeholder tokens excluded), before temperature and
    top_p, as OpenAI and vLLM report them.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(kw_only=True)
class Picks:
    """One step's choices: per row its token and logprob, or the error that ends it alone
    (``NonFiniteLogits``, a failure of its sampling)."""

    tokens: list[int | None]
    logprobs: list[TokenLogprob | None]
    errors: list[Exception | None]


class Sampler:
    def __init__(self, banned: list[int]):
        self.banned = banned  # token ids never sampled

    def pick(self, rows: list, logits: torch.Tensor) -> Picks:
        """The next token of each row (``rows``: the engine's sequences, in ``logits`` order;
        a row that fails has an error instead). ``logits`` [rows, vocab] float are changed in
        place."""
        logits[:, self.banned] = float("-inf")
        adjusted = self.adjusted(rows, logits)
        greedy = adjusted.argmax(-1).tolist()
        broken = (adjusted.isnan() | (adjusted == float("inf"))).any(-1)
        broken = (broken | (adjusted == float("-inf")).all(-1)).tolist()
        want = [s.top_logprobs is not None for s in rows]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want) else None
        picks = Picks(tokens=[], logprobs=[], errors=[])
        for i, seq in enumerate(rows):
            tok = entry = error = None
            try:
                if broken[i]:
                    raise NonFiniteLogits(
                        "the model produced non-finite logits for this sequence; it was ended"
                    )
                r = seq.request
                tok = (
                    greedy[i]
                    if r.temperature <= 0
                    else sample_token(adjusted[i], r.temperature, r.top_p, seq.generator)
                )
                if logprobs is not None and seq.top_logprobs is not None:
                    entry = logprob(logprobs[i], tok, seq.top_logprobs)
            except Exception as err:  # noqa: BLE001 - one row's failure ends only it
                error = err
            picks.tokens.append(tok)
            picks.logprobs.append(entry)
            picks.errors.append(error)
        return picks

    def adjusted(self, rows: list, logits: torch.Tensor) -> torch.Tensor:
        """The logits sampling reads: penalties for tokens generated so far, the logit bias."""
        rows_to_change = [
            i
            for i, s in enumerate(rows)
            if s.logit_bias or (s.tokens and (s.presence_penalty or s.frequency_penalty))
        ]
        if not rows_to_change:
            return logits
        logits = logits.clone()
        for i in rows_to_change:
            seq = rows[i]
            if seq.tokens and (seq.presence_penalty or seq.frequency_penalty):
                ids, counts = torch.tensor(seq.tokens).unique(return_counts=True)
                ids = ids.to(logits.device)
                penalty = seq.presence_penalty + seq.frequency_penalty * counts.to(logits)
                logits[i, ids] -= penalty.to(logits.device)
            if seq.logit_bias:
                ids = torch.tensor(list(seq.logit_bias), device=logits.device)
                bias = torch.tensor(list(seq.logit_bias.values()), device=logits.device)
                logits[i, ids] += bias
        # a placeholder stays impossible whatever the bias says
        logits[:, self.banned] = float("-inf")
        return logits


def sample_token(
    row: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token from the logits ``row`` at ``temperature`` (> 0) with nucleus ``top_p``."""
    # shift by the max first: with a tiny temperature the other logits then go to -inf
    # instead of the max going to inf (inf - inf = nan in the softmax)
    probs = torch.softmax((row - row.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    best = []
    if top:
        values, ids = logprobs.topk(top)
        best = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=best)
