"""Input waiting for its slice on the server's clock, bounded so memory cannot grow.

Slice `open` is the one whose window is open now; input may be queued for it and for at most
`max_ahead` slices after it. Input that names its slice goes there (a slice that has already
closed means the open one, with a notice: input is never dropped). Input that names no slice
continues after what is already queued, and what does not fit a slice's token limit flows
into the next ones, as live input queues up when it arrives faster than real time. Input that
would reach past the window is refused whole (backpressure): nothing of it is queued.
"""

from dataclasses import dataclass, field

from microturn.server.errors import ServerError


@dataclass(frozen=True)
class Placement:
    slice: int  # the first slice the input landed in
    late: bool  # it named a slice that had already closed
    spilled: bool  # it continued into later slices


@dataclass
class InputQueue:
    max_tokens: int  # per slice
    max_ahead: int  # slices after the open one that may hold input
    open: int = 0
    tail: int = 0  # where input naming no slice continues
    slices: dict[int, list[int]] = field(default_factory=dict)

    def put(self, tokens: list[int], slice_index: int | None = None,
            field_name: str = "text") -> Placement:
        if slice_index is not None:
            target = max(slice_index, self.open)
            self._check_ahead(target)
            have = len(self.slices.get(target, ()))
            if have + len(tokens) > self.max_tokens:
                raise ServerError("limit", f"slice {target} would hold {have + len(tokens)} "
                                  f"tokens, over max_input_tokens {self.max_tokens}", 422,
                                  field_name, self.max_tokens)
            if tokens:
                self.slices.setdefault(target, []).extend(tokens)
            return Placement(target, slice_index < self.open, False)
        index = start = max(self.tail, self.open)
        plan, rest = [], tokens
        while rest:
            room = self.max_tokens - len(self.slices.get(index, ()))
            if room > 0:
                plan.append((index, rest[:room]))
                rest = rest[room:]
            if rest:
                index += 1
        self._check_ahead(index)
        for target, part in plan:
            self.slices.setdefault(target, []).extend(part)
        self.tail = index
        return Placement(plan[0][0] if plan else start, False, len(plan) > 1)

    def take(self) -> tuple[int, list[int]]:
        """Close the open slice: its index and input (empty: silence)."""
        index = self.open
        self.open += 1
        return index, self.slices.pop(index, [])

    @property
    def queued_slices(self) -> int:
        return len(self.slices)

    def _check_ahead(self, index: int) -> None:
        if index > self.open + self.max_ahead:
            raise ServerError("backpressure", f"input would be queued {index - self.open} slices "
                              f"ahead of the open slice {self.open}, over max_buffered_slices "
                              f"{self.max_ahead}; send slower", 429, "slice", self.max_ahead)
