"""Time-of-year and time-of-day forcing features for one valid time on a lat/lon grid.

The model sees the calendar through four smooth, periodic fields per grid point:

* ``cos_day_of_year``, ``sin_day_of_year``: the angle ``2 pi * d / Y`` where ``d`` is the
  fractional day of the year (0 at 1 January 00 UTC) and ``Y`` that year's length (365 or
  366 days), so 31 December 18 UTC sits next to 1 January 00 UTC on the circle;
* ``cos_local_time``, ``sin_local_time``: the angle ``2 pi * s / 24`` of the mean local solar
  time ``s = (hour_utc + longitude / 15) mod 24`` in hours, which is what drives the diurnal
  cycle of radiation at a point (the equation of time, at most about 16 minutes, is ignored).

Cosine and sine together make each cycle continuous (no jump at midnight or New Year) and
bounded in [-1, 1], like normalised channels. The day-of-year pair is the same at every
grid point; it is broadcast so that every feature has the grid shape of the state.
"""

from __future__ import annotations

import numpy as np

TIME_FEATURE_NAMES = ("cos_day_of_year", "sin_day_of_year", "cos_local_time", "sin_local_time")
N_TIME_FEATURES = len(TIME_FEATURE_NAMES)

_HOUR = np.timedelta64(1, "h")


def time_features(time: np.datetime64, longitudes: np.ndarray, latitudes: np.ndarray | int) -> np.ndarray:
    """Forcing features at ``time`` (UTC) as a float32 array ``(latitude, longitude, 4)``.

    ``longitudes`` are degrees east (any range; only ``lon / 15`` hours modulo 24 matter).
    ``latitudes`` only sets the number of rows (the features do not depend on latitude); an
    int row count is accepted too. Feature order is :data:`TIME_FEATURE_NAMES`.
    """
    time = np.datetime64(time, "ns")
    longitudes = np.asarray(longitudes, dtype=np.float64)
    if longitudes.ndim != 1:
        raise ValueError(f"time_features: longitudes must be 1-D, got shape {longitudes.shape}")
    n_lat = int(latitudes) if np.ndim(latitudes) == 0 else len(latitudes)

    year_start = time.astype("datetime64[Y]")
    year_days = ((year_start + np.timedelta64(1, "Y")).astype("datetime64[D]")
                 - year_start.astype("datetime64[D]")).astype(np.int64)
    day_of_year = (time - year_start.astype("datetime64[ns]")) / np.timedelta64(1, "D")
    year_angle = 2.0 * np.pi * day_of_year / year_days

    hour_utc = (time - time.astype("datetime64[D]").astype("datetime64[ns]")) / _HOUR
    local_hours = np.mod(hour_utc + longitudes / 15.0, 24.0)
    day_angle = 2.0 * np.pi * local_hours / 24.0

    features = np.empty((n_lat, len(longitudes), N_TIME_FEATURES), dtype=np.float32)
    features[..., 0] = np.cos(year_angle)
    features[..., 1] = np.sin(year_angle)
    features[..., 2] = np.cos(day_angle)[None, :]
    features[..., 3] = np.sin(day_angle)[None, :]
    return features
