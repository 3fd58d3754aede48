"""Held-out loss of a served model, as figures: the pure part of ``llm-atc eval`` and ``promote``.

A conversation is scored by the negative log-likelihood of its reference assistant turns (every token the chat
template adds for an assistant turn: its content and end-of-turn) given everything before them. Over many
conversations the score is the mean per token (a ratio of sums), with a 95% interval from the ratio estimator's
standard error; two models scored on the same conversations are compared pair by pair, which removes the
conversations' own difficulty from the interval of the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959964  # two-sided 95% of the normal distribution


class TemplateMismatch(ValueError):
    """The chat template does not render a conversation prefix-consistently, so its turns cannot be told apart."""


@dataclass(frozen=True)
class ChatLoss:
    """One conversation under one model: the summed NLL (nats) of its assistant tokens, and how many."""

    nll: float
    tokens: int


def assistant_spans(turns: list[tuple[list[int], list[int]]], full: list[int]) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the assistant turns in ``full`` (the conversation's ids up to its last
    assistant turn). ``turns``: per assistant turn, the ids of what precedes it with the generation prompt, and
    the ids through the turn itself. Raises TemplateMismatch when one is not a prefix of the next."""
    spans = []
    for prompt, through in turns:
        if through[: len(prompt)] != prompt or full[: len(through)] != through or len(through) <= len(prompt):
            raise TemplateMismatch("the chat template does not render this conversation prefix-consistently")
        spans.append((len(prompt), len(through)))
    return spans


def chat_loss(logprobs: list[float | None]) -> ChatLoss:
    """The loss of a conversation's scored tokens, from their log-probabilities."""
    if any(value is None for value in logprobs):
        raise ValueError("the engine gave no log-probability for a scored token")
    return ChatLoss(-sum(value for value in logprobs if value is not None), len(logprobs))


@dataclass(frozen=True)
class Score:
    """A model's held-out loss: mean NLL per token with its 95% interval, over ``chats`` conversations."""

    model: str
    chats: int
    tokens: int
    nll: float
    low: float
    high: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def details(self) -> dict:
        return {
            "model": self.model,
            "chats": self.chats,
            "tokens": self.tokens,
            "nll": round(self.nll, 6),
            "nll_low": round(self.low, 6),
            "nll_high": round(self.high, 6),
            "perplexity": round(self.perplexity, 4),
        }

    def text(self) -> str:
        """ "1.234 nats/token (95% 1.20-1.27), perplexity 3.43, 200 chats"."""
        return (
            f"{self.nll:.3f} nats/token ({_interval(self.low, self.high)}), perplexity {self.perplexity:.2f}, "
            f"{self.chats} chats"
        )


def _interval(low: float, high: float) -> str:
    return f"95% {low:.3f} to {high:.3f}" if math.isfinite(low) and math.isfinite(high) else "no interval: 1 chat"


def _ratio(nll: list[float], tokens: list[int]) -> tuple[float, float]:
    """Mean per token of paired sums, and its standard error (infinite for fewer than two chats)."""
    total_tokens = sum(tokens)
    mean = sum(nll) / total_tokens
    n = len(nll)
    if n < 2:
        return mean, math.inf
    residuals = sum((x - mean * t) ** 2 for x, t in zip(nll, tokens, strict=True))
    return mean, math.sqrt(n / (n - 1) * residuals) / total_tokens


def score(model: str, losses: list[ChatLoss]) -> Score:
    """The mean NLL per token over ``losses`` (at least one, with tokens), with its 95% interval."""
    mean, error = _ratio([x.nll for x in losses], [x.tokens for x in losses])
    return Score(model, len(losses), sum(x.tokens for x in losses), mean, mean - Z95 * error, mean + Z95 * error)


@dataclass(frozen=True)
class Gain:
    """How much lower the candidate's loss is than the current model's, per token, with its 95% interval."""

    current: Score
    candidate: Score
    gain: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.gain:+.3f} nats/token ({_interval(self.low, self.high)})"

    def details(self) -> dict:
        return {"gain": round(self.gain, 6), "gain_low": round(self.low, 6), "gain_high": round(self.high, 6)}


def gain(current: Score, current_losses: list[ChatLoss], candidate: Score, candidate_losses: list[ChatLoss]) -> Gain:
    """current − candidate per token. Scored on the same conversations with the same tokens (one tokenizer), the
    difference is taken chat by chat; otherwise the two intervals are combined as independent."""
    paired = (
        bool(current_losses)
        and len(current_losses) == len(candidate_losses)
        and all(a.tokens == b.tokens for a, b in zip(current_losses, candidate_losses, strict=False))
    )
    if paired:
        mean, error = _ratio(
            [a.nll - b.nll for a, b in zip(current_losses, candidate_losses, strict=True)],
            [a.tokens for a in current_losses],
        )
    else:
        mean = current.nll - candidate.nll
        error = math.hypot((current.high - current.nll) / Z95, (candidate.high - candidate.nll) / Z95)
    return Gain(current, candidate, mean, mean - Z95 * error, mean + Z95 * error)
