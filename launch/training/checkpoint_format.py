"""Self-describing checkpoints: DeepSpeed's own files plus what is needed to use them anywhere.

A training checkpoint is a folder ``<run>/checkpoints/step_<N>/`` holding

* DeepSpeed's files (``engine.save_checkpoint``: module and optimizer state per rank);
* ``shards/model_rank_<k>.pt`` per model rank: every local parameter with its
  :class:`~parallel.sharding.ShardSpec`, so the full state can be assembled for any mesh;
* ``meta.json``: model config, mesh, channel list, normalisation statistics, data store
  fingerprint, run config, step, sampler position (``trainer_state`` per rank holds RNG
  states);
* ``COMPLETE``: written last, after every rank has finished; ``<run>/checkpoints/latest``
  names the newest complete checkpoint and is replaced atomically. A folder without
  ``COMPLETE`` is never resumed from.

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
from parallel.sharding import assemble_full_state
from weathermixer.config import ModelConfig

CONSOLIDATED_FORMAT = "weathermixer-consolidated"
CONSOLIDATED_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


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
    rank_states = []
    for rank in range(model_size):
        shard_file = folder / "shards" / f"model_rank_{rank}.pt"
        try:
            rank_states.append(torch.load(shard_file, map_location="cpu", weights_only=False))
        except Exception as error:
            raise CheckpointError(f"checkpoint {folder}: shard file {shard_file.name} cannot be read "
                                  f"({type(error).__name__}: {error}); expected one per model rank "
                                  f"(0..{model_size - 1})") from None
    state = assemble_full_state(rank_states)
    return Consolidated(ModelConfig.from_dict(meta["model_config"]), state, meta)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = Path(run_dir) / "checkpoints" / pointer.read_text().strip()
    read_meta(folder)  # refuses an incomplete one
    return folder
