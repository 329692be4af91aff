"""One error shape for every 4xx and 5xx, the one OpenAI clients parse:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

`param` names the offending request field as a path (`messages[0].content`), so a client can
point at it. FastAPI's own 422 for validation errors becomes 400 here: OpenAI clients treat
422 as unexpected, and every validation problem is simply a bad request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from edge_runtime.errors import (
    ContextLengthError,
    DeadlineExceededError,
    EdgeError,
    GenerationError,
    OffloadError,
    OffloadRemoteError,
    OffloadTimeoutError,
    OverloadedError,
)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error response raised from a handler; rendered by `api_error_handler`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # A message may quote what the client sent; text that cannot be encoded (a lone
        # surrogate) must not turn the error response itself into a 500.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_edge_error(e: EdgeError) -> APIError:
    """The HTTP form of an error the runtime raised on purpose."""
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=e.field, code="context_length_exceeded")
    if isinstance(e, GenerationError):
        return APIError(400, str(e), param=e.field)
    if isinstance(e, OverloadedError):
        return APIError(e.status, str(e), SERVER_ERROR, code="overloaded",
                        headers=refusal_headers(e.retry_after_s, e.should_retry))
    if isinstance(e, OffloadRemoteError) and e.code == "worker_busy":
        # Every cloud slot is taken: both paths are full. That is overload (retry later),
        # not a broken gateway.
        return APIError(429, str(e), SERVER_ERROR, code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, OffloadRemoteError):
        # The cloud worker judged the request: its client errors are the client's too.
        status = 400 if e.type == INVALID_REQUEST else 502
        return APIError(status, str(e), e.type, code=e.code)
    if isinstance(e, (OffloadTimeoutError, DeadlineExceededError)):
        return APIError(504, str(e), SERVER_ERROR, code="deadline_exceeded")
    if isinstance(e, OffloadError):
        return APIError(503, str(e), SERVER_ERROR, code="cloud_unavailable",
                        headers={"Retry-After": "1"})
    # Engine or bundle failures are the server's fault, not the request's.
    return APIError(500, str(e), SERVER_ERROR)


def refusal_headers(retry_after_s: float, should_retry: bool | None = None) -> dict[str, str]:
    """When capacity returns, and whether retrying can help at all.

    `Retry-After` is whole seconds (RFC 9110), rounded up and at least 1; `retry-after-ms`
    (what OpenAI's API sends, and its clients prefer) carries the estimate to the
    millisecond, so a client waits 300 ms rather than a second. `x-should-retry: false`
    (honoured by the official openai clients) stops the retries that cannot help: without
    it they retry a 429 twice, and a refusal made in a millisecond reaches the caller
    seconds later."""
    seconds = max(0.0, retry_after_s)
    headers = {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }
    if should_retry is not None:
        headers["x-should-retry"] = "true" if should_retry else "false"
    return headers


# pydantic puts the union member it tried into `loc` (`stop.list[str]`); a client wants only
# the field path. Field names here are snake_case, type tags are not (or are builtin names).
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*[\[\]A-Z-].*)$")


def field_path(loc: Sequence[int | str]) -> str | None:
    """`("body", "messages", 0, "content")` → `messages[0].content`."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(part):
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """One 400 for a list of pydantic errors: the first field, every message about it."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "))
    param = field_path(first.get("loc", ()))
    if param is None and first.get("type") == "missing":
        return APIError(400, "the request has no body; send a JSON object")
    if param is None and isinstance(first.get("input"), (bytes, str)):
        # FastAPI leaves a body it did not parse as JSON (wrong Content-Type) as raw bytes.
        return APIError(400, "request body must be a JSON object (Content-Type: application/json)")
    # A union field reports one error per member: for a list of parts, "not a string" at
    # `content` and the real problem at `content[0].type`. Name the deepest path under the
    # same top-level field.
    top = (param or "").split(".")[0].split("[")[0]
    paths = [field_path(e.get("loc", ())) or "" for e in errors]
    param = max((p for p in paths if p.split(".")[0].split("[")[0] == top), key=len) or None
    msgs = [
        str(e.get("msg", "")).removeprefix("Value error, ")
        for e, p in zip(errors, paths, strict=True)
        if (p or None) == param
    ]
    unique = list(dict.fromkeys(msgs))  # a union reports once per member; keep each once
    where = f"'{param}'" if param else "request body"
    return APIError(400, f"invalid {where}: {' or '.join(unique)}", param=param)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    _note_error(request, exc)
    return exc.response()


async def edge_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EdgeError)
    err = from_edge_error(exc)
    _note_error(request, err)
    return err.response()


async def request_validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = validation_error(exc.errors())
    _note_error(request, err)
    return err.response()


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (404 unknown path, 405 wrong method) in the same shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
    _note_error(request, err)
    return err.response()


def _note_error(request: Request, err: APIError) -> None:
    """Record the error code for the access log (see middleware.RequestContext)."""
    ctx = request.scope.get("edge_runtime.context")
    if ctx is not None:
        ctx.error = err.code or err.type


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(EdgeError, edge_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(HTTPException, http_exception_handler)
