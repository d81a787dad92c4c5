"""Whole reloads: SIGHUP, or (with `server.watch_config`) a change of the file on disk.

A reload reads and compiles the file in a worker thread (a large file takes seconds), builds a
whole new Runtime with the running one's key health and in-flight counts (carried by key
fingerprint) and its JWT verifier when `auth.jwt` is unchanged (else a new one, with its keys
fetched), and swaps it in with one assignment. Requests already running keep the runtime they
started with; new ones get the new one. A file that does not load is rejected whole: the running
config stays, and the log and /status say why. Keys that only a restart applies (the listener,
the state backend, the admin listener, telemetry) are named at warning level and on /status;
the rest applies.

Reloads run one at a time, in trigger order; one that a newer trigger has overtaken while it
waited skips its read (the newer one reads the file).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from aiohttp import web

from gateway.app import retire_jwt, with_jwt
from gateway.appkeys import OPS, RUNTIME
from gateway.config import ConfigError, build_runtime
from gateway.config.loader import ConfigWarning, load_config_checked
from gateway.config.runtime import Runtime
from gateway.config.schema import GatewayConfig
from gateway.logs import get_logger
from gateway.ops import ReloadResult, restart_required
from gateway.tasks import Tasks

_log = get_logger("gateway")


def log_config_warnings(warnings: tuple[ConfigWarning, ...]) -> None:
    for w in warnings:  # where, never the value
        _log.warning(
            "config warning", file=w.source, line=w.line, key_path=w.key_path, problem=w.message
        )


class Reloader:
    """Reloads `path` into `app` on demand (`trigger`) and, when the config asks, on change."""

    def __init__(
        self,
        app: web.Application,
        path: str,
        adjust: Callable[[GatewayConfig], GatewayConfig] | None = None,
    ) -> None:
        """`adjust`: what this process changes in every config it loads (a worker's admin
        port), applied to each reload as at start."""
        self.app = app
        self.path = path
        self._adjust = adjust
        self._tasks = Tasks("config-reload")
        self._one_at_a_time = asyncio.Lock()
        self._latest = 0
        self._seen = self._stat()  # the file as last looked at by the watcher

    def trigger(self, why: str) -> None:
        """Start a reload (returns at once)."""
        self._latest += 1
        self._tasks.spawn(self.reload(self._latest, why), "config-reload")

    async def reload(self, generation: int, why: str) -> bool:
        """Load, build and swap; True when the new config is in service."""
        async with self._one_at_a_time:
            if generation != self._latest:
                return False
            return await self._reload(why)

    async def _reload(self, why: str) -> bool:
        app = self.app
        ops = app[OPS]
        old = app[RUNTIME].current
        started = time.perf_counter()
        try:
            new, warnings, digest, needs_restart = await asyncio.to_thread(self._load, old)
        except ConfigError as exc:
            return self._rejected(why, str(exc))
        except Exception as exc:  # a bug, not a bad file: the old config stays too
            return self._rejected(why, f"unexpected {type(exc).__name__}")
        log_config_warnings(warnings)
        try:
            new = await with_jwt(app, old, new)
        except ValueError as exc:
            return self._rejected(why, f"auth.jwt: {exc}")
        app[RUNTIME].current = new  # the swap: one assignment
        await retire_jwt(old, new)
        now = time.time()
        state = ops.config
        state.loaded_at = now
        state.digest = digest
        state.restart_required = needs_restart
        state.last_reload = ReloadResult(now, True, why, None, needs_restart)
        _log.info(
            "config reloaded",
            trigger=why,
            models=len(new.routes),
            providers=len(new.providers),
            load_s=round(time.perf_counter() - started, 3),
            config_hash=digest,
        )
        if needs_restart:
            _log.warning(
                "config reload: changed keys need a restart to apply",
                keys=list(needs_restart),
            )
        return True

    def _load(
        self, old: Runtime
    ) -> tuple[Runtime, tuple[ConfigWarning, ...], str, tuple[str, ...]]:
        # In a worker thread: reading, parsing and compiling a large file takes seconds (and
        # comparing two large configs is not free either).
        fresh = load_config_checked(self.path)
        config = self._adjust(fresh.config) if self._adjust is not None else fresh.config
        runtime = build_runtime(config, health=old.health, in_flight=old.in_flight)
        return runtime, fresh.warnings, fresh.digest, restart_required(old, runtime)

    def _rejected(self, why: str, error: str) -> bool:
        ops = self.app[OPS]
        ops.config.last_reload = ReloadResult(time.time(), False, why, error)
        _log.error("config reload rejected", trigger=why, error=error)
        return False

    # -- watching the file ------------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def start_watching(self) -> None:
        self._tasks.spawn(self._watch(), "config-watch")

    async def _watch(self) -> None:
        """Every `server.watch_interval_s` (of the config in service: a reload may turn the
        watch on or off), reload when the file changed (its time, size or inode: an editor's
        rename-into-place too)."""
        while True:
            server = self.app[RUNTIME].current.server
            await asyncio.sleep(server.watch_interval_s)
            if not self.app[RUNTIME].current.server.watch_config:
                self._seen = self._stat()
                continue
            seen = self._stat()
            if seen is None or seen == self._seen:
                continue
            self._seen = seen
            self.trigger("watch")

    async def close(self) -> None:
        await self._tasks.cancel()
