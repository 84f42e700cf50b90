"""Discrete-event fleet simulation that drives the live scheduler's own decision code.

Every decision here is made by the code the live service runs, under a simulated clock:
output identity (``scheduler.identity``), reuse of a cached copy (``policies.reuse``),
routing (``policies.routing.route`` over ``policies.profile.EnergyProfile`` estimates
learned from the simulated batches, as live), and batching, power-cap admission and the
hold/move/refuse fates (one ``policies.dispatch.DispatchCore``, the object the live
``Batcher`` wraps). What is simulated is only what the GPUs would do: a batch of b
images of a variant takes the ML.ENERGY-measured latency and energy of its model at b
(``bench.fleet``), and the fleet draws that batch's average power while it runs. When
the costs come from a live service's profile, its measured time per request outside any
batch (``overhead_s``: cache lookup and store, flights, bookkeeping) is added to each
output's latency; GPU fleets priced from ML.ENERGY have none (nothing measured it).

Coalescing follows the live rule (one generation per output key and variant in flight;
everyone waiting shares its joules equally). A J/output target is held as live: each
finished batch feeds one ``policies.target.JoulesTarget``, whose answer sets the
dispatcher's batch wait. One simplification, stated in the report: a refused leader's
waiters are refused with it (live, one waiter retries).

Approximate reuse (``bench._latents``): a request whose reuse mode
(``policies.latent_reuse.reuse_mode``, with the run's ``reuse`` as the policy default)
is ``approximate`` may resume each output from the nearest kept latent of its pool,
variant and size, by ``bench.similarity``'s labeled proxy, and skip the steps its band
allows; every generation outside the baseline keeps its latents (a resumed one, those
after its start step: the live worker's capture). A resumed batch
costs its measured batch energy and time less the skipped steps' share of the per-step
part (``VariantCost.fixed_fraction``: none of it is fixed at today's assumption of 0),
and only outputs resuming at the same step share a batch. Its receipt says
``approximate``, with the steps, steps skipped and similarity. Resumed batches do not
feed the energy profile: routing prices full generations.

Two named baselines run on the same code, by the request policy the live service knows
(``GenerationRequest.policy``): ``baseline``, the highest-quality variant at batch size 1;
and ``competent``, each tier on a fixed variant (``policies.routing``'s declared-price
mapping), batched with the policy's cap and wait. Neither gets the cache, coalescing or
approximate reuse; the competent run is also not power-aware: no cap and no J/output
target act on it (the conventional baseline runs under the cap, as before).

Events are processed in time order (finishes before arrivals at equal times), and the
dispatcher steps after each group of events at one instant, as the live dispatcher
wakes on each arrival and finish.
"""

from __future__ import annotations

import gc
import heapq
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wattserve import GenerationRequest
from wattserve._schemas import MAX_SEED, RequestPolicy, parse_size
from wattserve.bench.fleet import IDLE_W, VariantCost, place, with_replicas
from wattserve.bench.trace import TraceRequest
from wattserve.policies.catalog import Catalog, VariantSpec
from wattserve.policies.dispatch import DispatchCore, Launch
from wattserve.policies.latent_reuse import ReuseBand, ReuseMode, reuse_mode, reuse_pool
from wattserve.policies.leases import LeaseBook, PowerReading
from wattserve.policies.policy import Policy
from wattserve.policies.profile import EnergyProfile
from wattserve.policies.reuse import CachedCopy, usable_copies
from wattserve.policies.routing import RouteRefusal, RoutingState, route
from wattserve.policies.target import JoulesTarget
from wattserve.scheduler.identity import flight_key, output_key
from wattserve.scheduler.leases import replica_slots

if TYPE_CHECKING:  # numpy and scikit-learn: the [serve] extra, needed for approximate reuse
    from wattserve.bench._latents import LatentStore, Resume

SOURCE = "simulated"  # ML.ENERGY-measured model costs, played out by the simulator
RNG_SEED = 0  # every run draws the same round trips: runs are deterministic
PLACEMENT_SAMPLE = 5_000  # requests routed up front to size the placement
SAMPLE_PERIOD_S = 0.1  # the live telemetry agents' default (10 Hz)
SIM_HOLDER = "simulator"
_DONE, _ARRIVAL, _WAKE = 0, 1, 2


@dataclass(slots=True)
class SimReceipt:
    """One output's outcome: the fields the savings attribution reads, plus latency."""

    request_index: int
    variant: str
    batch_id: str
    batch_size: int
    joules: float
    energy_source: str
    cache: str  # miss | hit | coalesced | approximate
    seed: int
    latency_s: float
    ok: bool
    floor: float
    steps: int | None = None  # the variant's schedule (generated outputs)
    steps_skipped: int = 0  # resumed from a kept latent after this many steps
    similarity: float | None = None  # the proxy similarity of the resume (approximate)


@dataclass
class RunResult:
    """What one simulated run produced."""

    policy: str
    receipts: list[SimReceipt]
    placement: dict[str, int]
    duration_s: float
    idle_j: float
    power_w: list[tuple[float, float]]  # (time s, fleet power W) at each change
    moved: int
    wall_s: float
    latents: dict[str, int] = field(default_factory=dict)  # the latent store's counts


@dataclass
class _Slot:
    request_index: int
    seed: int
    arrived_s: float
    floor: float
    fkey: str | None
    key: str | None
    pool: str | None = None  # keeps its latents in this pool once generated (None: not)
    prompt: str = ""
    resume: Resume | None = None


@dataclass
class _State:
    core: DispatchCore
    target_j: float | None  # the J/output target this run holds (None: none)
    book: LeaseBook  # the admission service's decisions: power budget and replica slots
    profile: EnergyProfile
    target: JoulesTarget
    catalog: Catalog
    costs: dict[str, VariantCost]
    names: frozenset[str]  # every placed variant is up for the whole run
    rng: random.Random  # draws measured round trips (a live profile's); seeded per run
    latents: LatentStore | None = None  # approximate reuse is on (None: off)
    _bands: dict[str, tuple[ReuseBand, ...]] = field(default_factory=dict)
    events: list[tuple[float, int, int, object]] = field(default_factory=list)
    seq: int = 0
    cache: dict[str, list[CachedCopy]] = field(default_factory=dict)
    flights: dict[str, list[_Slot]] = field(default_factory=dict)
    slots: dict[int, _Slot] = field(default_factory=dict)
    busy_gpus: int = 0
    busy_extra_w: float = 0.0
    pending_wake: float | None = None
    batches: int = 0

    def bands(self, spec: VariantSpec) -> tuple[ReuseBand, ...]:
        """``spec``'s reuse bands (``bench._latents.bands_of``), once per variant."""
        got = self._bands.get(spec.name)
        if got is None:
            from wattserve.bench._latents import bands_of  # noqa: PLC0415 (the [serve] extra)

            got = self._bands[spec.name] = bands_of(spec)
        return got

    def push(self, at_s: float, kind: int, data: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at_s, kind, self.seq, data))


class FleetSimulation:
    """Runs traces over a fleet: GPUs by type (``{"H100": 8, "B200": 4}``).

    ``costs`` names the GPU type each variant runs on (``bench.fleet.fleet_catalog``
    makes both for a fleet).
    """

    def __init__(
        self,
        catalog: Catalog,
        costs: dict[str, VariantCost],
        fleet: Mapping[str, int],
        *,
        policy: Policy | None = None,
        cap_w: float | None = None,
        target_j: float | None = None,
        idle_w: float = IDLE_W,
        max_hold_s: float = 5.0,
        replicas: dict[str, int] | None = None,
        overhead_s: dict[str, float] | None = None,
        reuse: ReuseMode = "exact",
        latent_max_bytes: int | None = None,
    ) -> None:
        specs = tuple(v for v in catalog.variants if v.name in costs)
        self.catalog = Catalog(source_path=catalog.source_path, variants=specs)
        self.costs = costs
        self.fleet = dict(fleet)
        self.gpus = sum(self.fleet.values())
        self.policy = policy or Policy()
        self.cap_w = cap_w
        self.target_j = target_j  # the budget's J/output target (None: none)
        self.idle_w = idle_w
        self.max_hold_s = max_hold_s
        self.replicas = replicas  # a fixed placement (a live fleet); None: by demand
        overhead_s = overhead_s or {}
        self.hit_overhead_s = overhead_s.get("hit", 0.0)
        self.miss_overhead_s = overhead_s.get("miss", 0.0)
        self.reuse = reuse  # the policy default for requests that name none
        self.latent_max_bytes = (
            self.policy.cache_max_bytes if latent_max_bytes is None else latent_max_bytes
        )
        self._now_s = 0.0  # simulated time of the step in progress

    # --- setup ------------------------------------------------------------------------

    def requests(
        self, trace: Sequence[TraceRequest], policy: RequestPolicy = "default"
    ) -> list[GenerationRequest]:
        """The trace as the scheduler's requests, each under the request ``policy``."""
        sizes: dict[str, tuple[int, int]] = {}
        deadline_s = self.policy.default_deadline_s  # as live, for requests that name none
        made = []
        for r in trace:
            width_px, height_px = sizes.get(r.size) or sizes.setdefault(r.size, parse_size(r.size))
            made.append(GenerationRequest.model_construct(
                prompt=r.prompt, negative_prompt=None, width_px=width_px, height_px=height_px,
                n=r.n, seed=r.seed, quality=r.quality, deadline_s=deadline_s, model=None,
                user=None, tenant=r.tenant, policy=policy, reuse=None,
            ))  # fmt: skip
        return made

    def placement(self, requests: Sequence[GenerationRequest]) -> dict[str, int]:
        """GPUs per variant, by the GPU time routing would send each variant.

        Each GPU type is split among its own variants. A type that routing would send
        nothing stands by with the models routing sends the most work to, where they run
        on it (a deadline or a baseline's load balancing may still reach it); with none of
        them, its GPUs idle.
        """
        if self.replicas is not None:
            return dict(self.replicas)
        state = RoutingState(frozenset(self.costs))
        demand: Counter[str] = Counter()
        for request in requests[:PLACEMENT_SAMPLE]:
            decision = route(request, self.catalog, self.policy, state)
            if isinstance(decision, RouteRefusal):
                continue
            chosen = decision.variant
            cost = self.costs[chosen]
            size = 1 if request.policy == "baseline" else len(cost.batch_latency_s) - 1
            demand[chosen] += request.n * cost.batch_latency_s[size] / size
        by_model: Counter[str] = Counter()
        for name, seconds in demand.items():
            by_model[self._spec(name).source] += seconds
        placed: dict[str, int] = {}
        for gpu, count in self.fleet.items():
            here = [name for name, cost in self.costs.items() if cost.gpu == gpu]
            wanted = {name: demand[name] for name in here if demand[name] > 0} or {
                name: by_model[self._spec(name).source] for name in here
            }
            placed.update(place(count, wanted))
        return placed

    def _spec(self, name: str) -> VariantSpec:
        spec = self.catalog.get(name)
        assert spec is not None  # costs and catalog name the same variants
        return spec

    # --- the run ----------------------------------------------------------------------

    def run(self, trace: Sequence[TraceRequest], *, policy: RequestPolicy = "default") -> RunResult:
        """Simulate ``trace`` under ``policy`` to completion; one receipt per output.

        The cyclic garbage collector is paused for the run: a million-request run holds
        millions of live objects, which the collector would rescan over and over (a
        quarter of the run time at 1 M requests) to find almost no cycles.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(trace, policy)
        finally:
            if collecting:
                gc.enable()

    def _run(self, trace: Sequence[TraceRequest], policy: RequestPolicy) -> RunResult:
        started = time.perf_counter()
        requests = self.requests(trace, policy)
        placement = self.placement(requests)
        catalog = with_replicas(self.catalog, placement)
        profile = EnergyProfile(catalog)
        st = _State(
            core=DispatchCore(catalog, max_batch_size=self.policy.max_batch_size,
                              max_wait_s=self.policy.max_wait_s, max_hold_s=self.max_hold_s,
                              joules_bounds=profile.joules_bounds),
            target_j=None if policy == "competent" else self.target_j,
            book=self._book(catalog, None if policy == "competent" else self.cap_w),
            profile=profile, target=JoulesTarget(), catalog=catalog, costs=self.costs,
            names=frozenset(catalog.names), rng=random.Random(RNG_SEED),
            latents=self._latent_store(trace) if policy == "default" else None,
        )  # fmt: skip
        receipts: list[SimReceipt] = []
        power: list[tuple[float, float]] = [(0.0, self.gpus * self.idle_w)]
        idle_j, last_s, moved = 0.0, 0.0, 0
        arrivals = [r.arrival_s for r in trace]
        next_arrival, now = 0, 0.0
        while next_arrival < len(requests) or st.events:
            head = st.events[0][0] if st.events else None
            arrival = arrivals[next_arrival] if next_arrival < len(requests) else None
            now = min(t for t in (head, arrival) if t is not None)
            idle_j += (self.gpus - st.busy_gpus) * self.idle_w * (now - last_s)
            last_s = now
            while st.events and st.events[0][0] <= now and st.events[0][1] == _DONE:
                _, _, _, launch = heapq.heappop(st.events)
                receipts.extend(self._finish(st, now, launch))
            while next_arrival < len(requests) and arrivals[next_arrival] <= now:
                receipts.extend(self._arrive(st, now, next_arrival, requests[next_arrival]))
                next_arrival += 1
            while st.events and st.events[0][0] <= now:  # only wakes are left at ``now``
                heapq.heappop(st.events)
                if st.pending_wake is not None and st.pending_wake <= now:
                    st.pending_wake = None
            moved += self._step(st, now, receipts)
            fleet_w = self._power_w(st)
            if power[-1][1] != fleet_w:
                power.append((now, fleet_w))
        return RunResult(
            policy=policy, receipts=receipts,
            placement=placement, duration_s=now, idle_j=idle_j, power_w=power, moved=moved,
            wall_s=time.perf_counter() - started,
            latents={**st.latents.stats, "bytes": st.latents.bytes} if st.latents else {},
        )  # fmt: skip

    def _latent_store(self, trace: Sequence[TraceRequest]) -> LatentStore | None:
        """The run's latent store when approximate reuse is on, its proxy fitted on ``trace``."""
        if self.reuse != "approximate":
            return None
        from wattserve.bench._latents import LatentStore  # noqa: PLC0415 (the [serve] extra)
        from wattserve.bench.similarity import PromptSimilarity  # noqa: PLC0415

        return LatentStore(PromptSimilarity([r.prompt for r in trace]), self.latent_max_bytes)

    def _book(self, catalog: Catalog, cap_w: float | None) -> LeaseBook:
        """The lease book as the admission service keeps it under ``cap_w``, simulated clock.

        Its readings are exact (the simulated fleet's power at the step), so it needs no
        warm-up; a batch's draw counts as not yet measured for two sample periods, as live.
        """
        book = LeaseBook(clock=lambda: self._now_s, sample_period_s=SAMPLE_PERIOD_S, warm_up=False)
        book.configure(cap_w=cap_w, replicas=replica_slots(catalog))
        return book

    def _power_w(self, st: _State) -> float:
        return self.gpus * self.idle_w + st.busy_extra_w

    def _arrive(
        self, st: _State, now: float, index: int, request: GenerationRequest
    ) -> list[SimReceipt]:
        """Route, reuse, coalesce or queue each output of one arriving request."""
        estimates = {name: st.profile.estimate(name, st.core.queued_for(name)) for name in st.names}
        decision = route(request, st.catalog, self.policy, RoutingState(st.names, estimates))
        if isinstance(decision, RouteRefusal):
            return [SimReceipt(index, "none", "none", 0, 0.0, SOURCE, "miss", request.seed or 0,
                               0.0, False, 0.0) for _ in range(request.n)]  # fmt: skip
        spec = st.catalog.get(decision.variant)
        assert spec is not None
        floor = self.policy.quality_floor(request.quality)
        baseline = request.policy != "default"  # either named baseline: no reuse of any kind
        # every tenant may use approximate reuse here: the simulator has no tenancy
        mode = reuse_mode(request.reuse, request.seed is not None, self.reuse, True)
        approximate = not baseline and mode == "approximate" and st.latents is not None
        shareable = (not baseline and not approximate
                     and (request.seed is not None or self.policy.share_unseeded))  # fmt: skip
        pools = self.policy.reuse_pools  # named shared pools, where set
        pool = reuse_pool(request.tenant, pools) if st.latents and not baseline else None
        base = request.seed if request.seed is not None else index
        done = []
        for i in range(request.n):
            seed = (base + i) % (MAX_SEED + 1)
            key = (
                output_key(request.prompt, None, request.width_px, request.height_px, seed)
                if shareable else None
            )  # fmt: skip
            if key is not None:
                hit = usable_copies(
                    st.cache.get(key, ()), floor, None, now, self.policy.cache_ttl_s
                )
                if hit:
                    done.append(SimReceipt(index, hit[0].variant, f"hit:{key[:8]}", 0, 0.0,
                                           SOURCE, "hit", seed, self.hit_overhead_s, True,
                                           floor))  # fmt: skip
                    continue
            fkey = flight_key(key, spec.name) if key is not None else None
            slot = _Slot(index, seed, now, floor, fkey, key, pool, request.prompt)
            if fkey is not None and fkey in st.flights:
                st.flights[fkey].append(slot)
                continue
            if fkey is not None:
                st.flights[fkey] = []
            if approximate and pool is not None and st.latents is not None:
                where = (pool, spec.name, request.width_px, request.height_px)
                slot.resume = st.latents.find(where, spec.steps, request.prompt, now,
                                              st.bands(spec))  # fmt: skip
            deadline_s = now + request.deadline_s if request.deadline_s else None  # as live
            ticket = st.core.submit(spec.name, request.width_px, request.height_px, now,
                                    deadline_s, floor, solo=request.policy == "baseline",
                                    start_step=slot.resume.skip if slot.resume else 0)  # fmt: skip
            st.slots[ticket] = slot
        return done

    def _resumed_share(self, launch: Launch) -> float:
        """What a batch costs of a full one: 1 less the skipped steps' per-step share."""
        if not launch.start_step:
            return 1.0
        steps = self.catalog.get(launch.variant).steps  # type: ignore[union-attr]
        fixed = self.costs[launch.variant].fixed_fraction
        return 1.0 - (1.0 - fixed) * launch.start_step / steps

    def _step(self, st: _State, now: float, receipts: list[SimReceipt]) -> int:
        """One dispatcher decision; launches become finish events. Returns outputs moved."""
        self._now_s = now  # the lease book's clock
        if self.cap_w is not None:
            st.book.observe(PowerReading(now, self._power_w(st)))
        step = st.core.step(now, st.book, SIM_HOLDER)
        for launch in step.launches:
            if launch.lease is not None:
                st.book.start(launch.lease.lease_id)
            cost = st.costs[launch.variant]
            size = len(launch.tickets)
            share = self._resumed_share(launch)  # power is unchanged: both scale alike
            latency_s = cost.latency_s(size, st.rng) * share
            energy_j = cost.batch_energy_j[size] * share
            st.busy_gpus += 1
            st.busy_extra_w += energy_j / latency_s - self.idle_w
            st.batches += 1
            st.push(now + latency_s, _DONE, (launch, f"bat_{st.batches}", latency_s, energy_j))
        for ticket, _refusal in step.rejected:
            slot = st.slots.pop(ticket)
            waiters = st.flights.pop(slot.fkey, []) if slot.fkey else []
            for s in (slot, *waiters):
                waited_s = now - s.arrived_s
                receipts.append(SimReceipt(s.request_index, "none", "none", 0, 0.0, SOURCE,
                                           "miss", s.seed, waited_s, False, s.floor))  # fmt: skip
        wake = step.wake_at_s
        if wake is not None:
            wake = max(wake, now + 1e-9)  # never re-wake at the same instant
        if wake is not None and (st.pending_wake is None or wake < st.pending_wake):
            st.pending_wake = wake
            st.push(wake, _WAKE, None)
        return len(step.moved)

    def _finish(self, st: _State, now: float, data: object) -> list[SimReceipt]:
        """A batch ended: charge its outputs and their sharers, cache them, learn."""
        launch, batch_id, latency_s, energy_j = data  # type: ignore[misc]
        size = len(launch.tickets)
        st.core.finished(launch.variant)
        if launch.lease is not None:
            st.book.release(launch.lease.lease_id)
        st.busy_gpus -= 1
        st.busy_extra_w -= energy_j / latency_s - self.idle_w
        if not launch.start_step:  # routing prices full generations
            st.profile.observe(launch.variant, size, energy_j / size, latency_s)
        st.target.observe(energy_j / size)
        st.core.max_wait_s = st.target.max_wait_s(self.policy, st.target_j)
        spec = st.catalog.get(launch.variant)
        assert spec is not None
        skipped = launch.start_step
        done = []
        for ticket in launch.tickets:
            slot = st.slots.pop(ticket)
            waiters = st.flights.pop(slot.fkey, []) if slot.fkey else []
            share = energy_j / size / (1 + len(waiters))
            resume = slot.resume if skipped else None
            first = "approximate" if resume else "miss"
            similarity = resume.similarity if resume else None
            for s, cache in ((slot, first), *((w, "coalesced") for w in waiters)):
                waited_s = now - s.arrived_s + self.miss_overhead_s
                done.append(SimReceipt(s.request_index, launch.variant, batch_id, size, share,
                                       SOURCE, cache, s.seed, waited_s, True, s.floor,
                                       spec.steps, skipped, similarity))  # fmt: skip
            if slot.key is not None:
                st.cache.setdefault(slot.key, []).append(
                    CachedCopy(launch.variant, spec.quality_score, now)
                )
            if st.latents is not None and slot.pool is not None:
                where = (slot.pool, launch.variant, launch.width_px, launch.height_px)
                st.latents.keep(where, spec.steps, slot.prompt, now, skipped)
        return done
