"""Self-describing checkpoints: DeepSpeed's own files plus what is needed to use them anywhere.

A training checkpoint is a folder ``<run>/checkpoints/step_<N>/`` (``N``: the training step,
zero-padded) holding a mesh-free form of everything a run continues from:

* ``shards/model_rank_<k>.pt`` per model rank: every parameter's float32 (master) value with its
  :class:`~parallel.sharding.ShardSpec`, so the full state can be assembled for any mesh, and
  the model's persistent buffers (FP8 amax histories), replicated over the model group, whole;
* ``optimizer/model_rank_<k>.pt`` per model rank: Adam's moments of every parameter the same
  way (``exp_avg``, ``exp_avg_sq``: ``{name: (ShardSpec json, tensor)}``) and the step count of
  every parameter group (``steps``), whatever optimizer and ZeRO stage wrote them
  (:mod:`launch.training.optimizer_state`);
* ``rng/rank_<r>.pt`` per rank: torch's and numpy's generator states (the dropout masks), used
  when the next run has the same mesh;
* ``meta.json``: model config, mesh, channel list, normalisation statistics, data store
  fingerprint, run config, step, and under ``resume`` the trainer's state: step, epoch,
  sampler position, learning-rate schedule, DeepSpeed's step counters and the global batch;
* ``COMPLETE``: written last, after every rank has finished; ``<run>/checkpoints/latest``
  names the newest complete checkpoint and is replaced atomically. A folder without
  ``COMPLETE`` is never resumed from.

Checkpoints written before the mesh-free optimizer state (DeepSpeed's ``engine.save_checkpoint``
files and ``trainer/rank_<r>.pt`` instead of ``optimizer/`` and ``rng/``) still load.

A *consolidated* checkpoint is one file, mesh-free: ``{"format", "version", "model_config",
"state_dict" (full tensors), "metadata"}``. Forecasting and resharding load it into any mesh
with :func:`parallel.sharding.load_full_state`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.runtime.atomic import atomic_write_bytes
from launch.training.optimizer_state import MOMENTS
from parallel.sharding import ShardSpec, assemble_full_state
from weathermixer.config import ModelConfig

CHECKPOINT_PREFIX = "step_"
CONSOLIDATED_FORMAT = "weathermixer-consolidated"
CONSOLIDATED_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(folder: str | Path) -> int | None:
    """The training step of a checkpoint folder ``step_<N>`` (None for any other name)."""
    name = Path(folder).name
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def shards_file(folder: Path, model_rank: int) -> Path:
    return Path(folder) / "shards" / f"model_rank_{model_rank}.pt"


def optimizer_file(folder: Path, model_rank: int) -> Path:
    return Path(folder) / "optimizer" / f"model_rank_{model_rank}.pt"


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / "rng" / f"rank_{rank}.pt"


def load_file(path: str | Path, what: str, mmap: bool = False) -> Any:
    """``torch.load`` of one checkpoint file; a missing, truncated or foreign file raises a
    :class:`CheckpointError` that names it and what it holds. ``mmap``: tensors stay on disk
    until touched (a rank that needs a slice of them reads that slice)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} ({what}) does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:  # truncated, zero-length, not a torch file
        raise CheckpointError(f"checkpoint file {path} ({what}) cannot be read ({type(error).__name__}: "
                              f"{error}); it is truncated or damaged") from None


@dataclass
class Consolidated:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]


def save_consolidated(path: str | Path, model_config: ModelConfig, state_dict: dict[str, torch.Tensor],
                      metadata: dict[str, Any]) -> Path:
    payload = {"format": CONSOLIDATED_FORMAT, "version": CONSOLIDATED_VERSION, "model_config": model_config.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "metadata": metadata}
    atomic_write_bytes(Path(path), lambda file: torch.save(payload, file))
    return Path(path)


def load_consolidated(path: str | Path) -> Consolidated:
    """A consolidated checkpoint file, or a training checkpoint folder assembled on the fly."""
    path = Path(path)
    if path.is_dir():
        return consolidate(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; expected a consolidated .pt file or a "
                              f"checkpoint folder <run>/checkpoints/step_<N>")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file at all
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); the file is "
                              f"truncated or not a checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != CONSOLIDATED_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a consolidated WeatherMixer checkpoint (expected format "
                              f"{CONSOLIDATED_FORMAT!r}, found {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})")
    if payload.get("version") != CONSOLIDATED_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}, expected {CONSOLIDATED_VERSION}")
    return Consolidated(ModelConfig.from_dict(payload["model_config"]), payload["state_dict"], payload["metadata"])


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / COMPLETE_MARKER).exists():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {COMPLETE_MARKER} marker): the run that wrote "
                              f"it stopped while saving; use an earlier checkpoint")
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} cannot be read ({error})") from None


def consolidate(folder: str | Path) -> Consolidated:
    """The mesh-free full state of a training checkpoint folder, from its per-model-rank shards."""
    folder = Path(folder)
    meta = read_meta(folder)
    model_size = int(meta["mesh"]["model_size"])
    rank_states = [load_file(shards_file(folder, rank), f"weights of model rank {rank} of {model_size}")
                   for rank in range(model_size)]
    state = assemble_full_state(rank_states)
    return Consolidated(ModelConfig.from_dict(meta["model_config"]), state, meta)


def read_rank_state(folder: str | Path, meta: dict[str, Any], specs: dict[str, ShardSpec]
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], list[int]]:
    """This rank's shard of every parameter's float32 value and Adam moments, and the optimizer's
    step count per parameter group, from a checkpoint written on any mesh.

    ``specs``: the sharding of this rank's parameters. Every model rank's files are opened with
    their tensors left on disk; a parameter whose shard the checkpoint holds as it is (the same
    domain x tensor layout) is read from that one file, any other is assembled from the shards
    and this rank's slice taken, one parameter at a time."""
    folder = Path(folder)
    model_size = int(meta["mesh"]["model_size"])
    weights = [load_file(shards_file(folder, rank), f"weights of model rank {rank} of {model_size}", mmap=True)
               for rank in range(model_size)]
    optimizer = [load_file(optimizer_file(folder, rank), f"optimizer state of model rank {rank} of {model_size}",
                           mmap=True) for rank in range(model_size)]
    tables = {"master": weights, **{key: [state[key] for state in optimizer] for key in MOMENTS}}
    missing = sorted(set(specs) - set(weights[0]))
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks parameters {missing[:5]} of this model; was it written by "
                              f"another model configuration?")
    values = {}
    for name, spec in specs.items():
        mine = spec.to_json()
        values[name] = {key: _shard_of(name, spec, mine, [table[name] for table in ranks])
                        for key, ranks in tables.items()}
    return values, [int(count) for count in optimizer[0]["steps"]]


def read_buffers(folder: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's persistent buffers (FP8 amax histories) from a checkpoint written on any mesh:
    replicated over the model group, so model rank 0's file holds each whole."""
    saved = load_file(shards_file(Path(folder), 0), "weights of model rank 0", mmap=True)
    missing = sorted(set(names) - set(saved))
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks the buffers {missing[:5]} of this model (FP8 amax "
                              f"histories); was it written by another model configuration?")
    return {name: saved[name][1].clone() for name in names}


def _shard_of(name: str, spec: ShardSpec, mine: dict, saved: list[tuple[dict, torch.Tensor]]) -> torch.Tensor:
    for saved_spec, tensor in saved:
        if saved_spec == mine:
            return tensor.float().clone()
    return spec.take(assemble_full_state([{name: item} for item in saved])[name]).float()


def checkpoint_candidates(run_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The checkpoints a run may resume from, best first, and the folders passed over with why.

    First the one ``latest`` names, then every other complete one from the highest step down
    (``latest`` may name a damaged one, or a kill may have come between a checkpoint's
    ``COMPLETE`` and ``latest``). A folder without ``COMPLETE`` is passed over: its save was
    interrupted."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    folders = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    candidates, passed_over = [], []
    for folder in sorted(folders, key=lambda p: (p.name != named, -checkpoint_step(p))):
        if (folder / COMPLETE_MARKER).exists():
            candidates.append(folder)
        else:
            passed_over.append((folder, f"no {COMPLETE_MARKER} marker: the run that wrote it stopped while saving"))
    if named is not None and not (root / named).is_dir():
        passed_over.insert(0, (root / named, f"named by {pointer} but does not exist"))
    return candidates, passed_over


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    candidates, _ = checkpoint_candidates(run_dir)
    return candidates[0] if candidates else None
