"""Secrets never reach a log: the access log's request paths lose the values of key-like
query parameters (`?api_key=...` is accepted where a header cannot be sent) and session ids
(a client-clocked HTTP session's id is its capability)."""

import logging
import re

SECRET_PARAMS = re.compile(r"((?:^|[?&])(?:api_key|key|token|access_token)=)[^&\s]*", re.I)
SESSION_IDS = re.compile(r"(/v1/sessions/)[^/?\s]+")
ACCESS_LOGGER = "uvicorn.access"


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


def install(logger_name: str = ACCESS_LOGGER) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())
