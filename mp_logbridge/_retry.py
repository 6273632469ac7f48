"""When to try a failed request again: the policy, and the one place that applies it.

:class:`RetryPolicy` is the schedule (Mixpanel's guidance: 2 s doubling to 60 s plus 1-5 s of
jitter, ``Retry-After`` as a lower bound). :func:`next_attempt` turns one failure into a decision —
try again at a given time, or give up with a drop reason — and is used by every sender: the
synchronous consumers (which sleep until then), the background worker (which schedules the lane),
the import command and the relay.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError, DeliveryError

__all__ = ["RetryDecision", "RetryPolicy", "next_attempt"]


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed request again.

    Follows Mixpanel's guidance: exponential backoff starting at ``initial_backoff`` seconds and
    doubling up to ``max_backoff``, plus a random jitter drawn from ``jitter``; a server's
    ``Retry-After`` is a lower bound, clamped to ``max_retry_after``. A batch is given up after
    ``max_attempts`` attempts or once ``max_elapsed`` seconds have passed since its first attempt.
    """

    initial_backoff: float = 2.0
    max_backoff: float = 60.0
    jitter: tuple[float, float] = (1.0, 5.0)
    max_attempts: int = 10
    max_elapsed: float = 600.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if len(self.jitter) != 2:
            raise ConfigurationError(f"jitter must be a (low, high) pair, got {self.jitter!r}")
        low, high = self.jitter
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        numbers = (
            self.initial_backoff,
            self.max_backoff,
            low,
            high,
            self.max_elapsed,
            self.max_retry_after,
        )
        if min(numbers) < 0 or low > high:
            raise ConfigurationError(f"invalid retry policy {self!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | RetryPolicy | None) -> RetryPolicy:
        """Build a policy from a mapping of its fields (as ``dictConfig`` would give them)."""
        if options is None:
            return cls()
        if isinstance(options, RetryPolicy):
            return options
        if not isinstance(options, Mapping):
            raise ConfigurationError(
                f"retry must be a RetryPolicy or a mapping of its fields, got {type(options).__name__}"
            )
        values = {key: options[key] for key in options}
        if "jitter" in values:
            values["jitter"] = tuple(values["jitter"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigurationError(f"invalid retry options: {exc}") from None

    def delay(
        self,
        retry_number: int,
        retry_after: float | None = None,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> float:
        """Seconds to wait before retry number ``retry_number`` (1 for the first retry)."""
        # The exponent is capped: 2.0 ** 1024 overflows (a product that does is just ``inf``).
        doubling = 2.0 ** min(max(0, retry_number - 1), 1000)
        backoff = min(self.max_backoff, self.initial_backoff * doubling)
        wait = backoff + float(rng(*self.jitter))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait

    def gives_up(self, attempts: int, elapsed: float, next_delay: float) -> bool:
        """Whether to stop after ``attempts`` attempts, ``elapsed`` seconds since the first."""
        return attempts >= self.max_attempts or elapsed + next_delay > self.max_elapsed


@dataclass(frozen=True)
class RetryDecision:
    """What to do after a retryable failure: ``retry_at`` a time, or give up for ``reason``."""

    retry_at: float | None
    reason: str | None = None

    @property
    def gives_up(self) -> bool:
        """Whether the records are dropped (``reason`` says why)."""
        return self.retry_at is None


def next_attempt(
    policy: RetryPolicy,
    error: DeliveryError,
    attempts: int,
    first_attempt: float,
    now: float,
    *,
    rng: Callable[[float, float], float] = random.uniform,
    deadline: float = float("inf"),
) -> RetryDecision:
    """Decide what follows a retryable failure of a batch.

    ``attempts`` counts the attempts made so far (1 after the first failure), ``first_attempt``
    and ``now`` are times on the same clock, and ``deadline`` is when the sender must be done
    (a close or exit deadline). The decision is to retry at ``now`` plus the policy's delay, or to
    give up: ``retries_exhausted`` when the policy says so, ``shutdown_timeout`` when the retry
    would come after the deadline.
    """
    delay = policy.delay(attempts, error.retry_after, rng)
    if policy.gives_up(attempts, now - first_attempt, delay):
        return RetryDecision(None, "retries_exhausted")
    if now + delay > deadline:
        return RetryDecision(None, "shutdown_timeout")
    return RetryDecision(now + delay)
