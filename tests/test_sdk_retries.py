"""The SDK's ``generate`` retries: which failures, how long it waits, and the key it sends.

Each test scripts a fake service (an ``httpx.MockTransport``) as a list of answers, one
per attempt, and replaces the client's sleep and RNG seams, so nothing really waits.
Every behaviour is checked on both ``Client`` and ``AsyncClient``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.test_sdk import generation_body
from wattserve import (
    AdmissionRejected,
    AsyncClient,
    Client,
    InvalidRequest,
    TransportError,
    WattserveError,
)
from wattserve._exceptions import (
    Conflict,
    GenerationFailed,
    ServiceUnavailable,
    is_wattserve_error_body,
)
from wattserve._retries import (
    BACKOFF_CAP_S,
    DEAD_REPLICA_FLOOR_S,
    IDEMPOTENCY_HEADER,
    RETRY_AFTER_CAP_S,
)

KINDS = ("sync", "async")
# One scripted answer: a response, or a transport failure the handler raises.
Answer = httpx.Response | httpx.TransportError


def ok() -> httpx.Response:
    return httpx.Response(200, json=generation_body())


def proxy_500() -> httpx.Response:
    """What Ray Serve's proxy answers when the replica holding the request died."""
    return httpx.Response(500, text="Internal Server Error")


def ws_error(status: int, message: str = "bad thing", **headers: str) -> httpx.Response:
    body = {"error": {"message": message, "type": "x", "param": None, "code": "x"}}
    return httpx.Response(status, json=body, headers=headers)


class MaxRng(random.Random):
    """Draws the top of every jitter range: the longest waits the policy allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


class MinRng(random.Random):
    """Draws zero from every jitter range, so only a Retry-After floor is left."""

    def uniform(self, a: float, b: float) -> float:
        return a


@dataclass
class Service:
    """A fake service that answers attempt ``i`` with ``script[i]`` (the last one after)."""

    script: list[Answer]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(answer, httpx.TransportError):
            raise answer
        return answer

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get(IDEMPOTENCY_HEADER) for r in self.requests]


@dataclass
class Run:
    """What happened over one scripted session: results or the error, and the sleeps."""

    service: Service
    sleeps: list[float]
    results: list[Any]
    error: WattserveError | None = None


def run(
    kind: str,
    script: list[Answer],
    *,
    calls: list[dict[str, Any]] | None = None,
    rng: random.Random | None = None,
    action: Callable[[Any], Any] | None = None,
    **client_kw: Any,
) -> Run:
    """Make ``calls`` (generate kwargs; one plain call by default) on a ``kind`` client."""
    service = Service(script)
    outcome = Run(service, sleeps=[], results=[])

    def prepare(client: Client | AsyncClient) -> None:
        client._rng = rng or random.Random(0)
        if isinstance(client, AsyncClient):

            async def fake_sleep(seconds: float) -> None:
                outcome.sleeps.append(seconds)

            client._sleep = fake_sleep
        else:
            client._sleep = outcome.sleeps.append

    async def run_async() -> None:
        transport = httpx.MockTransport(service)
        async with AsyncClient("http://ws", transport=transport, **client_kw) as client:
            prepare(client)
            for kw in calls or [{}]:
                call = action(client) if action else client.generate("x", **kw)
                outcome.results.append(await call)

    try:
        if kind == "async":
            asyncio.run(run_async())
        else:
            with Client("http://ws", transport=httpx.MockTransport(service), **client_kw) as c:
                prepare(c)
                for kw in calls or [{}]:
                    outcome.results.append(action(c) if action else c.generate("x", **kw))
    except WattserveError as exc:
        outcome.error = exc
    return outcome


# --- the key --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_proxy_500_is_retried_with_the_same_key_and_body(kind: str) -> None:
    r = run(kind, [proxy_500(), ok()])
    assert r.error is None and r.results[0].attempts == 2
    first, second = r.service.keys
    assert first and first == second and len(first) == 32  # uuid4().hex
    assert r.service.requests[0].content == r.service.requests[1].content
    assert r.service.requests[0].url.path == "/v1/images/generations"
    assert r.sleeps == [DEAD_REPLICA_FLOOR_S]  # above the jitter (<= 0.5): Serve needs a moment


@pytest.mark.parametrize("kind", KINDS)
def test_two_calls_send_two_keys(kind: str) -> None:
    r = run(kind, [ok()], calls=[{}, {}])
    assert len(r.service.keys) == 2 and len(set(r.service.keys)) == 2
    assert [res.attempts for res in r.results] == [1, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_a_given_key_is_sent_as_given_on_every_attempt(kind: str) -> None:
    r = run(kind, [ws_error(503, "busy"), ok()], calls=[{"idempotency_key": "order-42"}])
    assert r.service.keys == ["order-42", "order-42"]
    assert r.results[0].attempts == 2


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_key_is_refused_before_sending(kind: str) -> None:
    with pytest.raises(ValueError, match="idempotency_key"):
        run(kind, [ok()], calls=[{"idempotency_key": ""}])


# --- what is not retried ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_wattserve_500_is_an_answer_not_retried(kind: str) -> None:
    r = run(kind, [ws_error(500, "ledger is down"), ok()])
    assert len(r.service.requests) == 1 and r.sleeps == []
    assert type(r.error) is WattserveError and r.error.message == "ledger is down"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("status", "cls"), [(400, InvalidRequest), (409, Conflict), (429, AdmissionRejected)]
)
def test_4xx_is_never_retried(kind: str, status: int, cls: type[WattserveError]) -> None:
    r = run(kind, [ws_error(status, "no", **{"Retry-After": "1"}), ok()])
    assert len(r.service.requests) == 1 and r.sleeps == []
    assert isinstance(r.error, cls) and r.error.message == "no"


@pytest.mark.parametrize("kind", KINDS)
def test_max_retries_0_makes_one_attempt(kind: str) -> None:
    r = run(kind, [proxy_500(), ok()], max_retries=0)
    assert len(r.service.requests) == 1 and r.sleeps == []
    assert type(r.error) is WattserveError and "Internal Server Error" in r.error.message


@pytest.mark.parametrize("kind", KINDS)
def test_only_generate_retries(kind: str) -> None:
    r = run(kind, [ws_error(503, "busy"), ok()], action=lambda client: client.health())
    assert len(r.service.requests) == 1 and isinstance(r.error, ServiceUnavailable)
    assert r.service.keys == [None]  # and only generate carries a key


# --- what is retried, how often, how long -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_statuses_are_retried(kind: str, status: int) -> None:
    r = run(kind, [httpx.Response(status, text="bad gateway"), ok()])
    assert r.error is None and r.results[0].attempts == 2


@pytest.mark.parametrize("kind", KINDS)
def test_retry_after_is_a_floor_on_the_wait(kind: str) -> None:
    r = run(kind, [ws_error(503, "busy", **{"Retry-After": "2"}), ok()], rng=MinRng())
    assert r.sleeps == [2.0] and r.results[0].attempts == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_retry_after_is_capped(kind: str) -> None:
    r = run(kind, [ws_error(503, "busy", **{"Retry-After": "3600"}), ok()], rng=MinRng())
    assert r.sleeps == [RETRY_AFTER_CAP_S]


@pytest.mark.parametrize("kind", KINDS)
def test_retries_stop_after_max_retries_and_raise_the_last_error(kind: str) -> None:
    script: list[Answer] = [httpx.Response(502, text=f"boom {i}") for i in range(1, 6)]
    r = run(kind, script, max_retries=2)
    assert len(r.service.requests) == 3 and len(r.sleeps) == 2
    assert isinstance(r.error, GenerationFailed) and r.error.message == "HTTP 502: boom 3"
    assert len(set(r.service.keys)) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
def test_a_transport_error_is_retried(kind: str, exc: httpx.TransportError) -> None:
    r = run(kind, [exc, proxy_500(), ok()])
    assert r.error is None and r.results[0].attempts == 3
    assert len(set(r.service.keys)) == 1 and len(r.sleeps) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_service_that_stays_unreachable_is_a_transport_error(kind: str) -> None:
    r = run(kind, [httpx.ConnectError("refused")], max_retries=3)
    assert len(r.service.requests) == 4
    assert isinstance(r.error, TransportError) and "refused" in r.error.message


@pytest.mark.parametrize("kind", KINDS)
def test_backoff_doubles_up_to_the_cap(kind: str) -> None:
    r = run(kind, [proxy_500()], max_retries=7, backoff_s=1.0, rng=MaxRng())
    assert r.sleeps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert len(r.service.requests) == 8


@pytest.mark.parametrize("kind", KINDS)
def test_jittered_sleeps_stay_below_the_cap(kind: str) -> None:
    r = run(
        kind,
        [httpx.Response(503, text="busy")],
        max_retries=20,
        backoff_s=3.0,
        rng=random.Random(7),
    )
    assert len(r.sleeps) == 20 and all(0 <= s <= BACKOFF_CAP_S for s in r.sleeps)
    assert len(set(r.sleeps)) == 20  # jittered, not a fixed schedule


# --- settings and the body check ----------------------------------------------------------


@pytest.mark.parametrize("kw", [{"max_retries": -1}, {"backoff_s": -0.1}, {"backoff_s": 1e999}])
def test_bad_retry_settings_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Client("http://ws", **kw)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": {"message": "m", "type": "server_error"}}, True),
        ({"error": {"message": "m"}}, False),
        ({"error": "Internal Server Error"}, False),
        ({"detail": "Internal Server Error"}, False),
        ("Internal Server Error", False),
        ([1, 2], False),
        (None, False),
    ],
)
def test_is_wattserve_error_body(body: Any, expected: bool) -> None:
    assert is_wattserve_error_body(body) is expected
