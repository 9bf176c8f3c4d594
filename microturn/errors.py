"""The one exception type that reaches users: its message is a single line the CLI prints as is."""


class MicroturnError(Exception):
    """A user-facing error: bad input, a missing or corrupt file, an impossible setting."""
