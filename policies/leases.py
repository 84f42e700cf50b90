"""Power leases: the one place a batch, from any scheduler replica, gets to draw power.

Scheduler replicas share one power budget; two seeing the same headroom would both
spend it. So each asks the :class:`LeaseBook` for a *lease* per candidate batch, the
worker confirms the start and the scheduler releases the lease when the batch ends
(idempotent). The book is pure (injected clock, readings fed to ``observe``, decision
values, no exceptions), so the admission service (a Ray actor) and the fleet simulator
host the same object; not thread-safe: the host serialises calls. Rules, and why:

1. **Headroom** = cap - latest measured power - declared draw of leases not yet
   *visible* in it: started at s, with the reading taken at or after s +
   ``visible_after_s``. Until then the batch may be missing from the reading, so it
   counts in full (unstarted leases too). A released lease stays inside the latest
   reading until a newer one: conservative (under-use), never over.
2. **Uncapped** (no cluster or node cap): power is not consulted, so a cluster without
   telemetry works; only slots apply. **Capped without a reading** (none yet, the last
   poll failed, or older than ``expiry_s``): ``no_reading``; a cap is not kept blind.
3. **Node caps** (keys: node ids or id prefixes, as ``Budget.node_caps_w``; tightest
   applies) bind only on nodes the ask can use (its ``nodes``; empty: all in the
   reading): on each, cap - measured - pending draw that could land there must cover
   the ask. Serve picks the replica, so a pending lease counts on each node of its
   ``nodes`` (all if empty). A usable capped node absent from the reading: ``no_reading``.
4. **Slots**: ``replicas[variant]`` per variant, held from grant until release, expiry,
   or ``max_run_s`` after the start (a lost release must not hold a replica forever).
5. **Expiry**: an unstarted lease is void after ``granted_s + expiry_s`` (slot and draw
   freed, ``start`` False), so a late worker never draws power already given away.
6. **Epochs, warm-up**: each start of the admission service makes a book with a new
   epoch, carried in lease ids (``start`` of another epoch's lease: False). The new book
   does not know batches started under the old one, so with ``warm_up`` a capped book
   grants nothing until it holds a reading taken at or after its creation +
   ``visible_after_s``: that reading includes them.
7. **No starvation**: asks are decided oldest first (``now - waited_s``) across
   holders. The book remembers each holder's refused asks of its latest call (replaced
   by its next, forgotten after max(1 s, 3 sample periods) without one). An ask that
   waited ``aging_s`` or more and is refused for power *reserves* its draw and a slot of
   its variant (unless its draw alone is over a cap): younger asks in the decision get
   only the rest, so small batches cannot keep a big old one out. Another holder's
   remembered ask is never granted by this call (its holder must start it), so once
   aged it reserves whenever a slot is free. Young asks do not reserve: small batches
   backfill around a big young one.
8. Bad timing never raises: a reading stamped in the future counts as taken now, one
   older than a reading already seen is ignored, garbage lease ids answer False.

**Cost.** The fleet simulator calls the book at every dispatch step of ~1,000 live
leases, so nothing scans them: each call is O(log n) amortised (plus its asks). Kept
incrementally: a min-heap of deadlines (expiry, then ``max_run_s`` once started) with
lazy deletion (an entry whose lease is gone or started is skipped; only deadlines
before now are pruned), slots in use per variant, and running sums of draw: all live
leases, unstarted ones, and started ones no reading has caught up with yet (a heap by
start + ``visible_after_s``, emptied as readings advance: readings never go back, so a
lease once seen stays seen). A sum is recomputed from its leases when the set empties
and after as many removals as it has members, so rounding cannot drift. Per-node
pending draw is summed over the pending leases only, and only under node caps. The
heaps and sums are ``policies.lease_index``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from wattserve.policies.lease_index import Drawing, Due, Live

# "unavailable" is never decided here: a scheduler says it when the book cannot be reached.
RefusalReason = Literal[
    "power_cap",
    "no_slot",
    "no_reading",
    "warming_up",
    "unknown_variant",
    "unavailable",
    "background",
]

_RECONFIGURE_RETRY_S = 1.0  # unknown variant: a new configuration helps, not a new reading


@dataclass(frozen=True)
class LeaseAsk:
    """One candidate batch a scheduler wants to launch."""

    key: int  # the caller's id for this candidate; echoed back in its decision
    variant: str
    draw_w: float  # the batch's declared draw
    waited_s: float = 0.0  # age of its oldest output: an age, so callers' clocks never mix
    nodes: frozenset[str] = frozenset()  # node ids the variant can run on; empty: any
    # background work (the shadow audit): decided after every other ask and, under a
    # cap, granted only with room for a user batch as large beside it and no one refused
    background: bool = False


@dataclass(frozen=True)
class Lease:
    """Permission to start one batch: its draw and one replica slot are reserved."""

    lease_id: str  # f"{epoch}-{n}", unique per book
    epoch: int
    holder: str
    variant: str
    draw_w: float
    granted_s: float
    expires_s: float  # an unstarted lease is void after this (book clock)


@dataclass(frozen=True)
class LeaseRefusal:
    """Why an ask was not granted, in words a user can read, and when to ask again."""

    reason: RefusalReason
    message: str
    retry_after_s: float


@dataclass(frozen=True)
class LeaseDecision:
    """The answer to one ask: exactly one of ``lease`` and ``refusal`` is set."""

    key: int
    lease: Lease | None = None
    refusal: LeaseRefusal | None = None


@dataclass(frozen=True)
class PowerReading:
    """One poll of the telemetry agents, in watts."""

    at_s: float  # book-clock time the reading was taken
    cluster_w: float
    node_w: Mapping[str, float] = field(default_factory=dict)  # node id -> W


@dataclass(frozen=True)
class LeaseBookState:
    """The book at a glance, for status pages and benchmarks."""

    epoch: int
    cap_w: float | None
    measured_w: float | None
    pending_w: float  # declared draw of leases not yet visible in the measurement
    headroom_w: float | None  # cap - measured - pending (None when uncapped or no reading)
    leases: int  # live leases, unstarted and started
    slots_in_use: Mapping[str, int]
    warming_up: bool


@dataclass(frozen=True)
class _Memo:
    called_s: float  # when the holder last called
    asks: tuple[tuple[float, LeaseAsk], ...]  # (arrival on the book clock, ask) refused


def _node_cap_w(caps: Mapping[str, float], node: str) -> float | None:
    """The tightest cap whose key is ``node`` or a prefix of it; None if none applies."""
    matching = [cap_w for prefix, cap_w in caps.items() if node.startswith(prefix)]
    return min(matching) if matching else None


def _fmt_w(watts: float) -> str:
    return f"{max(watts, 0.0):.0f} W"  # a negative headroom reads as none


def _too_much(cap: str, room_w: float, draw_w: float, held: str = "") -> str:
    return f"{cap}: {_fmt_w(room_w)} of headroom{held}, batch draws {_fmt_w(draw_w)}"


@dataclass
class _Room:
    """What one decision may still hand out (headroom W, free slots), in decision order."""

    now_s: float
    gate: LeaseRefusal | None  # a refusal for every ask of this decision, if any
    cap_w: float | None
    cluster_w: float | None  # headroom left under the cluster cap; None: no cluster cap
    node_w: dict[str, float]  # headroom left per capped node in the reading
    node_caps_w: Mapping[str, float]
    nodes: frozenset[str]  # every node in the reading
    free: dict[str, int]
    held_w: float = 0.0  # reserved in this decision for asks waiting longer
    refused: bool = False  # an ask of this decision was refused to protect a cap

    def reach(self, ask: LeaseAsk) -> frozenset[str]:
        """The nodes the ask could land on."""
        return ask.nodes or self.nodes

    def shortfall(self, ask: LeaseAsk) -> tuple[RefusalReason, str] | None:
        """Why the ask's draw does not fit (reason, message), or None if it does."""
        if self.cluster_w is not None and ask.draw_w > self.cluster_w:
            held = f", {_fmt_w(self.held_w)} of it held for older batches" if self.held_w else ""
            cap = f"power cap {_fmt_w(self.cap_w or 0.0)}"
            return "power_cap", _too_much(cap, self.cluster_w + self.held_w, ask.draw_w, held)
        for node in sorted(self.reach(ask)):
            cap_w = _node_cap_w(self.node_caps_w, node)
            if node in self.node_w and ask.draw_w > self.node_w[node]:
                cap = f"node {node} power cap {_fmt_w(cap_w or 0.0)}"
                return "power_cap", _too_much(cap, self.node_w[node], ask.draw_w)
            if node not in self.node_w and cap_w is not None:
                return "no_reading", f"no power reading for capped node {node}"
        return None

    def reserve(self, ask: LeaseAsk) -> None:
        """Hold draw and a slot for an older ask, unless it is over a cap on its own."""
        caps = [self.cap_w, *(_node_cap_w(self.node_caps_w, n) for n in self.reach(ask))]
        if self.free.get(ask.variant, 0) > 0 and all(c is None or ask.draw_w <= c for c in caps):
            self.take(ask, held=True)  # one that can never fit would block everyone forever

    def take(self, ask: LeaseAsk, *, held: bool) -> None:
        """Spend the ask's draw and one slot of its variant (``held``: as a reservation)."""
        if self.cluster_w is not None:
            self.cluster_w -= ask.draw_w
        for node in self.reach(ask):
            if node in self.node_w:
                self.node_w[node] -= ask.draw_w
        self.free[ask.variant] = self.free.get(ask.variant, 0) - 1
        if held:
            self.held_w += ask.draw_w


class LeaseBook:
    """Leases of power and replica slots shared by several schedulers (rules above)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        epoch: int = 1,
        sample_period_s: float = 0.1,
        expiry_s: float | None = None,
        visible_after_s: float | None = None,
        aging_s: float = 1.0,
        max_run_s: float = 900.0,
        warm_up: bool = True,
    ) -> None:
        self._clock, self._epoch, self._period_s = clock, epoch, sample_period_s
        self._expiry_s = 5 * sample_period_s if expiry_s is None else expiry_s
        self._visible_after_s = 2 * sample_period_s if visible_after_s is None else visible_after_s
        self._aging_s, self._max_run_s = aging_s, max_run_s
        self._remember_s = max(1.0, 3 * sample_period_s)
        self._created_s, self._warmed = clock(), not warm_up
        self._cap_w: float | None = None
        self._node_caps_w: dict[str, float] = {}
        self._replicas: dict[str, int] = {}
        self._reading: PowerReading | None = None
        self._newest_s, self._poll_failed = -math.inf, False  # newest reading time seen
        self._live, self._unstarted, self._unseen = Drawing(), Drawing(), Drawing()
        self._ends = Due(self._end_s)  # over live leases: when each stops being live
        self._seen_at = Due(lambda x: (x.started_s or 0.0) + self._visible_after_s)  # started
        self._in_use: dict[str, int] = {}  # live leases per variant
        self._memos: dict[str, _Memo] = {}  # by holder
        self._ids = itertools.count(1)

    def configure(
        self,
        *,
        cap_w: float | None,
        node_caps_w: Mapping[str, float] | None = None,
        replicas: Mapping[str, int],
    ) -> None:
        """Adopt a budget and replica counts; live leases keep what they hold."""
        self._cap_w = cap_w
        self._node_caps_w = dict(node_caps_w or {})
        self._replicas = dict(replicas)

    def observe(self, reading: PowerReading | None) -> None:
        """Take a power reading; None means the poll failed (no reading until the next)."""
        if reading is None:
            self._reading, self._poll_failed = None, True
            return
        at_s = min(reading.at_s, self._clock())  # stamped in the future: taken as of now
        if at_s < self._newest_s:
            return  # older than one already seen: it would hide batches the newer one shows
        self._newest_s, self._poll_failed = at_s, False
        self._reading = reading if at_s == reading.at_s else replace(reading, at_s=at_s)
        if at_s >= self._created_s + self._visible_after_s:
            self._warmed = True

    def request(self, holder: str, asks: Sequence[LeaseAsk]) -> tuple[LeaseDecision, ...]:
        """Decide all of ``holder``'s candidate batches at once; answers in ``asks`` order."""
        now = self._now()
        self._memos.pop(holder, None)
        room = self._room(now)
        entries = [(now - ask.waited_s, i, ask, True) for i, ask in enumerate(asks)]
        others = [pair for memo in self._memos.values() for pair in memo.asks]
        entries += [(at, len(asks) + j, ask, False) for j, (at, ask) in enumerate(others)]
        entries.sort(key=lambda entry: (entry[2].background, entry[0], entry[1]))
        decided: dict[int, LeaseDecision] = {}
        for arrival_s, i, ask, own in entries:
            aged = now - arrival_s >= self._aging_s
            if own:
                decided[i] = self._decide(holder, ask, room, aged)
            elif aged and room.gate is None:
                room.reserve(ask)  # kept for its holder, never granted here
        answers = tuple(decided[i] for i in range(len(asks)))
        refused = tuple(
            (now - ask.waited_s, ask)
            for ask, answer in zip(asks, answers, strict=True)
            if answer.refusal is not None
            and answer.refusal.reason != "unknown_variant"
            and not ask.background  # background work never reserves against anyone
        )
        self._memos[holder] = _Memo(now, refused)
        return answers

    def start(self, lease_id: str) -> bool:
        """The worker is starting the lease's batch; False if the lease is not live here."""
        now = self._now()
        live = self._live.leases.get(lease_id) if isinstance(lease_id, str) else None
        if live is not None and live.started_s is None:
            live.started_s = now  # the first confirmation is when the draw began
            self._unstarted.discard(lease_id)
            self._unseen.add(lease_id, live)
            self._seen_at.push(lease_id, live, self._unseen.leases)
            self._ends.push(lease_id, live, self._live.leases)  # the expiry entry goes stale
        return live is not None

    def release(self, lease_id: str) -> bool:
        """The lease's batch ended (either way): True the first time, False after."""
        self._now()
        return isinstance(lease_id, str) and self._drop(lease_id)

    def state(self) -> LeaseBookState:
        """A snapshot of the book now."""
        now = self._now()
        reading = self._fresh(now)
        pending_w = self._pending_w(reading)
        measured_w = None if reading is None else reading.cluster_w
        headroom_w = None
        if self._cap_w is not None and measured_w is not None:
            headroom_w = self._cap_w - measured_w - pending_w
        warming_up = self._capped() and not self._warmed
        return LeaseBookState(
            self._epoch, self._cap_w, measured_w, pending_w, headroom_w, len(self._live.leases),
            dict(self._in_use), warming_up,
        )  # fmt: skip

    def _capped(self) -> bool:
        return self._cap_w is not None or bool(self._node_caps_w)

    def _end_s(self, live: Live) -> float:
        """When the lease stops being live: its expiry, or ``max_run_s`` after its start."""
        started_s = live.started_s
        return live.lease.expires_s if started_s is None else started_s + self._max_run_s

    def _now(self) -> float:
        """Read the clock; drop leases past expiry or ``max_run_s`` and idle holders' asks."""
        now = self._clock()
        for lease_id in self._ends.pop(self._live.leases, now, inclusive=False):
            self._drop(lease_id)  # live while now <= its end
        memos = self._memos.items()
        self._memos = {h: m for h, m in memos if now - m.called_s <= self._remember_s}
        return now

    def _grant(self, lease: Lease, nodes: frozenset[str], seq: int) -> None:
        live = Live(lease, nodes, seq)
        self._live.add(lease.lease_id, live)
        self._unstarted.add(lease.lease_id, live)
        self._ends.push(lease.lease_id, live, self._live.leases)
        self._in_use[lease.variant] = self._in_use.get(lease.variant, 0) + 1

    def _drop(self, lease_id: str) -> bool:
        """Forget a lease (released or past its end); False if it was not live."""
        live = self._live.discard(lease_id)
        if live is None:
            return False
        self._unstarted.discard(lease_id)
        self._unseen.discard(lease_id)
        variant = live.lease.variant
        self._in_use[variant] -= 1
        if not self._in_use[variant]:
            del self._in_use[variant]
        return True

    def _fresh(self, now: float) -> PowerReading | None:
        """The latest reading if it is recent enough to decide on."""
        reading = self._reading
        return None if reading is None or now - reading.at_s > self._expiry_s else reading

    def _pending_w(self, reading: PowerReading | None) -> float:
        """Declared draw of leases the reading may not include (all, without one)."""
        if reading is None:
            return self._live.draw_w
        for lease_id in self._seen_at.pop(self._unseen.leases, reading.at_s, inclusive=True):
            self._unseen.discard(lease_id)  # the reading (and every later one) shows it
        return self._unstarted.draw_w + self._unseen.draw_w

    def _pending(self, reading: PowerReading) -> list[Live]:
        """Leases whose draw the reading may not include, in grant order."""
        self._pending_w(reading)
        pending = [*self._unstarted.leases.values(), *self._unseen.leases.values()]
        return sorted(pending, key=lambda x: x.seq)

    def _next_reading_in_s(self, now: float) -> float:
        """How long until a reading newer than today's should have landed, s.

        A refusal for power can only turn into a grant with a new reading, so the refused
        ask comes back just after the next one (its poll started one period after this
        one's; a fifth of a period covers the poll itself) instead of a whole period after
        the refusal, which would add up to one period to every turnover under a cap.
        """
        period = self._period_s
        reading = self._reading
        if reading is None:
            return period
        due = reading.at_s + 1.2 * period - now
        return min(1.2 * period, max(0.1 * period, due))

    def _gate(self, now: float) -> LeaseRefusal | None:
        """A refusal that holds for every ask now (warming up, no reading), if any."""
        if not self._capped():
            return None
        if not self._warmed:
            left_s = self._created_s + self._visible_after_s - now
            why = f"admission epoch {self._epoch} waits for a reading with the running batches"
            return LeaseRefusal("warming_up", why, left_s if left_s > 0 else self._period_s)
        if self._fresh(now) is not None:
            return None
        why = "the last power poll failed" if self._poll_failed else "no power reading yet"
        if self._reading is not None:
            why = f"the last power reading is {now - self._reading.at_s:.2f} s old"
        why += "; nothing starts under a power cap without one"
        return LeaseRefusal("no_reading", why, self._period_s)

    def _room(self, now: float) -> _Room:
        """Headroom and free slots at the start of a decision."""
        gate, reading = self._gate(now), self._fresh(now)
        cluster_w = None
        if self._cap_w is not None and reading is not None:
            cluster_w = self._cap_w - reading.cluster_w - self._pending_w(reading)
        node_w: dict[str, float] = {}
        if reading is not None and self._node_caps_w:
            pending = self._pending(reading)  # few: summing them per node is cheap
            for node, measured_w in reading.node_w.items():
                cap_w = _node_cap_w(self._node_caps_w, node)
                if cap_w is not None:
                    there = sum(p.lease.draw_w for p in pending if not p.nodes or node in p.nodes)
                    node_w[node] = cap_w - measured_w - there
        in_use = self._in_use
        free = {name: n - in_use.get(name, 0) for name, n in self._replicas.items()}
        nodes = frozenset(() if reading is None else reading.node_w)
        return _Room(now, gate, self._cap_w, cluster_w, node_w, self._node_caps_w, nodes, free)

    def _pressed(self, ask: LeaseAsk, room: _Room) -> bool:
        """Whether a background ask must yield to the cap.

        It must while anyone waits on the cap, or when a user batch as large as it would
        not fit beside it.
        """
        if room.refused or room.held_w or any(m.asks for m in self._memos.values()):
            return True
        return room.shortfall(replace(ask, draw_w=2 * ask.draw_w)) is not None

    def _decide(self, holder: str, ask: LeaseAsk, room: _Room, aged: bool) -> LeaseDecision:
        """Grant or refuse one of the caller's own asks, spending from ``room``."""

        def no(reason: RefusalReason, message: str, retry_after_s: float) -> LeaseDecision:
            return LeaseDecision(ask.key, refusal=LeaseRefusal(reason, message, retry_after_s))

        if ask.variant not in self._replicas:
            message = f"variant {ask.variant!r} has no replicas configured"
            return no("unknown_variant", message, _RECONFIGURE_RETRY_S)
        if room.gate is not None:
            return LeaseDecision(ask.key, refusal=room.gate)
        if room.free.get(ask.variant, 0) <= 0:
            message = f"all {self._replicas[ask.variant]} replicas of {ask.variant} are leased"
            return no("no_slot", message, self._period_s)
        problem = room.shortfall(ask) if self._capped() else None
        if problem is not None:
            room.refused = True
            if aged and problem[0] == "power_cap":
                room.reserve(ask)
            return no(*problem, self._next_reading_in_s(room.now_s))
        if ask.background and self._capped() and self._pressed(ask, room):
            message = "background work yields to the power cap"
            return no("background", message, self._next_reading_in_s(room.now_s))
        room.take(ask, held=False)
        now, seq = room.now_s, next(self._ids)
        lease_id, expires_s = f"{self._epoch}-{seq}", now + self._expiry_s
        lease = Lease(lease_id, self._epoch, holder, ask.variant, ask.draw_w, now, expires_s)
        self._grant(lease, ask.nodes, seq)
        return LeaseDecision(ask.key, lease=lease)
