"""Request identity: which outputs are the same work.

An output is determined by the prompt (whitespace-normalised, case kept), the negative
prompt, the size and the seed, plus the variant that renders it. ``output_key`` hashes
the variant-independent part, so the result cache can serve an output made by any
variant good enough for the request; in-flight coalescing adds the variant, since two
variants given the same key make different pixels.

Unseeded requests get a fresh seed: users expect a new image each time, so their outputs
are neither coalesced nor cached unless the policy says ``share_unseeded``.
"""

from __future__ import annotations

import hashlib
import json


def normalize_prompt(prompt: str) -> str:
    """Collapse runs of whitespace and trim; case is meaningful to some text encoders."""
    return " ".join(prompt.split())


def output_key(
    prompt: str, negative_prompt: str | None, width_px: int, height_px: int, seed: int
) -> str:
    """A stable hex key for one output, independent of the variant that renders it."""
    canonical = json.dumps(
        {
            "task": "text-to-image",
            "prompt": normalize_prompt(prompt),
            "negative_prompt": normalize_prompt(negative_prompt or ""),
            "size": [width_px, height_px],
            "seed": seed,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def flight_key(output: str, variant: str) -> str:
    """The in-flight identity: the same output rendered by the same variant."""
    return f"{variant}:{output}"
