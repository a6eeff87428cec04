"""Generation over several endpoints: the pool's choice and back-off. Real servers killed mid pairs-stage
(every record written once, the dead endpoint counted in the manifest) are in tests/test_replicas.py, over the
two replicas of `toushi serve --replicas 2`."""

from __future__ import annotations

import httpx
import openai
import pytest

from toushi.engines.endpoints import BACKOFF_BASE_S, EndpointPool
from toushi.recipe import ModelSpec

# what a failed request carries (openai >= 3.60 reads it when the error is made)
REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

A, B = "http://a/v1", "http://b/v1"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pool_least_outstanding_backoff_probe_and_all_down():
    clock = Clock()
    pool = EndpointPool([A, B, A], per_endpoint=2, clock=clock)
    assert pool.urls == [A, B] and pool.total_capacity == 4
    picks = []
    for _ in range(4):
        ep = pool.choose()
        pool.start(ep)
        picks.append(ep.url)
    assert sorted(picks) == [A, A, B, B]  # least outstanding alternates
    assert pool.choose() is None  # both at capacity: the caller waits

    a, b = pool.endpoints
    pool.failed(b, openai.APIConnectionError(request=REQUEST), take_out=True)
    pool.failed(b, openai.APIConnectionError(request=REQUEST), take_out=True)  # same outage: one time out
    assert not b.up(clock.t) and pool.other_up({B}) and not pool.other_up({A, B})
    assert pool.choose() is None  # b has room but is out; a is full
    pool.succeeded(a)
    assert pool.choose({A}).url == A  # a request that failed on a still goes to a rather than to a dead b

    clock.t += BACKOFF_BASE_S * 2 + 0.1  # b's back-off (doubled by the second failure) is over
    assert b.up(clock.t)
    ep = pool.choose()
    assert ep is b
    pool.start(b)
    assert pool.choose() is a  # b is on probation: one request at a time until it succeeds
    pool.succeeded(b)
    assert b.failures_in_row == 0 and b.capacity(2, probe=True) == 2

    # every endpoint out: requests still go to the one back soonest (the engine sleeps its retry delay first)
    pool.failed(a, openai.APITimeoutError(request=REQUEST), take_out=True)
    pool.start(b)
    pool.start(b)
    pool.failed(b, openai.APIConnectionError(request=REQUEST), take_out=True)
    pool.failed(b, openai.APIConnectionError(request=REQUEST), take_out=True)
    assert not pool.other_up(set())
    assert pool.choose() is a  # a's back-off ends first (one failure in a row against b's two)
    stats = pool.stats()
    assert stats[B]["requests"] == 5 and stats[B]["ok"] == 1 and stats[B]["errors"] == 4
    assert stats[B]["error_types"] == {"APIConnectionError": 4} and stats[B]["times_taken_out"] == 2
    assert stats[A]["errors"] == 1 and "APITimeoutError" in stats[A]["last_error"]


def test_single_endpoint_keeps_full_concurrency_while_failing():
    pool = EndpointPool([A], per_endpoint=3, clock=Clock())
    (a,) = pool.endpoints
    pool.start(a)
    pool.failed(a, openai.InternalServerError("boom", response=_response(500), body=None), take_out=True)
    assert [pool.choose() for _ in range(1)] == [a]
    for _ in range(3):
        pool.start(a)
    assert pool.choose() is None  # the plain concurrency limit, no probation with one endpoint


def _response(code: int):
    import httpx

    return httpx.Response(code, request=httpx.Request("POST", "http://a/v1/chat/completions"))



def test_recipe_accepts_a_list_of_urls_and_rejects_an_empty_one():
    spec = ModelSpec(name="m", engine="openai", base_url=[A, B])
    assert spec.base_url == [A, B]
    with pytest.raises(ValueError, match="at least one URL"):
        ModelSpec(name="m", engine="openai", base_url=[])
