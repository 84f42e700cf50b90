import pytest

from wattserve.policies.catalog import CatalogError, load_catalog

VALID = """
[[variant]]
name = "v1"
source = "/models/v1"
steps = 4
guidance_scale = 3.0
max_size_px = 512
quality_score = 0.6
quality_provenance = "model card"
power_w = 300
[variant.energy_prior]
joules_per_image = { 1 = 100.0, 4 = 70.0 }
provenance = "measured"
"""


def write(tmp_path, text):
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def test_builtin_catalog_has_three_variants_with_different_costs():
    catalog = load_catalog()
    priors = {v.name: v.energy_prior.at_batch_size(1) for v in catalog.variants}
    assert len(priors) >= 3
    assert len(set(priors.values())) == len(priors)
    assert max(priors.values()) / min(priors.values()) > 5
    assert all(
        v.is_builtin and v.quality_provenance and v.energy_prior.provenance
        for v in catalog.variants
    )


def test_prior_uses_nearest_declared_batch_size_at_or_below(tmp_path):
    prior = load_catalog(write(tmp_path, VALID)).variants[0].energy_prior
    assert [prior.at_batch_size(b) for b in (1, 3, 4, 16)] == [100.0, 100.0, 70.0, 70.0]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda t: t.replace("steps = 4", 'steps = "four"'), "steps"),
        (lambda t: t.replace("quality_score = 0.6", "quality_score = 1.5"), "quality_score"),
        (lambda t: t.replace("power_w = 300\n", ""), "power_w"),
        (lambda t: t.replace('name = "v1"', 'name = "Bad Name"'), "name"),
        (lambda t: t.replace('source = "/models/v1"', 'source = "builtin:x"'), "(table)"),
        (lambda t: t + "\nunknown_key = 1\n", "energy_prior.unknown_key"),
        (lambda t: t.replace("1 = 100.0", "1 = -5.0"), "energy_prior"),
    ],
)
def test_invalid_catalog_names_file_and_field(tmp_path, mutate, field):
    path = write(tmp_path, mutate(VALID))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in info.value.message
    assert f"field '{field}'" in info.value.message


def test_unreadable_unparsable_empty_and_duplicate_catalogs(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "missing.toml")
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(write(tmp_path, "[[variant]\n"))
    with pytest.raises(CatalogError, match="field 'variant'"):
        load_catalog(write(tmp_path, "title = 'x'\n"))
    with pytest.raises(CatalogError, match="duplicate variant 'v1'"):
        load_catalog(write(tmp_path, VALID + VALID))
