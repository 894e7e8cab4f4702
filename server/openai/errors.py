"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Bad input is a 400 (not FastAPI's 422), so the SDK raises BadRequestError and does not retry
it; overload is a 503 with Retry-After, which the SDK does retry after the given delay.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status)
    if error_type is None:
        error_type = "server_error" if status >= 500 else HTTPStatus(status).phrase
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
