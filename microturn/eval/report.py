"""The eval's outputs: one table (metric x system), a JSON record of every scenario, a plot,
and two-lane views of chosen scenarios."""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from microturn.errors import MicroturnError
from microturn.eval.metrics import Verdict, median_ms, rate
from microturn.eval.scenario import Scenario, Transcript


@dataclass(frozen=True)
class Row:
    label: str
    family: str
    key: str
    kind: str  # "rate" or "ms"
    better: str  # "higher" | "lower"
    missing_as_inf: bool = False
    voice: bool | None = None  # only the voice sessions (True), only the others (False)


ROWS = (
    Row("pause TOR", "pause", "tor", "rate", "lower"),
    Row("backchannel TOR", "backchannel", "tor", "rate", "lower"),
    Row("turn-taking TOR", "turn_taking", "tor", "rate", "higher"),
    Row("turn-taking latency p50", "turn_taking", "latency_ms", "ms", "lower"),
    Row("interruption TOR", "interruption", "tor", "rate", "higher"),
    Row("interruption stop latency p50", "interruption", "stop_latency_ms", "ms", "lower",
        missing_as_inf=True),
    Row("interruption stop latency p50, voice", "interruption", "stop_latency_ms", "ms", "lower",
        missing_as_inf=True, voice=True),
    Row("interruption stop latency p50, text", "interruption", "stop_latency_ms", "ms", "lower",
        missing_as_inf=True, voice=False),
    Row("TimeSpeak accuracy", "time", "accuracy", "rate", "higher"),
    Row("CueSpeak text", "cue_text", "accuracy", "rate", "higher"),
    Row("CueSpeak audio", "cue_audio", "accuracy", "rate", "higher"),
    Row("CueSpeak visual", "cue_visual", "accuracy", "rate", "higher"),
    Row("content accuracy", "content", "correct", "rate", "higher"),
    Row("delegation recall", "background", "recall", "rate", "higher"),
    Row("delegation precision", "background", "precision", "rate", "higher"),
    Row("background answer correct", "background", "correct", "rate", "higher"),
    Row("talked over the user (background)", "background", "barged", "rate", "lower"),
    Row("acknowledgement latency p50", "background", "ack_ms", "ms", "lower"),
    Row("result to answer p50", "background", "delivery_ms", "ms", "lower"),
)


def summarise(verdicts: dict[str, list[Verdict]]) -> dict[str, dict[str, dict]]:
    """{system: {row label: {"value", "low", "high", "n"} or {"ms", "n"}}}."""
    table = {}
    for system, items in verdicts.items():
        table[system] = {}
        for row in ROWS:
            chosen = [v for v in items if v.family == row.family and
                      (row.voice is None or v.values.get("voice") == row.voice)]
            if not chosen:
                continue
            if row.kind == "rate":
                table[system][row.label] = asdict(rate(chosen, row.key))
            else:
                table[system][row.label] = {"ms": median_ms(chosen, row.key, row.missing_as_inf),
                                            "n": len(chosen)}
    return table


def _cell(entry: dict | None, kind: str) -> str:
    if entry is None:
        return "-"
    if kind == "rate":
        if entry["n"] == 0:
            return "-"
        return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"
    ms = entry["ms"]
    return "-" if ms is None else ("never" if math.isinf(ms) else f"{ms:.0f} ms")


def print_table(console: Console, table: dict[str, dict[str, dict]], title: str) -> None:
    out = Table(title=title, title_justify="left")
    out.add_column("metric (95 % CI)")
    for system in table:
        out.add_column(system, justify="right")
    for row in ROWS:
        if not any(row.label in t for t in table.values()):
            continue
        arrow = "↑" if row.better == "higher" else "↓"
        out.add_row(f"{row.label} {arrow}", *[_cell(t.get(row.label), row.kind)
                                              for t in table.values()])
    console.print(out)


def markdown_table(table: dict[str, dict[str, dict]]) -> str:
    systems = list(table)
    lines = ["| metric | " + " | ".join(systems) + " |",
             "|---" * (len(systems) + 1) + "|"]
    for row in ROWS:
        if any(row.label in t for t in table.values()):
            arrow = "↑" if row.better == "higher" else "↓"
            lines.append(f"| {row.label} {arrow} | " + " | ".join(
                _cell(table[s].get(row.label), row.kind) for s in systems) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, meta: dict, scenarios: list[Scenario],
               transcripts: dict[str, list[Transcript]], verdicts: dict[str, list[Verdict]],
               table: dict) -> None:
    record = {"meta": meta, "table": table,
              "scenarios": [sc.to_dict() for sc in scenarios],
              "runs": {system: [{"transcript": asdict(t), "verdict": asdict(v)}
                                for t, v in zip(transcripts[system], verdicts[system],
                                                strict=True)]
                       for system in transcripts}}
    try:
        Path(path).write_text(json.dumps(record, indent=1, default=_json_default))
    except OSError as exc:
        raise MicroturnError(f"--json {path}: cannot write ({exc.strerror})") from exc


def _json_default(value):
    if isinstance(value, float) and math.isinf(value):
        return None
    raise TypeError(type(value).__name__)


def plot(path: str | Path, table: dict[str, dict[str, dict]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MicroturnError("--plot needs matplotlib: pip install matplotlib") from exc
    rates = [r for r in ROWS if r.kind == "rate" and any(r.label in t for t in table.values())]
    systems = list(table)
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for i, system in enumerate(systems):
        xs, ys, err = [], [], [[], []]
        for j, row in enumerate(rates):
            entry = table[system].get(row.label)
            if not entry or entry["n"] == 0:
                continue
            xs.append(j + (i - (len(systems) - 1) / 2) * width)
            ys.append(entry["value"])
            err[0].append(entry["value"] - entry["low"])
            err[1].append(entry["high"] - entry["value"])
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=system)
    ax.set_xticks(range(len(rates)))
    ax.set_xticklabels([f"{r.label} {'↑' if r.better == 'higher' else '↓'}" for r in rates],
                       rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (95 % Wilson interval)")
    ax.legend(fontsize=8)
    ax.set_title("microturn eval: interactivity by family")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show(console: Console, scenario: Scenario, runs: dict[str, tuple[Transcript, Verdict]]):
    """Two lanes, per system an output column, and each system's verdict."""
    console.print(f"\n[bold]{scenario.id}[/] ({scenario.family}): {escape(scenario.note)}")
    marks = _expected_marks(scenario)
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("slice", justify="right")
    table.add_column("user (in)")
    for system in runs:
        table.add_column(f"{system} (out)")
    text = scenario.text_slices()
    for k in range(scenario.slices):
        cells = []
        for transcript, _ in runs.values():
            said = transcript.outputs[k].strip()
            style = "dim" if transcript.scripted[k] else ""
            cells.append(f"[{style}]{escape(said)}[/]" if style and said else escape(said))
        label = f"{k}{marks.get(k, '')}"
        table.add_row(label, escape(text[k]), *cells)
    console.print(table)
    for system, (_, verdict) in runs.items():
        colour = "green" if verdict.passed else "red"
        console.print(f"  {system}: [{colour}]{'pass' if verdict.passed else 'FAIL'}[/] "
                      f"({escape(verdict.reason)})")


def _expected_marks(sc: Scenario) -> dict[int, str]:
    e, marks = sc.expect, {}
    if e.turn_end is not None:
        marks[e.turn_end] = " <turn end"
    if e.hold is not None and sc.family == "pause":
        marks[e.hold[0]] = " <pause"
    if e.stop_onset is not None:
        marks[e.stop_onset] = " <interrupted"
    if e.keep_talking is not None:
        marks[e.keep_talking] = " <backchannel"
    for event in e.events:
        marks[event.slice] = f" <say {'/'.join(event.keywords) or 'anything'}"
    return marks
