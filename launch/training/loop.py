"""The training loop: steps, settle steps, epochs, stop and resume.

Who owns what: the **mesh** (``parallel``) the model-parallel groups; **DeepSpeed** the optimizer
state, mixed precision, gradient averaging over the replica group (data x sample) and ZeRO
partitioning, and gradient clipping (:mod:`launch.training.engine`); the **tile reader**
(``data``) each rank's tile and channel slice, the same time index on every rank of a replica.
The loop calls the components: :class:`~launch.training.step.TrainingStep` (one micro-batch),
:class:`~launch.training.checkpointer.Checkpointer`, :class:`~launch.training.validation.Validator`
and :class:`~launch.training.metrics_log.MetricsLog`.

Settle steps: the host waits for the device only at steps that log, validate, checkpoint, stop
(``stop_after``) or end the run; there it reads the losses of all steps since the previous one at
once and checks them. Between them it queues the next steps without waiting.

Stop and resume: SIGINT/SIGTERM set a flag that all ranks agree on at the next settle step; they
then write a checkpoint and exit. A run whose ``checkpoint.dir`` holds a complete checkpoint
resumes from it: weights, optimizer moments and step counts, schedule, sampler position and every
RNG state, so the continued losses equal the uninterrupted run's. On another mesh (data, sample,
domain or tensor sizes, ZeRO stage or optimizer) the same state is resharded; the data order
depends on the global batch only (``data/sampler.py``), which must stay the same, and the counter-based
streams (weight draws, input noise) on the step; dropout streams, one per rank, start anew.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.process_prefetch import PREFETCHERS
from data.sampler import ReplicaSampler, valid_time_indices
from launch.runtime.distributed import CollectiveTimeout, is_timeout
from launch.runtime.launcher_watch import LauncherWatch
from launch.runtime.rank_inputs import RankInputs, store_attrs
from launch.training.checkpointer import Checkpointer
from launch.training.config import RunConfig, TrainingSection
from launch.training.device_batches import DeviceBatches
from launch.training.metrics_log import MetricsLog
from launch.training.profiling import StepProfiler
from launch.training.step import FINITE, TrainingStep
from launch.training.validation import Validator, validation_indices
from parallel.mesh import ProcessMesh
from weathermixer.counts import training_flops


MAX_SKIPPED_IN_A_ROW = 10  # training.nonfinite_loss = skip stops at this many non-finite steps in a row


def training_sampler(time_indices, mesh: ProcessMesh, seed: int) -> ReplicaSampler:
    """The order of the training times, keyed by the data rank: data ranks read different times,
    the sample ranks of one data rank the same (they differ in their draws, not their data)."""
    return ReplicaSampler(time_indices, replica_rank=mesh.data_rank, num_replicas=mesh.config.data, seed=seed)


def sample_leads(training: TrainingSection, first_step: int) -> Callable[[int], int]:
    """The lead to read the ``k``-th sample of a training stream with: the rollout of the step it is
    used in. The stream comes in whole steps of micro_batch x gradient_accumulation samples
    (``ReplicaSampler.stream``) from ``first_step`` (0, or the step a run resumes at) on, so sample
    ``k`` serves step ``first_step + k // samples_per_step``; a phase of short rollouts then reads
    none of the targets that only the schedule's longest rollout needs."""
    return lambda k: training.rollout_steps(first_step + k // training.samples_per_step)


class Trainer:
    def __init__(self, run: RunConfig, device: torch.device, init_from: str | None = None, quiet: bool = False,
                 resume_from: str | None = None):
        self.run, self.device, self.quiet = run, device, quiet
        self.rank = dist.get_rank()
        self.run_dir = Path(run.checkpoint.dir)
        self.mesh = ProcessMesh.build(run.mesh, device.type)
        store = run.data.store
        self.attrs, _, _ = store_attrs(store)
        self.step_fn = TrainingStep.for_store(run, self.mesh, device)
        self.model = self.step_fn.model
        self.config = self.model.config
        self.inputs = RankInputs(store, self.model, pin_memory=device.type == "cuda")
        reader = self.inputs.reader
        # every training time has the targets of the longest rollout, so that the times drawn do not
        # depend on the rollout schedule (and a step's samples stay the same whatever its rollout)
        train = valid_time_indices(reader.times, run.training.max_rollout, *run.data.train,
                                   step=np.timedelta64(reader.step_hours, "h"))
        self.step_fn.set_training_size(len(train))
        self.sampler = training_sampler(train, self.mesh, run.training.seed)
        indices = validation_indices(self.inputs, run.data.validation, run.logging.validation_samples)
        self.validator = None if indices is None else Validator(self.inputs, self.step_fn.loss_fn, self.attrs, indices)
        self.metrics = MetricsLog(self.run_dir, run.logging.tensorboard, enabled=self.rank == 0)
        self.checkpoints = Checkpointer(self.run_dir, run.checkpoint.keep, self.step_fn, self.metadata)
        self.step = 0
        self._stop_requested = False
        self._watch: LauncherWatch | None = None
        self._phase = "the start of training"
        if init_from is not None:
            self.checkpoints.load_weights(init_from)
        self._resume(resume_from)

    # ---------------------------------------------------------------- the loop
    def train(self, stop_after: int | None = None, profile: tuple[int, int] | None = None) -> dict[str, Any]:
        """Train to ``training.steps``; ``stop_after`` steps of this invocation end it early with a
        checkpoint (for jobs shorter than the run); ``profile=(first, last)`` records those steps."""
        try:
            return self._train(stop_after, profile)
        except RuntimeError as error:  # torch.distributed's DistBackendError among them
            if not is_timeout(error):
                raise
            raise CollectiveTimeout(
                f"rank {self.rank}: {self._phase} did not finish: a collective waited longer than "
                f"training.collective_timeout_seconds = {self.run.training.collective_timeout_seconds:g} s for the "
                f"other ranks (one of them is frozen, has died or cannot be reached); the job ends here, the same "
                f"command resumes from the latest checkpoint") from None
        finally:
            if self._watch is not None:
                self._watch.close()

    def _train(self, stop_after: int | None, profile: tuple[int, int] | None) -> dict[str, Any]:
        run, t = self.run, self.run.training
        self._stop_at = None if stop_after is None else self.step + stop_after
        self._install_signal_handlers()
        self._progress = self._progress_bar()
        self._last: dict[str, Any] = {}
        self._window = (time.perf_counter(), 0)
        # step -> its (loss, nll, kl) and first non-finite channels on the device, and its time
        # indices, since the last settle step
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]] = {}
        self._nonfinite_in_a_row = 0
        self._profiler = (StepProfiler(*profile, self.run_dir / "profile", self.rank, self.device)
                          if profile else None)
        # one stream of time indices over all epochs, each cut to whole steps: the readers read the next
        # epoch's first samples while the current epoch's last steps compute, and no step mixes epochs
        time_indices = self.sampler.stream(samples_per_step=t.samples_per_step)
        # each sample read with the targets of its own step's rollout, not the longest one's
        with PREFETCHERS[run.data.worker_kind](self.inputs.reader, time_indices, sample_leads(t, self.step),
                                               run.data.prefetch, run.data.workers,
                                               max_lead_steps=t.max_rollout) as prefetcher:
            # the next micro-batch crosses to the device while one computes
            batches = DeviceBatches(prefetcher, self.inputs, t.micro_batch, self.device, self.step_fn.dtype)
            while self.step < t.steps:
                if self._train_step(batches):
                    return self._last
        return self._finish()

    def _train_step(self, batches: DeviceBatches) -> bool:
        """One step of ``training.gradient_accumulation`` micro-batches; True when the run stops after it."""
        t = self.run.training
        self._phase = f"step {self.step + 1}"
        if self._profiler is not None:
            self._profiler.step_begins(self.step + 1)
        micro_batches = [next(batches) for _ in range(t.gradient_accumulation)]
        lead = t.rollout_steps(self.step)
        losses, traces = [], []
        for batch in micro_batches:
            losses.append(self.step_fn.micro_step(batch, lead, self.step))
            traces.append(self.step_fn.nonfinite)
        self.step += 1
        self._window = (self._window[0], self._window[1] + 1)
        self._pending[self.step] = (torch.stack(losses).double().mean(dim=0), torch.stack(traces).amin(dim=0),
                                    [batch.time_indices for batch in micro_batches])
        if self._profiler is not None and (written := self._profiler.step_ends(self.step)):
            self._say(f"profile of steps {self._profiler.first}..{self._profiler.last} written to {written[0]} "
                      f"(timeline) and {written[1]} (table)")
        if self._progress is not None:
            self._progress.update(1)
        return self._settle_step(lead, consumed=batches.taken)

    def _settle_step(self, lead: int, consumed: int) -> bool:
        """At settle steps: check the losses, log, validate, checkpoint; True when the run stops here."""
        run, t = self.run, self.run.training
        log_now = self.step % run.logging.every == 0 or self.step == t.steps
        validate_now = self.validator is not None and self.step % run.logging.validate_every == 0
        checkpoint_now = self.step % run.checkpoint.every == 0 or self.step == t.steps
        stop_after_reached = self._stop_at is not None and self.step >= self._stop_at and self.step < t.steps
        if not (log_now or validate_now or checkpoint_now or stop_after_reached):
            return False  # queue the next step without waiting for the device
        loss, nll, kl = self._settle()
        sampler_state = self.sampler.state_dict(consumed)
        if log_now:
            self._log_progress(loss, lead, nll, kl, sampler_state["epoch"])
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{loss:.4f}", rollout=lead, refresh=False)
        if validate_now:
            self._phase = f"the validation at step {self.step}"
            self._validate()
        stop = self._agree_to_stop() or stop_after_reached
        if checkpoint_now or stop:
            self._phase = f"the checkpoint of step {self.step}"
            self.checkpoints.save({"step": self.step, "epoch": sampler_state["epoch"], "sampler": sampler_state})
        if stop:
            self._say(f"stopped at step {self.step}; checkpoint written to {self.checkpoints.folder}; the same "
                      f"command resumes from it")
        return stop

    def _finish(self) -> dict[str, Any]:
        if self._progress is not None:
            self._progress.close()
        if self.validator is not None and self.step % self.run.logging.validate_every != 0:
            self._validate()
        model_file = self.checkpoints.export(self.run_dir / "model.pt")
        self._say(f"trained {self.step} steps; checkpoints in {self.checkpoints.folder}, consolidated model "
                  f"{model_file}, metrics {self.metrics.path}")
        return self._last

    def _log_progress(self, loss: float, lead: int, nll: float, kl: float, epoch: int) -> None:
        """``nll``: the data term of the loss (the weighted MSE, or the CRPS of a ``crps`` run); ``epoch``:
        the one of the step's samples."""
        t = self.run.training
        start, steps = self._window
        elapsed = time.perf_counter() - start
        samples = steps * t.micro_batch * t.gradient_accumulation * self.mesh.config.data  # distinct times
        flops = training_flops(self.config, lead, mode=t.rollout_mode) * t.samples
        self._last = {"step": self.step, "epoch": epoch, "loss": loss, "lr": self.step_fn.scheduler.get_last_lr()[0],
                      "rollout": lead, "samples_per_s": samples / elapsed,
                      "tflops_per_rank": samples * flops / elapsed / 1e12 / dist.get_world_size()}
        if t.loss == "crps":
            self._last["crps"] = nll
        elif self.config.is_bayesian:
            self._last["nll"] = nll
        if self.config.is_bayesian:
            self._last["kl"] = kl
        self.metrics.write(self._last)
        self._window = (time.perf_counter(), 0)

    def _validate(self) -> None:
        self.metrics.write({"step": self.step, **self.validator(self.model, self.step_fn.dtype)})

    # ---------------------------------------------------------------- resume and metadata
    def _resume(self, source: str | None) -> None:
        state = self.checkpoints.resume(source)
        if state is None or state.get("sampler") is None:  # nothing, or the weights alone of an old checkpoint
            return
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.metrics.forget_after(self.step)  # the rows of steps after the checkpoint come again
        if state["resharded"]:
            m = state["mesh"]
            self._say(f"resumed from {state['folder']} at step {self.step}, resharded from mesh data={m['data']} "
                      f"sample={m['sample']} domain={m['domain'][0]}x{m['domain'][1]} tensor={m['tensor']} to "
                      f"{self.mesh.describe()}: weights, optimizer moments, schedule and sampler position carried "
                      f"over; dropout streams start anew")
        else:
            self._say(f"resumed from {state['folder']} at step {self.step}")

    def metadata(self) -> dict[str, Any]:
        """What makes a checkpoint self-describing (read by forecasting and resuming)."""
        a = self.attrs
        return {
            "model_config": self.config.to_dict(),
            "mesh": self.mesh.config.to_json(),
            "channels": [ch.to_json() for ch in a.channels],
            "static_channels": list(a.static_channels),
            "time_step_hours": a.time_step_hours,
            "normalization": {"mean": a.mean, "std": a.std, "static_mean": a.static_mean, "static_std": a.static_std},
            "store": str(self.run.data.store),
            "store_fingerprint": a.fingerprint(),
            "step": self.step,
            "run_config": self.run.to_dict(),
        }

    # ---------------------------------------------------------------- plumbing
    def _install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM, and the launcher above this rank exiting (DeepSpeed's runner forwards
        no signal), ask for a stop with a checkpoint at the next settle step."""
        def request_stop(signum, frame):
            self._stop_requested = True

        def launcher_gone(pid: int, command: str) -> None:
            self._stop_requested = True
            if self.rank == 0:
                print(f"the launcher {command!r} (pid {pid}) has exited; stopping with a checkpoint at the next "
                      f"settle step", file=sys.stderr, flush=True)

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, request_stop)
        self._watch = LauncherWatch(launcher_gone)

    def _settle(self) -> tuple[float, float, float]:
        """The replica-mean ``(loss, nll, kl)`` of the latest pending step, after checking every pending step's.

        One all-reduce and one device->host copy for all steps since the last settle step (the
        only place the loop waits for the device). Every rank sees the same values, so all apply
        the ``training.nonfinite_loss`` policy together, before this step validates or writes a
        checkpoint."""
        losses = torch.stack([loss for loss, _, _ in self._pending.values()])
        group = self.mesh.replica_group
        if group is not None:
            dist.all_reduce(losses, group=group)
            losses /= self.mesh.replicas
        values = losses.tolist()
        bad = []
        for step, (loss, _, _) in zip(self._pending, values):
            if math.isfinite(loss):
                self._nonfinite_in_a_row = 0
            else:
                bad.append((step, loss))
                self._nonfinite_in_a_row += 1
        if bad:
            self._nonfinite(bad)
        self._pending = {}
        return values[-1]

    def _nonfinite(self, bad: list[tuple[int, float]]) -> None:
        """Name where each non-finite loss comes from (step, rank, channel), then stop or skip."""
        traces = {step: (self._pending[step][1].tolist(), self._pending[step][2]) for step, _ in bad}
        reports = [None] * dist.get_world_size()
        m = self.mesh
        dist.all_gather_object(reports, (f"rank {self.rank} (data {m.data_rank}, sample {m.sample_rank}, domain "
                                         f"{m.domain_rank}, tensor {m.tensor_rank})", traces))
        messages = [self._describe_nonfinite(step, loss, reports) for step, loss in bad]
        policy = self.run.training.nonfinite_loss
        if policy == "stop" or self._nonfinite_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            why = ("training.nonfinite_loss = stop; 'skip' leaves such steps out" if policy == "stop" else
                   f"{self._nonfinite_in_a_row} steps in a row: the run diverged")
            raise FloatingPointError(f"{messages[0]}; stopping before the next checkpoint ({why})")
        if self.rank == 0:
            for message in messages:
                print(f"warning: {message}; the step's update was left out (training.nonfinite_loss = skip)",
                      file=sys.stderr, flush=True)

    def _describe_nonfinite(self, step: int, loss: float, reports: list) -> str:
        """Where the non-finite loss of ``step`` comes from: the ranks whose inputs or targets hold
        NaN or Inf (their channel, the samples' times), else those whose predictions do (the
        model diverged; a NaN in one tile reaches every tile's prediction)."""
        names, times = self.attrs.channel_names, self.inputs.reader.times
        data, predictions = [], []
        for where, traces in reports:
            (inputs, targets, outputs), batches = traces[step]
            when = ", ".join(str(times[i])[:16] for indices in batches for i in indices)
            if min(inputs, targets) < FINITE:
                what, channel = ("inputs", inputs) if inputs < FINITE else ("targets", targets)
                data.append(f"{where}: the {what} of channel {names[channel]} hold NaN or Inf (samples at {when})")
            elif outputs < FINITE:
                predictions.append(f"{where}: the prediction of channel {names[outputs]} is not finite while the "
                                   f"inputs and targets are (the weights or activations diverged: lower optimizer.lr)")
        found = data or predictions or ["every rank's inputs, targets and predictions are finite (the loss overflowed)"]
        more = f"; {len(found) - 3} more ranks" if len(found) > 3 else ""
        return f"step {step}: the training loss is {loss}; " + "; ".join(found[:3]) + more

    def _agree_to_stop(self) -> bool:
        """True on every rank when any rank was asked to stop (every rank reaches the same settle steps)."""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _progress_bar(self):
        if self.rank != 0 or self.quiet:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.run.training.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _say(self, message: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(message, flush=True)
