"""LLM streaming gateway: a byte-exact SSE reverse proxy for OpenAI and Anthropic wire APIs."""

from __future__ import annotations

__version__ = "0.1.0"
