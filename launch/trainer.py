"""The training loop: DeepSpeed engine over the replica group, the model over the mesh.

Who owns what:

* the **mesh** (``parallel``) owns the model-parallel groups: each rank holds its domain
  tile of the activations and its block of every weight;
* **DeepSpeed** owns the optimizer state, mixed precision, gradient averaging over the
  replica group (data x sample; ``launch.engine``) and ZeRO partitioning there, and
  gradient clipping (every parameter is flagged ``tensor_model_parallel``, so each element
  counts once in the norm; where the engine steps the torch optimizer itself, ZeRO-0 without
  DeepSpeed's bf16, the clipping runs inside the fused optimizer step: ``launch.engine``);
  with ``optimizer.master_weights`` the optimizer owns the precision instead: bf16 parameters
  and their float32 master weights in :class:`launch.master_weights.MasterWeightAdam`
  (ZeRO-0, DeepSpeed in float32: the fastest one-GPU step, ``benchmarks/GPU.md``);
* the **tile reader** (``data``) gives each rank only its tile and channel slice; every
  rank of one replica reads the same time index at the same step.

One training step = ``gradient_accumulation`` micro-batches of ``micro_batch`` samples,
each rolled out ``rollout_steps(step)`` steps (autoregressive or latent) against the
following states, loss :class:`weathermixer.loss.WeightedMSE`.

Settle steps: the host waits for the device only at steps that log, validate, checkpoint, stop
(``stop_after``) or end the run; there it reads the losses of all steps since the previous one at
once and checks them (:meth:`Trainer._settle`). Between them it queues the next steps without
waiting, so the device does not idle while the host launches work.

Stop and resume: SIGINT/SIGTERM set a flag that all ranks agree on at the next settle step
(within ``logging.every`` steps); they then write a checkpoint and exit. A run started with an
existing ``checkpoint.dir`` resumes from its latest complete checkpoint: weights, optimizer,
schedule, sampler position and every RNG state, so the continued losses equal the
uninterrupted run's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.process_prefetch import PREFETCHERS
from data.sampler import ReplicaSampler, valid_time_indices
from data.schema import HEADLINE_CHANNELS
from launch.checkpoint import (COMPLETE_MARKER, META_FILE, CheckpointError, atomic_write_bytes, atomic_write_text,
                               consolidate, latest_checkpoint, read_meta, save_consolidated)
from launch.device_batches import DeviceBatches
from launch.engine import initialize_engine
from launch.master_weights import MasterWeightAdam
from launch.profiling import StepProfiler
from launch.run_config import RunConfig
from launch.tiles import RankInputs, config_for_store, store_attrs
from parallel.mesh import ProcessMesh
from parallel.rng import seed_dropout
from parallel.sharding import load_full_state
from weathermixer.compile import compiled
from weathermixer.counts import training_flops
from weathermixer.loss import WeightedMSE, channel_weights, latitude_weights
from weathermixer.model import WeatherMixer

# the paper trains the patch embedding and the patch recovery at a lower rate than the rest
EMBEDDING_PREFIXES = ("embed.", "recover.")


def init_distributed(device: str = "auto") -> torch.device:
    """Start torch.distributed through DeepSpeed (launcher, torchrun or a single plain process)."""
    if "RANK" not in os.environ:  # a plain `python launch/train.py`: one process, no launcher
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
    import deepspeed  # after DS_ACCELERATOR: it picks its accelerator on import

    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def learning_rate_factor(step: int, total: int, warmup: int, decay: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, run: RunConfig, device: torch.device, init_from: str | None = None, quiet: bool = False):
        self.run, self.device, self.quiet = run, device, quiet
        self.rank = dist.get_rank()
        self.run_dir = Path(run.checkpoint.dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.mesh = ProcessMesh.build(run.mesh.build(), device.type)
        store = run.data.store
        self.config = config_for_store(run.model.build(), store)
        self.attrs, n_store_lat, n_lon = store_attrs(store)
        with torch.device(device):  # parameters are created and initialised where they will live
            model = WeatherMixer(self.config, self.mesh, seed=run.training.seed)
        seed_dropout(run.training.seed, self.mesh.data_rank, self.mesh.sample_rank, self.mesh.model_rank)
        self.inputs = RankInputs(store, model, pin_memory=device.type == "cuda")
        reader = self.inputs.reader

        block_params = [p for n, p in model.named_parameters() if not n.startswith(EMBEDDING_PREFIXES)]
        edge_params = [p for n, p in model.named_parameters() if n.startswith(EMBEDDING_PREFIXES)]
        o = run.optimizer
        groups = [{"params": block_params, "lr": o.lr}, {"params": edge_params, "lr": o.embedding_lr}]
        if o.master_weights:  # the parameters become bf16, the optimizer keeps their float32 values
            optimizer = MasterWeightAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                         compile=run.training.compile)
        else:
            optimizer = torch.optim.Adam(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                         fused=True)
        s = run.schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(
            step, run.training.steps, s.warmup_steps, s.decay, s.min_lr_ratio))
        self.engine, self.optimizer, self.scheduler = initialize_engine(model, optimizer, run.deepspeed_config(),
                                                                        self.mesh, lr_scheduler=schedule)
        self.model: WeatherMixer = self.engine.module
        from deepspeed.runtime.torch_autocast import autocast_if_enabled  # deepspeed imports after DS_ACCELERATOR

        self._autocast = functools.partial(autocast_if_enabled, self.engine)
        # one graph per rollout length and one for the loss; validation and export stay eager
        self._rollout = compiled(self.model.rollout) if run.training.compile else self.model.rollout
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() or o.master_weights else torch.float32

        # loss: cell-area weights of the stored rows (padded rows weigh nothing), channel weights
        rank = self.mesh.tensor_rank
        (lat0, lat1), _ = self.model.layers.tile_bounds()
        grid_latitudes = self._store_latitudes(store)
        rows = torch.zeros(self.config.model_lat, dtype=torch.float64)
        stored = min(self.config.model_lat, n_store_lat)
        rows[:stored] = latitude_weights(grid_latitudes[:stored])
        weights = torch.ones(len(self.attrs.channels), dtype=torch.float64) if run.training.loss_weights == "uniform" \
            else channel_weights(self.attrs.channel_names, [c.variable for c in self.attrs.channels],
                                 [c.level for c in self.attrs.channels])
        self.grid_points = stored * n_lon  # points that exist in the store (padded rows excluded)
        self.loss_fn = WeightedMSE(rows[lat0:lat1], weights[self.model.state_channels.indices[rank].cpu()],
                                   self.grid_points, float(weights.sum()), self.mesh).to(device)
        self._loss = compiled(self.loss_fn) if run.training.compile else self.loss_fn
        self.lead = run.training.max_rollout
        self.sampler = ReplicaSampler(
            valid_time_indices(reader.times, self.lead, *run.data.train, step=np.timedelta64(reader.step_hours, "h")),
            replica_rank=self.mesh.replica_rank, num_replicas=self.mesh.replicas, seed=run.training.seed)
        self.validation_indices = self._validation_indices()
        self.step, self.epoch = 0, 0
        self._stop_requested = False
        self._metrics_file = None
        self._tensorboard = None
        if init_from is not None:
            self._load_weights(init_from)
        self._resume()

    # ---------------------------------------------------------------- the loop
    def train(self, stop_after: int | None = None, profile: tuple[int, int] | None = None) -> dict[str, Any]:
        """Train to ``training.steps``; ``stop_after`` steps of this invocation end it early with a
        checkpoint (for jobs shorter than the run); ``profile=(first, last)`` records those steps
        (:mod:`launch.profiling`).

        The host reads device values only at settle steps (log, validate, checkpoint, stop_after,
        last step): each step's loss stays on the device until then. A SIGINT/SIGTERM therefore
        takes effect at the next settle step, within ``logging.every`` steps."""
        run, t = self.run, self.run.training
        first_step = self.step
        self._install_signal_handlers()
        samples_per_step = t.micro_batch * t.gradient_accumulation * self.mesh.replicas
        progress = self._progress_bar()
        last: dict[str, Any] = {}
        window_start, window_steps = time.perf_counter(), 0
        pending_losses: dict[int, torch.Tensor] = {}  # step -> its loss on the device, since the last settle step
        profiler = StepProfiler(*profile, self.run_dir / "profile", self.rank, self.device) if profile else None
        with PREFETCHERS[run.data.worker_kind](self.inputs.reader, (), self.lead, run.data.prefetch,
                                               run.data.workers) as prefetcher:
            self._prefetcher = prefetcher  # one for the run: reader processes start once, not per epoch
            # the next micro-batch crosses to the device while the current one computes
            device_batches = DeviceBatches(prefetcher, self.inputs, t.micro_batch, self.device, self.dtype)
            while self.step < t.steps:
                self.sampler.set_epoch(self.epoch)
                device_batches.start_epoch(iter(self.sampler))
                while self.step < t.steps:
                    if profiler is not None:
                        profiler.step_begins(self.step + 1)
                    batches = [device_batches.next() for _ in range(t.gradient_accumulation)]
                    if any(b is None for b in batches):
                        break  # epoch exhausted; the partial step is dropped and the next epoch begins
                    lead = t.rollout_steps(self.step)
                    losses = [self._micro_step(batch, lead) for batch in batches]
                    self.step += 1
                    window_steps += 1
                    pending_losses[self.step] = torch.stack(losses).double().mean()
                    if profiler is not None and (written := profiler.step_ends(self.step)):
                        self._say(f"profile of steps {profiler.first}..{profiler.last} written to {written[0]} "
                                  f"(timeline) and {written[1]} (table)")
                    if progress is not None:
                        progress.update(1)
                    log_now = self.step % run.logging.every == 0 or self.step == t.steps
                    validate_now = self.validation_indices is not None and self.step % run.logging.validate_every == 0
                    checkpoint_now = self.step % run.checkpoint.every == 0 or self.step == t.steps
                    stop_after_reached = (stop_after is not None and self.step - first_step >= stop_after
                                          and self.step < t.steps)
                    if not (log_now or validate_now or checkpoint_now or stop_after_reached):
                        continue  # not a settle step: queue the next step without waiting for the device
                    loss = self._settle(pending_losses)
                    pending_losses = {}
                    if log_now:
                        elapsed = time.perf_counter() - window_start
                        flops = training_flops(self.config, lead, mode=run.training.rollout_mode)
                        last = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                "rollout": lead, "samples_per_s": window_steps * samples_per_step / elapsed,
                                "tflops_per_rank": window_steps * samples_per_step * flops / elapsed / 1e12
                                / dist.get_world_size()}
                        self._log(last)
                        window_start, window_steps = time.perf_counter(), 0
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss:.4f}", rollout=lead, refresh=False)
                    if validate_now:
                        self._log(self.validate())
                    stop = self._agree_to_stop() or stop_after_reached
                    if checkpoint_now or stop:
                        self.save_checkpoint(consumed=device_batches.taken)
                    if stop:
                        self._say(f"stopped at step {self.step}; checkpoint written to {self.checkpoint_dir}; "
                                  f"the same command resumes from it")
                        return last
                else:
                    break
                self.epoch += 1
        if progress is not None:
            progress.close()
        if self.validation_indices is not None and self.step % run.logging.validate_every != 0:
            self._log(self.validate())
        model_file = self.export_consolidated(self.run_dir / "model.pt")
        self._say(f"trained {self.step} steps; checkpoints in {self.checkpoint_dir}, consolidated model "
                  f"{model_file}, metrics {self.run_dir / 'metrics.jsonl'}")
        return last

    def _micro_step(self, batch, lead: int) -> torch.Tensor:
        """One micro-batch forward, backward and engine step; the loss stays on the device (no wait)."""
        state, static, forcings, targets = batch
        with self._autocast():  # DeepSpeed's torch_autocast, as engine.forward would apply it
            prediction = self._rollout(state, static, forcings[:, :lead], lead, self.run.training.rollout_mode)
        loss = self._loss(prediction, targets[:, :lead])
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    # ---------------------------------------------------------------- validation
    def _validation_indices(self) -> np.ndarray | None:
        if self.run.data.validation is None:
            return None
        reader = self.inputs.reader
        valid = valid_time_indices(reader.times, 1, *self.run.data.validation,
                                   step=np.timedelta64(reader.step_hours, "h"))
        if len(valid) == 0:
            raise ValueError(f"data.validation = {list(self.run.data.validation)}: no time in {reader.store} has a "
                             f"following state inside that period")
        n = min(len(valid), self.run.logging.validation_samples)
        return valid[np.linspace(0, len(valid) - 1, n).round().astype(int)]

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Latitude-weighted RMSE (physical units) of one step on the validation times, all channels."""
        self.model.eval()
        reader, rank = self.inputs.reader, self.mesh.tensor_rank
        channels = self.model.state_channels.indices[rank]
        std = torch.tensor([self.attrs.std[i] for i in channels.tolist()], dtype=torch.float64, device=self.device)
        squared = torch.zeros(len(self.attrs.channels), dtype=torch.float64, device=self.device)
        loss = 0.0
        for index in self.validation_indices:
            state, static, forcings, targets = self.inputs.batch([reader.sample(int(index), 1)], self.device,
                                                                 self.dtype)
            prediction = self.model(state, static, forcings[:, 0])
            loss += float(self.loss_fn(prediction, targets[:, 0]))
            error = (prediction.double() - targets[:, 0].double()) * std
            squared[channels.to(self.device)] += (error.square() * self.loss_fn.lat_weights.double()).sum((0, 1, 2))
        model_group = self.mesh.model_group
        if model_group is not None:
            dist.all_reduce(squared, group=model_group)
        rmse = (squared / (len(self.validation_indices) * self.grid_points)).sqrt().tolist()
        self.model.train()
        names = self.attrs.channel_names
        out = {"step": self.step, "validation_loss": loss / len(self.validation_indices)}
        out.update({f"rmse_{name}": value for name, value in zip(names, rmse)
                    if name in HEADLINE_CHANNELS or len(names) <= 16})
        return out

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, consumed: int) -> Path:
        tag = f"step_{self.step:08d}"
        folder = self.checkpoint_dir / tag
        if self.rank == 0 and folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier attempt at this step
        dist.barrier()
        client_state = {"step": self.step, "epoch": self.epoch}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        full_precision = self._full_precision_parameters()  # collective over the replica group
        if self.mesh.replica_rank == 0:
            shards = {name: (param.shard.to_json(), full_precision[name].cpu())
                      for name, param in self.model.named_parameters()}
            atomic_write_bytes(folder / "shards" / f"model_rank_{self.mesh.model_rank}.pt",
                               lambda file: torch.save(shards, file))
        trainer_state = {"step": self.step, "epoch": self.epoch, "sampler": self.sampler.state_dict(consumed),
                         "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                         "device_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}
        atomic_write_bytes(folder / "trainer" / f"rank_{self.rank}.pt", lambda file: torch.save(trainer_state, file))
        dist.barrier()
        if self.rank == 0:
            atomic_write_text(folder / META_FILE, json.dumps(self.metadata(), indent=1))
            atomic_write_text(folder / COMPLETE_MARKER, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            atomic_write_text(self.checkpoint_dir / "latest", tag)
            self._prune()
        dist.barrier()
        return folder

    def _full_precision_parameters(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.model.named_parameters():
            if isinstance(self.optimizer, MasterWeightAdam):
                full = self.optimizer.master(param)
            else:
                full = safe_get_full_fp32_param(param)
            out[name] = (param.detach() if full is None else full).float()
        return out

    def _prune(self) -> None:
        complete = sorted(p for p in self.checkpoint_dir.glob("step_*") if (p / COMPLETE_MARKER).exists())
        for old in complete[:-self.run.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def metadata(self) -> dict[str, Any]:
        """What makes a checkpoint self-describing (read by forecasting and resuming)."""
        c = self.mesh.config
        return {
            "model_config": self.config.to_dict(),
            "mesh": {"data": c.data, "sample": c.sample, "domain": list(c.domain), "tensor": c.tensor,
                     "model_size": c.model_size},
            "channels": [ch.to_json() for ch in self.attrs.channels],
            "static_channels": list(self.attrs.static_channels),
            "time_step_hours": self.attrs.time_step_hours,
            "normalization": {"mean": self.attrs.mean, "std": self.attrs.std, "static_mean": self.attrs.static_mean,
                              "static_std": self.attrs.static_std},
            "store": str(self.run.data.store),
            "store_fingerprint": store_fingerprint(self.attrs),
            "step": self.step,
            "run_config": self.run.to_dict(),
        }

    def export_consolidated(self, path: Path) -> Path:
        """The latest checkpoint as one mesh-free file (rank 0 writes it)."""
        folder = latest_checkpoint(self.run_dir)
        if self.rank == 0:
            full = consolidate(folder)
            save_consolidated(path, full.model_config, full.state_dict, full.metadata)
        dist.barrier()
        return path

    def _resume(self) -> None:
        folder = latest_checkpoint(self.run_dir) if self.checkpoint_dir.exists() else None
        if folder is None:
            return
        meta = read_meta(folder)
        if meta["model_config"] != self.config.to_dict():
            raise CheckpointError(f"{folder} holds a model with config {meta['model_config']}, this run builds "
                                  f"{self.config.to_dict()}; use another checkpoint.dir or the same model")
        if meta["store_fingerprint"] != store_fingerprint(self.attrs):
            raise CheckpointError(f"{folder} was trained on a store with other channels or statistics than "
                                  f"{self.run.data.store}; expected the same store contents")
        same_mesh = meta["mesh"] == self.metadata()["mesh"]
        if same_mesh:
            self.engine.load_checkpoint(str(self.checkpoint_dir), tag=folder.name)
            state = torch.load(folder / "trainer" / f"rank_{self.rank}.pt", map_location="cpu", weights_only=False)
            self.sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            np.random.set_state(state["numpy_rng"])
            if state["device_rng"] is not None:
                torch.cuda.set_rng_state(state["device_rng"])
            self.step, self.epoch = state["step"], state["epoch"]
            self._say(f"resumed from {folder} at step {self.step}")
        else:  # another layout: weights through the mesh-free form; optimizer and schedule restart
            self._load_weights(folder)
            self._say(f"loaded the weights of {folder} (trained on mesh {meta['mesh']}) into "
                      f"{self.mesh.describe()}; optimizer state and schedule start afresh")

    def _load_weights(self, source: str | Path) -> None:
        from launch.checkpoint import load_consolidated

        full = load_consolidated(source)
        if full.model_config.to_dict() != self.config.to_dict():
            raise CheckpointError(f"{source} holds a model with config {full.model_config.to_dict()}, this run "
                                  f"builds {self.config.to_dict()}")
        load_full_state(self.model, {k: v.to(self.device) for k, v in full.state_dict.items()})
        # the optimizer's full-precision master copy must follow the new weights
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in self.model.named_parameters():
            value = param.shard.take(full.state_dict[name]).to(self.device).float()
            if isinstance(self.optimizer, MasterWeightAdam):
                self.optimizer.set_master(param, value)
            elif hasattr(param, "_hp_mapping"):
                safe_set_full_fp32_param(param, value)

    # ---------------------------------------------------------------- plumbing
    def _store_latitudes(self, store: str) -> np.ndarray:
        import zarr

        return np.asarray(zarr.open_group(str(store), mode="r")["latitude"][:])

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop_requested = True

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, request_stop)

    def _settle(self, pending_losses: dict[int, torch.Tensor]) -> float:
        """The replica-mean loss of the latest pending step, after checking every pending step's.

        One all-reduce and one device->host copy for all steps since the last settle step (the
        only place the loop waits for the device). The mean is over the replicas (each saw other
        samples; the model group already agrees), so every rank sees the same values and all
        raise together, before this step validates or writes a checkpoint."""
        losses = torch.stack(list(pending_losses.values()))
        group = self.mesh.replica_group
        if group is not None:
            dist.all_reduce(losses, group=group)
            losses /= self.mesh.replicas
        values = losses.tolist()
        for step, loss in zip(pending_losses, values):
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: the training loss is {loss}; lower optimizer.lr or check "
                                         f"the store's statistics")
        return values[-1]

    def _agree_to_stop(self) -> bool:
        """True on every rank when any rank was asked to stop. Called at settle steps only (every
        rank reaches the same ones, so the all-reduce matches): the host waits for the device only
        there, so a stop request takes effect within ``logging.every`` steps."""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _progress_bar(self):
        if self.rank != 0 or self.quiet:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.run.training.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._metrics_file is None:
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
            if self.run.logging.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
                except ImportError:  # tensorboard is optional
                    self._tensorboard = None
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def _say(self, message: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(message, flush=True)


def store_fingerprint(attrs) -> str:
    """Hash of what a trained model depends on: channels, static fields, statistics, time step."""
    import hashlib

    content = json.dumps({"channels": [c.to_json() for c in attrs.channels], "static": list(attrs.static_channels),
                          "mean": attrs.mean, "std": attrs.std, "static_mean": attrs.static_mean,
                          "static_std": attrs.static_std, "step": attrs.time_step_hours}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]
