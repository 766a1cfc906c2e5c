"""lmproxy: a fast OpenAI-compatible router for LLM inference services."""

__version__ = "0.1.0"
