"""Approximate reuse's pure decisions and its store (SQLite + files + FAISS, no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from wattserve.policies.latent_reuse import (
    ANONYMOUS_POOL,
    DEFAULT_BANDS,
    LatentEntry,
    ReuseRefusal,
    after_hit,
    capture_steps,
    evictions,
    reuse_mode,
    reuse_pool,
    steps_to_skip,
)  # fmt: skip
from wattserve.scheduler.latents import LatentStore
from wattserve.telemetry.database import make_engine, migrate


def test_published_bands_scale_to_the_variants_steps_and_never_past_a_kept_step():
    keep50 = capture_steps(50)
    assert keep50 == (5, 10, 15, 20, 25)
    similarities = (0.6, 0.7, 0.8, 0.87, 0.92, 0.99)
    skipped = [steps_to_skip(s, 50, DEFAULT_BANDS, keep50) for s in similarities]
    assert skipped == [0, 5, 10, 15, 20, 25]
    assert steps_to_skip(0.99, 8, DEFAULT_BANDS, capture_steps(8)) == 4  # half of 8
    assert steps_to_skip(0.99, 8, DEFAULT_BANDS, (1, 2)) == 2  # only what was kept
    assert steps_to_skip(0.99, 8, DEFAULT_BANDS, ()) == 0  # a scheduler that cannot resume
    assert capture_steps(1) == ()  # a one-step variant has nothing to skip


def test_approximate_is_opt_in_and_a_seed_keeps_its_bytes():
    assert (
        reuse_mode(None, seeded=True, policy_default="approximate", tenant_allowed=True) == "exact"
    )
    assert reuse_mode(None, seeded=False, policy_default="approximate", tenant_allowed=True) \
        == "approximate"  # fmt: skip
    assert reuse_mode(None, seeded=False, policy_default="approximate", tenant_allowed=False) \
        == "exact"  # fmt: skip
    assert reuse_mode("approximate", seeded=True, policy_default="exact", tenant_allowed=True) \
        == "approximate"  # fmt: skip
    refused = reuse_mode("approximate", seeded=False, policy_default="exact", tenant_allowed=False)
    assert isinstance(refused, ReuseRefusal)


def test_each_tenant_is_its_own_pool_unless_shared():
    assert reuse_pool("a", {}) != reuse_pool("b", {}) != reuse_pool(None, {})
    assert reuse_pool(None, {}) == ANONYMOUS_POOL
    shared = {"a": "team", "b": "team"}
    assert reuse_pool("a", shared) == reuse_pool("b", shared) == "team"


def test_eviction_drops_the_least_beneficial_first_hits_decay():
    new = LatentEntry("new", 10, 4, 4.0, 100.0)
    used = after_hit(after_hit(LatentEntry("used", 10, 4, 4.0, 0.0), 4, 50.0), 4, 100.0)
    shallow = LatentEntry("shallow", 10, 1, 1.0, 100.0)
    assert evictions([new, used, shallow], 30, 100.0) == ()
    assert evictions([new, used, shallow], 20, 100.0) == ("shallow",)
    assert evictions([new, used, shallow], 10, 100.0) == ("shallow", "new")
    later_s = 6 * 3600.0 * 10  # ten half-lives on
    stale = LatentEntry("stale", 10, 4, 12.0, 0.0)  # once valuable, unused since
    fresh = LatentEntry("fresh", 10, 4, 4.0, later_s)
    assert evictions([stale, fresh], 10, later_s) == ("stale",)


def _kept(steps=(2, 4), value=1.0) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"s{s}": np.full((4, 8, 8), value * s, np.float32) for s in steps})
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path) -> LatentStore:
    engine = make_engine(f"sqlite:///{tmp_path}/l.db")
    migrate(engine)
    return LatentStore(engine, tmp_path / "latents")


SPACE = ("tenant:a", "tiny-sd-large", 64, 64)


def test_nearest_finds_the_most_similar_prompt_within_its_space_only(store, tmp_path):
    store.put(SPACE, [1.0, 0.0, 0.0], _kept(), (2, 4), ("req_a", 0), "a")
    store.put(SPACE, [0.6, 0.8, 0.0], _kept(), (2, 4), ("req_b", 0), "a")
    store.put(("tenant:b", *SPACE[1:]), [1.0, 0.0, 0.0], _kept(), (2, 4), ("req_c", 0), "b")
    (best,) = store.nearest(SPACE, [0.9, 0.1, 0.0])
    assert best.entry_id == "req_a.0" and best.similarity == pytest.approx(0.9939, abs=1e-3)
    assert [m.entry_id for m in store.nearest(SPACE, [0.0, 1.0, 0.0], k=2)] == [
        "req_b.0",
        "req_a.0",
    ]
    assert store.nearest(("tenant:z", *SPACE[1:]), [1.0, 0.0, 0.0]) == []
    latent = np.load(io.BytesIO(store.load("req_a.0", 4)))
    assert latent.shape == (4, 8, 8) and float(latent[0, 0, 0]) == 4.0
    assert store.load("req_a.0", 3) is None  # a step that was not kept
    again = LatentStore(store.engine, tmp_path / "latents")  # a restart finds them all
    assert again.nearest(SPACE, [1.0, 0.0, 0.0])[0].entry_id == "req_a.0"


def test_the_byte_cap_evicts_by_benefit_and_a_stale_index_never_serves_a_gone_entry(store):
    size = len(_kept())
    store.max_bytes = 2 * size
    store.put(SPACE, [1.0, 0.0], _kept(), (2, 4), ("req_a", 0), "a")
    store.put(SPACE, [0.0, 1.0], _kept(), (2, 4), ("req_b", 0), "a")
    assert store.nearest(SPACE, [1.0, 0.0])[0].entry_id == "req_a.0"  # indexed
    store.record_hit("req_a.0", 4)
    store.put(SPACE, [0.7, 0.7], _kept(), (2, 4), ("req_c", 0), "a")
    assert store.stats() == {"entries": 2, "bytes": 2 * size}
    found = {m.entry_id for m in store.nearest(SPACE, [0.0, 1.0], k=3)}
    assert found == {"req_a.0", "req_c.0"}  # req_b (no hits, oldest) went first
    assert store.load("req_b.0", 4) is None
