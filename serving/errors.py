"""Client errors with their HTTP status, rendered in OpenAI's error format."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving.schemas import ErrorBody, ErrorResponse


class RequestError(Exception):
    """A request the server refuses; ``status`` is a 4xx code, ``message`` says what was wrong."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


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


class Unprocessable(RequestError):
    status = 422

    @classmethod
    def from_validation(cls, error: ValidationError) -> Unprocessable:
        details = []
        for item in error.errors()[:5]:
            where = ".".join(str(p) for p in item["loc"]) or "body"
            details.append(f"{where}: {item['msg']}")
        first = error.errors()[0]["loc"] if error.errors() else ()
        return cls("; ".join(details), param=".".join(str(p) for p in first) or None)


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)
