"""`microturn train --rl`: on-policy training of an interaction model (`loop.py`).

The flags of `microturn train` that mean the same thing here (steps, lr, warmup, seed,
families and their weights, LoRA, checkpoints, validation, --in-a-room) are shared; these
are RL's own. Every setting is checked before the model loads.
"""

import argparse
import sys
from pathlib import Path

from microturn.errors import MicroturnError

RL_LR = 5e-5  # --lr's default with --rl (SFT's is higher)


def add_rl_flags(parser: argparse.ArgumentParser) -> None:
    rl = parser.add_argument_group("on-policy RL (--rl)")
    rl.add_argument("--rl", action="store_true",
                    help="on-policy RL (GRPO) on the benchmark's metrics, from --rl-from")
    rl.add_argument("--rl-from", default="default", metavar="PATH|default|none",
                    help="the adapter the policy starts from (merged; RL trains a new adapter "
                         "on top): default = the shipped interaction model")
    rl.add_argument("--group", type=int, default=4, help="rollouts per scenario")
    rl.add_argument("--scenarios-per-step", type=int, default=4)
    rl.add_argument("--temperature", type=float, default=1.0, help="rollout sampling")
    rl.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip")
    rl.add_argument("--kl", type=float, default=0.05,
                    help="weight of the KL penalty to the starting model (0: none, no "
                         "reference forward)")


def run_rl(args: argparse.Namespace) -> None:
    from microturn.checkpoint.adapter import LoRAConfig
    from microturn.checkpoint.shipped import load_interaction_model, resolve_adapter
    from microturn.eval.generator import parse_families
    from microturn.rl.loop import RLConfig, RLRun
    from microturn.train.command import parse_family_weights
    from microturn.train.data import train_scenarios
    from microturn.train.validate import VALIDATION_SEED

    families = parse_families(args.families)
    lora = LoRAConfig(args.lora_rank, args.lora_alpha,
                      tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    config = RLConfig(steps=args.steps, scenarios=args.scenarios_per_step, group=args.group,
                      temperature=args.temperature, lr=args.lr or RL_LR, warmup=args.warmup,
                      clip=args.clip, kl_weight=args.kl, seed=args.seed,
                      families=tuple(families),
                      family_weights=parse_family_weights(args.family_weights, families),
                      in_a_room=args.in_a_room, max_output_tokens=args.max_output_tokens,
                      deterministic=args.deterministic, lora=lora,
                      checkpoint_every=args.checkpoint_every, validate_every=args.val_every)
    if not 0.0 <= args.in_a_room <= 1.0:
        raise MicroturnError(f"--in-a-room must be a fraction in [0, 1], got {args.in_a_room}")
    if args.val_per_family < 0:
        raise MicroturnError(f"--val-per-family must be >= 0, got {args.val_per_family}")
    parent = resolve_adapter(args.model, args.rl_from)
    loaded = load_interaction_model(args.model, args.rl_from, args.dtype, args.device or "cpu")
    validation = (train_scenarios(VALIDATION_SEED + args.seed, 1, args.val_per_family,
                                  families) if args.val_per_family else [])
    interactive = not args.no_progress and sys.stderr.isatty()
    run = RLRun(loaded, config, Path(args.out), parent, validation,
                log_every=0 if interactive or args.no_progress else 1, progress=interactive)
    history = run.train(resume=not args.no_resume)
    seconds = sum(r.rollout_seconds + r.update_seconds for r in history)
    print(f"rl: {run.step} steps, {sum(r.rollouts for r in history)} rollouts in {seconds:.0f} s "
          f"({seconds / max(1, len(history)):.0f} s a step); artifact {run.artifact}",
          file=sys.stderr)
    if run.validations:
        v = run.validations[-1]
        rates = ", ".join(f"{f} {r:.0%}" for f, r in sorted(v.pass_rate.items()))
        print(f"validation at step {v.step}: {v.overall:.0%} ({rates})", file=sys.stderr)
