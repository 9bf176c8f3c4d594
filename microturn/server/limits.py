"""Every limit the server enforces, with its default (docs/PROTOCOL.md lists them too)."""

from dataclasses import asdict, dataclass

from microturn.errors import MicroturnError


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 16  # open sessions, WebSocket and HTTP together
    max_message_bytes: int = 65_536  # one WebSocket text frame or one HTTP request body
    max_media_bytes: int = 1_048_576  # one binary WebSocket frame (audio chunk or image)
    max_input_tokens: int = 64  # per input slice
    max_buffered_slices: int = 25  # input queued ahead of the open slice (5 s at 200 ms)
    idle_timeout_s: float = 60.0  # no message from the client for this long: session closed
    start_timeout_s: float = 10.0  # a WebSocket that sends no `start` for this long is closed
    body_timeout_s: float = 10.0  # an HTTP request body still arriving after this is refused
    header_timeout_s: float = 10.0  # a request head still arriving after this: connection closed
    max_queued_events: int = 64  # output events a slow reader may leave unread

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise MicroturnError(f"{name.replace('_', '-')} must be > 0, got {value}")

    @property
    def ws_max_size(self) -> int:
        """The WebSocket layer's own cut-off: frames over it close the connection (1009)."""
        return max(4 * self.max_message_bytes, 2 * self.max_media_bytes)

    def public(self) -> dict:
        fields = asdict(self)
        del fields["max_queued_events"]
        return fields
