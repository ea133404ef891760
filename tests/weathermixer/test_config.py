"""ModelConfig validation, derived sizes, presets and the dict round trip."""

from __future__ import annotations

import pytest

from weathermixer.config import PRESETS, ConfigError, ModelConfig, preset


def test_paper_grid_is_cropped_to_720_rows_of_17280_tokens():
    config = preset("jigsaw-1b")
    assert (config.model_lat, config.model_lon) == (720, 1440)
    assert config.token_grid == (720, 24) and config.n_tokens == 17280
    assert config.input_channels == 72 and config.patch_size * config.input_channels == 4320
    assert config.token_hidden == 8640 and config.channel_hidden == 4320


def test_grid_policies():
    assert ModelConfig(lat=10, patch=(4, 8)).model_lat == 8
    assert ModelConfig(lat=10, patch=(4, 8), grid_policy="pad").model_lat == 12
    assert ModelConfig(lat=721, lat_multiple=2, patch=(1, 8)).model_lat == 720
    assert ModelConfig(lat=721, lat_multiple=2, patch=(3, 8), grid_policy="pad").model_lat == 726  # lcm 6
    assert preset("jigsaw-1b-0.125deg").model_lat == 1440 and preset("jigsaw-1b-0.125deg").n_tokens == 17280


def test_hidden_sizes_floor_like_the_paper():
    config = ModelConfig(lat=5, lon=8, patch=(1, 1), token_fraction=0.3, hidden=10, channel_fraction=0.55)
    assert config.n_tokens == 40 and config.token_hidden == 12  # floor(12.0)
    assert config.channel_hidden == 5  # floor(5.5)


@pytest.mark.parametrize("changes,key", [
    (dict(lon=64, patch=(1, 6)), "model.patch"),
    (dict(token_fraction=0.0), "model.token_fraction"),
    (dict(token_fraction=9.0), "model.token_fraction"),
    (dict(channel_fraction=-1.0), "model.channel_fraction"),
    (dict(token_fraction=1e-6), "model.token_fraction"),  # floors to no features
    (dict(hidden=0), "model.hidden"),
    (dict(depth=True), "model.depth"),
    (dict(lat=2, patch=(4, 8)), "model.lat"),
    (dict(patch=(1,)), "model.patch"),
    (dict(grid_policy="wrap"), "model.grid_policy"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(residual="add", out_channels=3), "model.residual"),
    (dict(decoder_merge="mean"), "model.decoder_merge"),
    (dict(static_channels=-1), "model.static_channels"),
    (dict(activation_checkpointing="yes"), "model.activation_checkpointing"),
])
def test_bad_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig().replace(**changes)


def test_patch_not_dividing_longitude_says_what_is_expected():
    with pytest.raises(ConfigError, match=r"do not divide model\.lon = 100.*divisor of 100"):
        ModelConfig(lon=100, patch=(1, 8))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'jigsaw-9b' unknown.*jigsaw-1b"):
        preset("jigsaw-9b")


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown keys \['hiden'\]"):
        ModelConfig.from_dict({"hiden": 5})
    with pytest.raises(ConfigError, match=r"unknown keys \['blocks'\]"):
        preset("tiny", blocks=3)


def test_dict_round_trip_and_overrides():
    for name in PRESETS:
        config = preset(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    config = preset("demo", hidden=32, patch=[2, 4])  # lists (YAML) become tuples
    assert config.hidden == 32 and config.patch == (2, 4) and PRESETS["demo"].hidden == 128


def test_a_config_saved_before_a_key_builds_the_model_it_was_saved_with():
    """A checkpoint's config from before ``model.fp8_backward_groups`` (whose default is now the
    embedding and decoder) built those layers without FP8 and keeps doing so; the other keys it
    predates take their defaults."""
    config = preset("tiny", fp8="delayed")
    saved = {key: value for key, value in config.to_dict().items() if key not in ("fp8_backward_groups", "fp8_history")}
    assert config.fp8_backward_groups == ("embedding", "decoder")
    assert ModelConfig.from_dict(saved) == config.replace(fp8_backward_groups=())


def test_required_presets_exist():
    assert {"tiny", "demo", "jigsaw-1b", "jigsaw-1.4b", "jigsaw-2.6b", "jigsaw-3.2b",
            "jigsaw-1b-0.125deg"} <= set(PRESETS)
    for name in ("jigsaw-1b", "jigsaw-1.4b", "jigsaw-2.6b", "jigsaw-3.2b"):
        config = preset(name)  # the paper's inputs: 69 channels + 3 static fields, no time features
        assert (config.in_channels, config.static_channels, config.forcing_channels, config.depth) == (69, 3, 0, 3)
