"""The OpenAI-compatible HTTP API (FastAPI). `create_app` is the entry point."""

from __future__ import annotations

from edge_runtime.api.app import create_app
from edge_runtime.api.errors import APIError

__all__ = ["APIError", "create_app"]
