"""Load the YAML file: `${VAR}` / `${VAR:-default}` expansion, duplicate-key detection, and
validation errors that name the key and its line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.schema import GatewayConfig

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MAX_CONFIG_BYTES = 4 * 1024 * 1024

Path_ = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why (never a secret)."""


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, expand and validate a YAML file. Raises ConfigError."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: larger than {_MAX_CONFIG_BYTES} bytes")
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8") from exc
    return load_config_text(text, source=str(p), env=env)


def load_config_text(
    text: str, source: str = "<config>", env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Validate YAML text. `env` defaults to os.environ. Raises ConfigError."""
    environ = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if node is None:
        raise ConfigError(f"{source}: the file is empty")
    lines: dict[Path_, int] = {}
    data = _construct(node, (), lines, source, environ)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: the top level must be a mapping")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, lines, source)) from None


def _construct(
    node: yaml.Node,
    path: Path_,
    lines: dict[Path_, int],
    source: str,
    env: Mapping[str, str],
) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if not isinstance(key, str | int | float | bool):
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: keys must be scalars")
            key_s = str(key)
            if key_s in out:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{source}:{line}: duplicate key {_dotted((*path, key_s))}")
            out[key_s] = _construct(value_node, (*path, key_s), lines, source, env)
            # Errors about a key point at the key's own line, not at its block value's first.
            lines[(*path, key_s)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(item, (*path, i), lines, source, env) for i, item in enumerate(node.value)
        ]
    assert isinstance(node, yaml.ScalarNode)
    value = _scalar(node)
    if isinstance(value, str) and "${" in value:
        return _expand(value, env, f"{source}:{node.start_mark.line + 1}")
    return value


def _scalar(node: yaml.Node) -> Any:
    # The safe constructor resolves YAML 1.1 scalars (ints, bools, nulls) as yaml.safe_load does.
    return yaml.SafeLoader("").construct_object(node)


def _expand(value: str, env: Mapping[str, str], where: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None and not value:  # shell semantics: unset or empty
            return default
        if value is not None:
            return value
        raise ConfigError(f"{where}: environment variable {name} is not set (and has no default)")

    return _ENV_REF.sub(sub, value)


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def _describe(exc: ValidationError, lines: dict[Path_, int], source: str) -> str:
    messages = []
    for err in exc.errors(include_url=False, include_input=False):
        loc: Path_ = tuple(p for p in err["loc"] if isinstance(p, str | int))
        # The `model: [deployments]` shorthand has no `deployments` node in the YAML.
        if (
            len(loc) >= 3
            and loc[0] == "models"
            and loc[2] == "deployments"
            and loc[:3] not in lines
        ):
            loc = (*loc[:2], *loc[3:])
        # pydantic inserts the discriminator of a "before" validator's output; keep what maps.
        line = None
        probe = loc
        while probe:
            if probe in lines:
                line = lines[probe]
                break
            probe = probe[:-1]
        where = f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            messages.append(f"{where}: unknown key {_dotted(loc)}")
        elif err["type"] == "missing":
            messages.append(f"{where}: {_dotted(loc)}: required key is missing")
        else:
            messages.append(f"{where}: {_dotted(loc)}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(messages)
