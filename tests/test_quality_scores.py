"""Audit scores on real images: SSIM/PSNR through scikit-image, CLIP through transformers.

The CLIP is the built-in random-weight one: its numbers mean nothing (and it says so);
what is tested is the code path a real local CLIP takes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from wattserve.telemetry.quality import PSNR_CAP_DB, ClipScorer, image_similarity
from wattserve.workers.pipelines import TINY_CLIP, resolve_clip_model


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


RNG = np.random.default_rng(3)
IMAGE = RNG.integers(0, 256, (64, 48, 3))


def test_identical_images_score_perfectly_and_noise_lowers_both_scores():
    same = image_similarity(_png(IMAGE), _png(IMAGE))
    assert same.ssim == pytest.approx(1.0) and same.psnr_db == PSNR_CAP_DB
    slight = image_similarity(_png(np.clip(IMAGE + RNG.normal(0, 5, IMAGE.shape), 0, 255)),
                              _png(IMAGE))  # fmt: skip
    heavy = image_similarity(_png(np.clip(IMAGE + RNG.normal(0, 60, IMAGE.shape), 0, 255)),
                             _png(IMAGE))  # fmt: skip
    assert 1.0 > slight.ssim > heavy.ssim
    assert PSNR_CAP_DB > slight.psnr_db > heavy.psnr_db > 0


def test_images_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="sizes differ"):
        image_similarity(_png(IMAGE), _png(IMAGE[:32]))


def test_tiny_clip_builds_once_loads_from_disk_and_says_its_weights_are_random(tmp_path):
    path = resolve_clip_model(TINY_CLIP, tmp_path)
    assert resolve_clip_model(TINY_CLIP, tmp_path) == path  # built once
    assert resolve_clip_model("/some/local/clip", tmp_path) == "/some/local/clip"
    scorer = ClipScorer(path)
    assert scorer.random_weights
    one = scorer.score("a red fox", _png(IMAGE))
    other = scorer.score("a red fox", _png(255 - IMAGE))
    assert -1.0 <= one <= 1.0 and one != other  # a real forward pass over each image
    assert scorer.score("a red fox", _png(IMAGE)) == one  # deterministic
