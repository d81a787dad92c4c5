"""Load the YAML file: `${VAR}` / `${VAR:-default}` expansion, duplicate-key detection, and
validation errors that name the key and its line.

No message built here quotes the file's text: YAML syntax errors name the line, column and key
path, never PyYAML's snippet of the line (which can hold an inline secret)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from gateway.config.schema import GatewayConfig

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Far deeper than the schema goes (about 6 levels). The builder does not recurse, but
# validation and every walk of the data after it do.
_MAX_DEPTH = 64
# Far more than a real config holds; bounds what aliases can multiply ("billion laughs").
_MAX_VALUES = 1_000_000

Path_ = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why (never a secret)."""


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """Something valid but unwise in the file. Names where it is, never the value."""

    source: str
    line: int | None
    key_path: str  # dotted, as written in the file: providers.oa.keys[0].secret
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.key_path}: {self.message}"


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config and the warnings about it (empty when there is nothing to say)."""

    config: GatewayConfig
    warnings: tuple[ConfigWarning, ...] = ()
    digest: str = ""  # sha256 of the text parsed ("sha256:<hex>")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, expand and validate a YAML file. Raises ConfigError."""
    return load_config_checked(path, env).config


def load_config_text(
    text: str, source: str = "<config>", env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Validate YAML text. `env` defaults to os.environ. Raises ConfigError."""
    return load_config_text_checked(text, source, env).config


def load_config_checked(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """`load_config`, with warnings about upstream secrets written inline instead of as
    `${VAR}` references. Blocking (file read, parse): call it off the event loop when one
    runs. Raises ConfigError."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: larger than {_MAX_CONFIG_BYTES} bytes")
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8") from exc
    loaded = load_config_text_checked(text, source=str(p), env=env)
    return dataclasses.replace(loaded, digest=text_digest(text))


def text_digest(text: str) -> str:
    """The config's identity on /status: sha256 of its UTF-8 text."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def load_config_text_checked(
    text: str, source: str = "<config>", env: Mapping[str, str] | None = None
) -> LoadedConfig:
    """`load_config_text`, with the warnings of `load_config_checked`. Raises ConfigError."""
    environ = os.environ if env is None else env
    builder = _Builder(source, environ)
    if not builder.build(text):
        raise ConfigError(f"{source}: the file is empty")
    data = builder.root
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:{builder.lines[()]}: the top level must be a mapping")
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data, builder.lines, source)) from None
    return LoadedConfig(config, _inline_secrets(data, builder))


# --- YAML to plain data ---------------------------------------------------------------------
#
# Built straight from the parser's events, without PyYAML's composer: no recursion (any depth
# is a clean error, never a RecursionError), and no node graph (millions of node and mark
# objects whose garbage collection, during a reload in a worker thread, would pause the event
# loop for as long as each collection runs).

_STR_TAG = "tag:yaml.org,2002:str"


@dataclass(slots=True)
class _Open:
    """A mapping or sequence whose end event has not come yet."""

    path: Path_
    value: dict[str, Any] | list[Any]
    anchor: str | None
    size_at_start: int
    key: str | None = None  # mapping: the key read, whose value is next (None: a key is next)
    key_line: int = 0


@dataclass(frozen=True, slots=True)
class _Anchor:
    value: Any
    path: Path_ | None  # None: the anchored node is a mapping key
    size: int  # values in it, its aliases expanded


@dataclass(slots=True)
class _Builder:
    """YAML text to plain data, recording each path's line, the raw text of every scalar
    that held a `${VAR}` reference (those values are not written inline), and where each alias
    points. `build` raises ConfigError."""

    source: str
    env: Mapping[str, str]
    lines: dict[Path_, int] = field(default_factory=dict)
    env_refs: dict[Path_, str] = field(default_factory=dict)
    aliases: dict[Path_, Path_] = field(default_factory=dict)  # alias path -> anchor path
    root: Any = field(default=None, init=False)
    _open: list[_Open] = field(default_factory=list, init=False)
    _anchors: dict[str, _Anchor | None] = field(default_factory=dict, init=False)  # None: open
    _size: int = field(default=0, init=False)
    _resolver: yaml.resolver.Resolver = field(default_factory=yaml.resolver.Resolver, init=False)
    _constructor: yaml.constructor.SafeConstructor = field(
        default_factory=yaml.constructor.SafeConstructor, init=False
    )

    def build(self, text: str) -> bool:
        """Read `text` into `root`; False when it holds no document at all."""
        documents = 0
        try:
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.NodeEvent):
                    self._node(event)
                elif isinstance(event, yaml.CollectionEndEvent):
                    self._close()
                elif isinstance(event, yaml.DocumentStartEvent):
                    documents += 1
                    if documents > 1:
                        problem = "expected a single document in the stream, found another"
                        raise ConfigError(self._invalid(event.start_mark, problem))
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow
            line = text.count("\n", 0, exc.position) + 1
            column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            raise ConfigError(
                f"{self.source}: invalid YAML: line {line}, column {column}: "
                f"unacceptable character #x{exc.character:04x}"
            ) from None
        except yaml.MarkedYAMLError as exc:
            message = self._invalid(exc.problem_mark, exc.problem or "syntax error")
            if exc.context:
                mark = exc.context_mark
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                message += f" ({exc.context}{at})"
            raise ConfigError(message) from None
        except yaml.YAMLError:
            raise ConfigError(f"{self.source}: invalid YAML") from None
        return documents > 0

    def origin(self, path: Path_) -> Path_:
        """Where the text of the value at `path` is, following aliases to their anchors."""
        for _ in range(_MAX_DEPTH):  # each step lands on an anchor written earlier
            for cut in range(len(path), 0, -1):
                target = self.aliases.get(path[:cut])
                if target is not None:
                    path = (*target, *path[cut:])
                    break
            else:
                return path
        return path

    def _invalid(self, mark: Any, problem: str) -> str:
        """PyYAML's messages quote the line (which may hold a secret): rebuilt without it."""
        message = f"{self.source}: invalid YAML"
        if mark is not None:
            message += f": line {mark.line + 1}, column {mark.column + 1}"
        path = self._here()
        if path:
            message += f", in {_dotted(path)}"
        return f"{message}: {problem}"

    def _here(self) -> Path_:
        """The path the parser is at: the next node's slot, or the mapping awaiting a key."""
        slot = self._slot()
        return slot if slot is not None else self._open[-1].path

    def _slot(self) -> Path_ | None:
        """The path of the next node; None when it is a mapping key."""
        if not self._open:
            return ()
        top = self._open[-1]
        if isinstance(top.value, list):
            return (*top.path, len(top.value))
        return None if top.key is None else (*top.path, top.key)

    def _node(self, event: yaml.NodeEvent) -> None:
        line = event.start_mark.line + 1 if event.start_mark else 0
        where = f"{self.source}:{line}"
        if len(self._open) >= _MAX_DEPTH:
            raise ConfigError(f"{where}: nested too deeply (more than {_MAX_DEPTH} levels)")
        slot = self._slot()
        if isinstance(event, yaml.AliasEvent):
            name = event.anchor or ""
            if name not in self._anchors:
                raise ConfigError(
                    self._invalid(event.start_mark, f"found undefined alias {name!r}")
                )
            anchor = self._anchors[name]
            if anchor is None:
                raise ConfigError(
                    f"{where}: {_dotted(self._here())}: alias *{name} refers to a node that "
                    "contains it"
                )
            self._grow(anchor.size, where)
            if slot is not None and anchor.path is not None:
                self.aliases[slot] = anchor.path
            self._place(anchor.value, slot, line)
        elif isinstance(event, yaml.ScalarEvent):
            value = self._scalar(event, slot, where)
            self._grow(1, where)
            if event.anchor is not None:
                self._anchors[event.anchor] = _Anchor(value, slot, 1)
            self._place(value, slot, line)
        else:
            assert isinstance(event, yaml.CollectionStartEvent)
            if slot is None:
                raise ConfigError(f"{where}: keys must be scalars")
            container: dict[str, Any] | list[Any] = (
                {} if isinstance(event, yaml.MappingStartEvent) else []
            )
            size_at_start = self._size
            self._grow(1, where)
            if event.anchor is not None:
                self._anchors[event.anchor] = None
            self._place(container, slot, line)
            self._open.append(_Open(slot, container, event.anchor, size_at_start))

    def _close(self) -> None:
        done = self._open.pop()
        if done.anchor is not None:
            self._anchors[done.anchor] = _Anchor(
                done.value, done.path, self._size - done.size_at_start
            )

    def _place(self, value: Any, slot: Path_ | None, line: int) -> None:
        if not self._open:
            self.root = value
            self.lines[()] = line
            return
        top = self._open[-1]
        if isinstance(top.value, list):
            top.value.append(value)
        elif top.key is None:  # `value` is a key
            if not isinstance(value, str | int | float | bool):
                raise ConfigError(f"{self.source}:{line}: keys must be scalars")
            key = str(value)
            if key in top.value:
                raise ConfigError(
                    f"{self.source}:{line}: duplicate key {_dotted((*top.path, key))}"
                )
            top.key, top.key_line = key, line
            return
        else:
            top.value[top.key] = value
            line = top.key_line  # errors about a key point at the key's line
            top.key = None
        assert slot is not None
        self.lines[slot] = line

    def _scalar(self, event: yaml.ScalarEvent, slot: Path_ | None, where: str) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._resolver.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, event.value, event.implicit
            )
        if tag == _STR_TAG:
            value: Any = event.value
        else:
            # The safe constructor resolves YAML 1.1 scalars (ints, bools, nulls) as
            # yaml.safe_load does. Its errors (a bad `!!int`, an unknown tag) can quote the
            # value: not passed on.
            node = yaml.ScalarNode(tag, event.value, style=event.style)
            try:
                value = self._constructor.construct_object(node)
            except Exception:  # ValueError, KeyError, ... from the tag's constructor
                raise ConfigError(
                    f"{where}: {_dotted(self._here())}: cannot read this value as {tag}"
                ) from None
            finally:
                self._constructor.constructed_objects.clear()
        if slot is not None and isinstance(value, str) and "${" in value:
            expanded = _expand(value, self.env, where)
            if expanded is not value:
                self.env_refs[slot] = value
            return expanded
        return value

    def _grow(self, values: int, where: str) -> None:
        # Aliases share their anchor's data, but validation visits every use: bounded.
        self._size += values
        if self._size > _MAX_VALUES:
            raise ConfigError(f"{where}: more than {_MAX_VALUES} values (aliases expanded)")


def _expand(value: str, env: Mapping[str, str], where: str) -> str:
    """`value` with its `${VAR}` references replaced; the same object when it holds none."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None and not value:  # shell semantics: unset or empty
            return default
        if value is not None:
            return value
        raise ConfigError(f"{where}: environment variable {name} is not set (and has no default)")

    if not _ENV_REF.search(value):
        return value
    return _ENV_REF.sub(sub, value)


# --- warnings --------------------------------------------------------------------------------

_INLINE_KEY = "secret written inline (use ${ENV_VAR})"
_INLINE_HEADER = "header value written inline (use ${ENV_VAR} if it is a secret)"
_INLINE_URL = "password written inline in the URL (use ${ENV_VAR})"
# Stands in for each `${VAR}` of a raw URL, so that its parts can be told apart.
_ENV_MARK = "\x00"


def _inline_secrets(data: dict[str, Any], builder: _Builder) -> tuple[ConfigWarning, ...]:
    """Upstream secrets whose value is written in the file instead of coming (fully or
    partly) from a `${VAR}`. `data` has passed validation, so its shape is the schema's."""
    found: list[tuple[Path_, str]] = []
    for name, provider in _mapping(data.get("providers")).items():
        for i in range(len(_sequence(_mapping(provider).get("keys")))):
            found.append((("providers", name, "keys", i, "secret"), _INLINE_KEY))
        for header in _mapping(_mapping(provider).get("headers")):
            found.append((("providers", name, "headers", header), _INLINE_HEADER))
    if "secret" in _mapping(_mapping(data.get("auth")).get("jwt")):
        found.append((("auth", "jwt", "secret"), _INLINE_KEY))
    if "token" in _mapping(data.get("admin")):
        found.append((("admin", "token"), _INLINE_KEY))

    warnings = [
        _warning(builder, path, message)
        for path, message in found
        if builder.origin(path) not in builder.env_refs and _lookup(data, path) not in (None, "")
    ]
    redis_path: Path_ = ("state", "redis_url")
    url = builder.env_refs.get(builder.origin(redis_path), _lookup(data, redis_path))
    if isinstance(url, str):
        try:
            password = urlsplit(_ENV_REF.sub(_ENV_MARK, url)).password
        except ValueError:
            password = None
        if password and _ENV_MARK not in password:
            warnings.append(_warning(builder, redis_path, _INLINE_URL))
    return tuple(warnings)


def _warning(builder: _Builder, path: Path_, message: str) -> ConfigWarning:
    # The line where the value is written: an aliased secret is written at its anchor.
    line = builder.lines.get(builder.origin(path))
    return ConfigWarning(builder.source, line, _dotted(path), message)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sequence(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _lookup(data: Any, path: Path_) -> Any:
    for part in path:
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


# --- messages --------------------------------------------------------------------------------


def _looks_like_a_value(loc: Path_, data: dict[str, Any]) -> bool:
    """An unknown key with no value, or with spaces in it, is likely a value that lost its
    key (`{id: k1, sk-...}`, `{secret sk-...}`): its name could be a secret."""
    name = str(loc[-1]) if loc else ""
    return _lookup(data, loc) is None or any(c.isspace() for c in name)


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def _describe(
    exc: ValidationError, data: dict[str, Any], lines: dict[Path_, int], source: str
) -> str:
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
        if err["type"] == "extra_forbidden" and _looks_like_a_value(loc, data):
            parent = _dotted(loc[:-1]) if len(loc) > 1 else "the top level"
            messages.append(
                f"{where}: unknown key in {parent} "
                "(name not shown: it looks like a value written without its key)"
            )
        elif err["type"] == "extra_forbidden":
            messages.append(f"{where}: unknown key {_dotted(loc)}")
        elif err["type"] == "missing":
            messages.append(f"{where}: {_dotted(loc)}: required key is missing")
        else:
            messages.append(f"{where}: {_dotted(loc)}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(messages)
