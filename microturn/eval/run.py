"""`microturn eval`: the systems side by side on one scenario set, scored by the same metrics.

1. Generate the scenarios (split, seed, count per family).
2. Run each system: micro-turn mode through the engine (the model under test, and the base
   model raw), and the turn-based VAD harness on the base model.
3. Score every transcript, print the table, write the JSON and plot, show chosen scenarios.
"""

import argparse
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from microturn.checkpoint.loader import load_checkpoint, load_model
from microturn.checkpoint.shipped import load_interaction_model, resolve_adapter
from microturn.errors import MicroturnError
from microturn.eval.generator import generate, parse_families
from microturn.eval.metrics import score
from microturn.eval.micro_turn import MicroTurnSettings, quiet_slices, run_micro_turn
from microturn.eval.report import markdown_table, plot, print_table, show, summarise, write_json
from microturn.eval.turn_based import TurnBasedSettings, run_turn_based

SYSTEMS = ("microturn", "turn-based", "raw")


def parse_systems(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in SYSTEMS for n in names):
        raise MicroturnError(f"systems: choose from {', '.join(SYSTEMS)}, got {text!r}")
    return names


def run_eval(args: argparse.Namespace) -> dict:
    console = Console(highlight=False, width=max(110, Console().width))
    systems = parse_systems(args.systems)
    scenarios = generate(args.split, args.seed, args.per_family, parse_families(args.families))
    micro = MicroTurnSettings(max_output_tokens=args.max_output_tokens, batch=args.batch)
    turn = TurnBasedSettings(silence_timeout_ms=args.silence_timeout_ms,
                             max_output_tokens=args.max_output_tokens)
    adapter = resolve_adapter(args.model, args.adapter)
    with console.status("loading models"):
        base = load_model(args.base_model, args.dtype, "cpu")
        tested = base if args.model in (None, args.base_model) and adapter is None else \
            load_interaction_model(args.model, str(adapter or "none"), args.dtype, "cpu")
        # the turn-based harness runs the checkpoint as trained: no marker rows to sample
        chat = load_checkpoint(args.base_model, args.dtype, "cpu") \
            if "turn-based" in systems else None
    transcripts, seconds = {}, {}
    with Progress(TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        for system in systems:
            task = bar.add_task(system, total=len(scenarios))
            step = lambda n, task=task: bar.advance(task, n)  # noqa: E731
            started = time.perf_counter()
            if system == "turn-based":
                transcripts[system] = run_turn_based(chat, scenarios, system, turn, step)
            elif system == "raw" and tested is base and "microturn" in transcripts:
                transcripts[system] = transcripts["microturn"]  # the same weights: same run
                bar.advance(task, len(scenarios))
            else:
                model = tested if system == "microturn" else base
                transcripts[system] = run_micro_turn(model, scenarios, system, micro, step)
            seconds[system] = time.perf_counter() - started
    by_id = {sc.id: sc for sc in scenarios}
    verdicts = {system: [score(by_id[t.scenario_id], t.outputs) for t in items]
                for system, items in transcripts.items()}
    table = summarise(verdicts)
    counts = {f: sum(sc.family == f for sc in scenarios) for f in dict.fromkeys(
        sc.family for sc in scenarios)}
    tested_name = tested.path.name + (f" + {adapter.name}" if adapter else "")
    title = (f"microturn eval: {args.split} split, seed {args.seed}, {len(scenarios)} scenarios "
             f"({args.per_family} per family); model {tested_name}, base {base.path.name}")
    print_table(console, table, title)
    console.print("run time: " + ", ".join(f"{s} {t:.0f} s" for s, t in seconds.items()))
    quiet = {system: quiet_slices(transcripts[system], (tested if system == "microturn"
                                                        else base).markers)
             for system in ("microturn", "raw") if system in transcripts}
    if quiet:
        console.print("quiet slices closed by a marker alone: " + ", ".join(
            f"{s} {q.share:.0%} of {q.quiet}" for s, q in quiet.items())
            + " [dim](the rest print nothing with other tokens)[/]")
    if tested is base and {"microturn", "raw"} <= set(systems):
        console.print("[dim]microturn and raw ran the same weights (no adapter): one run[/]")
    meta = {"split": args.split, "seed": args.seed, "per_family": args.per_family,
            "families": counts, "model": str(tested.path), "base_model": str(base.path),
            "adapter": str(adapter) if adapter else None,
            "dtype": args.dtype, "micro_turn": vars(micro), "turn_based": vars(turn),
            "seconds": seconds, "markdown": markdown_table(table),
            "quiet_slices": {s: vars(q) for s, q in quiet.items()}}
    if args.json:
        write_json(args.json, meta, scenarios, transcripts, verdicts, table)
    if args.plot:
        plot(args.plot, table)
    for sc in _chosen(scenarios, verdicts, args.show):
        show(console, sc, {system: (transcripts[system][i], verdicts[system][i])
                           for system in transcripts for i in [scenarios.index(sc)]})
    return {"table": table, "meta": meta}


def _chosen(scenarios, verdicts, count: int):
    """Up to `count` scenarios, one family after another, failures of the first system first."""
    if count <= 0:
        return []
    first = next(iter(verdicts.values()))
    order = sorted(range(len(scenarios)), key=lambda i: first[i].passed)
    chosen, families = [], set()
    for i in order:
        if scenarios[i].family not in families:
            chosen.append(scenarios[i])
            families.add(scenarios[i].family)
        if len(chosen) == count:
            break
    return chosen


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--families", default=None,
                        help="comma-separated families (default: all)")
    parser.add_argument("--split", default="heldout", choices=["heldout", "train"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-family", type=int, default=30, help="scenarios per family")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="the checkpoint under test in micro-turn mode, with --adapter "
                             "(default: the shipped interaction model)")
    parser.add_argument("--base-model", default=None, metavar="PATH",
                        help="the base model of the turn-based harness and raw (default: "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-output-tokens", type=int, default=4, help="per slice, all systems")
    parser.add_argument("--batch", type=int, default=16,
                        help="micro-turn sessions streamed together per tick")
    parser.add_argument("--silence-timeout-ms", type=int, default=500,
                        help="the turn-based harness's end-of-turn silence")
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--plot", default=None, metavar="FILE.png")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print N scenarios as two lanes with each system's verdict")
