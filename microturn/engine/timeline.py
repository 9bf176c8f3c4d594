"""The micro-turn timeline: the one definition of the interleaved token sequence.

Micro-turn k is

    <input_start> input tokens of slice k (or <silence>) <output_start> output tokens of slice k

where the output is what the model emitted: up to the slice's budget, possibly ended early by
<end_of_slice>, or a lone <silence>. The engine feeds exactly `Timeline.tokens()`; a trainer
builds the same sequence from a recording with `Timeline.from_export`.
"""

from dataclasses import dataclass, field

from microturn.engine.markers import MarkerTokens


@dataclass
class MicroTurn:
    index: int
    input_ids: list[int]  # empty: nothing arrived (fed as <silence>)
    output_ids: list[int] = field(default_factory=list)


@dataclass
class Timeline:
    markers: MarkerTokens
    turns: list[MicroTurn] = field(default_factory=list)

    def input_tokens(self, turn: MicroTurn) -> list[int]:
        """What the model is fed for the input half of a micro-turn, markers included."""
        body = turn.input_ids or [self.markers.silence]
        return [self.markers.input_start, *body, self.markers.output_start]

    def tokens(self) -> list[int]:
        out: list[int] = []
        for turn in self.turns:
            out += self.input_tokens(turn)
            out += turn.output_ids
        return out

    def output_mask(self) -> list[bool]:
        """For each token of `tokens()`: did the model emit it (True) or was it fed (False)."""
        mask: list[bool] = []
        for turn in self.turns:
            mask += [False] * len(self.input_tokens(turn))
            mask += [True] * len(turn.output_ids)
        return mask

    def export(self) -> dict:
        return {"markers": self.markers.to_dict(),
                "turns": [{"index": t.index, "input_ids": list(t.input_ids),
                           "output_ids": list(t.output_ids)} for t in self.turns]}

    @classmethod
    def from_export(cls, data: dict) -> "Timeline":
        return cls(MarkerTokens.from_dict(data["markers"]),
                   [MicroTurn(t["index"], list(t["input_ids"]), list(t["output_ids"]))
                    for t in data["turns"]])
