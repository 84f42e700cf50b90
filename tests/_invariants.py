"""The invariants every fault test ends with: answers, ledger rows, books, power.

After any fault, once the service has had time to recover:

* every request got an answer: a result, or an error the service gives on purpose
  (4xx, 429, 503) -- never a lost request or a traceback;
* every output has exactly one final ledger row, and no row is left ``pending`` once the
  janitor has run; every served output's receipt is its ledger row;
* the energy books balance (measured = attributed + idle + unattributed + failed
  attempts + pending) and no phantom draw stays: with no batch running, live power is
  back to the devices' idle draw within a few seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from tests._wait import poll
from wattserve import AdmissionRejected, GenerationResult, InvalidRequest, ServiceUnavailable
from wattserve.cluster.admission import cluster_books, cluster_power_w, node_agents
from wattserve.telemetry.attribution import Reconciliation
from wattserve.telemetry.ledger import LedgerRow, LedgerStore

ON_PURPOSE = (AdmissionRejected, ServiceUnavailable, InvalidRequest)
JANITOR_S = 30.0  # a stopped replica's rows: 10 s without heartbeat + a sweep, with margin
IDLE_WITHIN_S = 5.0  # an agent notices a dead worker within about a second


def books() -> Reconciliation:
    """The energy books of every node's agent, summed."""
    return cluster_books(node_agents())


def idle_power_w() -> float:
    """The cluster's power now (call it when nothing runs)."""
    return cluster_power_w(node_agents())


def check_ledger(db_url: str, results: Sequence[Any]) -> list[LedgerRow]:
    """Answers and ledger rows: every request answered, every output one final row."""
    served = [r for r in results if isinstance(r, GenerationResult)]
    refused = [r for r in results if isinstance(r, ON_PURPOSE)]
    other = [r for r in results if r not in served and r not in refused]
    assert not other, f"requests without a proper answer: {other[:3]}"
    ledger = LedgerStore(db_url)
    try:
        poll("no pending ledger rows", lambda: True if not ledger.recent(
            10_000, status="pending") else None, JANITOR_S)  # fmt: skip
        rows = ledger.window(None, None)
        outputs = Counter((r.request_id, r.image_index) for r in rows)
        assert max(outputs.values(), default=1) == 1, "an output with two rows"
        for result in served:
            mine = ledger.for_request(result.request_id)
            assert [r.status for r in mine] == ["ok"] * len(result.images)
            assert [r.joules for r in mine] == [x.joules for x in result.receipts]
    finally:
        ledger.close()
    return rows


def check(db_url: str, results: Sequence[Any], idle_w: float) -> dict[str, Any]:
    """Assert the invariants; return the figures a closing note reports."""
    served = [r for r in results if isinstance(r, GenerationResult)]
    refused = [r for r in results if isinstance(r, ON_PURPOSE)]
    rows = check_ledger(db_url, results)
    power = poll("power back to idle", lambda: (w := idle_power_w()) <= idle_w + 1e-6 and w or
                 None, IDLE_WITHIN_S, every_s=0.2)  # fmt: skip
    total = books()
    assert total.error_pct < 1.0, total
    return {
        "requests": len(results), "served": len(served), "refused": len(refused),
        "retried": sum(1 for r in served if r.attempts > 1), "ledger_rows": len(rows),
        "failed_rows": sum(1 for r in rows if r.status == "failed"), "power_w": power,
        "failed_attempt_j": round(total.failed_attempt_j, 1),
        "books_error_pct": round(total.error_pct, 3),
    }  # fmt: skip
