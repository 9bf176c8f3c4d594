"""The background worker: answers the interaction model's asks beside the tick loop.

Scheduling, so that the interaction model keeps every slice's deadline:

- Tool calls (`tools.py`) run on a small thread pool. They are Python functions that take
  microseconds to seconds and hold no model; the tick loop never waits for them.
- The background model (turn-based answers through the chat template, the same checkpoint or
  another) runs only in the time the ticks leave: the loop that owns the engine calls
  `use_idle(until)` when a tick is done, and the worker takes decode steps while a step still
  fits before `until` (the next slice's close), judged by a running estimate of a step's cost.
  One step at a time, on the thread that runs the ticks, so the two never compete for cores.

Every job ends in exactly one result: the answer, or a sentence the model can say about what
went wrong (an error, a timeout, no background model). A job of a session that ends, or one
the user retracts, is cancelled and delivers nothing.
"""

import contextlib
import itertools
import time
from collections.abc import Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from microturn.background.tools import Tools
from microturn.checkpoint.loader import LoadedModel
from microturn.engine.paged_attention import PagedSequence
from microturn.errors import MicroturnError
from microturn.sampling import SamplingParams, sample

MODEL = "model"  # a job's `tool` when the background model answers it


@dataclass
class Job:
    id: int
    session: Hashable
    query: str
    tool: str  # a tool's name, or MODEL
    asked_at: float  # perf_counter
    state: str = "running"  # running | done | error | timeout | cancelled
    result: str = ""  # what the interaction model is told (set when the job ends)
    finished_at: float | None = None
    future: Future | None = None  # a tool call on the pool
    steps: Iterator[int] | None = None  # a background-model answer, one token per step
    tokens: list[int] = field(default_factory=list)
    delivered: bool = False

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.asked_at


@dataclass(frozen=True)
class WorkerConfig:
    timeout_s: float = 20.0
    max_jobs_per_session: int = 4  # running at once; more asks are answered "busy"
    answer_tokens: int = 48  # longest background-model answer
    threads: int = 2  # tool calls in flight across all sessions
    prefill_chunk: int = 8  # prompt tokens per background step: each step fits a short gap

    def __post_init__(self):
        if not 0.1 <= self.timeout_s <= 3600:
            raise MicroturnError(f"timeout_s must be in [0.1, 3600], got {self.timeout_s}")
        if not 1 <= self.max_jobs_per_session <= 64:
            raise MicroturnError(f"max_jobs_per_session must be in [1, 64], "
                                 f"got {self.max_jobs_per_session}")
        if not 1 <= self.answer_tokens <= 512:
            raise MicroturnError(f"answer_tokens must be in [1, 512], got {self.answer_tokens}")


class BackgroundWorker:
    def __init__(self, tools: Tools | None = None, model: LoadedModel | None = None,
                 config: WorkerConfig | None = None):
        self.tools = tools if tools is not None else Tools()
        self.model, self.config = model, config or WorkerConfig()
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._pool = ThreadPoolExecutor(self.config.threads, "microturn-tool")
        self.step_estimate_s = 0.05  # a background-model step's cost, updated as steps run
        self.model_seconds = 0.0  # time spent in background-model steps (benchmarks read it)
        self.model_steps = 0

    def ask(self, session: Hashable, query: str) -> Job:
        """Start answering `query` for `session`; the job's result comes out of `ready`."""
        tool, query = self.tools.route(query)
        job = Job(next(self._ids), session, query, tool.name if tool else MODEL,
                  time.perf_counter())
        self.jobs[job.id] = job
        if len(self.running(session)) > self.config.max_jobs_per_session:
            self._finish(job, "error", "Sorry, I am still working on your other questions.")
        elif tool is not None:
            job.future = self._pool.submit(tool.run, query)
        elif self.model is None:
            self._finish(job, "error", "Sorry, I have no way to look that up.")
        else:
            tokenizer = self.model.tokenizer
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": query}])
            job.steps = answer_steps(self.model, tokenizer.encode(prompt),
                                     self.config.answer_tokens, self.config.prefill_chunk)
        return job

    @property
    def thinking(self) -> bool:
        """A background-model answer is waiting for idle time."""
        return any(j.steps is not None for j in self.jobs.values())

    def running(self, session: Hashable) -> list[Job]:
        return [j for j in self.jobs.values() if j.session == session and j.state == "running"]

    def cancel(self, session: Hashable, job_id: int | None = None) -> list[Job]:
        """Cancel the session's running jobs (or only `job_id`): nothing of theirs is
        delivered. A session's end cancels all of its jobs and forgets them."""
        cancelled = []
        for job in list(self.jobs.values()):
            if job.session != session or (job_id is not None and job.id != job_id):
                continue
            if job.state == "running":
                if job.future is not None:
                    job.future.cancel()
                job.steps = None
                self._finish(job, "cancelled", "")
                cancelled.append(job)
            if job_id is None:
                del self.jobs[job.id]
        return cancelled

    def ready(self, session: Hashable) -> list[Job]:
        """The session's jobs that ended and are not yet delivered, in the order they ended
        (marked delivered: each is given out once)."""
        now = time.perf_counter()
        for job in self.running(session):
            if job.future is not None and job.future.done():
                error = job.future.exception()
                if error is None:
                    self._finish(job, "done", str(job.future.result()))
                else:
                    self._finish(job, "error", f"Sorry, {str(error) or type(error).__name__}.")
            elif now - job.asked_at > self.config.timeout_s:
                if job.future is not None:
                    job.future.cancel()
                job.steps = None
                self._finish(job, "timeout", "Sorry, that is taking too long.")
        out = sorted((j for j in self.jobs.values() if j.session == session
                      and j.state not in ("running", "cancelled") and not j.delivered),
                     key=lambda j: j.finished_at)
        for job in out:
            job.delivered = True
        return out

    def wait(self, session: Hashable, job_ids: list[int]) -> list[Job]:
        """Finish these jobs now (tool calls waited for, background-model answers stepped to
        the end, the timeout still applying) and give them out: for runs that must not
        depend on wall time (the eval, training data)."""
        jobs = [self.jobs[i] for i in job_ids if i in self.jobs]
        for job in jobs:
            while job.steps is not None:
                self._step(job)
            if job.future is not None and job.state == "running":
                left = self.config.timeout_s - (time.perf_counter() - job.asked_at)
                with contextlib.suppress(Exception):  # `ready` turns it into a result
                    job.future.result(timeout=max(0.0, left))
        ready = {j.id: j for j in self.ready(session)}
        for job in jobs:
            if job.id not in ready and job.state not in ("running", "cancelled"):
                ready[job.id] = job  # given out before: give it out to this caller too
        return [ready[i] for i in job_ids if i in ready]

    def use_idle(self, until: float) -> int:
        """Background-model decode steps, round robin over the running answers, while one more
        step fits before `until` (perf_counter). Returns the steps taken."""
        taken = 0
        while True:
            jobs = [j for j in self.jobs.values() if j.steps is not None]
            if not jobs:
                return taken
            for job in jobs:
                if time.perf_counter() + self.step_estimate_s > until:
                    return taken
                self._step(job)
                taken += 1

    def _step(self, job: Job) -> None:
        started = time.perf_counter()
        token = next(job.steps, STOP)
        spent = time.perf_counter() - started
        self.model_seconds += spent
        self.model_steps += 1
        self.step_estimate_s = max(spent, 0.8 * self.step_estimate_s + 0.2 * spent)
        if token is None:  # a prefill chunk
            return
        tokenizer = self.model.tokenizer
        if token is not STOP and token not in tokenizer.eos_ids:
            job.tokens.append(token)
            if len(job.tokens) < self.config.answer_tokens:
                return
        job.steps = None
        self._finish(job, "done", _first_sentences(tokenizer.decode(job.tokens)))

    def _finish(self, job: Job, state: str, result: str) -> None:
        job.state, job.result, job.finished_at = state, result, time.perf_counter()

    def close(self) -> None:
        for session in {j.session for j in self.jobs.values()}:
            self.cancel(session)
        self._pool.shutdown(wait=False, cancel_futures=True)


STOP = -1  # the answer's steps ran out


@torch.inference_mode()
def answer_steps(loaded: LoadedModel, prompt_ids: list[int], max_tokens: int,
                 chunk: int) -> Iterator[int | None]:
    """Greedy generation one bounded step at a time: the prompt `chunk` tokens a step
    (yielding None), then one new token a step. Short steps are what lets background work
    fill the gaps between ticks without overrunning one."""
    model = loaded.model
    cache = PagedSequence(loaded.config, len(prompt_ids) + max_tokens, model.dtype,
                          model.device)
    greedy, generator = SamplingParams(temperature=0.0), torch.Generator()
    at = 0
    while True:
        feed = prompt_ids[at:at + chunk]
        positions = torch.arange(at, at + len(feed)).unsqueeze(0)
        logits = model(torch.tensor([feed]), positions, cache, logits_at=LAST)
        at += len(feed)
        if at < len(prompt_ids):
            yield None
            continue
        break
    for step in range(max_tokens):
        token = sample(logits[0, -1], greedy, generator)
        yield token
        if step + 1 < max_tokens:
            logits = model(torch.tensor([[token]]), torch.tensor([[at + step]]), cache,
                           logits_at=LAST)


LAST = torch.tensor([-1])


def _first_sentences(text: str, most_words: int = 30) -> str:
    """A spoken-length answer: at most `most_words`, cut after the last whole sentence."""
    words = text.replace("*", " ").split()[:most_words]
    ends = [i for i, w in enumerate(words) if w[-1] in ".!?"]
    return " ".join(words[:ends[-1] + 1] if ends else words)
