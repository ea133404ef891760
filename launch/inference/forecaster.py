"""The forecast loop: a consolidated checkpoint rolled out on any mesh into a WeatherBench2 store.

Every rank of a model replica (domain x tensor) reads only its tile and channel slice of the
initial state (:class:`launch.runtime.rank_inputs.RankInputs`), rolls the model out
autoregressively with the time features of each step's input time, de-normalises with the
checkpoint's statistics and writes its own region of one store (layout:
:mod:`data.forecast_store`). The data axis shares the initialisation times out, the sample
axis the ensemble members.

An ensemble member is a rollout with its own randomness: a Bayesian model's weight sample
(:meth:`WeatherMixer.draw_member`) and/or a perturbation of the initial state
(:class:`weathermixer.input_noise.InputNoise`), both functions of (forecast seed, member,
global element), so a member is the same on any mesh. A deterministic forecast uses a
Bayesian model's mean weights and no perturbation.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import zarr
from tqdm import tqdm

from data.forecast_store import (ForecastError, ForecastLayout, Progress, create_skeleton, mark_complete,
                                 partial_path, resumable, variable_attributes, write_region)
from data.schema import StoreAttrs, StoreError
from launch.runtime.compile import compile_step
from launch.training.checkpoint_format import CheckpointError, Consolidated, load_consolidated
from launch.runtime.rank_inputs import RankInputs, check_store_matches, noise_channel_scale, store_attrs
from parallel.fp8 import check_fp8_device
from parallel.mesh import MeshConfig, ProcessMesh
from parallel.sharding import load_full_state
from parallel.tiling import chunk_length
from weathermixer.input_noise import InputNoise
from weathermixer.model import WeatherMixer

# ---------------------------------------------------------------------- init times
# minutes are optional and matched lazily, so "…T00:12" reads as hour 00 then EVERY_HOURS 12
DATETIME_PATTERN = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}(?::\d{2})??)?"
_INIT_SPEC = re.compile(rf"^({DATETIME_PATTERN})(?::({DATETIME_PATTERN}))?(?::(\d+))?$")


def parse_init_times(spec: str, store_times: np.ndarray, step_hours: int, store: str) -> np.ndarray:
    """``START[:END[:EVERY_HOURS]]`` (ISO times, END inclusive, EVERY default the store step)
    as the initialisation times, each of which must be on the store's time axis."""
    match = _INIT_SPEC.match(spec.strip())
    if not match:
        raise ForecastError(f"--init {spec!r}: expected START[:END[:EVERY_HOURS]] with ISO times, e.g. "
                            f"2020-01-01T00:2020-01-31T12:12")
    start = np.datetime64(match.group(1).replace(" ", "T"), "ns")
    end = np.datetime64(match.group(2).replace(" ", "T"), "ns") if match.group(2) else start
    every = int(match.group(3)) if match.group(3) else step_hours
    if end < start or every < 1:
        raise ForecastError(f"--init {spec!r}: expected END >= START and EVERY_HOURS >= 1")
    times = np.arange(start, end + np.timedelta64(1, "ns"), np.timedelta64(every, "h")).astype("datetime64[ns]")
    missing = times[~np.isin(times, store_times)]
    if missing.size:
        raise ForecastError(f"--init {spec!r}: init times {[str(t)[:16] for t in missing[:4]]}"
                            f"{' ...' if missing.size > 4 else ''} are not on the time axis of {store} "
                            f"({str(store_times[0])[:16]} .. {str(store_times[-1])[:16]} every {step_hours} h); "
                            f"expected init times inside the store")
    return times


# ---------------------------------------------------------------------- the run
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


WORLD = "world"


@contextmanager
def _on_every_rank(what: str, group=WORLD):
    """Run the block, then raise on every rank of ``group`` if it failed on any of them.

    A rank that failed alone would otherwise leave the others waiting for it in the next
    collective. ``group``: :data:`WORLD`, a process group, or None (this rank alone).
    """
    error = None
    try:
        yield
    except Exception as failure:
        error = failure
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = [message]
    if dist.is_initialized() and group is not None:
        group = None if group == WORLD else group
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, message, group=group)
    if error is not None:
        raise error
    failed = [text for text in messages if text]
    if failed:
        raise ForecastError(f"{what} failed on another rank: {failed[0]}")


def _check_checkpoint(metadata: dict, checkpoint: str) -> None:
    missing = [k for k in ("channels", "static_channels", "time_step_hours", "normalization") if k not in metadata]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint}: metadata keys {missing} missing; expected a checkpoint "
                              f"written by launch/train.py")
    stats = metadata["normalization"]
    for key in ("mean", "std"):
        if len(stats.get(key, [])) != len(metadata["channels"]):
            raise CheckpointError(f"checkpoint {checkpoint}: metadata normalization.{key} has "
                                  f"{len(stats.get(key, []))} values, expected one per channel "
                                  f"({len(metadata['channels'])})")


@dataclass
class _Checked:
    """A checkpoint and a data store that were found to fit each other."""

    consolidated: Consolidated
    attrs: StoreAttrs
    grid: tuple[int, int]  # the store's (n_lat, n_lon)
    step_hours: int


def _load_checked(checkpoint: str, store: str) -> _Checked:
    consolidated = load_consolidated(checkpoint)
    metadata, config = consolidated.metadata, consolidated.model_config
    _check_checkpoint(metadata, checkpoint)
    attrs = check_store_matches(metadata, store)
    if not attrs.complete:
        raise StoreError(f"{store}: store is incomplete (root attribute 'complete' is not true): the "
                         f"preprocessing run that wrote it did not finish")
    _, n_lat, n_lon = store_attrs(store)
    if (config.lat, config.lon) != (n_lat, n_lon):
        raise ForecastError(f"checkpoint {checkpoint} was trained on a {config.lat}x{config.lon} grid, {store} "
                            f"has {n_lat}x{n_lon} (latitude x longitude); expected the same grid")
    step_hours = int(metadata["time_step_hours"])
    if step_hours != attrs.time_step_hours:
        raise ForecastError(f"checkpoint {checkpoint} steps {step_hours} h, {store} has time_step_hours "
                            f"{attrs.time_step_hours}; expected the same step")
    return _Checked(consolidated, attrs, (n_lat, n_lon), step_hours)


class _Normalisation:
    """This rank's channels between the store's statistics (the reader's) and the checkpoint's (the model's)."""

    def __init__(self, metadata: dict, attrs: StoreAttrs, channels: list[int]):
        self.store_mean, self.store_std = np.asarray(attrs.mean)[channels], np.asarray(attrs.std)[channels]
        self.mean = np.asarray(metadata["normalization"]["mean"], dtype=np.float64)[channels]
        self.std = np.asarray(metadata["normalization"]["std"], dtype=np.float64)[channels]
        self.same = np.array_equal(self.mean, self.store_mean) and np.array_equal(self.std, self.store_std)

    def to_model(self, state: torch.Tensor) -> torch.Tensor:
        if self.same:
            return state
        scale = torch.as_tensor(self.store_std / self.std, device=state.device, dtype=torch.float64)
        shift = torch.as_tensor((self.store_mean - self.mean) / self.std, device=state.device, dtype=torch.float64)
        return (state.double() * scale + shift).to(state.dtype)

    def to_physical(self, states: torch.Tensor) -> np.ndarray:
        # float64 on the host, a member at a time (the caller): its copy is 4x the bf16 states
        return (states.cpu().double().numpy() * self.std + self.mean).astype(np.float32)


@dataclass(frozen=True)
class Members:
    """A forecast's ensemble: ``count`` members (None: one deterministic forecast), drawn from
    forecast seed ``seed``; ``input_noise`` perturbs each member's initial state by that fraction
    of each channel's standard deviation or tendency standard deviation (``noise_scale``; None:
    the checkpoint's ``training.input_noise`` and ``input_noise_scale``)."""

    count: int | None = None
    seed: int = 0
    input_noise: float | None = None
    noise_scale: str = "std"  # its unit per channel: "std" or "tendency" (the checkpoint's training.input_noise_scale)
    from_analysis: bool = False  # member m starts from the store's analysis member m mod (its members)

    def resolve(self, metadata: dict, config, mesh: MeshConfig, analysis_members: int = 0) -> "Members":
        """Checked against the model, the mesh and the store (``analysis_members``: the size of its
        member dimension, 0 without one), with the input noise decided."""
        if self.from_analysis and (self.count is None or not analysis_members):
            raise ForecastError(f"--initial-members starts each of --members M from a member of an ensemble "
                                f"analysis: expected --members and a store with a member dimension (preprocess "
                                f"with --members all); got members {self.count}, {analysis_members} in the store")
        if self.count is None:
            if mesh.sample > 1:
                raise ForecastError(f"mesh sample = {mesh.sample}: the sample axis holds ensemble members; "
                                    f"expected --members M (a multiple of it) or sample = 1")
            return Members(None, self.seed, 0.0)
        if self.count < 1 or self.seed < 0:
            raise ForecastError(f"--members {self.count} / --seed {self.seed}: expected members >= 1, seed >= 0")
        if self.count % mesh.sample:
            raise ForecastError(f"--members {self.count} over mesh sample = {mesh.sample}: expected a multiple "
                                f"of the sample ranks (each holds members / sample of them)")
        training = metadata.get("run_config", {}).get("training", {})
        noise = float(training.get("input_noise", 0.0)) if self.input_noise is None else self.input_noise
        if noise < 0:
            raise ForecastError(f"--input-noise {noise}: expected a fraction >= 0")
        if not config.is_bayesian and noise == 0 and self.count > 1 and not self.from_analysis:
            raise ForecastError(f"--members {self.count}: the checkpoint's model has no Bayesian layers and the "
                                f"input noise is 0, so every member would be the same forecast; expected a "
                                f"Bayesian checkpoint or --input-noise > 0")
        return Members(self.count, self.seed, noise, training.get("input_noise_scale", "std"), self.from_analysis)

    def share_weights(self, config) -> bool:
        """Whether every member rolls out with the same weights (a model without Bayesian layers, or
        the one deterministic forecast), so that members can share a batch."""
        return self.count is None or not config.is_bayesian

    def of_rank(self, mesh: ProcessMesh) -> list[int | None]:
        """The members this sample rank rolls out."""
        if self.count is None:
            return [None]
        share = self.count // mesh.config.sample
        return list(range(mesh.sample_rank * share, (mesh.sample_rank + 1) * share))


def _layout(model: WeatherMixer, store: str, attrs: StoreAttrs, n_rows: int, members: int | None) -> ForecastLayout:
    """The output grid: the model grid's rows that exist in the store (crop drops rows, padding adds none)."""
    tiling = model.layers.tiling
    bounds = [tiling.tile_bounds(tile) for tile in range(tiling.n_tiles)]
    group = zarr.open_group(store, mode="r")
    longitudes = np.asarray(group["longitude"][:], dtype=np.float64)
    return ForecastLayout(
        channels=attrs.channels, levels=sorted({c.level for c in attrs.channels if c.level is not None}),
        latitudes=np.asarray(group["latitude"][:n_rows], dtype=np.float64), longitudes=longitudes,
        spatial_chunks=(chunk_length([b[0] for b in bounds], n_rows),
                        chunk_length([b[1] for b in bounds], len(longitudes))),
        attributes=variable_attributes(store, attrs.channels), members=members)


def run_forecast(checkpoint: str | Path, store: str | Path, output: str | Path, init: str, steps: int, *,
                 mesh: MeshConfig = MeshConfig(), device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 1, overwrite: bool = False,
                 progress: bool = True, compile: bool = False, members: Members = Members()) -> Path:
    """Forecast ``steps`` steps from every init time of ``init``; every rank calls this.

    Runs on ``mesh`` (data = whatever the world size leaves; replicas share the init times out,
    sample ranks the ``members``). ``batch_size``: forecasts rolled out together, (init time,
    member) pairs: a Bayesian model's members one at a time (each has its own weights), their
    init times together; the members of a model without weight samples together with their init
    times. ``compile``: the model step through ``torch.compile`` (the first batch pays the
    compilation). A rerun of the same request after an interruption
    keeps the (init time, member) pairs already written. Returns the path of the complete store.
    """
    checkpoint, store, output = str(checkpoint), str(store), Path(output)
    if steps < 1 or batch_size < 1:
        raise ForecastError(f"--steps {steps} / --batch-size {batch_size}: expected positive integers")
    if output.exists() and not overwrite:
        raise ForecastError(f"--output {output} exists; pass --overwrite to replace it")
    checked = _load_checked(checkpoint, store)
    metadata, config = checked.consolidated.metadata, checked.consolidated.model_config
    device = torch.device(device)
    if config.fp8 != "none":
        check_fp8_device(device)
    process_mesh = ProcessMesh.build(mesh, device_type=device.type)
    analysis = len(checked.attrs.members or [])
    members = members.resolve(metadata, config, process_mesh.config, analysis)
    model = WeatherMixer(config, process_mesh)
    load_full_state(model, checked.consolidated.state_dict)
    model.to(device=device, dtype=dtype).eval()
    if compile:
        compile_step(model)
    inputs = RankInputs(store, model, member=0 if members.from_analysis else None)
    times = parse_init_times(init, inputs.reader.times, checked.step_hours, store)
    leads = np.arange(steps + 1) * np.timedelta64(checked.step_hours, "h")
    layout = _layout(model, store, checked.attrs, min(config.model_lat, checked.grid[0]), members.count)
    partial, done = partial_path(output), Progress(output)
    request = {"checkpoint": checkpoint, "checkpoint_step": metadata.get("step"), "store": store, "init": init,
               "steps": steps, "members": members.count, "seed": members.seed, "input_noise": members.input_noise,
               "input_noise_scale": members.noise_scale, "from_analysis": members.from_analysis,
               "dtype": str(dtype), "spatial_chunks": list(layout.spatial_chunks)}
    with _on_every_rank(f"creating the forecast store {partial}"):
        if _rank() == 0:
            _create_or_resume(partial, done, layout, times, leads, request, {
                "title": "WeatherMixer forecast", "checkpoint": checkpoint, "checkpoint_step": metadata.get("step"),
                "store": store, "init": init, "steps": steps, "time_step_hours": checked.step_hours,
                "channels": [c.to_json() for c in checked.attrs.channels], "mesh": process_mesh.describe(),
                "dtype": str(dtype), "model_config": config.to_dict(), "members": members.count,
                "seed": members.seed, "input_noise": members.input_noise, "request": request}, progress)
    channels = model.state_channels.indices[process_mesh.tensor_rank].tolist()
    rollout = _Rollout(model, inputs, _Normalisation(metadata, checked.attrs, channels), layout, partial, done,
                       members, InputNoise(model, members.seed, members.input_noise, len(layout.latitudes),
                                           noise_channel_scale(checked.attrs, members.noise_scale, store)))
    with _on_every_rank(f"writing the forecast into {partial}"):
        rollout.run(times, steps, batch_size, device, dtype, progress)
    with _on_every_rank(f"completing the forecast store {output}"):
        if _rank() == 0:
            mark_complete(partial, output, overwrite)
            done.remove()
    return output


def _create_or_resume(partial: Path, done: Progress, layout: ForecastLayout, times: np.ndarray, leads: np.ndarray,
                      request: dict, attrs: dict, say: bool) -> None:
    """Keep the partial store of an interrupted run of the same request, else start afresh."""
    request = json.loads(json.dumps(request))  # as zarr returns it
    if resumable(partial, request) and done.folder.is_dir():
        if say:
            print(f"forecast: resuming {partial}: {len(done.done())} (init time, member) pairs already written")
        return
    create_skeleton(partial, layout, times, leads, attrs)
    done.reset()


class Pair(NamedTuple):
    """One forecast of a request: init time ``time`` (an index into its init times) of ``member``."""

    time: int
    member: int | None


@dataclass
class MemberRollout:
    """Rollouts of a batch of ensemble members, each with its weights and its perturbed initial state."""

    model: WeatherMixer
    seed: int  # the forecast seed: the members' weight samples (Bayesian) and perturbations
    perturb: InputNoise

    def __call__(self, state: torch.Tensor, static: torch.Tensor, forcings: torch.Tensor,
                 time_indices: Sequence[int], members: Sequence[int | None], steps: int) -> torch.Tensor:
        """Row k: member ``members[k]`` (None: the deterministic forecast) from its initial state at
        store time ``time_indices[k]``, ``(batch, 1 + steps, lat, lon, C)``, the initial state as
        perturbed first. The rows share the weights: of a Bayesian model, one member at a time, its
        weights drawn once for the rollout (not at each step)."""
        chosen = set(members)
        if None in chosen:
            if len(chosen) > 1:
                raise ForecastError(f"a batch of members {sorted(chosen, key=str)}: the deterministic forecast "
                                    f"(None) expected alone")
            self.model.use_mean_weights()  # a Bayesian model's deterministic forecast
        else:
            if self.model.config.is_bayesian and len(chosen) > 1:
                raise ForecastError(f"a batch of members {sorted(chosen)} of a Bayesian model: each member has its "
                                    f"own weight sample; expected one member per batch")
            self.model.draw_member(self.seed, members[0])
            state = self.perturb(state, time_indices, 0, members)
        forecast = state.new_empty((state.shape[0], 1 + steps, *state.shape[1:]))
        forecast[:, 0] = state
        with torch.no_grad():  # each step written in place: the states held once, not also stacked
            if None not in chosen:
                self.model.draw_sample()  # the member's weights (a deterministic model: none)
            self.model.rollout(state, static, forcings, steps, out=forecast[:, 1:])
        self.model.release_sample()
        return forecast


@dataclass
class _Rollout:
    """This replica's share of the (init time, member) pairs, in batches of at most ``batch_size``
    pairs: members that share the weights share batches, a Bayesian member's batches hold its init
    times alone."""

    model: WeatherMixer
    inputs: RankInputs
    normalisation: _Normalisation
    layout: ForecastLayout
    partial: Path
    done: Progress
    members: Members
    perturb: InputNoise

    def run(self, times: np.ndarray, steps: int, batch_size: int, device: torch.device, dtype: torch.dtype,
            progress: bool) -> None:
        """Failures are agreed on within the model group around its collectives (the rollout);
        the caller agrees over all ranks (replicas may have different numbers of batches)."""
        mesh = self.model.mesh
        mine = np.array_split(np.arange(len(times)), mesh.config.data)[mesh.data_rank]
        finished = self.done.done()
        total = len(times) * (self.members.count or 1)
        bar = tqdm(total=total, initial=len(finished), desc="forecast", unit="member" if self.members.count else
                   "init", disable=not (progress and _rank() == 0))
        roll_out = MemberRollout(self.model, self.members.seed, self.perturb)
        with bar:
            for batch in self._batches(mine, finished, batch_size):
                self._forecast(roll_out, times, batch, steps, device, dtype)
                bar.update(len(batch) * mesh.replicas)

    def _batches(self, mine: np.ndarray, finished: set[str], batch_size: int) -> list[list[Pair]]:
        """The pairs of init times ``mine`` and this rank's members still to write, batched."""
        per_member = [[Pair(time, member) for time in self.done.pending(mine, member, finished)]
                      for member in self.members.of_rank(self.model.mesh)]
        if self.members.share_weights(self.model.config):
            per_member = [[pair for pairs in per_member for pair in pairs]]
        return [pairs[first:first + batch_size] for pairs in per_member for first in range(0, len(pairs), batch_size)]

    @cached_property
    def _store_index(self) -> dict[np.datetime64, int]:
        """Position of each time on the store's time axis."""
        return {time: index for index, time in enumerate(self.inputs.reader.times)}

    def _forecast(self, roll_out: MemberRollout, times: np.ndarray, batch: list[Pair], steps: int,
                  device: torch.device, dtype: torch.dtype) -> None:
        store_times = [self._store_index[times[pair.time]] for pair in batch]
        members = [pair.member for pair in batch]
        with _on_every_rank("reading the initial states", self.model.mesh.model_group):
            state, static, forcings = self._initial_states(store_times, members, steps, device, dtype)
        self._write(batch, roll_out(state, static, forcings, store_times, members, steps))

    def _initial_states(self, store_times: list[int], members: list[int | None], steps: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(state, static, forcings)`` of a batch, each distinct initial state read once (the members
        of an init time start from one state, unless each starts from its analysis member)."""
        reader = self.inputs.reader
        step = np.timedelta64(int(reader.step_hours), "h")  # the checkpoint's (checked equal)
        analysis = [member % len(reader.attrs.members) if self.members.from_analysis else None for member in members]
        sources = list(zip(store_times, analysis))
        distinct = {source: position for position, source in enumerate(dict.fromkeys(sources))}
        samples = []
        for store_time, analysis_member in distinct:
            if self.members.from_analysis:
                reader.use_member(analysis_member)
            samples.append(reader.sample(store_time, lead_steps=0))
        state, static, _, _ = self.inputs.batch(samples, device, dtype)
        forcings = torch.stack([self.inputs.forcings(reader.times[store_time] + np.arange(steps) * step)
                                for store_time, _ in distinct]).to(device, dtype)
        rows = torch.as_tensor([distinct[source] for source in sources], device=device)
        return self.normalisation.to_model(state)[rows], static, forcings[rows]

    def _write(self, batch: list[Pair], states: torch.Tensor) -> None:
        """Each member's rows of ``states`` into its region of the store, then the pairs' progress markers."""
        model, mesh = self.model, self.model.mesh
        by_member: dict[int | None, list[int]] = {}
        for row, pair in enumerate(batch):
            by_member.setdefault(pair.member, []).append(row)
        n_rows = len(self.layout.latitudes)
        (lat0, lat1), (lon0, lon1) = model.layers.tile_bounds()
        rows = slice(min(lat0, n_rows), min(lat1, n_rows))
        channels = model.state_channels.indices[mesh.tensor_rank].tolist()
        with _on_every_rank(f"writing the forecast into {self.partial}", mesh.model_group):
            if rows.stop > rows.start:  # a tile of padding rows only has nothing to write
                for member, member_rows in by_member.items():  # one member's float64 copy at a time
                    physical = self.normalisation.to_physical(states[member_rows, :, :rows.stop - lat0])
                    write_region(self.partial, self.layout, physical,
                                 np.asarray([batch[row].time for row in member_rows]), rows, slice(lon0, lon1),
                                 channels, member)
        if mesh.model_rank == 0:
            for member, member_rows in by_member.items():
                self.done.mark([batch[row].time for row in member_rows], member)
