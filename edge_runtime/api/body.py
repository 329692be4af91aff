"""What a request body may be, checked on the raw bytes before FastAPI parses them.

The API takes JSON objects only, labelled `application/json` (415 otherwise). The label
matters for more than tidiness: a web page may send a cross-site POST without asking the
server first (no CORS preflight) only as text/plain, form-urlencoded or multipart, so a
server that reads such bodies as JSON can be driven by any page its user opens (the keyless
loopback daemon included). Requiring application/json makes every browser ask first.

Then the body must be UTF-8 JSON that Python can carry through tokenizer and response without
an exception: no lone surrogates (`"\\ud800"` decodes to a str that cannot be encoded back),
no NaN/Infinity literals, no nesting deeper than MAX_DEPTH, no integer longer than
MAX_INT_DIGITS. Each is a 400 that names the problem; before, some were 500s, and 500s feed a
rollout's error-rate abort rule.
"""

from __future__ import annotations

import json
from typing import Any

from edge_runtime.api.errors import APIError

MAX_DEPTH = 64
"""Deepest nesting accepted (the API's own bodies are 4 levels deep; tool schemas a few more)."""
MAX_INT_DIGITS = 40
"""Longest integer literal: far beyond any int64 field, far below Python's 4300-digit limit."""
INVALID_JSON = "invalid_json"
"""The error code of a body that is not JSON this API can read (its message says why)."""
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def check_body(method: str, content_type: str | None, body: bytes) -> APIError | None:
    """The refusal of this body, or None when the app may parse it."""
    if method in _NO_BODY_METHODS and not body:
        return None
    if content_type is None and not body:
        return None  # validation says "the request has no body; send a JSON object"
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "application/json":
        got = f"got {content_type!r}" if content_type else "none was sent"
        return APIError(
            415,
            f"the request body must be JSON with 'Content-Type: application/json' ({got}; "
            "with curl: -H 'Content-Type: application/json')",
            code="unsupported_media_type",
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return APIError(
                415, f"the request body must be UTF-8, got charset {value.strip()!r}",
                code="unsupported_media_type",
            )
    if not body:
        return None
    return _check_json(body)


def _check_json(body: bytes) -> APIError | None:
    try:
        text = body.decode("utf-8-sig")  # RFC 8259: UTF-8; a leading BOM may be ignored
    except UnicodeDecodeError as e:
        return APIError(
            400, f"request body is not UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}",
            code=INVALID_JSON,
        )
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_int=_int)
    except json.JSONDecodeError as e:
        return APIError(
            400, f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
            code=INVALID_JSON,
        )
    except RecursionError:
        return APIError(400, f"request body is nested deeper than {MAX_DEPTH} levels",
                        code=INVALID_JSON)
    except ValueError as e:
        return APIError(400, f"request body is not valid JSON: {e}", code=INVALID_JSON)
    return _check_values(data)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most "
                         f"{MAX_INT_DIGITS})")
    return int(digits)


def _check_values(data: Any) -> APIError | None:
    """Depth and encodability of every key and string, iteratively (no recursion to blow)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return APIError(400, f"request body is nested deeper than {MAX_DEPTH} levels",
                            code=INVALID_JSON)
        if isinstance(value, str):
            bad = _lone_surrogate(value)
            if bad is not None:
                return APIError(
                    400,
                    f"invalid '{path or 'body'}': the text holds a lone UTF-16 surrogate "
                    f"(\\u{ord(value[bad]):04x} at character {bad}), which is not Unicode text",
                    param=path or None,
                    code="invalid_text",
                )
        elif isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else k
                if _lone_surrogate(k) is not None:
                    return APIError(400, "a key of the request body holds a lone UTF-16 "
                                    "surrogate, which is not Unicode text", code="invalid_text")
                stack.append((v, sub, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
    return None


def _lone_surrogate(s: str) -> int | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None
