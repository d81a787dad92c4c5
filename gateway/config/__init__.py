"""Configuration: YAML schema, loader with ${ENV} expansion, and the compiled runtime."""

from __future__ import annotations

from gateway.config.loader import ConfigError, load_config, load_config_text
from gateway.config.runtime import Runtime, build_runtime
from gateway.config.schema import GatewayConfig

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "Runtime",
    "build_runtime",
    "load_config",
    "load_config_text",
]
