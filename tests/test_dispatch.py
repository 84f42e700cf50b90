"""The dispatcher's state machine under a hand-driven clock: what the simulator relies on."""

from __future__ import annotations

from wattserve.policies.catalog import load_catalog
from wattserve.policies.dispatch import DispatchCore
from wattserve.policies.leases import LeaseBook, PowerReading
from wattserve.scheduler.leases import replica_slots

CATALOG = load_catalog()  # large 450 W q0.9, medium 400 W q0.7, turbo 350 W q0.4


def book(cap_w: float | None = None, now: list[float] | None = None) -> LeaseBook:
    clock = now or [0.0]
    leases = LeaseBook(clock=lambda: clock[0], warm_up=False)
    leases.configure(cap_w=cap_w, replicas=replica_slots(CATALOG))
    return leases


def test_a_partial_batch_waits_for_company_then_launches_and_holds_its_replica():
    core, leases = DispatchCore(CATALOG, max_wait_s=0.02), book()
    tickets = [core.submit("tiny-sd-medium", 64, 64, now_s=0.0, deadline_s=None) for _ in range(3)]
    first = core.step(0.0, leases)
    assert first.launches == () and first.wake_at_s == 0.02
    launched = core.step(0.02, leases).launches
    assert [launch.tickets for launch in launched] == [tuple(tickets)]
    assert launched[0].lease is not None and launched[0].lease.variant == "tiny-sd-medium"
    assert core.queued_for("tiny-sd-medium") == 8  # one busy replica: a full batch ahead
    core.submit("tiny-sd-medium", 64, 64, now_s=0.03, deadline_s=None)
    assert core.step(1.0, leases).launches == ()  # its only replica is busy
    core.finished("tiny-sd-medium")
    assert leases.release(launched[0].lease.lease_id)
    assert len(core.step(1.0, leases).launches) == 1 and not core.busy_with("tiny-sd-large")


def test_a_slot_held_by_another_replica_keeps_the_batch_queued_without_refusing_it():
    now = [0.0]
    leases = book(now=now)
    other, mine = DispatchCore(CATALOG, max_wait_s=0.0), DispatchCore(CATALOG, max_wait_s=0.0)
    other.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None)
    taken = other.step(0.0, leases, holder="other").launches[0].lease
    kept = mine.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None)
    step = mine.step(0.0, leases, holder="mine")
    assert step.launches == () and step.rejected == () and step.wake_at_s is not None
    leases.release(taken.lease_id)
    assert mine.step(0.1, leases, holder="mine").launches[0].tickets == (kept,)


def test_under_a_cap_work_is_held_then_moved_once_then_refused():
    now = [0.0]
    leases = book(cap_w=700, now=now)
    core = DispatchCore(CATALOG, max_wait_s=0.0, max_hold_s=5.0)
    big = core.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None, floor=0.0)
    fussy = core.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None, floor=0.9)
    leases.observe(PowerReading(0.0, 280.0))
    held = core.step(0.0, leases)  # 280 + 450 > 700: held
    assert held.launches == () and held.wake_at_s is not None and held.wake_at_s > 0.0
    now[0] = 5.0
    leases.observe(PowerReading(5.0, 280.0))
    moved = core.step(5.0, leases)
    assert moved.moved == ((big, "tiny-sd-turbo"),)  # 350 W fits the floor of 0.0
    assert [(t, r.reason) for t, r in moved.rejected] == [(fussy, "power_cap")]
    now[0] = 5.1
    leases.observe(PowerReading(5.1, 280.0))
    launched = core.step(5.1, leases).launches
    assert [(x.variant, x.tickets, x.moved) for x in launched] == [
        ("tiny-sd-turbo", (big,), (True,))
    ]


def test_withdrawn_outputs_never_launch_and_no_reading_means_no_launch():
    now = [0.0]
    leases = book(cap_w=1000, now=now)
    core = DispatchCore(CATALOG, max_wait_s=0.0)
    gone = core.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None)
    assert core.withdraw(gone) and not core.withdraw(gone)
    kept = core.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None)
    assert core.step(0.0, leases).launches == ()  # no reading yet
    leases.observe(PowerReading(0.0, 0.0))
    assert core.step(0.0, leases).launches[0].tickets == (kept,)


def test_a_lease_granted_while_its_outputs_left_is_handed_back():
    core, leases = DispatchCore(CATALOG, max_wait_s=0.0), book()
    ticket = core.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None)
    proposal = core.propose(0.0)
    decisions = leases.request("local", proposal.asks)
    assert core.withdraw(ticket)  # the request went away while the lease was asked for
    step = core.settle(proposal, decisions)
    assert step.launches == () and [lease.variant for lease in step.unused] == ["tiny-sd-turbo"]


def test_background_work_never_launches_ahead_of_user_work_for_its_variant():
    core, leases = DispatchCore(CATALOG, max_wait_s=0.0), book()
    audit = core.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None, background=True)
    user = core.submit("tiny-sd-large", 64, 64, now_s=1.0, deadline_s=None)  # arrives later
    first = core.step(1.0, leases).launches
    assert [launch.tickets for launch in first] == [(user,)]  # the user's, though younger
    assert first[0].lease is not None
    core.finished("tiny-sd-large")
    leases.release(first[0].lease.lease_id)
    second = core.step(2.0, leases).launches
    assert [launch.tickets for launch in second] == [(audit,)]  # only once no user waits


def test_background_work_yields_to_the_cap_and_is_never_moved():
    now = [0.0]
    leases = book(cap_w=1000, now=now)
    core = DispatchCore(CATALOG, max_wait_s=0.0, max_hold_s=5.0)
    core.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None, background=True)
    leases.observe(PowerReading(0.0, 280.0))
    # 720 W of room: a 450 W audit fits, but not beside a user batch as large: it yields
    step = core.step(0.0, leases)
    assert step.launches == () and step.rejected == () and step.moved == ()
    assert step.wake_at_s is not None
    now[0] = 0.2
    leases.observe(PowerReading(0.2, 80.0))  # 920 W of room: room for both
    assert len(core.step(0.2, leases).launches) == 1
    uncapped, idle = book(), DispatchCore(CATALOG, max_wait_s=0.0)
    idle.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None, background=True)
    assert len(idle.step(0.0, uncapped).launches) == 1  # no cap: nothing to yield to


def test_background_work_yields_while_a_user_batch_is_refused_for_the_cap():
    now = [0.0]
    leases = book(cap_w=1400, now=now)
    core = DispatchCore(CATALOG, max_wait_s=0.0, max_hold_s=5.0)
    core.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None, background=True)
    core.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None)
    leases.observe(PowerReading(0.0, 1000.0))  # 400 W: the user's 450 W batch is refused
    step = core.step(0.0, leases)
    assert step.launches == ()  # and the 350 W audit, which would fit, yields
