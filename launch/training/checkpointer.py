"""Saving, resuming and exporting a run's checkpoints (the format: :mod:`launch.training.checkpoint_format`).

A checkpoint holds the run's whole state in a mesh-free form: every parameter's float32 value and
Adam moments per model rank with their :class:`~parallel.sharding.ShardSpec`, the optimizer's step
counts, the schedule, DeepSpeed's counters, the sampler position, the global batch and every rank's
generator states. A run resumes from it on any mesh (data, sample, domain, tensor), any ZeRO stage
and either optimizer: each rank takes its slice of each tensor. It is complete once ``COMPLETE`` is
written, and ``latest`` then names it.

Resume tries the checkpoint ``latest`` names, then the other complete ones from the newest down; a
damaged one (a file missing, truncated or unreadable) is passed over with a warning naming the file.
Every write agrees across the ranks: a full disk on any rank ends the save on all of them with one
message, and the checkpoint before it stays ``latest``.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from launch.runtime.atomic import atomic_write_bytes, atomic_write_text
from launch.training.checkpoint_format import (COMPLETE_MARKER, META_FILE, CheckpointError, checkpoint_candidates,
                                               checkpoint_name, checkpoint_step, consolidate, load_consolidated,
                                               load_file, optimizer_file, read_buffers, read_meta, read_rank_state,
                                               rng_file, save_consolidated, shards_file)
from launch.training.optimizer_state import MASTER, MOMENTS, OptimizerState
from launch.training.step import TrainingStep
from parallel.fp8 import histories_loaded
from parallel.rng import stream_seed
from parallel.sharding import load_full_state, persistent_buffers, replicated_spec
from weathermixer.config import ConfigError, ModelConfig

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (the same message on every rank)."""


class CheckpointMismatch(CheckpointError):
    """A whole checkpoint that does not fit this run (another model, store or global batch)."""


class Checkpointer:
    """The checkpoints of one run in ``<run_dir>/checkpoints``; every rank calls every method."""

    def __init__(self, run_dir: Path, keep: int, step: TrainingStep, metadata: Callable[[], dict[str, Any]]):
        self.run_dir, self.keep, self.step = Path(run_dir), keep, step
        self.folder = self.run_dir / "checkpoints"
        self.metadata = metadata
        self.mesh = step.model.mesh
        self.rank = dist.get_rank()
        self.optimizer_state = OptimizerState(step.model, step.base_optimizer, step.optimizer)
        self.last_saved: Path | None = None

    # ---------------------------------------------------------------- save
    def save(self, trainer_state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``trainer_state["step"]`` (step, epoch, sampler position)."""
        folder = self.folder / checkpoint_name(trainer_state["step"])
        problem = None
        if self.rank == 0:
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete earlier attempt at this step
            problem = self._space_problem(folder)
        self._agree(problem, folder)
        values, steps = self.optimizer_state.read()  # collective over the replica group
        writes = [(rng_file(folder, self.rank), "generator states", rng_states())]
        if self.mesh.replica_rank == 0:  # one writer per model rank
            shards = {name: param.shard.to_json() for name, param in self.step.model.named_parameters()}
            buffers = {name: (replicated_spec(buffer.shape).to_json(), buffer.detach().to("cpu", copy=True))
                       for name, buffer in persistent_buffers(self.step.model).items()}
            writes.append((shards_file(folder, self.mesh.model_rank), "float32 weights and buffers",
                           {**{name: (spec, values[name][MASTER]) for name, spec in shards.items()}, **buffers}))
            writes.append((optimizer_file(folder, self.mesh.model_rank), "optimizer moments and step counts",
                           {"steps": steps, **{key: {name: (spec, values[name][key]) for name, spec in shards.items()}
                                               for key in MOMENTS}}))
        self._agree(self._write(writes, folder), folder)
        problem = None
        if self.rank == 0:
            meta = {**self.metadata(), "resume": self._resume_state(trainer_state)}
            finished = time.strftime("%Y-%m-%dT%H:%M:%S\n")
            problem = self._write([(folder / META_FILE, "metadata", json.dumps(meta, indent=1)),
                                   (folder / COMPLETE_MARKER, "completion marker", finished),
                                   (self.folder / "latest", "pointer to the newest checkpoint", folder.name)], folder)
            if problem is None:
                prune(self.folder, folder, self.keep)
        self._agree(problem, folder)
        self.last_saved = folder
        return folder

    def _resume_state(self, trainer_state: dict[str, Any]) -> dict[str, Any]:
        """What continues a run on any mesh besides the tensors (the same on every rank)."""
        engine, t, mesh = self.step.engine, self.step.run.training, self.mesh.config
        return {**trainer_state, "schedule_position": self.step.scheduler.last_epoch,
                "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                           "skipped_steps": engine.skipped_steps},
                "global_batch": global_batch(mesh.data, t.micro_batch, t.gradient_accumulation)}

    def _write(self, writes: list[tuple[Path, str, Any]], folder: Path) -> str | None:
        """Write each ``(path, what, value)`` (text or a torch object); the problem, or None."""
        for path, what, value in writes:
            try:
                if isinstance(value, str):
                    atomic_write_text(path, value)
                else:
                    atomic_write_bytes(path, lambda file: torch.save(value, file))
            except OSError as error:
                if error.errno in NO_SPACE:
                    return self._no_space(folder, f"no space left writing {path.name} ({what}): {error.strerror}")
                return f"checkpoint {folder}: cannot write {path} ({what}): {error}"
        return None

    def _space_problem(self, folder: Path) -> str | None:
        needed, free = self._space(folder)
        return self._no_space(folder, "not enough disk space", needed, free) if free < needed else None

    def _no_space(self, folder: Path, what: str, needed: int | None = None, free: int | None = None) -> str:
        if needed is None:
            needed, free = self._space(folder)
        return (f"checkpoint {folder}: {what}: a checkpoint of this run needs about {_size(needed)}, {_size(free)} "
                f"are free there. Free space (or lower checkpoint.keep) and rerun the same command: it resumes from "
                f"the latest complete checkpoint")

    def _space(self, folder: Path) -> tuple[int, int]:
        """Bytes a checkpoint needs (the last one's size, else weights and two moments in float32)
        and bytes free at ``folder``."""
        if self.last_saved is not None and self.last_saved.is_dir():
            needed = sum(path.stat().st_size for path in self.last_saved.rglob("*") if path.is_file())
        else:
            needed = 12 * sum(int(np.prod(p.shard.global_shape)) for p in self.step.model.parameters())
        existing = folder
        while not existing.exists():
            existing = existing.parent
        return needed, shutil.disk_usage(existing).free

    def _agree(self, problem: str | None, folder: Path) -> None:
        """Every rank learns whether any rank failed; all raise the first rank's message together."""
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        failed = [p for p in problems if p is not None]
        if failed:
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder only holds space
            raise CheckpointWriteError(failed[0])

    # ---------------------------------------------------------------- resume and load
    def resume(self, source: str | Path | None = None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint that loads (or ``source``, a checkpoint folder):
        the trainer state to continue from (None: start afresh).

        Damaged checkpoints (a file missing or unreadable) are passed over with a warning; one
        that does not fit this run (another model, store or global batch) is an error."""
        if source is not None:
            candidates, passed_over = [Path(source)], []
            if not (Path(source) / COMPLETE_MARKER).exists():
                raise CheckpointError(f"--resume-from {source}: not a complete checkpoint folder (expected "
                                      f"<run>/checkpoints/step_<N> with a {COMPLETE_MARKER} marker)")
        else:
            candidates, passed_over = checkpoint_candidates(self.run_dir)
        skipped = []
        for folder in candidates:
            try:
                state, problem = self._load(folder), None
            except CheckpointMismatch as error:
                problem = (True, str(error))
            except CheckpointError as error:
                problem = (False, str(error))
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)  # a damaged file on any rank passes the folder over
            failed = [p for p in problems if p is not None]
            if not failed:
                self._warn_passed_over(folder, passed_over + skipped)
                self.last_saved = folder
                return state
            mismatch = [message for fatal, message in failed if fatal]
            if mismatch or source is not None:
                raise CheckpointError((mismatch or [failed[0][1]])[0])
            skipped.append((folder, failed[0][1]))
        self._warn_passed_over(None, passed_over + skipped)
        if candidates:
            raise CheckpointError(f"no checkpoint in {self.folder} could be loaded (the reasons above); move the "
                                  f"damaged ones away to start afresh, or name one with --resume-from")
        return None

    def _warn_passed_over(self, chosen: Path | None, passed_over: list[tuple[Path, str]]) -> None:
        """One warning per passed-over folder newer than the one resumed from (older ones are
        leftovers that pruning removes)."""
        if self.rank != 0:
            return
        floor = -1 if chosen is None else checkpoint_step(chosen)
        for folder, reason in passed_over:
            step = checkpoint_step(folder)
            if step is None or step >= floor:
                warn(f"skipped checkpoint {folder}: {reason}")

    def _load(self, folder: Path) -> dict[str, Any]:
        """Load ``folder`` into this run; raises :class:`CheckpointError` naming the file at fault, or
        :class:`CheckpointMismatch` where the checkpoint is whole but does not fit this run."""
        meta = read_meta(folder)
        expected = self.metadata()
        self._check_fits(folder, meta, expected)
        if "resume" not in meta:
            return self._load_legacy(folder, meta, expected)
        resume = meta["resume"]
        model = self.step.model
        specs = {name: param.shard for name, param in model.named_parameters()}
        values, steps = read_rank_state(folder, meta, specs)
        buffers = persistent_buffers(model)
        saved_buffers = read_buffers(folder, list(buffers))
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(values[name][MASTER])  # the parameters: the masters, rounded to their dtype
            for name, buffer in buffers.items():
                buffer.copy_(saved_buffers[name])
        histories_loaded(model)
        try:
            self.optimizer_state.write(values, steps)
        except ValueError as error:
            raise CheckpointError(f"checkpoint {folder}: {error}") from None
        self._load_schedule(resume)
        same_mesh = meta["mesh"] == expected["mesh"]
        if same_mesh:
            set_rng_states(load_file(rng_file(folder, self.rank), f"generator states of rank {self.rank}"))
        else:  # dropout streams are per rank: a new mesh starts new ones, keyed by the step
            reseed_dropout(self.step.run.training.seed, resume["step"], self.mesh)
        return {**resume, "folder": folder, "mesh": meta["mesh"], "resharded": not same_mesh}

    def _check_fits(self, folder: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
        if _normalised(meta["model_config"]) != expected["model_config"]:
            raise CheckpointMismatch(f"{folder} holds another model: "
                                     f"{model_difference(meta['model_config'], expected['model_config'])}; use "
                                     f"another checkpoint.dir or set the run's model as the checkpoint's")
        if meta["store_fingerprint"] != expected["store_fingerprint"]:
            raise CheckpointMismatch(f"{folder} was trained on a store with other channels or statistics than "
                                     f"{expected['store']}; expected the same store contents")
        saved = meta.get("resume", {}).get("global_batch")
        t, mesh = self.step.run.training, self.mesh.config
        mine = global_batch(mesh.data, t.micro_batch, t.gradient_accumulation)
        if saved is not None and saved["times"] != mine["times"]:
            raise CheckpointMismatch(
                f"{folder} was trained with a global batch of {saved['times']} times per step (data "
                f"{saved['data']} x micro_batch {saved['micro_batch']} x gradient_accumulation "
                f"{saved['gradient_accumulation']}), this run has {mine['times']} (data {mine['data']} x "
                f"{mine['micro_batch']} x {mine['gradient_accumulation']}). The schedule, the sampler position and "
                f"Adam's moments belong to that batch: set training.micro_batch and training.gradient_accumulation "
                f"so that data x micro_batch x gradient_accumulation = {saved['times']}, or start a new run from "
                f"these weights with --init-from {folder} and another checkpoint.dir")

    def _load_schedule(self, resume: dict[str, Any]) -> None:
        """The learning-rate schedule's position and DeepSpeed's counters. Each group's rate is this
        run's schedule at that position (``optimizer.lr``, ``schedule`` or ``training.steps`` may
        have changed: a longer run decays further)."""
        scheduler, engine = self.step.scheduler, self.step.engine
        position = resume["schedule_position"]
        rates = [base * factor(position) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": position, "_step_count": position + 1,
                                   "_last_lr": rates})
        for group, lr in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = lr
        counters = resume["engine"]
        engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
        engine.skipped_steps = counters["skipped_steps"]
        engine.micro_steps = counters["global_steps"] * engine.gradient_accumulation_steps()

    def _load_legacy(self, folder: Path, meta: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of DeepSpeed's files (before the mesh-free optimizer state): everything on
        the mesh that wrote it, the weights alone on another."""
        if meta["mesh"] != expected["mesh"]:
            self.load_weights(folder)
            warn(f"{folder} predates mesh-free optimizer state: loaded its weights into {self.mesh.describe()}; "
                 f"optimizer state and schedule start afresh")
            return {"step": 0, "epoch": 0, "sampler": None, "folder": folder, "mesh": meta["mesh"], "resharded": True}
        try:
            self.step.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        except Exception as error:
            raise CheckpointError(f"checkpoint {folder}: DeepSpeed's files cannot be loaded ({type(error).__name__}: "
                                  f"{error})") from None
        state = load_file(folder / "trainer" / f"rank_{self.rank}.pt", f"trainer state of rank {self.rank}")
        set_rng_states(state)
        return {**state, "folder": folder, "mesh": meta["mesh"], "resharded": False}

    def load_weights(self, source: str | Path) -> None:
        """Weights of any checkpoint (consolidated file or folder, any mesh), and the optimizer's
        full-precision copy of them; the moments and step counts stay as they are."""
        full = load_consolidated(source)
        model = self.step.model
        if full.model_config.to_dict() != model.config.to_dict():
            raise CheckpointError(f"{source} holds another model: "
                                  f"{model_difference(full.model_config.to_dict(), model.config.to_dict())}")
        device = next(model.parameters()).device
        load_full_state(model, {k: v.to(device) for k, v in full.state_dict.items()})
        self.optimizer_state.write_masters({name: param.shard.take(full.state_dict[name]).float()
                                            for name, param in model.named_parameters()})

    def export(self, path: Path) -> Path:
        """The last checkpoint saved as one mesh-free file (rank 0 writes it)."""
        if self.rank == 0:
            full = consolidate(self.last_saved)
            save_consolidated(path, full.model_config, full.state_dict, full.metadata)
        dist.barrier()
        return path


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def model_difference(saved: dict[str, Any], mine: dict[str, Any]) -> str:
    """The keys where a checkpoint's model config and this run's differ, each with both values."""
    saved = _normalised(saved)
    keys = sorted(key for key in saved.keys() | mine.keys() if saved.get(key, _ABSENT) != mine.get(key, _ABSENT))
    return ", ".join(f"model.{key} is {saved.get(key, _ABSENT)!r} there, {mine.get(key, _ABSENT)!r} in this run"
                     for key in keys)


_ABSENT = "(absent)"


def _normalised(model_config: dict[str, Any]) -> dict[str, Any]:
    """A saved model config with the keys it predates filled in (``ModelConfig.from_dict``): a
    checkpoint from before ``model.fp8_history`` still fits; one with keys this version lacks stays
    as it is."""
    try:
        return ModelConfig.from_dict(model_config).to_dict()
    except (ConfigError, TypeError, ValueError):
        return model_config


def global_batch(data: int, micro_batch: int, gradient_accumulation: int) -> dict[str, int]:
    """The training times of one step over all replicas (the sample ranks of a data rank share theirs)."""
    return {"data": data, "micro_batch": micro_batch, "gradient_accumulation": gradient_accumulation,
            "times": data * micro_batch * gradient_accumulation}


def prune(folder: Path, current: Path, keep: int) -> list[Path]:
    """Delete the checkpoints before ``current`` beyond the ``keep - 1`` newest complete ones, by
    step number; incomplete ones before it too (they are never resumed from). ``current`` and
    any checkpoint of a higher step are never touched. The deleted folders."""
    step = checkpoint_step(current)
    older = sorted((p for p in folder.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None and s < step),
                   key=checkpoint_step)
    complete = [p for p in older if (p / COMPLETE_MARKER).exists()]
    doomed = [p for p in older if not (p / COMPLETE_MARKER).exists()] + complete[:max(0, len(complete) - (keep - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


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


def reseed_dropout(seed: int, step: int, mesh) -> None:
    """Fresh dropout streams after a change of mesh, keyed by (seed, step, this rank's place)."""
    torch.manual_seed(stream_seed(seed, "dropout-resumed", step, mesh.data_rank, mesh.sample_rank, mesh.model_rank))
