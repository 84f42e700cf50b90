"""Prompt embeddings for approximate reuse: the variant's own text encoder, pooled.

The scheduler finds a similar earlier prompt before it queues a generation, so it needs
the embedding before any worker runs. It loads the variant's tokenizer and text encoder
from the same local files the workers load (``from_pretrained`` with ``subfolder``; no
other model, nothing downloaded) and keeps them per variant. The embedding is CLIP's
pooled output, normalised: what MoDM indexes. On CPU this costs a text-encoder pass per
request (milliseconds for the tiny variants; tens of ms for SD 2.1's OpenCLIP-H) — the
seam to move it onto the workers' devices if that ever matters. It runs on one thread and
the scheduler loads every catalog variant's encoder at start (``warm``): a load or a pass
that took every core mid-traffic would stretch the workers' batches on a shared CPU, and
with them the measured joules routing learns from.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from wattserve.policies.catalog import VariantSpec
from wattserve.workers.pipelines import resolve_source

log = structlog.get_logger(__name__)


class PromptEncoders:
    """One loaded text encoder per variant, loaded on first use."""

    def __init__(self, models_dir: Path) -> None:
        import torch

        torch.set_num_threads(1)  # the scheduler replica's only torch work
        self.models_dir = models_dir
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def warm(self, variants: Iterable[VariantSpec]) -> None:
        """Load the encoders of ``variants`` now, before traffic (failures are logged)."""
        for variant in variants:
            try:
                with self._lock:
                    if variant.name not in self._loaded:
                        self._loaded[variant.name] = self._load(variant)
            except Exception as exc:  # its first request loads it again, or falls back
                log.warning("encoder_warm_failed", variant=variant.name, error=repr(exc))

    def _load(self, variant: VariantSpec) -> tuple[Any, Any]:
        from transformers import AutoTokenizer, CLIPTextModel

        source = resolve_source(variant, self.models_dir)
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer",
                                                  local_files_only=True)  # fmt: skip
        encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                local_files_only=True).eval()  # fmt: skip
        return tokenizer, encoder

    def embed(self, variant: VariantSpec, prompt: str) -> np.ndarray:
        """The normalised pooled text embedding of ``prompt`` under ``variant``'s encoder."""
        import torch

        with self._lock:
            if variant.name not in self._loaded:
                self._loaded[variant.name] = self._load(variant)
            tokenizer, encoder = self._loaded[variant.name]
            ids = tokenizer(prompt, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                pooled = encoder(ids.input_ids).pooler_output[0].float().numpy()
        norm = float(np.linalg.norm(pooled))
        return pooled / norm if norm > 0 else pooled
