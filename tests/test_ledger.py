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
