"""Shared helpers of the lease book tests: a fake clock and short constructors."""

from __future__ import annotations

from wattserve.policies.leases import LeaseAsk, LeaseBook, PowerReading


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt_s: float) -> None:
        self.t += dt_s


def make_book(clock, *, cap_w=1000.0, node_caps_w=None, replicas=None, warm_up=False, **kw):
    book = LeaseBook(clock=clock, warm_up=warm_up, **kw)
    book.configure(cap_w=cap_w, node_caps_w=node_caps_w, replicas=replicas or {"v": 8})
    return book


def read(book, clock, cluster_w, **node_w):
    book.observe(PowerReading(clock(), cluster_w, dict(node_w)))


def ask(key, draw_w, variant="v", waited_s=0.0, nodes=()):
    return LeaseAsk(key, variant, draw_w, waited_s, frozenset(nodes))


def one(book, holder, *asks_):
    (decision,) = book.request(holder, list(asks_))
    return decision
