"""A hostile client, generated: random frames into a live audio+video session over the real
WebSocket. Every frame gets valid events back (an `error` for what is refused), the
connection and its session survive anything but `end`, and the server ends as it began: no
session left, every KV block free. Bounded: a fixed number of examples, no deadline."""

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import serving
from test_server import run, wait_until_all_free

from microturn.client import SessionsClient, StreamSession
from microturn.protocol import AudioOptions, EndedEvent, PongEvent, SessionOptions, VideoOptions
from microturn.server.limits import ServerLimits

KEYS = ["type", "text", "tokens", "slice", "clock", "export", "max_output_tokens", "audio",
        "video", "temperature", "seed", "slice_ms"]
TYPES = ["input", "start", "ping", "end", "nope", "", None, 3]
any_text = st.one_of(  # lone surrogates too: JSON can escape them
    st.text(st.characters(categories=["L", "N", "P", "S", "Zs", "Cc"]), max_size=40),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), any_text, st.sampled_from(TYPES))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12)
messages = st.fixed_dictionaries({"type": st.sampled_from(TYPES)},
                                 optional={k: json_values for k in KEYS[1:]})
inputs = st.fixed_dictionaries({"type": st.just("input")},
                               optional={"text": any_text, "tokens": json_values,
                                         "slice": json_values})
text_frames = st.one_of(messages.map(json.dumps), inputs.map(json.dumps),
                        json_values.map(json.dumps),
                        st.text(max_size=300),
                        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n))
binary_frames = st.tuples(st.sampled_from([0, 1, 2, 3, 255]), st.binary(max_size=3000)).map(
    lambda kv: bytes([kv[0]]) + kv[1])
frames = st.one_of(text_frames, binary_frames)


async def probe(url: str, frame: str | bytes) -> None:
    options = SessionOptions(max_output_tokens=2, audio=AudioOptions(), video=VideoOptions())
    s = await StreamSession.connect(url, options, clock="client")
    await s.send_raw(frame)
    await s.ping()
    async with asyncio.timeout(20):
        while True:  # every event parses (recv validates it); the session answers the ping
            event = await s.recv()
            if isinstance(event, PongEvent):
                break
            if isinstance(event, EndedEvent):  # the frame was a valid `end`
                assert json.loads(frame)["type"] == "end"
                return
    await s.end()


def test_random_frames_never_break_a_session_or_the_server(engine):
    limits = ServerLimits(max_sessions=4, max_message_bytes=4096, max_media_bytes=4096)
    with serving(engine, limits) as served:

        @settings(max_examples=120, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(frame=frames)
        def one(frame):
            run(probe(served.url, frame))

        one()

        async def clean():
            async with SessionsClient(served.url) as http:
                await wait_until_all_free(http)
                assert (await http.health()).status == "ok"

        run(clean())
