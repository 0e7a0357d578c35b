"""Client errors with their HTTP status, rendered in OpenAI's error format."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving.schemas import ErrorBody, ErrorResponse


class RequestError(Exception):
    """A request the server refuses (4xx) or could not serve (5xx); ``message`` says why."""

    status = 400
    type = "invalid_request_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def response(self, request_id: str | None = None, *, echo: bool = True) -> JSONResponse:
        """The error in OpenAI's format; ``echo`` adds the request id as ``X-Request-Id``."""
        headers = dict(self.headers or {})
        if request_id and echo:
            headers["X-Request-Id"] = request_id
        return error_response(
            self.status, self.message, self.type, self.param, self.code, headers=headers
        )


class BadRequest(RequestError):
    status = 400


class Unauthorized(RequestError):
    status = 401
    type = "authentication_error"


class NotFound(RequestError):
    status = 404
    type = "not_found_error"


class TooLarge(RequestError):
    status = 413


class TooManyRequests(RequestError):
    """Over the replica's queue limit: retry later (the openai client does, after Retry-After)."""

    status = 429
    type = "rate_limit_error"
    headers = {"Retry-After": "1"}


class ServerError(RequestError):
    """A fault of the server, not of the request (logged with the request id)."""

    status = 500
    type = "server_error"


class InvalidBody(BadRequest):
    """A body that does not fit the schema: a 400 naming the first field, as OpenAI and vLLM
    answer (FastAPI's default would be a 422)."""

    @classmethod
    def from_validation(cls, error: ValidationError) -> InvalidBody:
        details = []
        for item in error.errors()[:5]:
            where = ".".join(str(p) for p in item["loc"]) or "body"
            details.append(f"{where}: {item['msg']}")
        first = error.errors()[0]["loc"] if error.errors() else ()
        return cls("; ".join(details), param=".".join(str(p) for p in first) or None)


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)
