"""Quality scores of an audited pair: a served image against the reference's.

Two kinds, chosen per pair by ``policies.audit.measure_for``:

* **Image similarity** — SSIM and PSNR (scikit-image) of the served image to the
  reference's, both decoded to RGB. Meaningful only within one model family and seed.
* **CLIP text-image score** — the cosine similarity of the prompt's and the image's CLIP
  embeddings (``transformers`` ``CLIPModel``, loaded with ``from_pretrained`` from a
  local path: ``WATTSERVE_AUDIT_CLIP_MODEL``); the verdict reads the reference's score
  minus the served one's. Across different models this is the only comparison.

With random weights (the built-in tiny CLIP used by the demo and tests) the numbers
mean nothing; ``ClipScorer.random_weights`` says so and every report labels it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; reported as this
RANDOM_WEIGHTS_MARKER = "wattserve_random_weights"  # in the model's config.json


@dataclass(frozen=True)
class ImageSimilarity:
    """How close the served image is to the reference's, pixel for pixel."""

    ssim: float
    psnr_db: float


def _rgb(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def image_similarity(served_png: bytes, reference_png: bytes) -> ImageSimilarity:
    """SSIM and PSNR (dB, capped at ``PSNR_CAP_DB``) of two same-size PNGs."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    served, reference = _rgb(served_png), _rgb(reference_png)
    if served.shape != reference.shape:
        raise ValueError(f"image sizes differ: {served.shape} vs {reference.shape}")
    window = min(7, *served.shape[:2]) | 1  # SSIM's window: odd, at most the image
    ssim = float(structural_similarity(served, reference, channel_axis=2, win_size=window,
                                       data_range=255))  # fmt: skip
    if (served == reference).all():
        return ImageSimilarity(ssim, PSNR_CAP_DB)
    psnr = float(peak_signal_noise_ratio(reference, served, data_range=255))
    return ImageSimilarity(ssim, min(psnr, PSNR_CAP_DB))


class ClipScorer:
    """CLIP text-image scores from a local model directory (one thread, CPU)."""

    def __init__(self, path: str | Path) -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.path = str(path)
        self._torch = torch
        self._model = CLIPModel.from_pretrained(self.path, local_files_only=True).eval()
        self._tokenizer = CLIPTokenizer.from_pretrained(self.path, local_files_only=True)
        self._images = CLIPImageProcessor.from_pretrained(self.path, local_files_only=True)
        config = json.loads((Path(self.path) / "config.json").read_text())
        self.random_weights = bool(config.get(RANDOM_WEIGHTS_MARKER, False))

    def score(self, prompt: str, png: bytes) -> float:
        """Cosine similarity of the prompt's and the image's CLIP embeddings."""
        from PIL import Image

        torch = self._torch
        with Image.open(io.BytesIO(png)) as image:
            pixels = self._images(images=image.convert("RGB"), return_tensors="pt")
        tokens = self._tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            text = self._model.get_text_features(**tokens)
            picture = self._model.get_image_features(**pixels)
        text = getattr(text, "pooler_output", text)
        picture = getattr(picture, "pooler_output", picture)
        return float(torch.nn.functional.cosine_similarity(text, picture).item())
