"""Approximate reuse on the request path: real tiny workers, real text encoders, SQLite."""

from __future__ import annotations

import pytest

from tests.conftest import InProcessPool
from wattserve import GenerationRequest
from wattserve.policies.policy import Policy
from wattserve.scheduler.approximate import ApproximateReuse
from wattserve.scheduler.cache import ResultCache
from wattserve.scheduler.latents import LatentStore
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import LedgerStore
from wattserve.telemetry.savings import savings_by_cause
from wattserve.workers.encoder import PromptEncoders

LARGE = "tiny-sd-large"  # 8 DDIM steps: kept after 1..4, a resume skips up to 4


@pytest.fixture
def scheduler(catalog, inprocess_pool: InProcessPool, models_dir, tmp_path) -> Scheduler:
    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    store = LatentStore(ledger.engine, tmp_path / "latents")
    reuse = ApproximateReuse(store, PromptEncoders(models_dir).embed)
    return Scheduler(catalog, Policy(), inprocess_pool, ledger, approximate=reuse)


def ask(prompt: str = "a lighthouse at dusk", **kw) -> GenerationRequest:
    fields = {"prompt": prompt, "width_px": 64, "height_px": 64, "model": LARGE, **kw}
    return GenerationRequest(**fields)


async def test_a_second_similar_request_resumes_and_costs_less(scheduler):
    first = (await scheduler.generate(ask(reuse="approximate"))).wattserve.receipts[0]
    second = (await scheduler.generate(ask(reuse="approximate"))).wattserve.receipts[0]
    assert (first.cache, first.steps_skipped, first.steps) == ("miss", 0, 8)
    assert second.cache == "approximate" and second.steps_skipped == 4
    assert second.similarity == pytest.approx(1.0, abs=1e-5)
    assert second.reuse_source == f"{first.request_id}.0"  # same (anonymous) owner
    assert second.joules < first.joules and second.energy_source == "simulated"
    (row,) = scheduler.ledger.for_request(second.request_id)
    assert (row.cache, row.steps_skipped, row.reuse_source) == (
        "approximate",
        4,
        second.reuse_source,
    )
    split = savings_by_cause([first, second], LARGE)
    assert split.by_cause_joules["approximate_cache"] == pytest.approx(first.joules * 4 / 8)


async def test_exact_requests_never_resume_and_seeded_ones_keep_their_bytes(scheduler):
    await scheduler.generate(ask())  # keeps latents for later
    plain = (await scheduler.generate(ask())).wattserve.receipts[0]
    seeded = [await scheduler.generate(ask(seed=11)) for _ in range(2)]
    assert plain.cache == "miss" and plain.steps_skipped == 0
    assert [r.wattserve.receipts[0].steps_skipped for r in seeded] == [0, 0]
    assert seeded[0].data[0].b64_json == seeded[1].data[0].b64_json


async def test_n_outputs_resume_from_distinct_sources_or_run_in_full(scheduler):
    await scheduler.generate(ask(reuse="approximate"))
    receipts = (await scheduler.generate(ask(reuse="approximate", n=2))).wattserve.receipts
    assert sorted(r.cache for r in receipts) == ["approximate", "miss"]  # one source only
    assert receipts[0].batch_id != receipts[1].batch_id  # different start steps, own batches


async def test_latents_never_cross_tenants_unless_pooled(scheduler):
    await scheduler.generate(ask(tenant="a", reuse="approximate"))
    other = (await scheduler.generate(ask(tenant="b", reuse="approximate"))).wattserve.receipts
    assert other[0].cache == "miss"
    scheduler.policy = Policy(reuse_pools={"c": "team", "d": "team"})
    await scheduler.generate(ask(tenant="c", reuse="approximate"))
    pooled = (await scheduler.generate(ask(tenant="d", reuse="approximate"))).wattserve.receipts
    assert pooled[0].cache == "approximate" and pooled[0].steps_skipped > 0
    assert pooled[0].reuse_source is None  # the source is c's: d is not shown it


async def test_exact_hits_cross_tenants_by_default_and_stay_in_pools_when_asked(scheduler):
    scheduler.cache = ResultCache(scheduler.ledger.engine, scheduler.approximate.store.directory
                                  / "cache")  # fmt: skip
    await scheduler.generate(ask(tenant="a", seed=3))
    shared = (await scheduler.generate(ask(tenant="b", seed=3))).wattserve.receipts[0]
    assert shared.cache == "hit"  # today's behaviour, kept as the default
    scheduler.policy = Policy(pool_exact_reuse=True)
    await scheduler.generate(ask(tenant="a", seed=4))
    pooled = (await scheduler.generate(ask(tenant="b", seed=4))).wattserve.receipts[0]
    again = (await scheduler.generate(ask(tenant="b", seed=4))).wattserve.receipts[0]
    assert (pooled.cache, again.cache) == ("miss", "hit")  # b's own copy, not a's


async def test_a_failing_encoder_costs_reuse_never_the_request(catalog, inprocess_pool, tmp_path):
    def broken(_variant, _prompt):
        raise RuntimeError("encoder out of memory")

    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    reuse = ApproximateReuse(LatentStore(ledger.engine, tmp_path / "latents"), broken)
    scheduler = Scheduler(catalog, Policy(), inprocess_pool, ledger, approximate=reuse)
    receipts = (await scheduler.generate(ask(reuse="approximate"))).wattserve.receipts
    again = (await scheduler.generate(ask(reuse="approximate"))).wattserve.receipts
    assert [r.cache for r in receipts + again] == ["miss", "miss"]  # served, in full
    assert reuse.store.stats()["entries"] == 0
