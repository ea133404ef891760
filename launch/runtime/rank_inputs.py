"""Wiring between a data store and a model on a mesh: which tile and channels a rank reads.

The model decides the decomposition (its domain tile in model-grid points and its tensor
slice of every channel group); the store provides the channels. These helpers keep the
two in step for training, forecasting and evaluation alike.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr

from data.reader import Sample, TileReader
from data.schema import StoreAttrs, StoreError
from data.time_features import N_TIME_FEATURES
from weathermixer.config import ModelConfig
from weathermixer.model import WeatherMixer


def store_attrs(store: str) -> tuple[StoreAttrs, int, int]:
    """The store's attributes and its grid size ``(n_lat, n_lon)``."""
    try:
        group = zarr.open_group(str(store), mode="r")
    except Exception as error:
        raise StoreError(f"{store}: cannot be opened as a zarr store ({type(error).__name__}: {error})") from None
    attrs = StoreAttrs.from_json(dict(group.attrs), store=str(store))
    return attrs, group["latitude"].shape[0], group["longitude"].shape[0]


def store_latitudes(store: str) -> np.ndarray:
    """The store's latitude coordinate (ascending)."""
    return np.asarray(zarr.open_group(str(store), mode="r")["latitude"][:])


def noise_channel_scale(attrs: StoreAttrs, kind: str, store: str) -> np.ndarray | None:
    """Per state channel, the input noise's unit in standard deviations: None (``std``: one
    standard deviation) or, for ``tendency``, the channel's 6-hour tendency std over its std."""
    if kind == "std":
        return None
    if len(attrs.tendency_std) != len(attrs.std):
        raise StoreError(f"{store}: no tendency statistics (tendency_std) for input noise scaled by the tendency; "
                         f"expected a store written by launch/preprocess.py, or input_noise_scale = std")
    return np.asarray(attrs.tendency_std, dtype=np.float64) / np.asarray(attrs.std, dtype=np.float64)


def config_for_store(config: ModelConfig, store: str) -> ModelConfig:
    """``config`` with grid and channel counts taken from the store (time features as forcings)."""
    attrs, n_lat, n_lon = store_attrs(store)
    return config.replace(lat=n_lat, lon=n_lon, in_channels=len(attrs.channels), out_channels=len(attrs.channels),
                          static_channels=len(attrs.static_channels), forcing_channels=N_TIME_FEATURES)


def check_store_matches(metadata: dict, store: str) -> StoreAttrs:
    """Refuse a store whose channels differ from the ones a checkpoint was trained on."""
    attrs, _, _ = store_attrs(store)
    trained = [(c["variable"], c["level"]) for c in metadata["channels"]]
    found = [(c.variable, c.level) for c in attrs.channels]
    if trained != found:
        raise StoreError(f"{store}: channels {[c.name for c in attrs.channels]} differ from the checkpoint's "
                         f"{[v if lev is None else f'{v}{lev}' for v, lev in trained]}; expected the same "
                         f"channels in the same order")
    if list(metadata["static_channels"]) != list(attrs.static_channels):
        raise StoreError(f"{store}: static fields {attrs.static_channels} differ from the checkpoint's "
                         f"{metadata['static_channels']}")
    return attrs


class RankInputs:
    """Reads this rank's tile and channel slices from a store and shapes them for the model.

    The reader returns physical values; :meth:`batch` normalises on the target device, where it
    is one cheap pass instead of host passes over every sample.
    """

    def __init__(self, store: str, model: WeatherMixer, pin_memory: bool = False, member: int | None = None):
        self.model = model
        layers, rank = model.layers, model.mesh.tensor_rank
        (lat0, lat1), (lon0, lon1) = layers.tile_bounds()
        config = model.config
        self.forcing_index = layers.channels(config.forcing_channels).indices[rank].cpu()
        self.reader = TileReader(store, lat_range=(lat0, lat1), lon_range=(lon0, lon1),
                                 channels=model.state_channels.indices[rank].tolist(),
                                 static_channels=layers.channels(config.static_channels).indices[rank].tolist(),
                                 model_lat=config.model_lat, pin_memory=pin_memory, normalize=False,
                                 member=member)
        self._static_cache: tuple[tuple, torch.Tensor] | None = None

    def batch(self, samples: list[Sample], device: torch.device | str, dtype: torch.dtype = torch.float32):
        """``(state, static, forcings, targets)`` for the model from a list of samples.

        State and targets cross to the device in the reader's channel-first memory (pinned
        when the reader pins), are normalised there and become channel-last views: the
        normalisation and the transposition are device kernels, not host passes. All samples
        must have the same lead (the samples of one micro-batch serve one step's rollout).
        """
        leads = [len(s.targets) for s in samples]
        if len(set(leads)) > 1:
            raise ValueError(f"RankInputs.batch: the samples of one batch must have the same lead (targets), got "
                             f"leads {leads} for time indices {[s.time_index for s in samples]}")
        state = self._normalized([s.inputs for s in samples], device, dtype)
        targets = self._normalized([s.targets for s in samples], device, dtype)
        # each sample's time features cross from the reader's (pinned) memory and this rank's
        # slice is taken on the device: a host-side stack would be pageable memory, whose copy
        # makes the host wait for the device
        forcings = torch.stack([s.forcings.to(device, non_blocking=True) for s in samples])
        forcings = forcings.index_select(-1, self.forcing_index.to(forcings.device)).to(dtype)
        return state, self._static_on(samples[0].static, device, dtype), forcings, targets

    def _static_on(self, static: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The static fields on ``device`` in ``dtype``, copied once (the same for every sample)."""
        key = (static.data_ptr(), str(torch.device(device)), dtype)
        if self._static_cache is None or self._static_cache[0] != key:
            self._static_cache = (key, static.to(device, dtype))
        return self._static_cache[1]

    def forcings(self, times: np.ndarray) -> torch.Tensor:
        """Time features of this tile at ``times``: ``(len(times), tile_lat, tile_lon, local forcings)``."""
        return torch.from_numpy(self.reader.time_features(times))[..., self.forcing_index]

    def _normalized(self, tensors: list[torch.Tensor], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Raw channel-last samples normalised into one ``dtype`` batch on ``device``: each sample
        crosses in its channel-first memory and is normalised and cast in one pass into its place
        in the batch (channel-first memory, a channel-last view)."""
        channel_first = tensors[0].movedim(-1, -3)
        out = torch.empty((len(tensors), *channel_first.shape), dtype=dtype, device=device).movedim(-3, -1)
        for sample, place in zip(tensors, out):
            self.reader.normalize_into(sample.movedim(-1, -3).to(device, non_blocking=True).movedim(-3, -1), place)
        return out
