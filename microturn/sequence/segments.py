"""The two segments of the interaction / background split, spelt in the model's own words.

- The **ask** (delegation) segment is output: `<ask> query </ask>`, emitted by the interaction
  model across as many output slices as it takes. It is not speech: `AskReader` takes it out of
  the spoken text and hands the query to the background worker.
- The **result** (background) segment is input: `<result> text </result>`, in the input slice
  where the background worker's answer arrived, after the slice's text (and clock).

Both are ordinary text tokens of the checkpoint's tokenizer, not added markers: adding
vocabulary would shift the media ids and every log-probability of a model already trained,
while the tags cost three tokens each and a small model learns to copy them. They are
recorded in the timeline like any other tokens (the result segment in `MicroTurn.result_ids`),
so an export replays them and the trainer recomputes the same bits.
"""

import re
from dataclasses import dataclass, field
from typing import Protocol

from microturn.errors import MicroturnError


class Tokenizer(Protocol):  # the checkpoint's tokenizer, as far as segments need it
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

ASK_OPEN, ASK_CLOSE = "<ask>", "</ask>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
MAX_RESULT_TOKENS = 96  # a result segment's tokens, tags included: a sentence, not a page
MAX_ASK_CHARS = 400  # an ask left open longer than this is dropped as babble


def result_segment(tokenizer: Tokenizer, text: str,
                   limit: int = MAX_RESULT_TOKENS) -> list[int]:
    """`<result> text </result>` as token ids; a text too long for `limit` is cut at a word
    (the tags always stay, so the model always sees where the result ends)."""
    head, tail = tokenizer.encode(f" {RESULT_OPEN}"), tokenizer.encode(f" {RESULT_CLOSE}")
    room = limit - len(head) - len(tail)
    if room < 1:
        raise MicroturnError(f"result segment: limit {limit} leaves no room for text")
    words = " ".join(text.split()).split(" ")
    body = tokenizer.encode(" " + " ".join(words))
    while len(body) > room and len(words) > 1:
        words = words[:-1]
        body = tokenizer.encode(" " + " ".join(words) + " …")
    return head + body[:room] + tail


def result_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of a result segment (its tags taken off)."""
    text = tokenizer.decode(ids).strip()
    return text.removeprefix(RESULT_OPEN).removesuffix(RESULT_CLOSE).strip()


_ASK = re.compile(re.escape(ASK_OPEN) + r"(.*?)" + re.escape(ASK_CLOSE), re.S)


@dataclass
class AskReader:
    """Reads one session's output lane slice by slice: what is speech, and which asks closed.

    An ask may span slices; its text is withheld from speech from `<ask>` on, and the query is
    given out once `</ask>` arrives. A tag cut between two slices (`<as` | `k>`) is held back
    until it can be told from speech."""
    pending: str = ""  # output text not yet told apart (an open ask, or a possible tag start)
    asks: list[str] = field(default_factory=list)  # every query closed so far

    def push(self, text: str) -> tuple[str, list[str]]:
        """(speech, closed queries) of the output text of one slice."""
        text, self.pending = self.pending + text, ""
        speech, queries, at = [], [], 0
        for match in _ASK.finditer(text):
            speech.append(text[at:match.start()])
            query = " ".join(match.group(1).split())
            if query:
                queries.append(query)
            at = match.end()
        rest = text[at:]
        start = rest.find(ASK_OPEN)
        if start >= 0:  # an ask still open: hold it, unless it has gone on far too long
            speech.append(rest[:start])
            if len(rest) - start <= MAX_ASK_CHARS:
                self.pending = rest[start:]
        else:
            cut = _partial_tag(rest)
            speech.append(rest[:cut])
            self.pending = rest[cut:]
        self.asks += queries
        return "".join(speech), queries


def _partial_tag(text: str) -> int:
    """Where a possible start of `<ask>` at the end of `text` begins (len(text): none)."""
    for n in range(min(len(ASK_OPEN) - 1, len(text)), 0, -1):
        if ASK_OPEN.startswith(text[-n:]):
            return len(text) - n
    return len(text)
