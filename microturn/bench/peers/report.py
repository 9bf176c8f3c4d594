"""The peers' results as a markdown table, JSON records and a two-panel PNG."""

import json
from dataclasses import asdict

from microturn.bench.peers.harness import HEAD_TAIL, PeerRecord


def common_length(records: list[PeerRecord], shape: str) -> int:
    """The micro-turns every engine's long session reached at this shape."""
    return min(len(r.latency_ms) for r in records if r.shape == shape)


def tail_head_at(record: PeerRecord, turns: int) -> float:
    """Tail/head over the first `turns` micro-turns: sessions stopped by the time budget at
    different lengths compare only at a length they all reached."""
    ms = record.latency_ms[:turns]
    n = min(HEAD_TAIL, max(1, len(ms) // 2))
    return (sum(ms[-n:]) / n) / (sum(ms[:n]) / n)


def label(record: PeerRecord) -> str:
    audio = f"+{record.audio_positions}" if record.audio_positions else ""
    return f"{record.shape} {record.input_tokens}{audio}/{record.output_tokens}"


def markdown_table(records: list[PeerRecord], slice_ms: int) -> str:
    lines = ["| engine | shape | p50 ms | p99 ms | tail/head | micro-turns | tail/head at "
             f"common length | capacity (p99 < {slice_ms} ms) | KV MiB/session | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        turns = f"{r.turns}{' (time budget)' if r.stopped_early else ''}"
        cap = f"{r.capacity_sessions}{'+' if r.capacity_limited_by_search else ''}"
        common = common_length(records, r.shape)
        lines.append(f"| {r.engine} | {label(r)} | "
                     f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.tail_head_ratio:.2f} | {turns} | "
                     f"{tail_head_at(r, common):.2f} ({common}) | {cap} | "
                     f"{r.memory_per_session_mb:.1f} | {r.tokens_per_s:.0f} |")
    return "\n".join(lines)


def write_json(records: list[PeerRecord], path: str, machine: dict,
               skipped: list[str]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "skipped": skipped,
                   "records": [asdict(r) for r in records]}, f, indent=1)


def write_plot(records: list[PeerRecord], path: str, title: str, slice_ms: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(dict.fromkeys(r.engine for r in records))
    shapes = list(dict.fromkeys(r.shape for r in records))
    colors = {e: plt.cm.tab10(i) for i, e in enumerate(engines)}
    styles = {s: ls for s, ls in zip(shapes, ["-", "--", ":"], strict=False)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2),
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    for r in records:
        left.plot(r.context_tokens, r.latency_ms, styles[r.shape], color=colors[r.engine],
                  linewidth=1.2, label=f"{r.engine}, {label(r)}")
    left.axhline(slice_ms, color="grey", linewidth=0.8, linestyle="-.")
    left.text(0.01, slice_ms, f"{slice_ms} ms slice", va="bottom", fontsize=8, color="grey",
              transform=left.get_yaxis_transform())
    left.set_xlabel("session length (tokens)")
    left.set_ylabel("micro-turn latency, one session alone (ms)")
    left.set_yscale("log")
    left.set_title("latency as the session grows")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    width = 0.8 / max(1, len(shapes))
    for j, shape in enumerate(shapes):
        values = [next((r.capacity_sessions for r in records
                        if r.engine == e and r.shape == shape), 0) for e in engines]
        bars = right.bar([i + j * width for i in range(len(engines))], values, width,
                         label=shape, hatch=["", "//", ".."][j % 3],
                         color=[colors[e] for e in engines], edgecolor="black")
        right.bar_label(bars, fontsize=8)
    right.set_xticks([i + width * (len(shapes) - 1) / 2 for i in range(len(engines))],
                     engines, rotation=20, fontsize=8)
    right.set_ylabel(f"real-time sessions (p99 cycle < {slice_ms} ms)")
    right.set_ylim(0, max([r.capacity_sessions for r in records] + [1]) * 1.15 + 0.5)
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set_title("real-time capacity")
    right.legend(fontsize=8, title="shape")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
