"""Saving, resuming and exporting a run's checkpoints (the format: :mod:`launch.training.checkpoint_format`).

A checkpoint holds DeepSpeed's own files (weights, optimizer, schedule), every model rank's
full-precision shard with its :class:`~parallel.sharding.ShardSpec`, every rank's trainer state
(step, epoch, sampler position, RNG states) and the run's metadata; it is complete once
``COMPLETE`` is written, and ``latest`` then names it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from launch.runtime.atomic import atomic_write_bytes, atomic_write_text
from launch.training.checkpoint_format import (COMPLETE_MARKER, META_FILE, CheckpointError, consolidate,
                                               latest_checkpoint, load_consolidated, read_meta, save_consolidated)
from launch.training.master_weights import MasterWeightAdam
from launch.training.step import TrainingStep
from parallel.sharding import load_full_state


class Checkpointer:
    """The checkpoints of one run in ``<run_dir>/checkpoints``; every rank calls every method."""

    def __init__(self, run_dir: Path, keep: int, step: TrainingStep, metadata: Callable[[], dict[str, Any]]):
        self.run_dir, self.keep, self.step = Path(run_dir), keep, step
        self.folder = self.run_dir / "checkpoints"
        self.metadata = metadata
        self.mesh = step.model.mesh
        self.rank = dist.get_rank()

    # ---------------------------------------------------------------- save
    def save(self, trainer_state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``trainer_state["step"]`` (step, epoch, sampler position)."""
        tag = f"step_{trainer_state['step']:08d}"
        folder = self.folder / tag
        if self.rank == 0 and folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier attempt at this step
        dist.barrier()
        client_state = {"step": trainer_state["step"], "epoch": trainer_state["epoch"]}
        self.step.engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state, save_latest=False)
        self._save_shards(folder)
        state = {**trainer_state, **rng_states()}
        atomic_write_bytes(folder / "trainer" / f"rank_{self.rank}.pt", lambda file: torch.save(state, file))
        dist.barrier()
        if self.rank == 0:
            atomic_write_text(folder / META_FILE, json.dumps(self.metadata(), indent=1))
            atomic_write_text(folder / COMPLETE_MARKER, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            atomic_write_text(self.folder / "latest", tag)
            self._prune()
        dist.barrier()
        return folder

    def _save_shards(self, folder: Path) -> None:
        """Each model rank's parameters in full precision with their sharding (replica rank 0 writes)."""
        full_precision = self._full_precision_parameters()  # collective over the replica group
        if self.mesh.replica_rank == 0:
            shards = {name: (param.shard.to_json(), full_precision[name].cpu())
                      for name, param in self.step.model.named_parameters()}
            atomic_write_bytes(folder / "shards" / f"model_rank_{self.mesh.model_rank}.pt",
                               lambda file: torch.save(shards, file))

    def _full_precision_parameters(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.step.model.named_parameters():
            if isinstance(self.step.optimizer, MasterWeightAdam):
                full = self.step.optimizer.master(param)
            else:
                full = safe_get_full_fp32_param(param)
            out[name] = (param.detach() if full is None else full).float()
        return out

    def _prune(self) -> None:
        complete = sorted(p for p in self.folder.glob("step_*") if (p / COMPLETE_MARKER).exists())
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- resume and load
    def resume(self) -> dict[str, Any] | None:
        """Load the latest complete checkpoint; the trainer state to continue from (None: start
        afresh). On another mesh only the weights load (through the mesh-free form)."""
        folder = latest_checkpoint(self.run_dir) if self.folder.exists() else None
        if folder is None:
            return None
        meta = read_meta(folder)
        expected = self.metadata()
        if meta["model_config"] != expected["model_config"]:
            raise CheckpointError(f"{folder} holds a model with config {meta['model_config']}, this run builds "
                                  f"{expected['model_config']}; use another checkpoint.dir or the same model")
        if meta["store_fingerprint"] != expected["store_fingerprint"]:
            raise CheckpointError(f"{folder} was trained on a store with other channels or statistics than "
                                  f"{expected['store']}; expected the same store contents")
        if meta["mesh"] != expected["mesh"]:
            self.load_weights(folder)
            return {"resharded_from": folder, "mesh": meta["mesh"]}
        self.step.engine.load_checkpoint(str(self.folder), tag=folder.name)
        state = torch.load(folder / "trainer" / f"rank_{self.rank}.pt", map_location="cpu", weights_only=False)
        set_rng_states(state)
        return {**state, "folder": folder}

    def load_weights(self, source: str | Path) -> None:
        """Weights of any checkpoint (consolidated file or folder, any mesh), and the optimizer's
        full-precision copy of them."""
        full = load_consolidated(source)
        model = self.step.model
        if full.model_config.to_dict() != model.config.to_dict():
            raise CheckpointError(f"{source} holds a model with config {full.model_config.to_dict()}, this run "
                                  f"builds {model.config.to_dict()}")
        device = next(model.parameters()).device
        load_full_state(model, {k: v.to(device) for k, v in full.state_dict.items()})
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in model.named_parameters():
            value = param.shard.take(full.state_dict[name]).to(device).float()
            if isinstance(self.step.optimizer, MasterWeightAdam):
                self.step.optimizer.set_master(param, value)
            elif hasattr(param, "_hp_mapping"):
                safe_set_full_fp32_param(param, value)

    def export(self, path: Path) -> Path:
        """The latest checkpoint as one mesh-free file (rank 0 writes it)."""
        folder = latest_checkpoint(self.run_dir)
        if self.rank == 0:
            full = consolidate(folder)
            save_consolidated(path, full.model_config, full.state_dict, full.metadata)
        dist.barrier()
        return path


def rng_states() -> dict[str, Any]:
    """Every generator a training step draws from (the dropout masks)."""
    return {"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
            "device_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None}


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    if state.get("device_rng") is not None:
        torch.cuda.set_rng_state(state["device_rng"])
