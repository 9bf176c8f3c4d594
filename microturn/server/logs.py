"""What the server's logs may say.

- Secrets never reach a log: the access log's request paths lose the values of key-like query
  parameters (`?api_key=...` is accepted where a header cannot be sent) and session ids (a
  client-clocked HTTP session's id is its capability).
- A client's fault is a counted refusal, not a server error: uvicorn's error records for an
  invalid UTF-8 text frame (it closes the socket with 1007) and for a refused WebSocket
  handshake (our 401 denial, which uvicorn's sans-I/O protocol reports as an incomplete
  handshake) become `microturn_client_errors_total` counts instead of tracebacks.
"""

import logging
import re
from collections.abc import Callable

SECRET_PARAMS = re.compile(r"((?:^|[?&])(?:api_key|key|token|access_token)=)[^&\s]*", re.I)
SESSION_IDS = re.compile(r"(/v1/sessions/)[^/?\s]+")
ACCESS_LOGGER = "uvicorn.access"
ERROR_LOGGER = "uvicorn.error"
# uvicorn's message -> our error code (None: already counted where we refused)
CLIENT_FAULTS = {"Invalid UTF-8 sequence received from client.": "invalid_utf8",
                 "ASGI callable returned without completing handshake.": None}


def redact(path: str) -> str:
    return SESSION_IDS.sub(r"\1[session]", SECRET_PARAMS.sub(r"\1[redacted]", path))


class RedactSecrets(logging.Filter):
    """uvicorn's access record carries (client, method, path with query, http version,
    status) as its args: the path is rewritten before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


class CountClientFaults(logging.Filter):
    def __init__(self, count: Callable[[str], None]):
        super().__init__()
        self.count = count

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in CLIENT_FAULTS:
            return True
        if (code := CLIENT_FAULTS[record.msg]) is not None:
            self.count(code)
        return False


def install(count_client_error: Callable[[str], None]) -> None:
    """Both filters, once per process; the count goes to the newest app's metrics."""
    access = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactSecrets) for f in access.filters):
        access.addFilter(RedactSecrets())
    errors = logging.getLogger(ERROR_LOGGER)
    for f in errors.filters:
        if isinstance(f, CountClientFaults):
            f.count = count_client_error
            return
    errors.addFilter(CountClientFaults(count_client_error))
