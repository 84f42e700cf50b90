"""The lease book: unit tests per rule (invariants under random interleavings are in
``test_leases_properties.py``)."""

from __future__ import annotations

import pytest

from tests._leases import FakeClock, ask, make_book, one, read
from wattserve.policies.leases import (
    Lease,
    LeaseBookState,
    LeaseDecision,
    LeaseRefusal,
    PowerReading,
)


@pytest.fixture
def clock():
    return FakeClock()


# --- headroom ------------------------------------------------------------------------


def test_grants_oldest_first_and_answers_in_ask_order(clock):
    book = make_book(clock)
    read(book, clock, 200.0)
    young, old = ask(0, 500.0, waited_s=0.0), ask(1, 500.0, waited_s=0.5)
    decisions = book.request("s1", [young, old])
    assert [d.key for d in decisions] == [0, 1]
    assert decisions[1].lease is not None and decisions[1].refusal is None
    assert decisions[0].lease is None and decisions[0].refusal.reason == "power_cap"


def test_power_cap_refusal_says_cap_headroom_and_draw(clock):
    book = make_book(clock, cap_w=700.0)
    read(book, clock, 180.0)
    assert one(book, "s1", ask(0, 400.0)).lease is not None
    refusal = one(book, "s1", ask(1, 120.0 + 1, waited_s=0.0)).refusal
    assert refusal == LeaseRefusal(
        "power_cap", "power cap 700 W: 120 W of headroom, batch draws 121 W", pytest.approx(0.12)
    )
    assert one(book, "s2", ask(2, 120.0)).lease is not None  # exactly the headroom fits


def test_a_power_refusal_comes_back_just_after_the_next_reading(clock):
    """Not a whole period after the refusal: that would idle the budget at every turnover."""
    book = make_book(clock, cap_w=700.0)  # sample period 0.1 s
    read(book, clock, 600.0)
    clock.advance(0.07)  # the next poll starts 0.03 s from now and lands soon after
    refusal = one(book, "s1", ask(0, 400.0)).refusal
    assert refusal.reason == "power_cap"
    assert refusal.retry_after_s == pytest.approx(0.05)  # 0.03 + a fifth of a period
    clock.advance(0.2)  # a poll is late: come back soon, not never
    assert one(book, "s1", ask(1, 400.0)).refusal.retry_after_s == pytest.approx(0.01)


def test_started_lease_counts_in_full_until_a_reading_shows_it(clock):
    book = make_book(clock)
    read(book, clock, 100.0)
    lease = one(book, "s1", ask(0, 300.0)).lease
    assert book.state().pending_w == 300.0
    assert book.start(lease.lease_id)
    clock.advance(0.1)
    read(book, clock, 400.0)  # taken before start + visible_after_s (0.2 s)
    assert book.state().pending_w == 300.0
    assert book.state().headroom_w == 1000.0 - 400.0 - 300.0
    clock.advance(0.15)  # now past start + 0.2 s (0.1 + 0.1 would round just under)
    read(book, clock, 400.0)
    state = book.state()
    assert state.pending_w == 0.0 and state.headroom_w == 600.0 and state.leases == 1


def test_release_drops_pending_draw_but_not_what_the_reading_shows(clock):
    book = make_book(clock)
    read(book, clock, 100.0)
    unstarted = one(book, "s1", ask(0, 300.0)).lease
    assert book.release(unstarted.lease_id)
    assert book.state().pending_w == 0.0
    lease = one(book, "s1", ask(1, 300.0)).lease
    book.start(lease.lease_id)
    clock.advance(0.2)
    read(book, clock, 400.0)
    assert book.release(lease.lease_id)
    assert book.state().headroom_w == 600.0  # still measured until a newer reading


def test_uncapped_book_needs_no_reading_only_slots(clock):
    book = make_book(clock, cap_w=None, replicas={"v": 2}, warm_up=True)
    decisions = book.request("s1", [ask(k, 5000.0) for k in range(3)])
    assert [d.lease is not None for d in decisions] == [True, True, False]
    assert decisions[2].refusal.reason == "no_slot"
    state = book.state()
    assert state.headroom_w is None and not state.warming_up and state.slots_in_use == {"v": 2}


def test_capped_book_refuses_without_a_fresh_reading(clock):
    book = make_book(clock)
    refusal = one(book, "s1", ask(0, 10.0)).refusal
    assert refusal.reason == "no_reading" and "no power reading yet" in refusal.message
    read(book, clock, 100.0)
    assert one(book, "s1", ask(1, 10.0)).lease is not None
    book.observe(None)
    refusal = one(book, "s1", ask(2, 10.0)).refusal
    assert refusal.reason == "no_reading" and "poll failed" in refusal.message
    read(book, clock, 100.0)
    clock.advance(0.51)  # older than expiry_s = 5 sample periods
    refusal = one(book, "s1", ask(3, 10.0)).refusal
    assert refusal.reason == "no_reading" and "0.51 s old" in refusal.message
    assert refusal.retry_after_s == 0.1
    assert book.state().measured_w is None


def test_readings_stamped_late_or_out_of_order_are_safe(clock):
    book = make_book(clock)
    lease = one(book, "s1", ask(0, 1.0)).refusal  # no reading: nothing to do with it
    assert lease.reason == "no_reading"
    read(book, clock, 100.0)
    granted = one(book, "s1", ask(1, 300.0)).lease
    book.start(granted.lease_id)
    book.observe(PowerReading(clock() + 10.0, 100.0))  # future stamp: taken as of now
    assert book.state().pending_w == 300.0
    clock.advance(0.3)
    read(book, clock, 400.0)
    book.observe(PowerReading(clock() - 0.3, 100.0))  # older than the one held: ignored
    assert book.state().measured_w == 400.0 and book.state().pending_w == 0.0


# --- node caps -----------------------------------------------------------------------


def test_node_caps_bind_only_on_the_nodes_the_ask_can_use(clock):
    book = make_book(clock, cap_w=None, node_caps_w={"a": 1000.0})
    read(book, clock, 1000.0, a=900.0, b=100.0)
    assert one(book, "s1", ask(0, 500.0, nodes={"b"})).lease is not None
    refusal = one(book, "s1", ask(1, 500.0, nodes={"a", "b"})).refusal
    assert refusal.reason == "power_cap"
    assert refusal.message == "node a power cap 1000 W: 100 W of headroom, batch draws 500 W"
    assert one(book, "s1", ask(2, 500.0)).refusal.reason == "power_cap"  # any node: a too
    assert one(book, "s1", ask(3, 100.0)).lease is not None
    assert book.state().headroom_w is None  # no cluster cap


def test_node_cap_keys_are_prefixes_and_the_tightest_applies(clock):
    caps = {"gpu-1": 600.0, "gpu-1b": 400.0}
    book = make_book(clock, cap_w=None, node_caps_w=caps)
    read(book, clock, 350.0, **{"gpu-1a": 100.0, "gpu-1b": 200.0, "cpu-0": 50.0})
    assert one(book, "s1", ask(0, 500.0, nodes={"gpu-1a"})).lease is not None
    assert one(book, "s1", ask(1, 250.0, nodes={"gpu-1b"})).refusal.reason == "power_cap"
    assert one(book, "s1", ask(2, 5000.0, nodes={"cpu-0"})).lease is not None


def test_pending_draw_counts_on_every_node_the_lease_could_land_on(clock):
    book = make_book(clock, cap_w=None, node_caps_w={"a": 500.0, "b": 500.0})
    read(book, clock, 0.0, a=0.0, b=0.0)
    assert one(book, "s1", ask(0, 400.0, nodes={"a"})).lease is not None
    assert one(book, "s1", ask(1, 400.0, nodes={"b"})).lease is not None
    assert one(book, "s1", ask(2, 200.0, nodes={"b"})).refusal is not None
    book2 = make_book(clock, cap_w=None, node_caps_w={"a": 500.0, "b": 500.0})
    read(book2, clock, 0.0, a=0.0, b=0.0)
    assert one(book2, "s1", ask(0, 400.0)).lease is not None  # any node: counts on both
    assert one(book2, "s1", ask(1, 200.0, nodes={"b"})).refusal is not None


def test_capped_node_missing_from_the_reading_is_no_reading(clock):
    book = make_book(clock, cap_w=None, node_caps_w={"gpu": 500.0})
    read(book, clock, 100.0, **{"gpu-0": 100.0})
    refusal = one(book, "s1", ask(0, 10.0, nodes={"gpu-9"})).refusal
    assert refusal.reason == "no_reading" and "gpu-9" in refusal.message
    assert one(book, "s1", ask(1, 10.0, nodes={"cpu-9"})).lease is not None  # uncapped node


# --- slots, expiry, release ----------------------------------------------------------


def test_slots_per_variant_and_unknown_variant(clock):
    book = make_book(clock, cap_w=None, replicas={"big": 1, "small": 2})
    first = one(book, "s1", ask(0, 1.0, "big")).lease
    refusal = one(book, "s2", ask(1, 1.0, "big")).refusal
    assert refusal == LeaseRefusal("no_slot", "all 1 replicas of big are leased", 0.1)
    assert one(book, "s2", ask(2, 1.0, "small")).lease is not None
    refusal = one(book, "s2", ask(3, 1.0, "huge")).refusal
    assert refusal.reason == "unknown_variant" and "'huge'" in refusal.message
    assert book.state().slots_in_use == {"big": 1, "small": 1}
    assert book.release(first.lease_id)
    assert one(book, "s2", ask(4, 1.0, "big")).lease is not None


def test_unstarted_lease_expires_and_frees_its_slot_and_draw(clock):
    book = make_book(clock, replicas={"v": 1})
    read(book, clock, 0.0)
    lease = one(book, "s1", ask(0, 600.0)).lease
    assert lease.expires_s == pytest.approx(lease.granted_s + 0.5)
    assert lease.lease_id.startswith("1-") and lease.epoch == 1 and lease.holder == "s1"
    clock.advance(0.5)
    read(book, clock, 0.0)
    assert book.state().leases == 1  # void only after expires_s
    clock.advance(0.01)
    assert not book.start(lease.lease_id)
    assert book.state() == LeaseBookState(1, 1000.0, 0.0, 0.0, 1000.0, 0, {}, False)
    assert not book.release(lease.lease_id)
    assert one(book, "s1", ask(1, 600.0)).lease is not None


def test_release_is_idempotent_and_garbage_ids_answer_false(clock):
    book = make_book(clock, cap_w=None)
    lease = one(book, "s1", ask(0, 1.0)).lease
    assert book.start(lease.lease_id) and book.start(lease.lease_id)  # repeat: still fine
    assert book.release(lease.lease_id)
    assert not book.release(lease.lease_id)
    assert not book.start(lease.lease_id)
    for garbage in ("", "nope", "1-999", "2-1", None, 7):
        assert not book.start(garbage) and not book.release(garbage)


def test_started_lease_frees_its_slot_after_max_run(clock):
    book = make_book(clock, cap_w=None, replicas={"v": 1}, max_run_s=10.0)
    lease = one(book, "s1", ask(0, 1.0)).lease
    book.start(lease.lease_id)
    clock.advance(9.0)
    assert one(book, "s1", ask(1, 1.0)).refusal.reason == "no_slot"
    clock.advance(1.5)
    assert one(book, "s1", ask(2, 1.0)).lease is not None
    assert not book.release(lease.lease_id)


# --- epochs and warm-up --------------------------------------------------------------


def test_warm_up_waits_for_a_reading_that_includes_old_batches(clock):
    book = make_book(clock, warm_up=True, epoch=3)
    assert book.state().warming_up
    refusal = one(book, "s1", ask(0, 1.0)).refusal
    assert refusal.reason == "warming_up" and refusal.retry_after_s == pytest.approx(0.2)
    assert "epoch 3" in refusal.message
    clock.advance(0.15)
    read(book, clock, 100.0)  # before created + visible_after_s: may miss old batches
    assert one(book, "s1", ask(1, 1.0)).refusal.retry_after_s == pytest.approx(0.05)
    clock.advance(0.1)
    assert one(book, "s1", ask(2, 1.0)).refusal.retry_after_s == 0.1  # time up, no reading
    read(book, clock, 100.0)
    lease = one(book, "s1", ask(3, 1.0)).lease
    assert lease.lease_id.startswith("3-") and not book.state().warming_up


@pytest.mark.parametrize("warm_up", [False, True])
def test_warm_up_covers_old_batches_a_lagging_meter_does_not_show_yet(clock, warm_up):
    old = make_book(clock)
    read(old, clock, 100.0)
    old.start(one(old, "s1", ask(0, 600.0)).lease.lease_id)  # true power now 700 W
    clock.advance(0.05)
    new = make_book(clock, epoch=2, warm_up=warm_up)  # the service restarted
    clock.advance(0.05)
    read(new, clock, 100.0)  # the meter lags: the 600 W batch is not in it yet
    decision = one(new, "s1", ask(1, 600.0))
    if not warm_up:  # what warm-up is for: this grant would take the world to 1300 W
        assert decision.lease is not None
        return
    assert decision.refusal.reason == "warming_up"
    clock.advance(0.2)
    read(new, clock, 700.0)  # past created + visible_after_s: the old batch shows
    assert one(new, "s1", ask(2, 600.0)).refusal.reason == "power_cap"
    assert one(new, "s1", ask(3, 300.0)).lease is not None


def test_new_epoch_refuses_old_leases(clock):
    old = make_book(clock)
    read(old, clock, 0.0)
    lease = one(old, "s1", ask(0, 10.0)).lease
    new = make_book(clock, epoch=2, warm_up=True)
    clock.advance(0.2)
    read(new, clock, 0.0)
    assert not new.start(lease.lease_id) and not new.release(lease.lease_id)
    fresh = one(new, "s1", ask(1, 10.0)).lease
    assert fresh.epoch == 2 and fresh.lease_id != lease.lease_id
    assert new.start(fresh.lease_id)


# --- no starvation -------------------------------------------------------------------


def test_aged_ask_reserves_its_draw_against_younger_ones(clock):
    book = make_book(clock)
    read(book, clock, 500.0)  # 500 W of headroom
    old_big, small = ask(0, 700.0, waited_s=1.0), ask(1, 100.0, waited_s=0.0)
    big_d, small_d = book.request("s1", [old_big, small])
    assert big_d.refusal.reason == "power_cap" and small_d.refusal.reason == "power_cap"
    assert "700 W of it held for older batches" in small_d.refusal.message


def test_young_big_ask_lets_small_ones_backfill(clock):
    book = make_book(clock)
    read(book, clock, 500.0)
    big_d, small_d = book.request("s1", [ask(0, 700.0, waited_s=0.9), ask(1, 100.0)])
    assert big_d.refusal is not None and small_d.lease is not None


def test_remembered_old_ask_of_another_holder_reserves_but_is_never_granted(clock):
    book = make_book(clock)
    read(book, clock, 500.0)
    assert one(book, "A", ask(0, 700.0, waited_s=2.0)).refusal is not None
    assert one(book, "B", ask(0, 100.0)).refusal.reason == "power_cap"
    read(book, clock, 0.0)  # now the big one would fit: B still may not take its share
    decisions = book.request("B", [ask(1, 200.0), ask(2, 200.0)])
    assert [d.lease is not None for d in decisions] == [True, False]
    assert book.state().leases == 1  # nothing was granted to A by B's call
    assert one(book, "A", ask(0, 700.0, waited_s=2.0)).lease is not None


def test_remembered_asks_are_replaced_by_the_next_call_and_forgotten_when_idle(clock):
    book = make_book(clock)
    read(book, clock, 500.0)
    one(book, "A", ask(0, 700.0, waited_s=2.0))
    book.request("A", [])  # A no longer wants it
    assert one(book, "B", ask(0, 100.0)).lease is not None
    one(book, "A", ask(1, 700.0, waited_s=2.0))
    clock.advance(1.01)
    read(book, clock, 500.0)
    assert one(book, "B", ask(1, 100.0)).lease is not None  # A silent for > 1 s


def test_young_remembered_ask_does_not_reserve(clock):
    book = make_book(clock)
    read(book, clock, 500.0)
    one(book, "A", ask(0, 700.0, waited_s=0.5))
    assert one(book, "B", ask(0, 100.0)).lease is not None


def test_remembered_old_ask_holds_the_next_free_slot(clock):
    book = make_book(clock, cap_w=None, replicas={"v": 1})
    first = one(book, "B", ask(0, 1.0)).lease
    assert one(book, "A", ask(0, 1.0, waited_s=1.5)).refusal.reason == "no_slot"
    assert book.release(first.lease_id)
    assert one(book, "B", ask(1, 1.0)).refusal.reason == "no_slot"  # held for A
    assert one(book, "A", ask(0, 1.0, waited_s=1.5)).lease is not None


@pytest.mark.parametrize("node_caps_w", [None, {"a": 400.0}])
def test_old_ask_over_a_cap_on_its_own_reserves_nothing(clock, node_caps_w):
    book = make_book(clock, node_caps_w=node_caps_w)
    read(book, clock, 0.0, a=0.0)
    too_big = ask(0, 1500.0 if node_caps_w is None else 500.0, waited_s=5.0)
    assert one(book, "A", too_big).refusal.reason == "power_cap"  # can never fit
    assert one(book, "B", ask(0, 100.0)).lease is not None


def test_decision_values_hold_exactly_one_of_lease_and_refusal(clock):
    book = make_book(clock)
    read(book, clock, 0.0)
    for decision in book.request("s1", [ask(0, 10.0), ask(1, 10.0e6)]):
        assert isinstance(decision, LeaseDecision)
        assert (decision.lease is None) != (decision.refusal is None)
        assert decision.lease is None or isinstance(decision.lease, Lease)
