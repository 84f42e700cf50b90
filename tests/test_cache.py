import sqlalchemy as sa

from wattserve.scheduler.cache import ResultCache
from wattserve.scheduler.identity import flight_key, normalize_prompt, output_key
from wattserve.telemetry.database import make_engine, migrate


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def cache_at(tmp_path, **kw):
    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    migrate(engine)
    return ResultCache(engine, tmp_path / "blobs", **kw)


def test_identity_normalises_whitespace_but_not_case_and_sees_every_input():
    base = output_key("a red  cube ", None, 64, 64, 7)
    assert base == output_key(" a red cube", "", 64, 64, 7)
    assert normalize_prompt("  a \n red\tcube ") == "a red cube"
    others = {
        output_key("A red cube", None, 64, 64, 7),
        output_key("a red cube", "blurry", 64, 64, 7),
        output_key("a red cube", None, 64, 96, 7),
        output_key("a red cube", None, 64, 64, 8),
    }
    assert base not in others and len(others) == 4
    assert flight_key(base, "v1") != flight_key(base, "v2")


def test_output_keys_are_stable_across_versions():
    """Keys are stored in the persistent cache: a change of encoding would orphan it."""
    assert output_key("a red  cube ", None, 64, 64, 7) == (
        "f5f82224ccbd44a0e715d0759e1bfff00788a5078239cd985f95582f3f444c66"
    )
    assert output_key('café "q" \\ ü', "blur\ny", 1024, 768, 2**32 - 1) == (
        "2fd3581c596a0362cee9bd78aa2b25431f367da8f23b6fe63d64dc9d8516d30b"
    )


def test_hit_needs_quality_at_or_above_floor_and_prefers_the_best(tmp_path):
    cache = cache_at(tmp_path)
    cache.put("k", "turbo", 0.4, "simulated", b"turbo-png", "req_a", 0)
    assert cache.get("k", min_quality=0.5) is None
    cache.put("k", "large", 0.9, "simulated", b"large-png", "req_b", 1)
    hit = cache.get("k", min_quality=0.0)
    assert (hit.png, hit.variant, hit.source_request_id, hit.source_image_index) == (
        b"large-png", "large", "req_b", 1,
    )  # fmt: skip
    assert cache.get("k", 0.0, variant="turbo").png == b"turbo-png"
    assert cache.get("other", 0.0) is None


def test_entries_survive_a_restart_and_identical_bytes_are_stored_once(tmp_path):
    cache_at(tmp_path).put("k1", "v", 0.5, "simulated", b"same", "r", 0)
    reopened = cache_at(tmp_path)
    reopened.put("k2", "v", 0.5, "simulated", b"same", "r", 1)
    reopened.put("k2", "v", 0.5, "simulated", b"same", "r", 1)  # idempotent
    assert reopened.get("k1", 0.0).png == b"same"
    assert reopened.stats() == {"entries": 2, "bytes": 8}
    assert len(list((tmp_path / "blobs").rglob("*.png"))) == 1


def test_lru_eviction_keeps_the_recently_used_under_the_byte_cap(tmp_path):
    clock = Clock()
    cache = cache_at(tmp_path, max_bytes=25, clock=clock)
    for name in ("a", "b"):
        clock.now += 1
        cache.put(name, "v", 0.5, "simulated", name.encode() * 10, "r", 0)
    clock.now += 1
    assert cache.get("a", 0.0) is not None  # a is now the most recently used
    clock.now += 1
    cache.put("c", "v", 0.5, "simulated", b"c" * 10, "r", 0)
    assert cache.get("b", 0.0) is None
    assert cache.get("a", 0.0) is not None and cache.get("c", 0.0) is not None
    assert cache.stats()["bytes"] <= 25
    assert len(list((tmp_path / "blobs").rglob("*.png"))) == 2


def test_ttl_expires_entries_and_missing_files_are_misses(tmp_path):
    clock = Clock()
    cache = cache_at(tmp_path, ttl_s=60, clock=clock)
    cache.put("k", "v", 0.5, "simulated", b"png", "r", 0)
    clock.now += 59
    assert cache.get("k", 0.0) is not None
    clock.now += 2
    assert cache.get("k", 0.0) is None
    fresh = cache_at(tmp_path / "other")
    fresh.put("k", "v", 0.5, "simulated", b"gone", "r", 0)
    for blob in (tmp_path / "other" / "blobs").rglob("*.png"):
        blob.unlink()
    assert fresh.get("k", 0.0) is None and fresh.stats()["entries"] == 0


def test_memory_tier_answers_without_io_and_keeps_the_floor_and_ttl(tmp_path):
    clock = Clock()
    cache = cache_at(tmp_path, ttl_s=60, clock=clock)
    assert cache.recent("k", 0.0) is None  # nothing held: the caller asks get()
    cache.put("k", "small", 0.3, "simulated", b"png-small", "r", 0)
    for blob in (tmp_path / "blobs").rglob("*.png"):
        blob.unlink()  # no disk behind it: the memory tier alone answers
    assert cache.recent("k", 0.2).png == b"png-small"
    assert cache.recent("k", 0.5) is None  # below the floor: not served from memory
    assert cache.recent("k", 0.0, variant="other") is None
    clock.now += 61
    assert cache.recent("k", 0.0) is None  # expired like its row


def test_memory_tier_is_bounded_and_forgets_what_eviction_removes(tmp_path):
    clock = Clock()
    cache = cache_at(tmp_path, max_bytes=25, memory_bytes=20, clock=clock)
    for name in ("a", "b"):
        clock.now += 1
        cache.put(name, "v", 0.5, "simulated", name.encode() * 10, "r", 0)
    clock.now += 1
    assert cache.recent("a", 0.0) is not None  # a is now the most recent in memory
    clock.now += 1
    cache.put("c", "v", 0.5, "simulated", b"c" * 10, "r", 0)
    # the database evicted b (least recently used, the touch of a counted): memory too
    assert cache.recent("b", 0.0) is None and cache.get("b", 0.0) is None
    assert cache.recent("a", 0.0) is not None and cache.recent("c", 0.0) is not None
    cache.put("d", "v", 0.5, "simulated", b"d" * 5, "r", 0)  # over 20 bytes held: a goes
    assert cache.recent("a", 0.0) is None and cache.get("a", 0.0) is not None


def test_lookups_write_nothing_until_touches_are_flushed(tmp_path):
    clock = Clock()
    cache = cache_at(tmp_path, clock=clock)
    cache.put("k", "v", 0.5, "simulated", b"png", "r", 0)

    def last_used():
        with cache.engine.connect() as conn:
            return conn.execute(sa.text("SELECT last_used_s FROM result_cache")).scalar_one()

    clock.now += 5
    assert cache.recent("k", 0.0) is not None
    assert last_used() == 1000.0
    assert cache.flush_touches() == 1 and last_used() == 1005.0
    assert cache.flush_touches() == 0
