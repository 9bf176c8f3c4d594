"""On-policy training behind `microturn train --rl`: GRPO on the benchmark's own metrics.

    run = RLRun(loaded, RLConfig(steps=100), out_dir, parent=adapter_path)
    run.train()

One step:

1. draw `scenarios` train-split scenarios (a function of seed and step: a resumed run draws
   the same), each `group` times;
2. stream them all through the real engine at once (the model as served: adapters merged),
   sampled at `temperature`; every session's export carries the policy log-probabilities;
3. score each rollout per slice (`reward.py`) and credit each slice group-relatively
   (`advantage.py`);
4. for every rollout with credit: the trainer's forward on it, the on-policy check (in
   deterministic mode every ratio is exactly 1.0, or the step stops with an error), the
   clipped surrogate plus KL to the reference (`objective.py`), one backward; then clipping
   and one AdamW step.

The model being trained carries a fresh LoRA on top of whatever was merged into it at load
(the shipped interaction model by default), so the reference is that model with this run's
adapter off. `out_dir` holds `checkpoint.safetensors` (adapter, optimizer, step, history),
`history.json`, `adapter.safetensors` (saved with its parent's path: `apply_adapter` merges
the parent first) and `rl.png` (reward and pass rate per step).
"""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from microturn.checkpoint.adapter import LoRAConfig
from microturn.checkpoint.loader import LoadedModel
from microturn.errors import MicroturnError
from microturn.eval.generator import FAMILIES, generate
from microturn.eval.micro_turn import MicroTurnSettings, run_micro_turn
from microturn.eval.scenario import Scenario
from microturn.rl.advantage import group_advantages
from microturn.rl.objective import clipped_objective, policy_logprobs, rollout_tokens
from microturn.rl.reward import RewardWeights, slice_rewards
from microturn.train.data import in_a_room
from microturn.train.lora import adapters_off, add_lora, lora_modules, save_adapter, serving
from microturn.train.run_checkpoint import read_checkpoint, restore, write_checkpoint
from microturn.train.validate import Validation, kv_budget_mb, validate

CHECKPOINT = "checkpoint.safetensors"
RL_SEED = 500_000  # rollout scenarios draw seeds from here: apart from SFT's and validation's


@dataclass(frozen=True)
class RLConfig:
    steps: int = 100
    scenarios: int = 4  # distinct scenarios per step
    group: int = 4  # rollouts of each
    temperature: float = 1.0
    lr: float = 5e-5
    warmup: int = 5
    clip: float = 0.2
    kl_weight: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    families: tuple[str, ...] = ()  # () = every family
    family_weights: dict[str, int] = field(default_factory=dict)
    in_a_room: float = 0.0
    max_output_tokens: int = 4
    deterministic: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    checkpoint_every: int = 10
    validate_every: int = 0
    rewards: RewardWeights = field(default_factory=RewardWeights)

    def __post_init__(self):
        for name in ("steps", "scenarios", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise MicroturnError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group < 2:
            raise MicroturnError(f"group must be >= 2 (rollouts are compared within a group), "
                                 f"got {self.group}")
        if not 0 < self.temperature <= 2:
            raise MicroturnError(f"temperature must be in (0, 2] (on-policy training samples),"
                                 f" got {self.temperature}")
        if not self.lr > 0 or not 0 < self.clip < 1 or self.kl_weight < 0:
            raise MicroturnError("lr must be > 0, clip in (0, 1), kl_weight >= 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class RLStep:
    step: int  # steps done after this one
    reward: float  # mean total reward of the step's rollouts
    passed: float  # share of rollouts whose verdict passed
    by_family: dict[str, float]  # pass rate per family
    kl: float  # mean k3 KL per credited token
    ratio_deviation: float  # max |ratio - 1| (0.0: on-policy, bit for bit)
    tokens: int  # credited tokens
    rollouts: int
    learned_from: int  # rollouts with credit (the rest had zero advantage)
    grad_norm: float
    lr: float
    rollout_seconds: float
    update_seconds: float


class RLRun:
    def __init__(self, loaded: LoadedModel, config: RLConfig, out_dir: str | Path,
                 parent: Path | None = None, validation: list[Scenario] | None = None,
                 log_every: int = 1, progress: bool = True,
                 source: Callable[[int], list[Scenario]] | None = None):
        """`source(step)`: the step's scenarios (default: train-split draws, `_pool`)."""
        self.loaded, self.config, self.out_dir = loaded, config, Path(out_dir)
        self.source = source or self._pool
        self.parent, self.validation = parent, validation or []
        self.log_every, self.show_progress = log_every, progress
        model = loaded.model
        if lora_modules(model):
            raise MicroturnError("rl: the model already carries a trainer's adapter")
        add_lora(model, config.lora)
        self.frontend = None  # loaded with the first rollout that has audio or video
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr,
                                           weight_decay=0.0)
        self.step = 0
        self.history: list[RLStep] = []
        self.validations: list[Validation] = []
        self.artifact: Path | None = None

    # -- the loop ------------------------------------------------------------------------------

    def train(self, resume: bool = True) -> list[RLStep]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.out_dir / CHECKPOINT).is_file():
            self.load(self.out_dir / CHECKPOINT)
        c = self.config
        with _Progress(self.show_progress, c.steps, self.step, self.log_every) as bar:
            while self.step < c.steps:
                self.history.append(self.one_step())
                bar.update(self.history[-1])
                if c.validate_every and self.step % c.validate_every == 0 and self.validation:
                    self.validations.append(validate(self.loaded, self.validation, self.step))
                    bar.note(self.validations[-1])
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.save(self.out_dir / CHECKPOINT)
        if self.validation and (not self.validations or self.validations[-1].step != self.step):
            self.validations.append(validate(self.loaded, self.validation, self.step))
        self.artifact = self.save_artifact()
        (self.out_dir / "history.json").write_text(json.dumps(
            {"steps": [asdict(r) for r in self.history],
             "validations": [asdict(v) for v in self.validations]}, indent=1))
        plot_rl(self.history, self.validations, self.out_dir / "rl.png")
        return self.history

    def one_step(self) -> RLStep:
        c, started = self.config, time.perf_counter()
        scenarios = self.source(self.step)
        rollouts = [sc for sc in scenarios for _ in range(c.group)]
        if self.frontend is None and any(sc.has_audio or sc.has_video for sc in rollouts):
            self.frontend = self.loaded.load_frontend()
        exports: dict[int, dict] = {}
        settings = MicroTurnSettings(max_output_tokens=c.max_output_tokens, batch=len(rollouts),
                                     temperature=c.temperature,
                                     seed=(c.seed * 7919 + self.step) * 1000,
                                     kv_budget_mb=kv_budget_mb(self.loaded, rollouts,
                                                               len(rollouts)))
        was_training = self.loaded.model.training
        self.loaded.model.eval()
        with torch.no_grad(), serving(self.loaded.model):
            transcripts = run_micro_turn(self.loaded, rollouts, "rl", settings,
                                         on_close=lambda i, e: exports.__setitem__(i, e))
        self.loaded.model.train(was_training)
        rewards = [slice_rewards(sc, t.outputs, c.rewards)
                   for sc, t in zip(rollouts, transcripts, strict=True)]
        credit = []
        for g in range(len(scenarios)):
            members = range(g * c.group, (g + 1) * c.group)
            advantages = group_advantages([rewards[i].values for i in members])
            credit += [rollout_tokens(exports[i], a) for i, a in zip(members, advantages,
                                                                      strict=True)]
        rolled = time.perf_counter()
        learning = [r for r in credit if r is not None]
        total = sum(len(r.index) for r in learning)
        lr = c.lr * min(1.0, (self.step + 1) / max(1, c.warmup))
        for group_ in self.optimizer.param_groups:
            group_["lr"] = lr
        deviation, kl, norm = 0.0, 0.0, 0.0
        model = self.loaded.model
        model.train()
        for rollout in learning:
            reference = None
            if c.kl_weight > 0:
                with torch.no_grad(), adapters_off(model):
                    reference = policy_logprobs(model, rollout, c.deterministic, self.frontend)
            new = policy_logprobs(model, rollout, c.deterministic, self.frontend)
            parts = clipped_objective(new, rollout, reference, c.clip, c.kl_weight)
            if c.deterministic and parts.ratio_deviation != 0.0:
                raise MicroturnError(
                    f"rl step {self.step}: on-policy check failed, a ratio is off 1.0 by "
                    f"{parts.ratio_deviation:.3g}: the trainer did not recompute the sampler's "
                    f"log-probabilities bit for bit")
            (parts.loss / total).backward()
            deviation, kl = max(deviation, parts.ratio_deviation), kl + parts.kl
        if learning:
            norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()),
                                                        c.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        by_family: dict[str, list[bool]] = {}
        for sc, r in zip(rollouts, rewards, strict=True):
            by_family.setdefault(sc.family, []).append(r.passed)
        return RLStep(self.step, float(np.mean([r.total for r in rewards])),
                      float(np.mean([r.passed for r in rewards])),
                      {f: float(np.mean(v)) for f, v in sorted(by_family.items())},
                      kl / max(1, total), deviation, total, len(rollouts), len(learning), norm,
                      lr, rolled - started, time.perf_counter() - rolled)

    def _pool(self, step: int) -> list[Scenario]:
        """The step's scenarios: families drawn by weight, each a fresh train-split draw."""
        c = self.config
        families = list(c.families) or list(FAMILIES)
        weights = np.array([c.family_weights.get(f, 1) for f in families], dtype=np.float64)
        rng = np.random.default_rng([c.seed, step])
        picked = rng.choice(len(families), size=c.scenarios, p=weights / weights.sum())
        out = []
        for f in sorted(set(picked.tolist())):
            out += generate("train", RL_SEED + step, int((picked == f).sum()), [families[f]])
        return in_a_room(out, c.in_a_room, c.seed * 1_000_003 + step)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        metadata = {"step": str(self.step), "config": self.config.to_json(),
                    "history": json.dumps([asdict(r) for r in self.history]),
                    "validations": json.dumps([asdict(v) for v in self.validations])}
        write_checkpoint(path, self.params, self.optimizer, metadata)

    def load(self, path: Path) -> None:
        tensors, metadata = read_checkpoint(path)
        saved = json.loads(metadata["config"])
        if saved["lora"] != json.loads(json.dumps(asdict(self.config.lora))):
            raise MicroturnError(f"{path}: checkpoint has lora={saved['lora']}, this run has "
                                 f"{asdict(self.config.lora)}")
        restore(path, tensors, metadata, self.params, self.optimizer)
        self.step = int(metadata["step"])
        self.history = [RLStep(**r) for r in json.loads(metadata["history"])]
        self.validations = [Validation(**v) for v in json.loads(metadata["validations"])]

    def save_artifact(self) -> Path:
        path = self.out_dir / "adapter.safetensors"
        metadata = {"step": str(self.step), "clock": str(self.loaded.clock).lower(),
                    "clock_both_lanes": str(self.loaded.clock_both_lanes).lower(),
                    "method": "rl"}
        if self.parent is not None:
            metadata["parent"] = str(Path(self.parent).resolve())
        save_adapter(path, self.loaded.model, self.config.lora, None, metadata)
        return path


class _Progress:
    """One line per `log_every` steps (a background run's log), or a rich bar in a terminal."""

    def __init__(self, enabled: bool, total: int, done: int, log_every: int):
        self.enabled, self.total, self.done, self.log_every = enabled, total, done, log_every

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("rl"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("reward {task.fields[reward]}"),
                                TextColumn("passed {task.fields[passed]}"))
            self.bar.start()
            self.task = self.bar.add_task("rl", total=self.total, completed=self.done,
                                          reward="-", passed="-")
        return self

    def update(self, r: RLStep) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=r.step, reward=f"{r.reward:+.3f}",
                            passed=f"{r.passed:.0%}")
        elif self.log_every and r.step % self.log_every == 0:
            families = " ".join(f"{f} {v:.0%}" for f, v in r.by_family.items())
            print(f"rl step {r.step}/{self.total} reward {r.reward:+.3f} passed {r.passed:.0%} "
                  f"({families}) kl {r.kl:.4f} ratio-dev {r.ratio_deviation:.1e} tokens "
                  f"{r.tokens} from {r.learned_from}/{r.rollouts} rollouts, rollout "
                  f"{r.rollout_seconds:.0f} s, update {r.update_seconds:.0f} s",
                  file=sys.stderr, flush=True)

    def note(self, v: Validation) -> None:
        rates = ", ".join(f"{f} {r:.0%}" for f, r in sorted(v.pass_rate.items()))
        line = f"step {v.step}: validation {v.overall:.0%} ({rates})"
        if self.enabled:
            self.bar.console.print(line)
        elif self.log_every:
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()


def plot_rl(history: list[RLStep], validations: list[Validation], path: Path) -> Path | None:
    """Reward and pass rate per step (and validation pass rate); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    steps = [r.step for r in history]
    left.plot(steps, [r.reward for r in history], label="mean reward", alpha=0.5)
    if len(history) >= 5:
        smooth = np.convolve([r.reward for r in history], np.ones(5) / 5, mode="valid")
        left.plot(steps[4:], smooth, label="5-step mean")
    left.set(xlabel="step", ylabel="reward per rollout")
    left.legend(fontsize="small")
    right.plot(steps, [r.passed for r in history], label="rollouts passed", alpha=0.5)
    if validations:
        right.plot([v.step for v in validations], [v.overall for v in validations],
                   marker="o", label="validation (greedy)")
    right.set(xlabel="step", ylabel="pass rate", ylim=(0, 1.05))
    right.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
