"""Pipeline sources: build the built-in tiny pipelines once, then load like any model.

A built-in variant (``source = "builtin:NAME"``) is a small Stable Diffusion pipeline
with random weights, built from configs on first use and saved with ``save_pretrained``
under the models directory; from then on it is loaded with
``DiffusionPipeline.from_pretrained`` exactly like a real checkpoint. Nothing is ever
downloaded: other sources must be a local path or a hub id already in the local cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import structlog

from wattserve.policies.catalog import BuiltinArch, VariantSpec

log = structlog.get_logger(__name__)

_TOKENIZER_MAX_TOKENS = 77


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _tiny_tokenizer() -> Any:
    """A CLIP tokenizer with a 514-token byte-level vocabulary and no merges."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(ch + "</w>" for ch in alphabet), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_TOKENIZER_MAX_TOKENS)


def _build_random_pipeline(arch: BuiltinArch) -> Any:
    """A random-weight Stable Diffusion pipeline of the given architecture.

    With ``arch``'s defaults this is the tiny demo layout; the optional fields reach
    real architectures (Stable Diffusion 2.1 in ``scripts/gpu_catalog.toml``). The
    modules are built in a fixed order after one ``torch.manual_seed`` so the weights
    depend on ``arch`` alone. The tokenizer is always the 514-token byte-level one; a
    larger ``text_vocab_size`` only enlarges the embedding table (ids stay < 514).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(arch.init_seed)
    tokenizer = _tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=arch.text_vocab_size or len(tokenizer),
            hidden_size=arch.text_hidden_size,
            intermediate_size=arch.text_intermediate_size or arch.text_hidden_size * 2,
            num_attention_heads=arch.text_heads,
            num_hidden_layers=arch.text_layers,
            max_position_embeddings=_TOKENIZER_MAX_TOKENS,
            hidden_act=arch.text_hidden_act,
            bos_token_id=special[0],
            eos_token_id=special[1],
            pad_token_id=special[1],
            projection_dim=arch.text_projection_dim or arch.text_hidden_size,
        )
    )
    cross = arch.down_cross_attention
    head_dim = arch.unet_attention_head_dim
    unet = UNet2DConditionModel(
        sample_size=arch.unet_sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=arch.unet_layers_per_block,
        block_out_channels=tuple(arch.unet_block_out_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        cross_attention_dim=arch.text_hidden_size,
        attention_head_dim=tuple(head_dim) if isinstance(head_dim, list) else head_dim,
        use_linear_projection=arch.unet_use_linear_projection,
        upcast_attention=arch.unet_upcast_attention,
        norm_num_groups=arch.norm_num_groups,
    )
    vae_levels = len(arch.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=tuple(arch.vae_block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        layers_per_block=arch.vae_layers_per_block,
        norm_num_groups=arch.norm_num_groups,
        sample_size=arch.vae_sample_size,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(timestep_spacing="trailing", clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def resolve_source(variant: VariantSpec, models_dir: Path) -> str:
    """Where ``from_pretrained`` should load ``variant`` from, building it if built-in.

    The build writes to a temporary directory beside the target and renames it into
    place, so concurrent replicas of one variant never see a half-written model.
    """
    if not variant.is_builtin:
        return variant.source
    assert variant.builtin is not None  # guaranteed by VariantSpec validation
    target = models_dir / variant.name
    if (target / "model_index.json").exists():
        return str(target)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{variant.name}-", dir=models_dir))
    try:
        _build_random_pipeline(variant.builtin).save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
            # another replica won the race; its copy is identical
        else:
            log.info("builtin_model_built", variant=variant.name, path=str(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_pipeline(variant: VariantSpec, models_dir: Path) -> Any:
    """Load ``variant``'s pipeline with ``from_pretrained``, offline, on CPU or GPU."""
    import torch
    from diffusers import DiffusionPipeline

    dtype = getattr(torch, variant.dtype)
    device = "cuda" if torch.cuda.is_available() and variant.resources.num_gpus > 0 else "cpu"
    if device == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # half precision is slow or unsupported on CPU
    pipe = DiffusionPipeline.from_pretrained(
        resolve_source(variant, models_dir), dtype=dtype, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


TINY_CLIP = "builtin:tiny-clip"


def resolve_clip_model(source: str, models_dir: Path) -> str:
    """Where the audit's CLIP model loads from: a local path, or the built-in tiny one.

    ``builtin:tiny-clip`` is a random-weight CLIP (text tower with the tiny pipelines'
    tokenizer, a 32 px vision tower) built once under ``models_dir``: its scores are
    meaningless, its config says so, and the code path is the real one.
    """
    if source != TINY_CLIP:
        return source
    target = models_dir / "tiny-clip"
    if (target / "config.json").exists():
        return str(target)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-clip-", dir=models_dir))
    try:
        _build_tiny_clip(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _build_tiny_clip(path: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from wattserve.telemetry.quality import RANDOM_WEIGHTS_MARKER

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_attention_heads": 2, "num_hidden_layers": 2,
                     "max_position_embeddings": _TOKENIZER_MAX_TOKENS,
                     "bos_token_id": special[0], "eos_token_id": special[1],
                     "pad_token_id": special[1]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )  # fmt: skip
    setattr(config, RANDOM_WEIGHTS_MARKER, True)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(path)  # fmt: skip
