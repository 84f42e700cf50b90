"""A labeled proxy for prompt similarity, for simulating approximate reuse offline.

Approximate reuse (``policies.latent_reuse``) decides how many denoising steps a new
prompt may skip from the cosine similarity of its text embedding to a cached prompt's:
MoDM's bands (0.65 / 0.75 / 0.85 / 0.90 / 0.95) are thresholds in CLIP text-embedding
space. No text-encoder weights exist on this machine, so the simulator cannot compute
that similarity. It uses this stand-in instead, named ``tfidf-proxy`` wherever a result
rests on it:

* **What it computes.** TF-IDF vectors over lower-cased words (runs of letters,
  digits and underscores, single characters included; sublinear term frequency,
  L2-normalised), the vocabulary and IDF fitted on the distinct prompts of the trace
  being simulated, and their cosine. Fitting on the whole trace uses corpus statistics
  of prompts not yet arrived; it decides nothing per request (the nearest cached prompt
  is still chosen among those stored before the request arrives). Identical prompts
  score 1.0; prompts sharing no word score 0.0.
* **What it shows.** Lexical overlap: how much of a prompt's wording, weighted by how
  rare each word is in the trace, another prompt shares. In DiffusionDB that captures
  what the data README measures — users editing and re-running their own prompts.
* **What it does not show.** CLIP semantic similarity. Paraphrases with different words
  score low here and may be close in CLIP space; prompts differing in one decisive word
  ("a cat with a hat" / "without a hat") score high here. Unrelated prompts score near 0
  here, while CLIP text cosines of unrelated prompts are far from 0. The MoDM bands are
  applied to a different similarity scale, so the calibration below is a proxy, and no
  figure resting on it is a claim about what CLIP would give.

**Calibration** (``CALIBRATION_SCALE``, ``CALIBRATION_OFFSET``): the bands see
``offset + scale * cosine``, clipped to [0, 1], and the chosen map is the identity
(scale 1, offset 0). Why, measured on ``diffusiondb_prompts_5k.txt`` (4,999 prompts,
each against the most similar of the 500 before it; exact repeats left out): of the
pairs the data README calls near-duplicates (Jaccard >= 0.7 over word sets), 90 %
score >= 0.77, above the lowest band (0.65); of pairs sharing less than half their word
set (Jaccard < 0.5), 99 % score < 0.66, below it. So at the identity the lowest band
separates "an edit of the same prompt" from "a different prompt" as the word sets do,
and no constant is fitted to a desired hit rate. Against the 500 prompts before each,
56.7 % of the file's prompts then have one at >= 0.65 (50.4 % of those that are not
exact repeats), 23.4 % at >= 0.95. Whether CLIP would admit more or fewer is not known
here. ``python -m wattserve.bench.similarity FILE`` reproduces these figures.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

__all__ = [
    "CALIBRATION_OFFSET",
    "CALIBRATION_SCALE",
    "PROXY_LABEL",
    "PromptSimilarity",
]

PROXY_LABEL = "tfidf-proxy"
CALIBRATION_SCALE = 1.0  # identity: see the module docstring for why
CALIBRATION_OFFSET = 0.0
TOKEN_PATTERN = r"(?u)\b\w+\b"  # every word, single characters too ("3 d", "8 k")
PROVENANCE = (
    f"{PROXY_LABEL}: TF-IDF cosine over words, fitted on the trace's prompts, mapped to the "
    f"bands as {CALIBRATION_OFFSET:g} + {CALIBRATION_SCALE:g} x cosine; lexical overlap, "
    "not CLIP similarity (CLIP-space bands applied to another scale)"
)


class PromptSimilarity:
    """Calibrated proxy similarity between the distinct prompts of one trace.

    Prompts are numbered in first-appearance order (``id``); ``row(i)`` is prompt i's
    calibrated similarity to every prompt, one sparse product (O(nonzeros of the
    matrix)), so nearest-neighbour search over a store is a gather and an argmax.
    """

    label = PROXY_LABEL

    def __init__(self, prompts: Sequence[str]) -> None:
        self._ids: dict[str, int] = {}
        for prompt in prompts:
            self._ids.setdefault(prompt, len(self._ids))
        if not self._ids:
            raise ValueError("a similarity needs at least one prompt")
        vectorizer = TfidfVectorizer(
            lowercase=True, token_pattern=TOKEN_PATTERN, sublinear_tf=True, dtype=np.float32
        )
        try:
            matrix = vectorizer.fit_transform(list(self._ids))
        except ValueError:  # no prompt has a word: every pair shares none
            matrix = sparse.csr_matrix((len(self._ids), 1), dtype=np.float32)
        self._matrix = sparse.csr_matrix(matrix)
        self._query = np.zeros(self._matrix.shape[1], dtype=np.float32)  # reused per row

    def __len__(self) -> int:
        return len(self._ids)

    def id(self, prompt: str) -> int:
        """The number of ``prompt``; KeyError for a prompt the proxy was not fitted on."""
        return self._ids[prompt]

    def row(self, prompt_id: int) -> np.ndarray:
        """Calibrated similarity of prompt ``prompt_id`` to every prompt, by id (float32)."""
        start, end = self._matrix.indptr[prompt_id], self._matrix.indptr[prompt_id + 1]
        words = self._matrix.indices[start:end]
        self._query[words] = self._matrix.data[start:end]
        cosine = self._matrix @ self._query  # a dense product: one pass over the nonzeros
        self._query[words] = 0.0
        if end > start:
            cosine[prompt_id] = 1.0  # exactly, not 1 - rounding
        return calibrated(cosine)

    def similarity(self, a: str, b: str) -> float:
        """Calibrated similarity of two fitted prompts, in [0, 1]."""
        if a == b:
            return 1.0
        return float(self.row(self.id(a))[self.id(b)])


def calibrated(cosine: np.ndarray) -> np.ndarray:
    """The proxy's cosine on the scale the bands are read on (the documented constants)."""
    if CALIBRATION_SCALE == 1.0 and CALIBRATION_OFFSET == 0.0:
        return np.clip(cosine, 0.0, 1.0, out=cosine)
    return np.clip(CALIBRATION_OFFSET + CALIBRATION_SCALE * cosine, 0.0, 1.0)


def calibration_figures(prompts: Sequence[str], window: int = 500) -> dict[str, float]:
    """The figures the calibration rests on, for ``prompts`` in order (see the docstring)."""
    proxy = PromptSimilarity(prompts)
    ids = np.array([proxy.id(p) for p in prompts])
    words = [frozenset(re.findall(r"\w+", p.lower())) for p in prompts]
    best, jaccard, exact = np.zeros(len(ids)), np.zeros(len(ids)), np.zeros(len(ids), bool)
    for i in range(1, len(ids)):
        lo = max(0, i - window)
        best[i] = proxy.row(int(ids[i]))[ids[lo:i]].max()
        exact[i] = bool((ids[lo:i] == ids[i]).any())
        jaccard[i] = max(len(words[i] & words[k]) / max(1, len(words[i] | words[k]))
                         for k in range(lo, i))  # fmt: skip
    fresh = ~exact
    near, apart = fresh & (jaccard >= 0.7), fresh & (jaccard < 0.5)
    return {
        "prompts": len(ids),
        "near_duplicates_p10": float(np.percentile(best[near], 10)),
        "apart_p99": float(np.percentile(best[apart], 99)),
        **{f"share_at_{t:.2f}": float((best >= t).mean()) for t in (0.65, 0.75, 0.85, 0.95)},
        "fresh_share_at_0.65": float((best[fresh] >= 0.65).mean()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the calibration figures for a prompt file (one prompt per line, in order)."""
    parser = argparse.ArgumentParser(description=calibration_figures.__doc__)
    parser.add_argument("prompts", help="a prompt file, one per line, in session order")
    args = parser.parse_args(argv)
    with open(args.prompts, encoding="utf-8") as lines:
        prompts = [line.strip() for line in lines if line.strip()]
    for name, value in calibration_figures(prompts).items():
        print(f"{name:24} {value:.4f}" if isinstance(value, float) else f"{name:24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
