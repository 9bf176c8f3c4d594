"""The two-lane view shared by `microturn demo` and `microturn stream`: per slice, what came in
and what the model said, with the slice's latency against its deadline."""

from rich.console import Console
from rich.markup import escape


def lane_row(heard: str, said: str, name: str = "") -> str:
    heard = heard.strip()
    cell = escape(f"{heard:<34}") if heard else f"[dim]{'· silence ·':<34}[/]"
    label = f"{name:>5} " if name else ""
    return f"   {label}[cyan]in[/] {cell} [magenta]out[/] {escape(repr(said))}"


def latency_mark(latency_ms: float, slice_ms: int) -> str:
    ok = "[green]ok[/]" if latency_ms <= slice_ms else "[red]MISS[/]"
    return f"{latency_ms:5.0f} ms / {slice_ms} ms {ok}"


def print_slice(console: Console, index: int, heard: str, said: str, latency_ms: float,
                slice_ms: int) -> None:
    console.print(f"[bold]slice {index:3d}[/] {latency_mark(latency_ms, slice_ms)}"
                  f"{lane_row(heard, said)[2:]}")
