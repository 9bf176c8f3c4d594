"""One session's side of the background split: its asks out, its results in.

Whoever drives a session (the demo, the server's tick loop, the eval) calls `heard` with each
output slice's text and `next_result` when it builds the next input slice:

    speech, asked = lane.heard(text)          # speech to show or say; jobs just started
    ids, job = lane.next_result()             # a `<result>` segment for this slice, or []
    engine.append(sid, input_ids, result_ids=ids)

At most one result lands per input slice (a second waits for the next), so the model reads
one answer at a time.
"""

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from microturn.background.worker import BackgroundWorker, Job
from microturn.checkpoint.tokenizer import Tokenizer
from microturn.sequence.segments import AskReader, result_segment


@dataclass
class BackgroundLane:
    worker: BackgroundWorker
    session: Hashable
    tokenizer: Tokenizer
    reader: AskReader = field(default_factory=AskReader)
    waiting: deque = field(default_factory=deque)  # ended jobs not yet fed

    def heard(self, output_text: str) -> tuple[str, list[Job]]:
        """(the speech in this output slice, the jobs its closed asks started)."""
        speech, queries = self.reader.push(output_text)
        return speech, [self.worker.ask(self.session, q) for q in queries]

    def next_result(self) -> tuple[list[int], Job | None]:
        """The result segment to feed in the input slice being built, and its job."""
        self.waiting.extend(self.worker.ready(self.session))
        if not self.waiting:
            return [], None
        job = self.waiting.popleft()
        return result_segment(self.tokenizer, job.result), job

    def close(self) -> None:
        self.worker.cancel(self.session)
        self.waiting.clear()
