"""How a trace's requests are drawn: arrivals, repeats, popularity, prompts, seeds.

Pure and deterministic: ``draw_requests(spec, prompts)`` yields the same request fields
for the same spec and prompts. ``bench.trace`` wraps them into ``TraceRequest``s.

* **Arrivals.** ``poisson`` is a Poisson process at ``rate_per_s``. ``bursty`` is the
  same process switched on for ``on_s`` and off for ``off_s`` in turn, starting on: the
  Poisson process's own clock runs only during ON windows, so there are no arrivals in
  OFF windows and the long-run mean rate is ``rate_per_s * on_s / (on_s + off_s)``.
  Times are rounded to the microsecond.
* **Tier, size, tenant.** Every request, new or repeat, draws them by weight, so the
  whole trace's mixes match the spec (not just its new requests').
* **Repeats.** A request is a repeat with probability ``repeat_rate`` when an earlier
  seeded request of its tier and size exists: it copies that request's prompt and seed,
  making the same output, which the result cache or in-flight coalescing can serve.
  Only seeded requests are repeated: the scheduler shares only seeded outputs by
  default, so a copy of an unseeded request would not be a duplicate. The first
  request of each class is new, so short traces realise a little less than the rate.
  A repeat keeps its own tenant: who asks does not change the pixels, and the result
  cache is shared across tenants.
* **Which request a repeat copies** (``popularity``). Each new seeded request gets a
  popularity weight when it first appears, within its tier and size class, and a
  repeat picks among its class in proportion to weight. ``zipf``: the k-th distinct
  seeded request of the class weighs ``k ** -skew``, a fixed catalogue ranked by first
  appearance, so the earliest requests stay the hottest for the whole trace (a warm
  cache keeps them; nothing trends or drifts). ``pareto``: each weighs an independent
  Pareto(alpha=``skew``) draw, so a hot request can first appear anywhere in the trace.
  ``uniform``: all weigh the same. Weights are only appended and repeats never change
  them (popularity is not rich-get-richer), so a running cumulative sum and a bisection
  pick an original in O(log n). Classes keep the mixes to sampling noise: were a repeat to pick
  from all requests and inherit the tier, a heavy Zipf head's first few requests alone
  would move a 20,000-request trace's tier mix by up to 13 points.
* **New requests.** The prompt is the next one of a shuffled pass over the prompts
  (without replacement); when they run out, a fresh shuffle starts. With
  ``prompt_order = "file"`` it is the next one in the file's own order, starting over at
  the end: a log of real prompts keeps what its order carries (a prompt's edits and
  re-runs arrive close behind it), and no random number is spent on it. The seed (with
  probability ``seeded_fraction``) is drawn from [0, 2**31) without repeats, so a prompt
  reused in a later pass still makes a different output: every new request is a new
  output.

Arrivals, request content and tenants use separate random streams derived from the
spec's seed, so changing the rate or the tenant mix leaves the requests themselves alone.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wattserve.bench.trace import TraceSpec

SEED_BITS = 31  # request seeds come from [0, 2**31), as the demo's do

# arrival_s, prompt, seed, size, quality, tenant
DrawnRequest = tuple[float, str, int | None, str, str, str | None]


def draw_requests(spec: TraceSpec, prompts: Sequence[str]) -> Iterator[DrawnRequest]:
    """The fields of ``spec``'s requests, in arrival order (see the module docstring)."""
    content = random.Random(f"{spec.seed}:content")
    tenant_rng = random.Random(f"{spec.seed}:tenants")
    pick_tier, pick_size = _picker(spec.tiers), _picker(spec.sizes)
    pick_tenant = _picker(spec.tenants) if spec.tenants else None
    weigh = _popularity(spec, content)
    next_prompt = _prompt_passes(prompts, content, spec.prompt_order == "file")
    # Per (tier, size): the seeded new requests as (prompt, seed), and their running
    # cumulative popularity weight.
    classes: dict[tuple[str, str], tuple[list[tuple[str, int]], list[float]]] = {}
    used_seeds: set[int] = set()
    for arrival_s in _arrivals(spec):
        tenant = pick_tenant(tenant_rng) if pick_tenant else None
        quality, size = pick_tier(content), pick_size(content)
        known = classes.get((quality, size))
        if known and content.random() < spec.repeat_rate:
            originals, cumulative = known
            drawn = content.random() * cumulative[-1]
            prompt, seed = originals[min(bisect_right(cumulative, drawn), len(originals) - 1)]
            yield arrival_s, prompt, seed, size, quality, tenant
            continue
        prompt, new_seed = next(next_prompt), None
        if content.random() < spec.seeded_fraction:
            new_seed = _fresh_seed(content, used_seeds)
            originals, cumulative = classes.setdefault((quality, size), ([], []))
            originals.append((prompt, new_seed))
            cumulative.append((cumulative[-1] if cumulative else 0.0) + weigh(len(originals)))
        yield arrival_s, prompt, new_seed, size, quality, tenant


def _arrivals(spec: TraceSpec) -> Iterator[float]:
    """Arrival offsets in seconds; bursty maps the Poisson clock onto ON windows."""
    rng = random.Random(f"{spec.seed}:arrivals")
    period_s = spec.on_s + spec.off_s
    active_s = 0.0
    for _ in range(spec.requests):
        active_s += rng.expovariate(spec.rate_per_s)
        if spec.arrival == "bursty":
            windows, into_window_s = divmod(active_s, spec.on_s)
            yield round(windows * period_s + into_window_s, 6)
        else:
            yield round(active_s, 6)


def _picker(weights: Mapping[str, float]) -> Callable[[random.Random], Any]:
    """Draw a key in proportion to its weight (a zero-weight key never)."""
    keys = [key for key, weight in weights.items() if weight > 0]
    cumulative = list(accumulate(weight for weight in weights.values() if weight > 0))
    if len(keys) == 1:  # the common single size: no draw, and no random number spent
        return lambda _rng: keys[0]

    def pick(rng: random.Random) -> Any:
        return keys[min(bisect_right(cumulative, rng.random() * cumulative[-1]), len(keys) - 1)]

    return pick


def _popularity(spec: TraceSpec, rng: random.Random) -> Callable[[int], float]:
    """The weight of the ``rank``-th distinct seeded request (1-based), drawn once."""
    skew = spec.skew
    if spec.popularity == "zipf":
        return lambda rank: rank**-skew
    if spec.popularity == "pareto":
        return lambda _rank: rng.paretovariate(skew)
    return lambda _rank: 1.0


def _prompt_passes(
    prompts: Sequence[str], rng: random.Random, in_file_order: bool = False
) -> Iterator[str]:
    """Passes over ``prompts``, each shuffled (without replacement) or in file order."""
    order = list(prompts)
    while True:
        if not in_file_order:
            rng.shuffle(order)
        yield from order


def _fresh_seed(rng: random.Random, used: set[int]) -> int:
    """A seed no earlier new request of the trace has, so every new output is new."""
    seed = rng.getrandbits(SEED_BITS)
    while seed in used:
        seed = rng.getrandbits(SEED_BITS)
    used.add(seed)
    return seed
