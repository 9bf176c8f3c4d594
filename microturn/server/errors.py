"""`ServerError`: a refusal the client is told about: code, field, limit and HTTP status."""

from microturn.protocol import ErrorEvent, ErrorInfo


class ServerError(Exception):
    def __init__(self, code: str, message: str, status: int = 400, field: str | None = None,
                 limit: float | int | str | None = None):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
        self.field, self.limit = field, limit

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, field=self.field, message=self.message,
                         limit=self.limit)

    def event(self) -> ErrorEvent:
        return ErrorEvent(**self.info().model_dump())
