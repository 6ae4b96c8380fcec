"""OpenAI-shaped errors: raise an `APIError` subclass anywhere, one handler renders it.

Every body is `{"error": {"message", "type", "param", "code"}}`; no traceback ever leaves the
server (unexpected exceptions are logged here and answered with a generic 500).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.sse import sse

log = logging.getLogger("serve.errors")


class StartupError(RuntimeError):
    """The server cannot start (bad provider, missing model directory); the message is for the user."""


class EngineCrashed(StartupError):
    """`--api-workers`: the engine process died while serving; the server exits with status 1."""


class APIError(Exception):
    """An error a client sees: HTTP status, OpenAI error type, the offending `param`, a `code`."""

    status_code = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def sse(self) -> bytes:
        """The error as a final SSE event, for errors after a stream has started."""
        return sse(self.body())


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    """401; OpenAI's type for a missing or wrong key is `invalid_request_error` (code
    `invalid_api_key`)."""

    status_code = 401
    type = "invalid_request_error"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"


class MethodNotAllowedError(APIError):
    status_code = 405
    type = "invalid_request_error"


class PayloadTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"


class UnsupportedMediaTypeError(APIError):
    status_code = 415
    type = "invalid_request_error"


class RateLimitError(APIError):
    """429: the request queue is full (OpenAI's rate-limit shape, so SDKs back off and retry)."""

    status_code = 429
    type = "requests"


class ServerError(APIError):
    status_code = 500
    type = "server_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "server_error"


GENERIC_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 (no route) and 405 (wrong method), in OpenAI's shape."""
    return await api_error_handler(request, http_error(request, exc))


def http_error(request: Request, exc: Exception) -> APIError:
    """Starlette's `HTTPException` (404 no route, 405 wrong method) as an `APIError`."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    error: APIError
    if exc.status_code == 404:
        error = NotFoundError(f"Invalid URL ({where})")
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error = MethodNotAllowedError(
            f"Invalid method for URL ({where}); allowed: {allow}", headers=exc.headers
        )
    else:
        error = APIError(str(exc.detail), headers=exc.headers)
        error.status_code = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Last resort for exceptions that escaped the routes' own guard."""
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return await api_error_handler(request, ServerError(GENERIC_SERVER_ERROR))


EXCEPTION_HANDLERS = {
    APIError: api_error_handler,
    HTTPException: http_exception_handler,
    Exception: unexpected_error_handler,
}
