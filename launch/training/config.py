"""The training run configuration: one YAML file, validated before any work starts.

Sections: ``model`` (a preset plus field overrides), ``mesh``, ``data``, ``optimizer``,
``schedule``, ``training``, ``checkpoint``, ``logging`` and ``deepspeed`` (a JSON file in
``configs/deepspeed/``). Command-line overrides use dotted keys: ``--set optimizer.lr=3e-4``
(values are parsed as YAML, so ``--set mesh.domain=[2,1]`` works). Errors name the key and
the expected value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from parallel.mesh import MeshConfig
from weathermixer.config import PRESETS, ConfigError, ModelConfig, preset

REPO_ROOT = Path(__file__).resolve().parents[2]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    preset: str = "demo"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; expected one of {sorted(PRESETS)}")
        return value

    def build(self) -> ModelConfig:
        """The preset with overrides; grid and channel counts are later taken from the store."""
        return preset(self.preset, **{k: tuple(v) if k == "patch" else v for k, v in self.overrides.items()})


class DataSection(Section):
    store: str
    train: tuple[str, str]  # inclusive ISO dates/times
    validation: tuple[str, str] | None = None
    prefetch: int = Field(2, ge=1)  # samples read ahead (held in host memory)
    workers: int = Field(1, ge=1)  # readers; a 0.25 deg tile of one rank needs several
    # "thread": reader threads in the rank's process; "process": reader processes that read into
    # data.prefetch shared page-locked slots (data.process_prefetch; at least micro_batch + workers):
    # they scale with the host's cores, threads stop at about four busy cores (benchmarks/READER.md)
    worker_kind: Literal["thread", "process"] = "thread"

    @model_validator(mode="after")
    def _workers_fit(self) -> "DataSection":
        if self.workers > self.prefetch:
            raise ValueError(f"data.workers = {self.workers} exceeds data.prefetch = {self.prefetch}: each worker "
                             f"reads one of the prefetched samples; raise data.prefetch to at least {self.workers}")
        return self

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _iso_text(cls, period):
        """YAML reads an unquoted 2020-01-01 as a date: keep it as its ISO text."""
        if isinstance(period, (list, tuple)):
            return [item.isoformat() if hasattr(item, "isoformat") else item for item in period]
        return period


class OptimizerSection(Section):
    lr: float = Field(1e-4, gt=0)  # mixer blocks
    embedding_lr: float = Field(2e-5, gt=0)  # patch embedding and patch recovery (paper)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    # bf16 parameters whose float32 master weights and moments the optimizer keeps and updates in
    # one pass (launch.training.master_weights); DeepSpeed in float32 at ZeRO stage 0 (fp32.json)
    master_weights: bool = False


class ScheduleSection(Section):
    warmup_steps: int = Field(100, ge=0)
    decay: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class RolloutStage(Section):
    from_step: int = Field(0, ge=0)
    steps: int = Field(1, ge=1)


class TrainingSection(Section):
    steps: int = Field(ge=1)
    micro_batch: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    rollout: list[RolloutStage] = Field(default_factory=lambda: [RolloutStage()])
    rollout_mode: Literal["autoregressive", "latent"] = "autoregressive"
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss_weights: Literal["default", "uniform"] = "default"
    compile: bool = False  # torch.compile the training rollout and the loss (launch.runtime.compile)
    # the sampling axis: Monte Carlo samples per step, spread evenly over the mesh's sample ranks
    # (every sample rank of a data rank sees the same batch, with its own weight draws and noise)
    samples: int = Field(1, ge=1)
    kl_weight: float = Field(1.0, ge=0)  # beta ("heat"): loss = mse + kl_weight * KL / (times x values per time)
    input_noise: float = Field(0.0, ge=0)  # per-sample input noise, a fraction of each channel's ...
    # ... std ("std") or 6-hour tendency std ("tendency": each channel perturbed as much as it changes in a step)
    input_noise_scale: Literal["std", "tendency"] = "std"
    # "mse": each sample's weighted MSE (the NLL); "crps": the samples are ensemble members scored
    # together by the almost fair CRPS (crps_alpha = 1: fair; anemoi's default 0.95)
    loss: Literal["mse", "crps"] = "mse"
    crps_alpha: float = Field(0.95, ge=0, le=1)
    # the longest a collective may wait for the other ranks: a frozen or unreachable rank ends the
    # job after this long with a message naming the step (torch's and DeepSpeed's default: 30 min)
    collective_timeout_seconds: float = Field(300.0, gt=0)
    # a NaN or Inf loss: "stop" the run before its next checkpoint, or "skip" the step (the
    # optimizer leaves out an update of non-finite gradients) and go on; both name the step, the
    # rank and the channel. Ten such steps in a row stop a skipping run too (it diverged)
    nonfinite_loss: Literal["stop", "skip"] = "stop"

    @field_validator("rollout")
    @classmethod
    def _ordered(cls, stages: list[RolloutStage]) -> list[RolloutStage]:
        if not stages or stages[0].from_step != 0:
            raise ValueError("the first rollout stage must start at from_step 0")
        starts = [s.from_step for s in stages]
        if starts != sorted(set(starts)):
            raise ValueError(f"rollout stages must have increasing from_step, got {starts}")
        return stages

    def rollout_steps(self, step: int) -> int:
        return [s.steps for s in self.rollout if s.from_step <= step][-1]

    @property
    def max_rollout(self) -> int:
        return max(s.steps for s in self.rollout)

    @property
    def samples_per_step(self) -> int:
        """Training samples one data replica reads per optimizer step."""
        return self.micro_batch * self.gradient_accumulation


class CheckpointSection(Section):
    dir: str = "outputs/run"
    every: int = Field(100, ge=1)
    keep: int = Field(3, ge=1)


class LoggingSection(Section):
    # also the most steps between two waits of the host for the device: the trainer reads (and
    # checks) the losses and agrees on a SIGINT/SIGTERM stop only at steps that log, validate,
    # checkpoint or end the run, so a stop request takes effect within `every` steps
    every: int = Field(10, ge=1)
    validate_every: int = Field(100, ge=1)
    validation_samples: int = Field(8, ge=1)
    tensorboard: bool = True


class RunConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    mesh: MeshConfig = Field(default_factory=MeshConfig)  # parallel.mesh's own, validated as it validates
    data: DataSection
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    training: TrainingSection
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    deepspeed: str = "configs/deepspeed/zero1.json"
    deepspeed_overrides: dict[str, Any] = Field(default_factory=dict)  # merged into the JSON, e.g. {bf16: {enabled: false}}

    @model_validator(mode="after")
    def _buildable(self) -> "RunConfig":
        try:
            self.model.build()
        except (ConfigError, ValueError) as error:
            raise ValueError(str(error)) from None
        if self.optimizer.master_weights:
            self._check_master_weights(self.deepspeed_config())
        self._check_samples()
        if self.training.nonfinite_loss == "skip":
            self._check_nonfinite_policy(self.deepspeed_config())
        if self.data.worker_kind == "process" and self.data.prefetch < self.training.micro_batch + self.data.workers:
            raise ValueError(f"data.prefetch = {self.data.prefetch} with data.worker_kind = 'process': a micro-batch "
                             f"holds {self.training.micro_batch} of the prefetched samples' slots until it is on the "
                             f"device, so the {self.data.workers} reader processes need free ones to read ahead; set "
                             f"data.prefetch >= training.micro_batch + data.workers = "
                             f"{self.training.micro_batch + self.data.workers}")
        return self

    def _check_samples(self) -> None:
        t, sample_ranks, model = self.training, self.mesh.sample, self.model.build()
        if t.loss == "crps" and t.samples < 2:
            raise ValueError(f"training.loss = 'crps' scores an ensemble: training.samples = {t.samples}, expected "
                             f"at least 2 members")
        if t.samples % sample_ranks:
            raise ValueError(f"training.samples = {t.samples} does not divide over mesh.sample = {sample_ranks} "
                             f"sample ranks; expected a multiple of {sample_ranks}")
        if t.samples > 1 and not model.is_bayesian and t.input_noise == 0:
            raise ValueError(f"training.samples = {t.samples} with a deterministic model and no input noise: every "
                             f"sample would be the same; set model.overrides.bayesian (e.g. all) or "
                             f"training.input_noise > 0, or use mesh.data for data parallelism")
        if model.is_bayesian and model.activation_checkpointing and t.samples // sample_ranks > 1:
            raise ValueError(f"model.activation_checkpointing recomputes a forward in its backward with the weight "
                             f"draw of the last sample; with training.samples / mesh.sample = "
                             f"{t.samples // sample_ranks} samples per rank expected 1 (raise mesh.sample)")

    def _check_nonfinite_policy(self, config: dict[str, Any]) -> None:
        """Skipping a step needs an optimizer that leaves out non-finite gradients: DeepSpeed's
        ZeRO 1/2 and bf16/fp16 optimizers do; at ZeRO stage 0 the clip inside the fused step does."""
        precision = any(config.get(key, {}).get("enabled", False) for key in ("bf16", "bfloat16", "fp16"))
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if stage == 0 and not precision and float(config.get("gradient_clipping", 0.0)) <= 0:
            raise ValueError(f"training.nonfinite_loss = 'skip' at ZeRO stage 0 without DeepSpeed's bf16: the "
                             f"optimizer skips a non-finite update only inside its gradient clipping, but the "
                             f"DeepSpeed config {self.deepspeed} sets gradient_clipping = "
                             f"{config.get('gradient_clipping', 0.0)}; set it > 0 (e.g. 1.0) or use 'stop'")

    def _check_master_weights(self, config: dict[str, Any]) -> None:
        """optimizer.master_weights owns the precision: DeepSpeed must neither cast the model nor
        wrap the optimizer (its own bf16/fp16 optimizers, autocast, ZeRO partitions)."""
        clashes = [f"{key}.enabled" for key in ("bf16", "bfloat16", "fp16", "torch_autocast")
                   if config.get(key, {}).get("enabled", False)]
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if stage != 0:
            clashes.append(f"zero_optimization.stage = {stage}")
        if clashes:
            raise ValueError(f"optimizer.master_weights = true keeps the bf16 parameters' float32 master weights "
                             f"itself, but the DeepSpeed config {self.deepspeed} sets {', '.join(clashes)}; use "
                             f"deepspeed: configs/deepspeed/fp32.json (ZeRO stage 0, no bf16 section)")

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed JSON with batch sizes and clipping taken from this run."""
        path = Path(self.deepspeed)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RunConfigError(f"deepspeed = {self.deepspeed!r}: cannot read the DeepSpeed JSON ({error})") from None
        _merge(config, self.deepspeed_overrides)
        config["train_micro_batch_size_per_gpu"] = self.training.micro_batch
        config["gradient_accumulation_steps"] = self.training.gradient_accumulation
        config.pop("train_batch_size", None)
        config.setdefault("zero_allow_untested_optimizer", True)  # our torch Adam with per-group learning rates
        if self.optimizer.master_weights:  # average the replicas' bf16 gradients in float32
            config.setdefault("communication_data_type", "fp32")
        return config

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class RunConfigError(ValueError):
    """A run configuration that cannot work; the message names the key and what was expected."""


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """``section.key=value`` into the nested dict (the value parsed as YAML)."""
    if "=" not in assignment:
        raise RunConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optimizer.lr=3e-4")
    key, text = assignment.split("=", 1)
    *path, last = key.strip().split(".")
    node = values
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RunConfigError(f"--set {key}: {part} is not a section")
    node[last] = yaml.safe_load(text)


def load_run_config(path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None
                    ) -> RunConfig:
    """Read, override and validate a run config; raises :class:`RunConfigError` naming the key."""
    if values is None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise RunConfigError(f"run config {path}: cannot be read ({error})") from None
        except yaml.YAMLError as error:
            raise RunConfigError(f"run config {path}: not valid YAML ({error})") from None
    for assignment in overrides:
        apply_override(values, assignment)
    try:
        return RunConfig.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<top>'}: {e['msg']}"
                             + (f" (got {e['input']!r})" if e['type'] not in ('missing',) and not isinstance(
                                 e.get('input'), dict) else "") for e in error.errors())
        raise RunConfigError(f"run config {path or '<dict>'}: {problems}") from None
