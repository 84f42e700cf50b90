"""The lease book's invariants under random interleavings, next to a fake world.

Dispatchers ask for leases, start batches that draw their full declared power on one of
their nodes, end them, and the admission service restarts now and then while the world
keeps running old batches. After every operation the world's true power must be under
the caps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from tests._leases import FakeClock
from wattserve.policies.leases import (
    Lease,
    LeaseAsk,
    LeaseBook,
    PowerReading,
)

# --- properties: a fake world -------------------------------------------------------

NODES_IDLE_W = {"gpu-a1": 40.0, "gpu-a2": 60.0, "gpu-b1": 30.0}
CAP_W = 900.0
NODE_CAPS_W = {"gpu-a": 700.0, "gpu-b1": 500.0}
REPLICAS = {"big": 2, "small": 3}


@dataclass
class Held:
    lease: Lease
    nodes: frozenset[str]


@dataclass
class World:
    clock: FakeClock
    book: LeaseBook
    running: list[tuple[Lease, str, float]] = field(default_factory=list)  # lease, node, start
    queues: dict[str, list[tuple[int, LeaseAsk, float]]] = field(default_factory=dict)
    granted: dict[str, list[Held]] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    keys: int = 0

    def node_w(self, lag_s: float = 0.0) -> dict[str, float]:
        """True power per node, or (``lag_s``) what a meter shows that misses recent starts."""
        watts = dict(NODES_IDLE_W)
        for lease, node, started_s in self.running:
            if started_s <= self.clock() - lag_s:
                watts[node] += lease.draw_w
        return watts

    def check(self) -> None:
        watts = self.node_w()
        assert sum(watts.values()) <= CAP_W + 1e-6
        for node, w in watts.items():
            caps = [c for prefix, c in NODE_CAPS_W.items() if node.startswith(prefix)]
            assert all(w <= c + 1e-6 for c in caps), (node, w)
        epoch = self.book.state().epoch
        for variant, n in REPLICAS.items():
            mine = [x for x, _, _ in self.running if x.epoch == epoch and x.variant == variant]
            assert len(mine) <= n


def new_book(clock: FakeClock, epoch: int) -> LeaseBook:
    book = LeaseBook(clock=clock, epoch=epoch, warm_up=True)
    book.configure(cap_w=CAP_W, node_caps_w=NODE_CAPS_W, replicas=REPLICAS)
    return book


def do_ask(world: World, data, holder: str) -> None:
    queue = world.queues.setdefault(holder, [])
    for _ in range(data.draw(st.integers(0, 2))):
        variant = data.draw(st.sampled_from(sorted(REPLICAS)))
        draw_w = float(data.draw(st.integers(20, 450)))
        nodes = frozenset(data.draw(st.sets(st.sampled_from(sorted(NODES_IDLE_W)))))
        world.keys += 1
        queue.append(
            (world.keys, LeaseAsk(world.keys, variant, draw_w, nodes=nodes), world.clock())
        )
    now = world.clock()
    asks = [LeaseAsk(a.key, a.variant, a.draw_w, now - t, a.nodes) for _, a, t in queue]
    decisions = world.book.request(holder, asks)
    assert [d.key for d in decisions] == [a.key for a in asks]
    granted = {d.key: d.lease for d in decisions if d.lease is not None}
    for a in asks:
        if a.key in granted:
            world.granted.setdefault(holder, []).append(Held(granted[a.key], a.nodes))
    world.queues[holder] = [entry for entry in queue if entry[0] not in granted]


def do_start(world: World, data) -> None:
    holders = sorted(h for h, held in world.granted.items() if held)
    if not holders:
        return
    held = world.granted[data.draw(st.sampled_from(holders))]
    item = held.pop(data.draw(st.integers(0, len(held) - 1)))
    lease, now = item.lease, world.clock()
    expected = lease.epoch == world.book.state().epoch and now <= lease.expires_s
    assert world.book.start(lease.lease_id) == expected
    if expected:
        node = data.draw(st.sampled_from(sorted(item.nodes or NODES_IDLE_W)))
        world.running.append((lease, node, now))


def do_release(world: World, lease: Lease, twice: bool) -> None:
    if lease.epoch != world.book.state().epoch:
        return  # the old book's batches are never released to the new one
    for _ in range(2 if twice else 1):
        if world.book.release(lease.lease_id):
            assert lease.lease_id not in world.released
            world.released.add(lease.lease_id)


# weighted towards the operations that move leases along; restarts and failures are rare
OPS = ("tick",) * 8 + ("ask",) * 8 + ("start",) * 8 + ("end",) * 4
OPS += ("advance", "fail", "abandon", "restart")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_world_power_stays_under_every_cap(data):
    clock = FakeClock()
    world = World(clock, new_book(clock, 1))
    clock.advance(0.2)  # past the first book's warm-up, once it sees a reading
    holders = ("d0", "d1", "d2")[: data.draw(st.integers(2, 3))]
    steps = data.draw(st.lists(st.sampled_from(OPS), min_size=20, max_size=120))
    for op in steps:
        holder = data.draw(st.sampled_from(holders))
        if op in ("tick", "advance"):  # a tick: a sample period or so, then a reading
            clock.advance(data.draw(st.integers(1, 150 if op == "tick" else 900)) / 1000)
        if op == "tick":  # the meter may miss starts up to just under visible_after_s old
            watts = world.node_w(lag_s=data.draw(st.integers(0, 190)) / 1000)
            world.book.observe(PowerReading(clock(), sum(watts.values()), watts))
        elif op == "fail":
            world.book.observe(None)
        elif op == "ask":
            do_ask(world, data, holder)
        elif op == "start":
            do_start(world, data)
        elif op == "end" and world.running:
            lease, _, _ = world.running.pop(data.draw(st.integers(0, len(world.running) - 1)))
            do_release(world, lease, twice=data.draw(st.booleans()))
        elif op == "abandon" and world.granted.get(holder):
            lease = world.granted[holder].pop().lease
            expected = lease.epoch == world.book.state().epoch and clock() <= lease.expires_s
            assert world.book.release(lease.lease_id) == expected
            world.released.add(lease.lease_id)
        elif op == "restart":
            world.book = new_book(clock, world.book.state().epoch + 1)
        world.check()


@settings(max_examples=200, deadline=None)
@given(
    draws=st.lists(st.integers(50, 250), min_size=120, max_size=120),
    durations=st.lists(st.integers(1, 4), min_size=120, max_size=120),
    a_first=st.lists(st.booleans(), min_size=40, max_size=40),
    per_step=st.integers(1, 3),
)
def test_old_big_ask_is_not_starved_by_small_ones(draws, durations, a_first, per_step):
    clock, big_w, idle_w = FakeClock(), 700.0, 100.0
    book = LeaseBook(clock=clock, aging_s=1.0, warm_up=False)
    book.configure(cap_w=1000.0, replicas={"big": 1, "small": 10})
    running: list[tuple[int, str, float]] = []  # (end step, lease id, W) of B's batches
    enqueued_s, aged_step, granted_step, k = clock(), None, None, 0
    for step in range(40):
        clock.advance(0.1)
        for item in [r for r in running if r[0] <= step]:
            running.remove(item)
            assert book.release(item[1])
        drawn_w = (big_w if granted_step is not None else 0.0) + sum(r[2] for r in running)
        book.observe(PowerReading(clock(), idle_w + drawn_w))
        waited_s = clock() - enqueued_s
        if aged_step is None and waited_s >= 1.0 + 1e-9:
            aged_step = step
        for who in ("A", "B") if a_first[step] else ("B", "A"):
            headroom_w = book.state().headroom_w
            if who == "A" and granted_step is None:
                (d,) = book.request("A", [LeaseAsk(0, "big", big_w, waited_s)])
                assert (d.lease is not None) == (headroom_w >= big_w)  # as soon as it fits
                if d.lease is not None:
                    granted_step = step
                    assert book.start(d.lease.lease_id)
            elif who == "B":
                asks = [
                    LeaseAsk(k + i, "small", float(draws[k + i]), 0.05) for i in range(per_step)
                ]
                k += per_step
                leases = [d.lease for d in book.request("B", asks) if d.lease is not None]
                if leases and aged_step is not None and granted_step is None:
                    assert sum(x.draw_w for x in leases) <= headroom_w - big_w
                for lease in leases:
                    assert book.start(lease.lease_id)
                    running.append((step + durations[k % 120], lease.lease_id, lease.draw_w))
    assert aged_step is not None and granted_step is not None
    assert granted_step <= aged_step + 4 + 2
