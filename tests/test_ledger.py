import sqlalchemy as sa

from wattserve.telemetry.ledger import LedgerRow, LedgerStore


def row(request_id="req_1", index=0, joules=10.0):
    return LedgerRow(
        request_id=request_id, image_index=index, variant="v", quality="draft",
        route_reason="cheapest_capable", batch_id="bat_1", batch_size=1, joules=joules,
        energy_source="simulated", cache="miss", status="ok", latency_ms=5.0, seed=2**62,
        width_px=64, height_px=64,
    )  # fmt: skip


def test_writes_are_idempotent_per_output(tmp_path):
    store = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    assert store.record([row(index=0), row(index=1)]) == 2
    assert store.record([row(index=1, joules=99.0), row(index=2)]) == 1
    rows = store.for_request("req_1")
    assert [(r.image_index, r.joules) for r in rows] == [(0, 10.0), (1, 10.0), (2, 10.0)]
    assert rows[0].seed == 2**62


def test_recent_is_newest_first_and_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path}/sub/dir/l.db"
    store = LedgerStore(url)
    store.record([row("req_a"), row("req_b"), row("req_c")])
    store.close()
    reopened = LedgerStore(url)
    assert [r.request_id for r in reopened.recent(2)] == ["req_c", "req_b"]
    entry = reopened.recent(1)[0].to_entry()
    assert entry.energy_source == "simulated" and entry.status == "ok"


def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path):
    store = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar() == 10_000


def pending(request_id="req_1", index=0, holder="rep_a"):
    accepted = row(request_id, index, joules=0.0)
    accepted.status, accepted.holder, accepted.batch_id = "pending", holder, "none"
    return accepted


def test_an_output_is_on_record_from_acceptance_and_settled_once(tmp_path):
    store = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    store.record([pending(index=0), pending(index=1)])
    assert [r.status for r in store.for_request("req_1")] == ["pending", "pending"]
    assert store.settle([row(index=0, joules=7.0), row(index=1, joules=8.0)]) == 2
    assert [(r.status, r.joules) for r in store.for_request("req_1")] == [("ok", 7.0), ("ok", 8.0)]
    assert store.settle([row(index=0, joules=99.0)]) == 0  # a second final row never lands
    assert store.for_request("req_1")[0].joules == 7.0


def test_the_janitor_fails_only_rows_of_replicas_that_stopped_beating(tmp_path):
    store = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    store.heartbeat("rep_live")
    store.record([pending("req_live", holder="rep_live"), pending("req_dead", holder="rep_gone")])
    assert store.fail_orphans(stale_after_s=10.0) == 1
    dead = store.for_request("req_dead")[0]
    assert (dead.status, dead.joules, dead.energy_source) == ("failed", 0.0, "simulated")
    assert "stopped" in (dead.error or "")
    assert store.for_request("req_live")[0].status == "pending"
    # the dead replica's late settle (it was only slow) cannot add a second final row
    assert store.settle([row("req_dead", joules=5.0)]) == 0
    assert store.for_request("req_dead")[0].status == "failed"
    assert store.fail_orphans(stale_after_s=10.0) == 0  # idempotent


def test_usage_counts_pending_outputs_apart(tmp_path):
    store = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    failed = row("req_f")
    failed.status = "failed"
    store.record([row("req_ok"), failed, pending("req_p")])
    (usage,) = store.usage_by_variant()
    assert (usage.outputs, usage.failed_outputs, usage.pending_outputs) == (1, 1, 1)
