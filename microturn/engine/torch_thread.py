"""The one thread a server process does its torch work on.

Each thread that runs parallel torch ops gets its own OpenMP team. On a small machine two
teams slow each other down: on 2 cores a tick run on a second thread took 1.5-2x as long as
the same tick on the thread that loaded the model (`microturn bench server`, A/B). So a server
loads the model, warms it up and runs every tick on this single thread, and its event loop
never runs torch ops.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

_thread: ThreadPoolExecutor | None = None


def torch_thread() -> ThreadPoolExecutor:
    global _thread
    if _thread is None:
        _thread = ThreadPoolExecutor(1, thread_name_prefix="microturn-torch")
    return _thread


def run_on_torch_thread(fn, *args, **kwargs):
    """Call fn on the torch thread and wait for its result (exceptions propagate)."""
    return torch_thread().submit(fn, *args, **kwargs).result()


async def on_torch_thread(fn, *args):
    """Await fn(*args) run on the torch thread, leaving the event loop free meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(torch_thread(), fn, *args)
