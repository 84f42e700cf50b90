"""The variant catalog: which model variants exist, what they cost, how good they are.

A catalog is a TOML file with one ``[[variant]]`` table per variant (see
``policies/builtin_catalog.toml``). Every number that routing relies on carries its
provenance in the file: a quality score says where it came from, an energy prior says
how it was obtained. A malformed file fails at startup with an error that names the
file and the field.
"""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from wattserve import InvalidRequest, WattserveError

BUILTIN_PREFIX = "builtin:"
TASK_TEXT_TO_IMAGE = "text-to-image"


class CatalogError(WattserveError):
    """The catalog file is missing, unparsable or invalid; the message names file and field."""


# A Ray node label value (``ray.io/accelerator-type``): 63 characters at most,
# alphanumeric at both ends, ``-_.`` inside; no commas or parentheses, which the label
# selector ``in(A,B)`` would misread.
AcceleratorType = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
]


class Resources(BaseModel):
    """Ray resources one replica of the variant needs.

    ``accelerator_types`` names the device types a replica may run on (any of them;
    empty: any node). The first is the variant's native type, the one its energy
    numbers describe. ``accelerator_type = "H100"`` is accepted as shorthand for one.
    """

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    accelerator_types: tuple[AcceleratorType, ...] = ()
    replicas: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _one_type_shorthand(cls, data: Any) -> Any:
        """``accelerator_type = "H100"`` (older files, stored specs) -> ``("H100",)``."""
        if not isinstance(data, dict) or "accelerator_type" not in data:
            return data
        data = dict(data)
        single = data.pop("accelerator_type")
        if "accelerator_types" in data:
            raise ValueError("give accelerator_types or its shorthand accelerator_type, not both")
        if single is not None:  # a stored spec from before the rename holds null
            data["accelerator_types"] = (single,)
        return data

    @field_validator("accelerator_types")
    @classmethod
    def _distinct(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(types)) != len(types):
            raise ValueError("accelerator_types must not repeat a type")
        return types

    @property
    def native_accelerator_type(self) -> str | None:
        """The type the variant's energy numbers describe (the first listed), or None."""
        return self.accelerator_types[0] if self.accelerator_types else None


class EnergyPrior(BaseModel):
    """Expected joules per image at given batch sizes, before anything is measured."""

    model_config = ConfigDict(extra="forbid")

    joules_per_image: dict[int, float] = Field(min_length=1)
    provenance: str = Field(min_length=1)

    @model_validator(mode="after")
    def _positive(self) -> EnergyPrior:
        for batch_size, joules in self.joules_per_image.items():
            if batch_size < 1 or joules <= 0:
                raise ValueError("batch sizes must be >= 1 and joules > 0")
        return self

    def at_batch_size(self, batch_size: int) -> float:
        """Joules per image at ``batch_size``: the nearest declared size at or below it."""
        known = sorted(self.joules_per_image)
        below = [b for b in known if b <= batch_size]
        return self.joules_per_image[below[-1] if below else known[0]]


class BuiltinArch(BaseModel):
    """Architecture of a built-in Stable Diffusion pipeline with random weights.

    The defaults describe the tiny demo pipelines; every field left out builds exactly
    what it always built (same modules, construction order and random weights). The
    optional fields reach real sizes, e.g. the Stable Diffusion 2.1 architecture in
    ``scripts/gpu_catalog.toml``. ``unet_attention_head_dim`` is diffusers' (misnamed)
    per-level *number of heads*, as in real UNet configs.
    """

    model_config = ConfigDict(extra="forbid")

    unet_block_out_channels: list[int] = Field(min_length=2, max_length=4)
    unet_layers_per_block: int = Field(default=1, ge=1, le=4)
    # Which down levels have cross-attention (up levels mirror it); None: all but the
    # first (the tiny layout). SD 1.x/2.x: [true, true, true, false].
    unet_cross_attention_levels: list[bool] | None = None
    unet_attention_head_dim: int | list[int] = 8
    unet_use_linear_projection: bool = False
    unet_upcast_attention: bool = False
    unet_sample_size: int = Field(default=8, ge=1)
    norm_num_groups: int = Field(default=8, ge=1)
    text_hidden_size: int = Field(default=32, ge=8)
    text_layers: int = Field(default=2, ge=1)
    text_heads: int = Field(default=2, ge=1)
    text_intermediate_size: int | None = Field(default=None, ge=1)  # None: 2 x hidden
    text_vocab_size: int | None = Field(default=None, ge=514)  # None: the tokenizer's 514
    text_hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    text_projection_dim: int | None = Field(default=None, ge=1)  # None: hidden size
    vae_block_out_channels: list[int] = Field(default=[16, 32], min_length=2, max_length=4)
    vae_layers_per_block: int = Field(default=1, ge=1, le=4)
    vae_sample_size: int = Field(default=64, ge=8)
    init_seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> BuiltinArch:
        levels = len(self.unet_block_out_channels)
        if self.unet_cross_attention_levels is not None:
            if len(self.unet_cross_attention_levels) != levels:
                raise ValueError("unet_cross_attention_levels needs one entry per UNet level")
        if isinstance(self.unet_attention_head_dim, list):
            if len(self.unet_attention_head_dim) != levels:
                raise ValueError("unet_attention_head_dim list needs one entry per UNet level")
        if self.text_hidden_size % self.text_heads:
            raise ValueError("text_hidden_size must be a multiple of text_heads")
        channels = [*self.unet_block_out_channels, *self.vae_block_out_channels]
        if any(c % self.norm_num_groups for c in channels):
            raise ValueError("every block's channels must be a multiple of norm_num_groups")
        return self

    @property
    def down_cross_attention(self) -> list[bool]:
        """Per down level, whether it has cross-attention (the up levels mirror it)."""
        if self.unet_cross_attention_levels is not None:
            return list(self.unet_cross_attention_levels)
        return [False] + [True] * (len(self.unet_block_out_channels) - 1)


class VariantSpec(BaseModel):
    """One servable variant of a task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    task: Literal["text-to-image"] = TASK_TEXT_TO_IMAGE
    source: str = Field(min_length=1)
    steps: int = Field(ge=1, le=200)
    guidance_scale: float = Field(ge=0)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    min_size_px: int = Field(default=32, ge=8)
    max_size_px: int = Field(ge=8)
    size_multiple_px: int = Field(default=8, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    quality_score: float = Field(ge=0, le=1)
    quality_provenance: str = Field(min_length=1)
    power_w: float = Field(gt=0, description="active power while busy, for simulated energy")
    resources: Resources = Resources()
    energy_prior: EnergyPrior
    builtin: BuiltinArch | None = None
    # Approximate reuse: (min cosine similarity, fraction of the steps skipped) bands, as
    # calibrated for this variant, and where they come from. None: the published bands
    # (policies.latent_reuse.DEFAULT_BANDS), scaled to ``steps``.
    reuse_bands: tuple[tuple[float, float], ...] | None = None
    reuse_bands_provenance: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> VariantSpec:
        if self.min_size_px > self.max_size_px:
            raise ValueError("min_size_px must not exceed max_size_px")
        if self.reuse_bands is not None:
            if not self.reuse_bands_provenance:
                raise ValueError("reuse_bands need a reuse_bands_provenance")
            if any(not (-1 <= s <= 1 and 0 < f < 1) for s, f in self.reuse_bands):
                raise ValueError("reuse_bands are (similarity in -1..1, fraction in (0, 1))")
        if self.source.startswith(BUILTIN_PREFIX) and self.builtin is None:
            raise ValueError("a 'builtin:' source needs a [variant.builtin] architecture table")
        return self

    @property
    def is_builtin(self) -> bool:
        """Whether the pipeline is built locally from ``builtin`` rather than loaded."""
        return self.source.startswith(BUILTIN_PREFIX)

    def size_problem(self, width_px: int, height_px: int) -> str | None:
        """Why this variant cannot make a ``width_px`` x ``height_px`` image, or None."""
        for side in (width_px, height_px):
            if not self.min_size_px <= side <= self.max_size_px:
                return f"sides must be within {self.min_size_px}..{self.max_size_px} px"
            if side % self.size_multiple_px:
                return f"sides must be multiples of {self.size_multiple_px} px"
        return None


class Catalog(BaseModel):
    """All variants, by name; built only through :func:`load_catalog`."""

    model_config = ConfigDict(frozen=True)

    source_path: str
    variants: tuple[VariantSpec, ...]

    @functools.cached_property
    def name_index(self) -> tuple[tuple[VariantSpec, ...], dict[str, VariantSpec]]:
        """The variants tuple it indexes, and name -> spec.

        Routing and dispatch look variants up per output. Read it through :meth:`get` /
        :attr:`names`, which rebuild it if ``model_copy`` swapped the tuple.
        """
        return self.variants, {v.name: v for v in self.variants}

    def _by_name(self) -> dict[str, VariantSpec]:
        index = self.name_index
        if index[0] is not self.variants:
            index = self.__dict__["name_index"] = (
                self.variants, {v.name: v for v in self.variants}
            )  # fmt: skip
        return index[1]

    def get(self, name: str) -> VariantSpec | None:
        """The variant called ``name``, or None."""
        return self._by_name().get(name)

    @property
    def names(self) -> list[str]:
        """Variant names in file order."""
        return list(self._by_name())


def builtin_catalog_path() -> Path:
    """Path of the catalog shipped with wattserve."""
    return Path(str(resources.files("wattserve.policies") / "builtin_catalog.toml"))


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Load and validate a catalog file (the built-in one when ``path`` is None)."""
    file = Path(path) if path is not None else builtin_catalog_path()
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"catalog {file}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog {file}: not valid TOML: {exc}") from exc
    entries = raw.get("variant")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"catalog {file}: field 'variant': need at least one [[variant]] table")
    variants = []
    for index, entry in enumerate(entries):
        try:
            variants.append(VariantSpec.model_validate(entry))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"]) or "(table)"
            name = entry.get("name", f"#{index}") if isinstance(entry, dict) else f"#{index}"
            raise CatalogError(
                f"catalog {file}: variant {name!r}: field '{where}': {err['msg']}",
                param=where,
            ) from exc
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CatalogError(f"catalog {file}: field 'name': duplicate variant {duplicates[0]!r}")
    return Catalog(source_path=str(file), variants=tuple(variants))


def parse_variant_entry(text: str) -> VariantSpec:
    """One ``[[variant]]`` table (or bare variant table) of TOML text, validated."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"toml: not valid TOML: {exc}", param="toml") from exc
    entries = raw.get("variant", raw)
    if isinstance(entries, list):
        if len(entries) != 1:
            raise InvalidRequest("toml: give exactly one [[variant]] table", param="toml")
        entries = entries[0]
    try:
        return VariantSpec.model_validate(entries)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "(table)"
        raise InvalidRequest(f"variant field '{where}': {err['msg']}", param=where) from exc
