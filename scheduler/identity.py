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

_json_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str


def normalize_prompt(prompt: str) -> str:
    """Collapse runs of whitespace and trim; case is meaningful to some text encoders."""
    return " ".join(prompt.split())


def output_key(
    prompt: str, negative_prompt: str | None, width_px: int, height_px: int, seed: int
) -> str:
    """A stable hex key for one output, independent of the variant that renders it.

    The hash is over canonical JSON (sorted keys, no spaces) of the task, both prompts,
    the size and the seed. It is written out by hand rather than through ``json.dumps``
    of a dict because the fleet simulator computes a million of these; the bytes are the
    same (``tests/test_cache.py`` pins two keys), and they must stay so, since keys are
    stored in the persistent result cache.
    """
    canonical = (
        f'{{"negative_prompt":{_json_str(normalize_prompt(negative_prompt or ""))},'
        f'"prompt":{_json_str(normalize_prompt(prompt))},"seed":{int(seed)},'
        f'"size":[{int(width_px)},{int(height_px)}],"task":"text-to-image"}}'
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def pooled_key(output: str, pool: str) -> str:
    """``output``'s key inside one reuse pool: exact reuse that never crosses pools."""
    return hashlib.sha256(f"{pool}\n{output}".encode()).hexdigest()


def flight_key(output: str, variant: str) -> str:
    """The in-flight identity: the same output rendered by the same variant."""
    return f"{variant}:{output}"
