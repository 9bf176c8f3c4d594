"""Client input decoded into what a slice carries, before any scheduling: text to token ids,
PCM16 to the session's 16 kHz audio, PNG/JPEG to frames. Each refusal is a `ServerError`
naming the field and the limit; media that would wait longer than `max_buffered_slices` is
refused whole (backpressure), so nothing is half-queued."""

import asyncio
import time

from microturn.checkpoint.tokenizer import Tokenizer
from microturn.errors import MicroturnError
from microturn.frontend.video import decode_image
from microturn.sequence.media_specs import AUDIO_RATE
from microturn.server.errors import ServerError
from microturn.server.limits import ServerLimits
from microturn.server.live_session import LiveSession
from microturn.server.metrics import ServerMetrics


class InputDecoder:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, limits: ServerLimits,
                 metrics: ServerMetrics):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.limits, self.metrics = limits, metrics

    def tokens(self, text: str, tokens: list[int] | None) -> tuple[list[int], str]:
        """The input's token ids and the field they came from; ids checked against the vocab."""
        if tokens is not None:
            if text:
                raise ServerError("invalid", "send text or tokens, not both", 422, "tokens")
            if any(not 0 <= t < self.vocab_size for t in tokens):
                raise ServerError("invalid", f"token ids must be in [0, {self.vocab_size})",
                                  422, "tokens", self.vocab_size)
            return tokens, "tokens"
        if len(text) > self.limits.max_message_bytes:
            raise ServerError("limit", "text longer than max_message_bytes", 413, "text",
                              self.limits.max_message_bytes)
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError as exc:  # a lone surrogate: JSON allows the escape
                raise ServerError("invalid", f"text: not valid Unicode ({exc.reason} at "
                                  f"character {exc.start})", 422, "text") from None
        return (self.tokenizer.encode(text) if text else []), "text"

    def audio(self, live: LiveSession, pcm16: bytes) -> None:
        """PCM16 for the session's audio, in order; slices take it 3,200 samples at a time
        (`MediaAssembler`). Refused whole when more than max_buffered_slices would wait."""
        if live.pcm is None:
            raise ServerError("invalid", "this session was opened without audio (start with "
                              "\"audio\": {...})", 422, "audio")
        frames = len(pcm16) // (2 * live.pcm.channels)
        incoming = frames * AUDIO_RATE / live.pcm.rate / live.media.samples_per_slice
        limit = self.limits.max_buffered_slices
        if live.media.buffered_audio_slices + incoming > limit:
            raise ServerError("backpressure", f"audio would wait for more than "
                              f"max_buffered_slices {limit} slices; send in real time", 429,
                              "audio", limit)
        try:
            live.media.push_audio(live.pcm.push(pcm16))
        except MicroturnError as exc:
            raise ServerError("invalid", str(exc), 422, "audio") from None
        live.last_seen = time.monotonic()
        self.metrics.audio_seconds.inc(frames / live.pcm.rate)

    async def image(self, live: LiveSession, data: bytes) -> None:
        """One PNG/JPEG frame for the next frame due (`MediaAssembler`). Decoding and resizing
        (1-5 ms) run off the event loop; the connection's next message waits for it, so
        images keep their order."""
        if live.media is None or live.media.layout.video is None:
            raise ServerError("invalid", "this session was opened without video (start with "
                              "\"video\": {...})", 422, "image")
        try:
            frame = await asyncio.to_thread(decode_image, data, live.media.layout.video)
        except MicroturnError as exc:
            raise ServerError("invalid", str(exc), 422, "image") from None
        try:
            live.media.push_frame(frame)
        except MicroturnError as exc:
            raise ServerError("backpressure", str(exc), 429, "image",
                              self.limits.max_buffered_slices) from None
        live.last_seen = time.monotonic()
        self.metrics.images.inc()

    def slice_request(self, live: LiveSession, text: str, tokens: list[int] | None,
                      slice_index: int | None) -> list[int]:
        """Client clock: one whole slice's ids, refused when over max_input_tokens, when
        max_buffered_slices already wait for the engine, or out of order."""
        ids, field_name = self.tokens(text, tokens)
        live.last_seen = time.monotonic()
        if len(ids) > self.limits.max_input_tokens:
            raise ServerError("limit", f"{len(ids)} tokens in one slice, over max_input_tokens "
                              f"{self.limits.max_input_tokens}", 422, field_name,
                              self.limits.max_input_tokens)
        if len(live.requests) >= self.limits.max_buffered_slices:
            raise ServerError("backpressure", f"{len(live.requests)} slices already wait for "
                              f"the engine (max_buffered_slices "
                              f"{self.limits.max_buffered_slices}); wait for outputs",
                              429, "slice", self.limits.max_buffered_slices)
        if slice_index is not None and slice_index != live.submitted:
            raise ServerError("slice_order", f"slice {slice_index} sent, the next slice of "
                              f"this session is {live.submitted}", 409, "slice",
                              live.submitted)
        return ids
