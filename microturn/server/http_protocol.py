"""uvicorn's h11 HTTP protocol with a limit on how long a request's head may take to arrive.

uvicorn times an idle keep-alive connection, but any byte restarts that timer, and a new
connection has none: a client sending its headers a byte at a time holds a connection open for
ever (slowloris). Here every request's head, the first on a connection or the next after a
response, must be complete within `header_timeout_s` of the connection opening or the previous
response; otherwise the connection is closed. A WebSocket upgrade leaves this protocol behind.
"""

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            upgraded = self.transport.get_protocol() is not self
            if self.cycle is not cycle or upgraded:  # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
