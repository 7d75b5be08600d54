"""Domain errors and the one mapping to an HTTP status and the OpenAI-style error body.

Every failure leaves the API as ``{"error": {"message", "type", "param", "code"}}``; the
``openai`` client reads it into its own error classes (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "AuthError",
    "ConflictError",
    "InvalidRequest",
    "JobFailed",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "RateLimited",
    "ServiceError",
    "Timeout",
    "Unavailable",
    "error_body",
    "error_response",
    "install_error_handlers",
]

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code or self.code
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class AuthError(ServiceError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFound(ServiceError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ConflictError(ServiceError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(ServiceError):
    status, type, code = 413, "invalid_request_error", "body_too_large"


class RateLimited(ServiceError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class QueueFull(ServiceError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class JobFailed(ServiceError):
    status, type, code = 500, "server_error", "job_failed"


class Unavailable(ServiceError):
    status, type, code = 503, "server_error", "unavailable"


class Timeout(ServiceError):
    status, type, code = 504, "server_error", "timeout"


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: Exception) -> JSONResponse:
    """The response for any exception: a ServiceError as it says; anything else is logged
    and answered 503 when Redis failed (the request may be retried), else 500."""
    if isinstance(exc, ServiceError):
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, exc.code),
            status_code=exc.status,
            headers=exc.headers,
        )
    if type(exc).__module__.startswith("redis"):
        log.warning("Redis failed under a request: %s: %s", type(exc).__name__, exc)
        status, code = 503, "redis_unavailable"
    else:
        log.error("unhandled error", exc_info=exc)
        status, code = 500, "internal_error"
    return JSONResponse(
        error_body(
            f"{type(exc).__name__}: the service could not answer", "server_error", None, code
        ),
        status_code=status,
        headers={"Retry-After": "1"} if status == 503 else None,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map the exceptions of routes onto the one error body. Anything else is answered by
    ``app.api.middleware.Guard`` through ``error_response``, inside the server's own error
    handling, so the connection stays usable."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, None, None),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
