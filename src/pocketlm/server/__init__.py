"""The local server: OpenAI-compatible HTTP API and the chat page."""

from .app import create_app

__all__ = ["create_app"]
