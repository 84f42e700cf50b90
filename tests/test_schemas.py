import pytest
from pydantic import ValidationError

from wattserve import ImageGenerationBody
from wattserve._schemas import parse_size


def body(**overrides):
    return ImageGenerationBody.model_validate({"prompt": "a red cube", **overrides})


def test_defaults_normalise_to_a_request():
    req = body().to_request()
    assert (req.width_px, req.height_px, req.n, req.quality, req.seed, req.model) == (
        64,
        64,
        1,
        "standard",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("alias", "tier"),
    [("hd", "high"), ("low", "draft"), ("medium", "standard"), ("auto", "standard")],
)
def test_openai_quality_values_map_to_tiers(alias, tier):
    assert body(quality=alias).to_request().quality == tier


def test_auto_model_means_router_chooses():
    assert body(model="auto").to_request().model is None
    assert body(model="tiny-sd-turbo").to_request().model == "tiny-sd-turbo"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"size": "64by64"}, "size"),
        ({"size": "0x64"}, "size"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"n": "2"}, "n"),
        ({"quality": "ultra"}, "quality"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"response_format": "url"}, "response_format"),
        ({"style": "vivid"}, "style"),
        ({"deadline_s": 0}, "deadline_s"),
    ],
)
def test_bad_fields_are_rejected_by_name(overrides, field):
    with pytest.raises(ValidationError) as info:
        body(**overrides)
    assert info.value.errors()[0]["loc"][0] == field


def test_parse_size():
    assert parse_size("96x64") == (96, 64)
    assert parse_size(" 32X48 ") == (32, 48)
    with pytest.raises(ValueError):
        parse_size("64")
