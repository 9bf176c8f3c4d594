"""Periodic checkpoints of live sessions: each session's export written every `every_s`
seconds to a directory or any fsspec URL (`file://`, `memory://`, `s3://` with its package),
so a crash loses at most that interval. A client continues a session from its last checkpoint
with `resume_session` (docs/PROTOCOL.md); a clean close removes it.

Writes go to a temporary name first and are then moved over the old one, so a reader never
sees half a file.
"""

import asyncio
import json
from dataclasses import dataclass

import fsspec

from microturn.errors import MicroturnError


@dataclass
class CheckpointStore:
    url: str  # a directory or fsspec URL; one `<session id>.json` per live session
    every_s: float = 5.0

    def __post_init__(self):
        self._written: dict[str, int] = {}  # session -> turns in its newest checkpoint
        self._lock = asyncio.Lock()
        if not 0.2 <= self.every_s <= 3600:
            raise MicroturnError(f"checkpoint interval must be in [0.2, 3600] s, "
                                 f"got {self.every_s}")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.fs.makedirs(self.root, exist_ok=True)
        except (OSError, ValueError, ImportError) as exc:
            raise MicroturnError(f"checkpoint dir {self.url}: {exc}") from None

    def _path(self, session: str) -> str:
        return f"{self.root.rstrip('/')}/{session}.json"

    async def write(self, session: str, export: dict) -> None:
        """Save `export`, unless a newer one of the session is already saved (a periodic save
        that raced the session's final one at close)."""
        turns = len(export["turns"])
        async with self._lock:
            if turns < self._written.get(session, -1):
                return
            await asyncio.to_thread(self._write, session, json.dumps(export))
            self._written[session] = turns

    def _write(self, session: str, text: str) -> None:
        path = self._path(session)
        with self.fs.open(path + ".tmp", "w") as f:
            f.write(text)
        self.fs.mv(path + ".tmp", path)

    async def read(self, session: str) -> dict | None:
        return await asyncio.to_thread(self._read, session)

    def _read(self, session: str) -> dict | None:
        path = self._path(session)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path) as f:
            return json.loads(f.read())

    async def forget(self, session: str) -> None:
        self._written.pop(session, None)
        await asyncio.to_thread(self._forget, session)

    def _forget(self, session: str) -> None:
        path = self._path(session)
        if self.fs.exists(path):
            self.fs.rm(path)
