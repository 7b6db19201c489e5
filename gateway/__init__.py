"""The Quiver gateway: the OpenAI HTTP API in front of vLLM, with adapter hot-swap."""

from gateway.app import create_app, server_config
from gateway.settings import Settings

__all__ = ["Settings", "create_app", "server_config"]
