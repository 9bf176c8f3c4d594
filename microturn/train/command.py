"""`microturn train`: flags, then data, validation scenarios and the loop (`loop.py`).

Every setting is checked before the model loads, so a bad flag costs no time. Targets are
built (the teacher answering with the base weights) before the adapter exists or a full
fine-tune has changed anything, and the teacher's answers are cached in the output directory,
so a resumed run asks nothing twice.
"""

import argparse
import sys
from pathlib import Path

from microturn.errors import MicroturnError
from microturn.eval.generator import parse_families


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="checkpoint, history, plot and the trained adapter go here; a "
                             "checkpoint already there is resumed")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="DIR",
                      help="train on the *.json exports in DIR instead of generated targets")
    data.add_argument("--families", default=None, help="comma-separated (default: all)")
    data.add_argument("--per-family", type=int, default=8, help="scenarios per family per seed")
    data.add_argument("--family-weights", default=None, metavar="F=K,...",
                      help="K times --per-family for family F (e.g. time=4,cue_audio=2)")
    data.add_argument("--rounds", type=int, default=8,
                      help="train-split seeds seed .. seed+rounds-1 make the pool")
    data.add_argument("--seed", type=int, default=0, help="scenario seeds and data order")
    data.add_argument("--reply-delay", type=int, default=0,
                      help="slices between the user's last word and the reply")
    data.add_argument("--max-output-tokens", type=int, default=4, help="per slice")
    data.add_argument("--teacher-tokens", type=int, default=64,
                      help="longest teacher reply, tokens")
    data.add_argument("--clock", action=argparse.BooleanOptionalAction, default=True,
                      help="silent slices tell the seconds of quiet, so timed requests are "
                           "read off a clock, not counted (default: on; saved in the adapter)")
    data.add_argument("--clock-both-lanes", action="store_true",
                      help="the clock starts again when the model speaks too: it tells the "
                           "seconds since anyone spoke (a count is one wait a number; saved "
                           "in the adapter)")
    data.add_argument("--in-a-room", type=float, default=0.0, metavar="FRACTION",
                      help="this fraction of the text-only scenarios get an audio stream of "
                           "room noise (the same talk with a microphone open)")
    data.add_argument("--catch-trials", type=float, default=0.0, metavar="FRACTION",
                      help="this fraction of the sound and sight cue scenarios never get "
                           "their cue (the target: silence), so saying the word at a guessed "
                           "time costs")
    data.add_argument("--teacher-answers-only", action="store_true",
                      help="keep the teacher's content answers as they are (no \"The answer "
                           "is X.\" where it missed)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1000)
    opt.add_argument("--batch-size", type=int, default=4)
    opt.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    opt.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: 2e-4; with --rl 5e-5)")
    opt.add_argument("--warmup", type=int, default=20)
    opt.add_argument("--min-lr-ratio", type=float, default=0.1)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--full", action="store_true", help="train every weight (no adapter)")
    opt.add_argument("--lora-rank", type=int, default=8)
    opt.add_argument("--lora-alpha", type=float, default=16.0)
    opt.add_argument("--lora-targets", default="qkv,o,gate_up,down")
    opt.add_argument("--train-frontend", action="store_true",
                     help="train the audio/video front-end too (saved with the adapter)")
    opt.add_argument("--frontend-lr-scale", type=float, default=1.0, metavar="X",
                     help="the front-end's learning rate is X times --lr's schedule (it starts "
                          "from a fresh draw where the adapter tunes trained weights)")
    opt.add_argument("--train-markers", action="store_true",
                     help="train the timeline markers' embedding rows too (saved with the "
                          "adapter): a marker the base never trained gets a logit of its own")
    opt.add_argument("--checkpoint-every", type=int, default=50)
    opt.add_argument("--moment-weight", type=float, default=1.0,
                     help="loss weight of the slices where a behaviour is decided (a timed "
                          "word, a reply's start, a stop) and the two before them")
    opt.add_argument("--init-adapter", default=None, metavar="PATH",
                     help="start from this trained adapter (same targets; a higher --lora-rank "
                          "grows it) instead of a fresh one")
    val = parser.add_argument_group("validation")
    val.add_argument("--val-every", type=int, default=100, help="steps (0: at the end only)")
    val.add_argument("--val-per-family", type=int, default=4,
                     help="train-split validation scenarios per family (0: none)")
    parser.add_argument("--no-resume", action="store_true", help="start over in --out")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop at this step of the --steps schedule (run again without "
                             "it, or with a later one, to go on)")
    parser.add_argument("--no-progress", action="store_true")


def run_train(args: argparse.Namespace) -> None:
    from microturn.checkpoint.adapter import LoRAConfig
    from microturn.checkpoint.loader import load_model
    from microturn.train.data import (
        ExportExamples,
        TargetExamples,
        catch_trials,
        in_a_room,
        train_scenarios,
    )
    from microturn.train.loop import LoopConfig, TrainingRun
    from microturn.train.targets import TargetConfig
    from microturn.train.teacher import ChatTeacher
    from microturn.train.validate import VALIDATION_SEED

    lora = LoRAConfig(args.lora_rank, args.lora_alpha,
                      tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    config = LoopConfig(steps=args.steps, batch_size=args.batch_size, accumulate=args.accumulate,
                        lr=args.lr or 2e-4, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                        weight_decay=args.weight_decay, seed=args.seed,
                        deterministic=args.deterministic, full=args.full, lora=lora,
                        train_frontend=args.train_frontend,
                        frontend_lr_scale=args.frontend_lr_scale,
                        train_markers=args.train_markers, validate_every=args.val_every,
                        checkpoint_every=args.checkpoint_every,
                        moment_weight=args.moment_weight, init_adapter=args.init_adapter)
    targets = TargetConfig(max_output_tokens=args.max_output_tokens,
                           reply_delay=args.reply_delay,
                           checked_answers=not args.teacher_answers_only, clock=args.clock,
                           clock_both_lanes=args.clock_both_lanes)
    families = parse_families(args.families)
    weights = parse_family_weights(args.family_weights, families)
    if args.init_adapter is not None and not Path(args.init_adapter).is_file():
        raise MicroturnError(f"--init-adapter: {args.init_adapter} is not a file")
    for name in ("per_family", "rounds"):
        if getattr(args, name) < 1:
            raise MicroturnError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(args, name)}")
    for name in ("in_a_room", "catch_trials"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise MicroturnError(f"--{name.replace('_', '-')} must be a fraction in [0, 1], "
                                 f"got {getattr(args, name)}")
    if args.clock_both_lanes and not args.clock:
        raise MicroturnError("--clock-both-lanes needs the clock (drop --no-clock)")
    if args.stop_after is not None and args.stop_after < 1:
        raise MicroturnError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.val_per_family < 0:
        raise MicroturnError(f"--val-per-family must be >= 0, got {args.val_per_family}")
    if args.data is not None and not Path(args.data).is_dir():
        raise MicroturnError(f"--data: {args.data} is not a directory")
    out = Path(args.out)

    loaded = load_model(args.model, args.dtype, args.device or "cpu")
    loaded.clock, loaded.clock_both_lanes = args.clock, args.clock_both_lanes
    markers = loaded.markers
    if args.data is not None:
        examples = ExportExamples(args.data)
    else:
        scenarios = in_a_room([sc for family in families
                               for sc in train_scenarios(args.seed, args.rounds,
                                                         args.per_family * weights.get(family, 1),
                                                         [family])], args.in_a_room, args.seed)
        scenarios = catch_trials(scenarios, args.catch_trials, args.seed)
        teacher = ChatTeacher(loaded, args.teacher_tokens, out / "teacher.json")
        print(f"building {len(scenarios)} target timelines (teacher: the base model)",
              file=sys.stderr)
        try:
            examples = TargetExamples.from_scenarios(scenarios, teacher, loaded.tokenizer,
                                                     markers, targets)
        finally:
            teacher.save()
    validation = (train_scenarios(VALIDATION_SEED + args.seed, 1, args.val_per_family,
                                  families) if args.val_per_family else [])
    interactive = not args.no_progress and sys.stderr.isatty()
    run = TrainingRun(loaded, examples, config, out, validation, progress=interactive,
                      log_every=0 if interactive or args.no_progress else 10)
    history = run.train(resume=not args.no_resume, stop_after=args.stop_after)
    seconds = sum(r.seconds for r in history)
    tokens = sum(r.tokens for r in history)
    print(f"trained {run.step} steps on {len(examples)} timelines: {tokens} tokens in "
          f"{seconds:.0f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s); artifact "
          f"{run.artifact}", file=sys.stderr)
    if run.validations:
        v = run.validations[-1]
        rates = ", ".join(f"{f} {r:.0%}" for f, r in sorted(v.pass_rate.items()))
        print(f"validation at step {v.step}: {v.overall:.0%} ({rates})", file=sys.stderr)
        best = run.best
        print(f"best validation (mean family pass rate {best.macro:.0%}) at step {best.step}: "
              f"{run.artifact_path(best=True)}", file=sys.stderr)


def parse_family_weights(text: str | None, families: list[str]) -> dict[str, int]:
    """"time=4,cue_audio=2" -> {"time": 4, "cue_audio": 2}, each a trained family."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in families:
            raise MicroturnError(f"--family-weights: {name!r} is not a trained family "
                                 f"({', '.join(families)})")
        try:
            out[name] = int(value)
        except ValueError:
            raise MicroturnError(f"--family-weights: {item.strip()!r} is not F=K with an "
                                 f"integer K") from None
        if not 1 <= out[name] <= 100:
            raise MicroturnError(f"--family-weights: {name} weight must be in [1, 100], "
                                 f"got {out[name]}")
    return out
