"""One session's side of the background split: its asks out, its results in.

Whoever drives a session (the demo, the server's tick loop, the eval) calls `heard` with each
output slice's text, and `listen` and `next_result` when it builds the next input slice:

    speech, asked = lane.heard(text)          # speech to show or say; jobs just started
    lane.listen(input_text)                   # the user's words, for the asks' numbers
    ids, job = lane.next_result()             # a `<result>` segment for this slice, or []
    engine.append(sid, input_ids, result_ids=ids)

An ask's numbers are checked against the user's recent words (`grounding.py`).

At most one result lands per input slice (a second waits for the next), so the model reads
one answer at a time. Served, a result lands in the first input slice after it is ready. With
a fixed `delay` (the eval, and training data), it lands exactly `delay` slices after the
input slice that follows the ask, whatever the tool's wall time: the same timeline every run.
"""

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from microturn.background.grounding import ground
from microturn.background.worker import BackgroundWorker, Job
from microturn.checkpoint.tokenizer import Tokenizer
from microturn.sequence.segments import AskReader, result_segment

RECENT_CHARS = 400  # about the last 15 seconds of speech


@dataclass
class BackgroundLane:
    worker: BackgroundWorker
    session: Hashable
    tokenizer: Tokenizer
    delay: int | None = None  # None: land when ready; k: land k slices after the next slice
    reader: AskReader = field(default_factory=AskReader)
    slice: int = 0  # the input slice being built next
    due: dict[int, int] = field(default_factory=dict)  # job id -> slice it lands in (fixed delay)
    waiting: deque = field(default_factory=deque)  # ended jobs not yet fed
    recent_input: str = ""  # the user's last words (RECENT_CHARS), for the asks' numbers

    def heard(self, output_text: str) -> tuple[str, list[Job]]:
        """(the speech in this output slice, the jobs its closed asks started)."""
        speech, queries = self.reader.push(output_text)
        jobs = [self.worker.ask(self.session, ground(q, self.recent_input, self.worker.tools))
                for q in queries]
        self.slice += 1
        if self.delay is not None:
            self.due |= {job.id: self.slice + self.delay for job in jobs}
        return speech, jobs

    def listen(self, input_text: str) -> None:
        """The user's words in the input slice being built."""
        if input_text:
            self.recent_input = (self.recent_input + " " + input_text)[-RECENT_CHARS:]

    def next_result(self) -> tuple[list[int], Job | None]:
        """The result segment to feed in the input slice being built, and its job."""
        if self.delay is None:
            self.waiting.extend(self.worker.ready(self.session))
        else:
            landing = [i for i, at in self.due.items() if at <= self.slice]
            if landing:
                for job in self.worker.wait(self.session, landing):
                    del self.due[job.id]
                    self.waiting.append(job)
        if not self.waiting:
            return [], None
        job = self.waiting.popleft()
        return result_segment(self.tokenizer, job.result), job

    def close(self) -> None:
        self.worker.cancel(self.session)
        self.waiting.clear()
