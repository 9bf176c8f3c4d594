"""Portable sessions through the server: a session continued from its export (HTTP) or from
the server's last checkpoint after a restart (WebSocket) goes on bit for bit as an
uninterrupted one, with the slices numbered on; bad resumes are refused by name."""

import asyncio
import json
import random

import httpx
import pytest
from serving import serving
from test_engine import tiny_loaded

from microturn.checkpoint.loader import load_tokenizer
from microturn.client import ClientError, SessionsClient, StreamSession
from microturn.engine.engine import Engine, EngineConfig
from microturn.protocol import OutputEvent, SessionOptions
from microturn.server.checkpoints import CheckpointStore

OPTIONS = SessionOptions(max_output_tokens=3, temperature=0.9, top_p=0.95, seed=4,
                         deterministic=True)


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_loaded(load_tokenizer()),
                  EngineConfig(kv_budget_mb=32, block_size=16, deterministic=True,
                               resume_chunk=16))


def texts(n: int) -> list[str]:
    rng = random.Random(2)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "hills",
             "and", "quiet", "towns"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 3))) for _ in range(n)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_http_resume_from_an_export_goes_on_bitwise(engine):
    said = texts(16)

    async def main(url):
        async with SessionsClient(url) as http:
            whole = await http.open(OPTIONS)
            reference = [await http.slice(whole.session, t) for t in said]
            first = await http.open(OPTIONS)
            for t in said[:9]:
                await http.slice(first.session, t)
            export = (await http.close(first.session, export=True)).export
            resumed = await http.open(SessionOptions(resume=export))
            assert resumed.resumed_from == 9
            again = [await http.slice(resumed.session, t) for t in said[9:]]
            assert [o.slice for o in again] == list(range(9, 16))
            assert [o.tokens for o in again] == [o.tokens for o in reference[9:]]
            ended = await http.close(resumed.session, export=True)
            full = await http.close(whole.session, export=True)
            assert ended.export["logprobs"] == full.export["logprobs"]

            export["turns"][4]["input_ids"].append(17)  # negative control: another history
            changed = await http.open(SessionOptions(resume=export))
            other = [await http.slice(changed.session, t) for t in said[9:]]
            assert [o.tokens for o in other] != [o.tokens for o in reference[9:]]

            with pytest.raises(ClientError) as refused:
                await http.open(SessionOptions(resume={"turns": 3}))
            assert refused.value.info.field == "resume"

    with serving(engine) as served:
        run(main(served.url))


def test_a_session_resumes_from_the_last_checkpoint_after_a_restart(engine, tmp_path):
    said = texts(14)
    store = CheckpointStore(str(tmp_path), every_s=0.2)

    async def first_half(url) -> str:
        s = await StreamSession.connect(url, OPTIONS, clock="client")
        for t in said[:8]:
            await s.send(t)
            while not isinstance(await s.recv(), OutputEvent):
                pass
        saved = tmp_path / f"{s.session_id}.json"
        for _ in range(100):  # the next checkpoint holds all 8 slices
            await asyncio.sleep(0.1)
            if saved.exists() and len(json.loads(saved.read_text())["turns"]) == 8:
                break
        await s.close()  # the connection drops (the session would idle out)
        return s.session_id

    async def reference(url) -> list[list[int]]:
        s = await StreamSession.connect(url, OPTIONS, clock="client")
        out = []
        for t in said:
            await s.send(t)
            while not isinstance(event := await s.recv(), OutputEvent):
                pass
            out.append(event.tokens)
        await s.end()
        return out

    async def second_half(url, session_id) -> list[OutputEvent]:
        s = await StreamSession.connect(url, SessionOptions(resume_session=session_id),
                                        clock="client")
        assert s.started.resumed_from == 8
        out = []
        for t in said[8:]:
            await s.send(t)
            while not isinstance(event := await s.recv(), OutputEvent):
                pass
            out.append(event)
        await s.end()
        return out

    with serving(engine, checkpoints=store) as served:
        session_id = run(first_half(served.url))
        expected = run(reference(served.url))
    with serving(engine, checkpoints=store) as restarted:  # a new server, the same store
        events = run(second_half(restarted.url, session_id))
        assert [e.slice for e in events] == list(range(8, 14))
        assert [e.tokens for e in events] == expected[8:]
        response = httpx.post(f"{restarted.url}/v1/sessions",
                              json={"resume_session": "never-was"})
        assert response.status_code == 404
        assert response.json()["error"]["field"] == "resume_session"
