"""Which endpoint a request goes to, when a role's ``base_url`` lists several (the openai engine).

Each request goes to the endpoint with the fewest requests outstanding, at most ``per_endpoint`` at once
on each. An endpoint whose request fails with a retryable error (connection refused, 5xx, 429, timeout)
is taken out for a back-off period (doubling with each failure in a row, capped), and the request is
sent at once to another endpoint that is up. When the back-off ends, the endpoint gets one probe request
at a time until one succeeds (with several endpoints). When every endpoint is out, requests still go to
the one back soonest, after the engine's own jittered retry delay: with a single endpoint this is exactly
the engine's plain retry.

The pool is plain bookkeeping (no I/O, no event loop), so it outlives the engine's per-call event loops:
an endpoint found dead in one batch stays out for the next. ``stats()`` is what stages write into their
manifest: requests sent, succeeded and failed per endpoint, with the error types seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

BACKOFF_BASE_S = 2.0  # first time out for an endpoint that failed
BACKOFF_MAX_S = 60.0


@dataclass
class Endpoint:
    url: str
    outstanding: int = 0
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    failures_in_row: int = 0  # retryable failures since the last success: sets the back-off
    times_taken_out: int = 0
    down_until: float = 0.0

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def capacity(self, per_endpoint: int, probe: bool) -> int:
        # Back from a back-off, not yet proven healthy: one probe at a time (when others take the load).
        return 1 if probe and self.failures_in_row else per_endpoint


class EndpointPool:
    """Least-outstanding-requests choice over endpoints, with a back-off for failing ones."""

    def __init__(self, urls: list[str], per_endpoint: int, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise ValueError("an endpoint pool needs at least one URL")
        self.endpoints = [Endpoint(u) for u in dict.fromkeys(urls)]  # a URL listed twice is one endpoint
        self.per_endpoint = per_endpoint
        self.clock = clock

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    @property
    def total_capacity(self) -> int:
        return self.per_endpoint * len(self.endpoints)

    def choose(self, avoid: set[str] = frozenset()) -> Endpoint | None:
        """The endpoint for the next attempt, or None when those to use are all at capacity (wait).

        Endpoints that are up are used; only when none is up, the ones backing off (soonest back first).
        ``avoid`` (endpoints that already failed this request) are used last.
        """
        now = self.clock()
        live = [e for e in self.endpoints if e.up(now)] or sorted(self.endpoints, key=lambda e: e.down_until)
        probe = len(self.endpoints) > 1
        free = [e for e in live if e.outstanding < e.capacity(self.per_endpoint, probe)]
        if not free:
            return None
        return min(free, key=lambda e: (e.url in avoid, e.outstanding))

    def other_up(self, avoid: set[str]) -> bool:
        """Is an endpoint up that this request has not failed on (so it can fail over right away)?"""
        now = self.clock()
        return any(e.up(now) and e.url not in avoid for e in self.endpoints)

    def start(self, ep: Endpoint) -> None:
        ep.outstanding += 1
        ep.requests += 1

    def succeeded(self, ep: Endpoint) -> None:
        ep.outstanding -= 1
        ep.ok += 1
        ep.failures_in_row = 0

    def abandoned(self, ep: Endpoint) -> None:
        """A request given up without an answer (cancelled): neither a success nor the endpoint's fault."""
        ep.outstanding -= 1
        ep.requests -= 1

    def failed(self, ep: Endpoint, exc: BaseException, take_out: bool) -> None:
        """Count a failed attempt; ``take_out`` (a retryable, endpoint-side error) starts a back-off."""
        ep.outstanding -= 1
        ep.errors += 1
        name = type(exc).__name__
        ep.error_types[name] = ep.error_types.get(name, 0) + 1
        ep.last_error = f"{name}: {str(exc)[:200]}"
        if take_out:
            ep.failures_in_row += 1
            if ep.up(self.clock()):  # concurrent failures of one outage count as one time out
                ep.times_taken_out += 1
            backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (ep.failures_in_row - 1))
            ep.down_until = max(ep.down_until, self.clock() + backoff)

    def stats(self) -> dict[str, dict]:
        """Per endpoint: requests sent, ok, errors (by type), times taken out, the last error."""
        return {
            e.url: {
                "requests": e.requests,
                "ok": e.ok,
                "errors": e.errors,
                "error_types": dict(e.error_types),
                "times_taken_out": e.times_taken_out,
                "last_error": e.last_error,
            }
            for e in self.endpoints
        }
