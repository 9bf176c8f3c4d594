"""The training loop behind `microturn train`.

    run = TrainingRun(loaded, examples, LoopConfig(steps=300), out_dir, validation=scenarios)
    history = run.train()

One optimizer step: `accumulate` batches (each `batch_size` sequences, batched by length),
their summed token NLL divided by the step's token count, one backward each, clipping, AdamW
at the step's learning rate (linear warmup, then cosine down to `min_lr_ratio`). The forward is
the engine's own model code with deterministic kernels (the sampler's bits). LoRA by default
(`lora.py`: only A and B learn), or every weight with `full`; the front-end learns too with
`train_frontend`, and the timeline markers' embedding rows with `train_markers`
(`marker_rows.py`: a marker the base never trained can tie with unused tokens). Weights the
model holds in bf16 (the front-end, a full fine-tune) learn as fp32 masters
(`master_weights.py`), since AdamW's small steps round away on a bf16 weight.

`out_dir` holds `checkpoint.safetensors` (trainable weights, optimizer state, step, data
position: a resumed run continues bit for bit), `history.json`, the final artifact
(`adapter.safetensors`, or `model.safetensors` for a full fine-tune), `training.png`, and with
validation `best-adapter.safetensors` (`best-model…`): the artifact at the validation with the
highest mean family pass rate, since a run that moves one behaviour can lose another.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from microturn.checkpoint.adapter import LoRAConfig, read_adapter
from microturn.checkpoint.loader import LoadedModel
from microturn.errors import MicroturnError
from microturn.eval.scenario import Scenario
from microturn.train.data import Examples, Position, batches_from, tokens_in, training_batch
from microturn.train.logprobs import sequence_logprobs
from microturn.train.lora import add_lora, load_adapter, lora_modules, save_adapter
from microturn.train.marker_rows import add_marker_rows, marker_rows
from microturn.train.master_weights import MasterWeights
from microturn.train.run_checkpoint import read_checkpoint, restore, write_checkpoint
from microturn.train.validate import Validation, validate

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 4
    accumulate: int = 1  # batches per optimizer step
    lr: float = 2e-4
    warmup: int = 20  # steps of linear warmup
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0  # data order
    deterministic: bool = True  # the sampler's kernels: trainer = sampler, bitwise
    full: bool = False  # every weight learns (no adapter)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train_frontend: bool = False
    frontend_lr_scale: float = 1.0  # the front-end's lr is this times the schedule's
    train_markers: bool = False  # the markers' embedding rows (tied: their logits too)
    validate_every: int = 0  # steps; 0: only at the end (when there are validation scenarios)
    checkpoint_every: int = 50
    moment_weight: float = 1.0  # loss weight of the slices where a behaviour is decided
    init_adapter: str | None = None  # start from this adapter instead of a fresh one

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulate", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise MicroturnError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise MicroturnError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.validate_every < 0:
            raise MicroturnError("warmup and validate_every must be >= 0")
        if not 1.0 <= self.moment_weight <= 100.0:
            raise MicroturnError(f"moment_weight must be in [1, 100], got {self.moment_weight}")
        if self.full and self.train_markers:
            raise MicroturnError("train_markers: a full fine-tune trains every row already")
        if not 0 < self.frontend_lr_scale <= 100:
            raise MicroturnError(f"frontend_lr_scale must be in (0, 100], got "
                                 f"{self.frontend_lr_scale}")
        if self.frontend_lr_scale != 1.0 and not self.train_frontend:
            raise MicroturnError("frontend_lr_scale: only with train_frontend")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MicroturnError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def learning_rate(config: LoopConfig, step: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr * min_lr_ratio."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    low = config.lr * config.min_lr_ratio
    return low + (config.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepRecord:
    step: int  # steps done after this one
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # sequence tokens processed (padding excluded)
    seconds: float


class TrainingRun:
    def __init__(self, loaded: LoadedModel, examples: Examples, config: LoopConfig,
                 out_dir: str | Path, validation: list[Scenario] | None = None,
                 progress: bool = True, log_every: int = 0):
        self.loaded, self.examples, self.config = loaded, examples, config
        self.out_dir = Path(out_dir)
        self.validation, self.show_progress = validation or [], progress
        self.log_every = log_every
        model = loaded.model
        needs_frontend = config.train_frontend or any(
            sc.has_audio or sc.has_video for sc in self.validation) or _has_media(examples)
        self.frontend = loaded.load_frontend() if needs_frontend else None
        if config.full:
            model.requires_grad_(True)
        elif not lora_modules(model):
            add_lora(model, config.lora)
        if config.train_markers and marker_rows(model) is None:
            m = loaded.markers
            add_marker_rows(model, [m.input_start, m.output_start, m.silence, m.end_of_slice])
        if self.frontend is not None:
            self.frontend.requires_grad_(config.train_frontend)
        if config.init_adapter is not None:
            self._start_from(Path(config.init_adapter))
        self.weights = MasterWeights(self._trainable())
        self.params = self.weights.params  # what the optimizer steps and checkpoints hold
        if not self.params:
            raise MicroturnError("training: nothing to train")
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.step, self.position = 0, Position()
        self.history: list[StepRecord] = []
        self.validations: list[Validation] = []
        self.artifact: Path | None = None

    # -- the loop ------------------------------------------------------------------------------

    def train(self, resume: bool = True, stop_after: int | None = None) -> list[StepRecord]:
        """Up to `config.steps`, or only up to `stop_after` of them (the schedule still spans
        `steps`: the run stops there as a checkpoint would, and goes on when run again)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.out_dir / CHECKPOINT).is_file():
            self.load(self.out_dir / CHECKPOINT)
        c = self.config
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        stream = batches_from(self.examples, c.batch_size, c.seed, self.position)
        with _Progress(self.show_progress, end, self.step, self.log_every) as bar:
            while self.step < end:
                record = self._optimizer_step(stream)
                self.history.append(record)
                bar.update(record)
                if c.validate_every and self.step % c.validate_every == 0 and self.validation:
                    self._validate_and_keep_best()
                    bar.note(self.validations[-1])
                if self.step % c.checkpoint_every == 0 or self.step == end:
                    self.save(self.out_dir / CHECKPOINT)
        if self.validation and (not self.validations or self.validations[-1].step != self.step):
            self._validate_and_keep_best()
        self.artifact = self.save_artifact()
        self._write_history()
        plot_history(self.history, self.validations, self.out_dir / "training.png")
        return self.history

    def _optimizer_step(self, stream) -> StepRecord:
        c, started = self.config, time.perf_counter()
        lr = learning_rate(c, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches = []
        for _ in range(c.accumulate):
            self.position, indices = next(stream)
            batches.append(training_batch([self.examples.export(i) for i in indices],
                                          c.moment_weight))
        counted = sum(float(b.weights().sum()) for b in batches)
        if counted == 0:
            raise MicroturnError(f"step {self.step}: no token is selected for the loss")
        self.loaded.model.train()
        total = 0.0
        for batch in batches:
            logprobs = sequence_logprobs(self.loaded.model, batch.token_ids, c.deterministic,
                                         self.frontend, batch.audio, batch.patches,
                                         batch.windows)
            loss = -(logprobs * batch.weights()).sum() / counted
            loss.backward()
            total += float(loss.detach())
        self.weights.take_grads()
        params = list(self.params.values())
        norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.write()
        self.step += 1
        return StepRecord(self.step, total, lr, norm, sum(tokens_in(b) for b in batches),
                          time.perf_counter() - started)

    def run_validation(self) -> Validation:
        return validate(self.loaded, self.validation, self.step)

    @property
    def best(self) -> Validation | None:
        """The validation with the highest mean family pass rate (the latest of equals)."""
        return max(reversed(self.validations), key=lambda v: v.macro, default=None)

    def _validate_and_keep_best(self) -> None:
        self.validations.append(self.run_validation())
        if self.best is self.validations[-1]:
            self.save_artifact(best=True)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Trainable weights, optimizer state, step and data position, in one file (written
        beside and renamed, so an interrupted save leaves the last checkpoint whole)."""
        metadata = {"step": str(self.step), "epoch": str(self.position.epoch),
                    "batch": str(self.position.batch), "config": self.config.to_json(),
                    "history": json.dumps([asdict(r) for r in self.history]),
                    "validations": json.dumps([asdict(v) for v in self.validations])}
        write_checkpoint(path, self.params, self.optimizer, metadata)

    def load(self, path: Path) -> None:
        tensors, metadata = read_checkpoint(path)
        saved = json.loads(metadata["config"])
        ours = json.loads(json.dumps(asdict(self.config)))
        default = json.loads(json.dumps(asdict(LoopConfig())))  # a key older files lack
        for key in ("full", "lora", "train_frontend", "train_markers", "frontend_lr_scale"):
            if saved.get(key, default[key]) != ours[key]:
                raise MicroturnError(f"{path}: checkpoint was trained with {key}="
                                     f"{saved.get(key, default[key])}, this run has "
                                     f"{key}={ours[key]}")
        restore(path, tensors, metadata, self.params, self.optimizer)
        self.weights.write()
        self.step = int(metadata["step"])
        self.position = Position(int(metadata["epoch"]), int(metadata["batch"]))
        self.history = [StepRecord(**r) for r in json.loads(metadata["history"])]
        self.validations = [Validation(**v) for v in json.loads(metadata["validations"])]

    def artifact_path(self, best: bool = False) -> Path:
        name = "model.safetensors" if self.config.full else "adapter.safetensors"
        return self.out_dir / (f"best-{name}" if best else name)

    def save_artifact(self, best: bool = False) -> Path:
        """What serving loads: the adapter (small), or the whole model for a full run."""
        path = self.artifact_path(best)
        if self.config.full:
            named = dict(self.loaded.model.named_parameters())
            if self.frontend is not None and self.config.train_frontend:
                named |= {f"frontend.{n}": p for n, p in self.frontend.named_parameters()}
            save_file({n: p.detach().contiguous() for n, p in named.items()}, str(path),
                      {"format": "microturn-full", "step": str(self.step)})
            return path
        save_adapter(path, self.loaded.model, self.config.lora,
                     self.frontend if self.config.train_frontend else None,
                     {"step": str(self.step), "clock": str(self.loaded.clock).lower(),
                      "clock_both_lanes": str(self.loaded.clock_both_lanes).lower()})
        return path

    def _start_from(self, path: Path) -> None:
        """A run that goes on from a trained adapter (a new data mix or schedule): its A, B
        and front-end become this run's starting point (a higher rank here grows it:
        `load_adapter`)."""
        if self.config.full:
            raise MicroturnError("init_adapter: a full fine-tune starts from the base weights")
        saved, _, _ = read_adapter(path)
        ours = self.config.lora
        if saved.targets != ours.targets or saved.rank > ours.rank:
            raise MicroturnError(f"init_adapter: {path} has rank {saved.rank} on "
                                 f"{','.join(saved.targets)}, this run rank {ours.rank} on "
                                 f"{','.join(ours.targets)} (the same targets, a rank as "
                                 f"high or higher)")
        load_adapter(path, self.loaded.model,
                     self.frontend if self.config.train_frontend else None)

    def _param_groups(self) -> list[dict]:
        """One group, or with a front-end lr scale the front-end's weights in a second."""
        scale = self.config.frontend_lr_scale
        if scale == 1.0:
            return [{"params": list(self.params.values())}]
        front = [n.startswith("frontend.") for n in self.params]
        params = list(self.params.values())
        return [{"params": [p for p, f in zip(params, front, strict=True) if not f]},
                {"params": [p for p, f in zip(params, front, strict=True) if f],
                 "lr_scale": scale}]

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        out = {n: p for n, p in self.loaded.model.named_parameters() if p.requires_grad}
        if self.frontend is not None and self.config.train_frontend:
            out |= {f"frontend.{n}": p for n, p in self.frontend.named_parameters()}
        return out

    def _write_history(self) -> None:
        (self.out_dir / "history.json").write_text(json.dumps(
            {"steps": [asdict(r) for r in self.history],
             "validations": [asdict(v) for v in self.validations],
             "best_step": self.best.step if self.best else None}, indent=1))


def _has_media(examples: Examples) -> bool:
    targets = getattr(examples, "targets", None)
    if targets is not None:
        return any(t.scenario.has_audio or t.scenario.has_video for t in targets)
    return any("layout" in examples.export(i) for i in range(min(len(examples), 64)))


class _Progress:
    """A rich progress bar with loss and tokens/s; without a terminal (a background run's
    log), one plain line every `log_every` steps instead (0: silent, as in tests)."""

    def __init__(self, enabled: bool, total: int, done: int, log_every: int = 0):
        self.enabled, self.total, self.done = enabled, total, done
        self.log_every = log_every
        self.tokens, self.seconds = 0, 0.0

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"),
                                TextColumn("{task.fields[speed]} tok/s"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done,
                                          loss="-", speed="-")
        return self

    def update(self, record: StepRecord) -> None:
        self.tokens += record.tokens
        self.seconds += record.seconds
        if self.enabled:
            self.bar.update(self.task, completed=record.step, loss=f"{record.loss:.4f}",
                            speed=f"{self.tokens / self.seconds:.0f}")
        elif self.log_every and record.step % self.log_every == 0:
            print(f"step {record.step}/{self.total} loss {record.loss:.4f} lr {record.lr:.2e} "
                  f"grad-norm {record.grad_norm:.2f} {self.tokens / self.seconds:.0f} tok/s",
                  file=sys.stderr, flush=True)

    def note(self, validation: Validation) -> None:
        rates = ", ".join(f"{f} {r:.0%}" for f, r in sorted(validation.pass_rate.items()))
        line = (f"step {validation.step}: validation {validation.overall:.0%}, family mean "
                f"{validation.macro:.0%} ({rates})")
        if self.enabled:
            self.bar.console.print(line)
        elif self.log_every:
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()


def plot_history(history: list[StepRecord], validations: list[Validation],
                 path: Path) -> Path | None:
    """Loss (and validation pass rates) against steps; None where matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = 2 if validations else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes[0][0].plot([r.step for r in history], [r.loss for r in history])
    axes[0][0].set(xlabel="step", ylabel="loss (mean token NLL)", yscale="log")
    if validations:
        for family in sorted({f for v in validations for f in v.pass_rate}):
            points = [(v.step, v.pass_rate[family]) for v in validations if family in v.pass_rate]
            axes[0][1].plot(*zip(*points, strict=True), marker="o", label=family)
        axes[0][1].set(xlabel="step", ylabel="validation pass rate", ylim=(0, 1.05))
        axes[0][1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
