"""What a long session keeps resident: the long-session policy, defined once.

A session's KV slots, in order, are three zones:
- the sink: its first `sink_slots` tokens, kept forever;
- the compacted zone: text and markers of older slices whose media positions were dropped,
  packed in sequence order into whole blocks;
- the raw zone: every token from `raw_start` on, media included (the newest slices).

Two events change them, each recorded in the export (`Eviction`) before the token it preceded:
- compact: the oldest raw blocks keep only their text and marker slots (and, to fill whole
  blocks, the newest of their media slots) and join the compacted zone. The transcript of what
  was heard and said outlives the raw frames.
- drop: the oldest whole blocks after the sink go, the compacted zone's first.

Kept tokens keep their positions. The engine makes the events (`Engine._evict`); the trainer
replays them (`kernels/windowed_attention.py`) so that every token sees what it saw then.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Eviction:
    at_token: int  # the first token fed after it
    first_slot: int  # where it starts among the session's resident slots
    slots: int  # the resident slots it covers (whole blocks)
    kept: tuple[tuple[int, int], ...] = ()  # compact: (first token, count) runs packed in order

    @property
    def kept_slots(self) -> int:
        return sum(n for _, n in self.kept)

    def to_dict(self) -> dict:
        record = {"at_token": self.at_token, "first_slot": self.first_slot, "slots": self.slots}
        if self.kept:
            record["kept"] = [list(run) for run in self.kept]
        return record

    @classmethod
    def from_dict(cls, record: dict) -> "Eviction":
        return cls(int(record["at_token"]), int(record["first_slot"]), int(record["slots"]),
                   tuple((int(t), int(n)) for t, n in record.get("kept") or ()))


@dataclass(frozen=True)
class Epoch:
    """What was resident from token `at` until the next event."""
    at: int
    compacted: tuple[tuple[int, int], ...]  # (first token, count) runs, in slot order
    raw_start: int


@dataclass
class Residency:
    block_size: int
    sink_slots: int  # a whole number of blocks
    compacted: list[int] = field(default_factory=list)  # token index of each compacted slot
    raw_start: int = -1  # first token of the raw zone; the sink's end until something goes

    def __post_init__(self):
        if self.raw_start < 0:
            self.raw_start = self.sink_slots

    def resident_slots(self, fed: int) -> int:
        return self.sink_slots + len(self.compacted) + max(0, fed - self.raw_start)

    def epoch(self, at: int) -> Epoch:
        return Epoch(at, _runs(self.compacted), self.raw_start)

    def plan_compaction(self, tokens: list[int], at: int, blocks: int,
                        vocab_size: int) -> Eviction | None:
        """Compact the oldest `blocks` raw blocks of a session that has fed `tokens[:at]`;
        None where that frees no block (a region of text alone)."""
        bs, start = self.block_size, self.raw_start
        region = range(start, start + blocks * bs)
        media = [t for t in region if _is_media(tokens[t], vocab_size)]
        filler = -(len(region) - len(media)) % bs  # media slots kept to fill whole blocks
        dropped = set(media[:len(media) - filler])
        if len(dropped) < bs:
            return None
        kept = [t for t in region if t not in dropped]
        return Eviction(at, self.sink_slots + len(self.compacted), blocks * bs, _runs(kept))

    def apply(self, e: Eviction, tokens: list[int] | None = None, vocab_size: int = 0) -> None:
        """Take the event in; a record this policy could not have written raises ValueError
        (with `tokens`: also a compaction that drops text)."""
        bs = self.block_size
        if e.slots <= 0 or e.slots % bs or e.at_token < self.raw_start:
            raise ValueError(f"eviction at token {e.at_token} is not one the engine makes "
                             f"(whole blocks after the {self.sink_slots}-slot sink)")
        if not e.kept:
            if e.first_slot != self.sink_slots or \
                    e.slots > len(self.compacted) + e.at_token - self.raw_start:
                raise ValueError(f"eviction at token {e.at_token} is not one the engine makes "
                                 f"(whole blocks after the {self.sink_slots}-slot sink)")
            gone = min(e.slots, len(self.compacted))
            del self.compacted[:gone]
            self.raw_start += e.slots - gone
            return
        kept = [t for first, n in e.kept for t in range(first, first + n)]
        end = self.raw_start + e.slots
        if e.first_slot != self.sink_slots + len(self.compacted) or end > e.at_token or \
                kept != sorted(set(kept)) or not kept or kept[0] < self.raw_start or \
                kept[-1] >= end or len(kept) % bs or len(kept) >= e.slots:
            raise ValueError(f"compaction at token {e.at_token} is not one the engine makes "
                             f"(the oldest raw blocks, whole blocks kept in order)")
        if tokens is not None:
            kept_set = set(kept)
            if any(t not in kept_set and not _is_media(tokens[t], vocab_size)
                   for t in range(self.raw_start, end)):
                raise ValueError(f"compaction at token {e.at_token} drops text: only media "
                                 f"positions are compacted away")
        self.compacted += kept
        self.raw_start = end


def replay(evictions: list[Eviction], block_size: int, sink_slots: int,
           tokens: list[int] | None = None, vocab_size: int = 0) -> list[Epoch]:
    """Each stretch's residency, from the start, checking every record on the way."""
    residency = Residency(block_size, sink_slots)
    epochs, last = [residency.epoch(0)], 0
    for e in evictions:  # (a compaction and a drop may come before the same token)
        if e.at_token < max(last, 1) or (tokens is not None and e.at_token >= len(tokens)):
            raise ValueError("evictions must fall in order inside the session's tokens")
        residency.apply(e, tokens, vocab_size)
        if e.at_token == last:
            epochs.pop()
        epochs.append(residency.epoch(e.at_token))
        last = e.at_token
    return epochs


def _is_media(token: int, vocab_size: int) -> bool:
    return bool(vocab_size) and token >= vocab_size


def _runs(indices: list[int]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for t in indices:
        if runs and runs[-1][0] + runs[-1][1] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return tuple((t, n) for t, n in runs)
