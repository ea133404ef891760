"""Time features: known angles, periodicity and shape."""

from __future__ import annotations

import numpy as np
import pytest

from data.time_features import TIME_FEATURE_NAMES, time_features


def test_shape_dtype_and_names():
    features = time_features(np.datetime64("2020-03-01T06"), np.arange(0, 360, 45.0), np.linspace(-90, 90, 5))
    assert features.shape == (5, 8, 4) and features.dtype == np.float32
    assert TIME_FEATURE_NAMES == ("cos_day_of_year", "sin_day_of_year", "cos_local_time", "sin_local_time")
    assert np.all(np.abs(features) <= 1.0)
    assert np.all(features[..., :2] == features[:1, :1, :2])  # day of year is the same everywhere


@pytest.mark.parametrize("time, year_angle", [
    ("2021-01-01T00", 0.0),
    ("2021-07-02T12", np.pi),  # day 182.5 of 365
    ("2020-07-02T00", np.pi),  # day 183 of 366 (leap year)
    ("2021-04-02T06", 2 * np.pi * 91.25 / 365),
])
def test_day_of_year_angle(time, year_angle):
    features = time_features(np.datetime64(time), np.array([0.0]), 1)
    np.testing.assert_allclose(features[0, 0, :2], [np.cos(year_angle), np.sin(year_angle)], atol=1e-6)


def test_local_solar_time_follows_longitude():
    longitudes = np.array([0.0, 90.0, 180.0, 270.0, 359.0])
    features = time_features(np.datetime64("2021-05-05T06"), longitudes, 2)
    local_hours = np.array([6.0, 12.0, 18.0, 0.0, 6.0 + 359.0 / 15.0 - 24.0])
    np.testing.assert_allclose(features[1, :, 2], np.cos(2 * np.pi * local_hours / 24), atol=1e-6)
    np.testing.assert_allclose(features[1, :, 3], np.sin(2 * np.pi * local_hours / 24), atol=1e-6)


def test_cycles_close_at_new_year_and_midnight():
    before = time_features(np.datetime64("2021-12-31T23:59:59"), np.array([0.0]), 1)
    after = time_features(np.datetime64("2022-01-01T00:00"), np.array([0.0]), 1)
    np.testing.assert_allclose(before, after, atol=1e-4)


def test_longitudes_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"longitudes must be 1-D, got shape \(2, 2\)"):
        time_features(np.datetime64("2021-01-01"), np.zeros((2, 2)), 2)
