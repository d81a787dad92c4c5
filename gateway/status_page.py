"""The admin status page: one self-contained HTML document for the on-call engineer.

`render_status_page(data)` turns the JSON of ``GET /status/data`` into a complete page: inline
CSS and JS only (no external URL of any kind), everything painted on the server so the page
reads fully with JavaScript off, and every value from the data escaped (caller ids, model names
and error messages are text, never markup). Its script polls ``/status/data`` every
`STATUS_REFRESH_S` and rebuilds each section in place with ``createElement``/text nodes; when a
poll fails it keeps the last data and marks the page stale.

The script mirrors the Python renderers below function for function (same names, same element
tree, same attribute order, same number formats), so the page looks the same before and after
its first refresh; tests/test_status_page.py checks that in a browser. Change both together.

Stable hooks for tests: ``#live-streams`` (text: the integer), ``table#keys`` with one
``tr[data-key-id][data-state]`` per key, ``table#models``, ``table#streams``, ``#config``,
``#limiter``, ``#ready`` (``data-ready``), ``#alerts`` (``data-count``) and ``#updated``
(``data-stale`` once a poll fails).
"""

from __future__ import annotations

import html
import json
import math
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["ERROR_RATE_ALERT", "STATUS_DATA_PATH", "STATUS_REFRESH_S", "render_status_page"]

STATUS_REFRESH_S: Final = 1.0
"""How often the page's script polls `STATUS_DATA_PATH`, in seconds."""
STATUS_DATA_PATH: Final = "/status/data"
ERROR_RATE_ALERT: Final = 0.05
"""A model whose error rate over the window reaches this (with one error or more) is an alert."""
_FETCH_TIMEOUT_S: Final = 5.0
_DASH: Final = "\u2014"


class _Html(str):
    """Markup built by `_el` (already escaped); any other string put in the page is text."""

    __slots__ = ()


def _children(parts: object) -> list[str]:
    out: list[str] = []
    if parts is None:
        return out
    if isinstance(parts, list | tuple):
        for part in parts:
            out.extend(_children(part))
    elif isinstance(parts, _Html):
        out.append(parts)
    else:
        out.append(html.escape(str(parts), quote=True))
    return out


def _el(tag: str, attrs: Mapping[str, object] | None = None, *children: object) -> _Html:
    """One element: attributes None/False are left out, True is bare; children are escaped
    unless built by `_el`; lists are flattened. (The script's ``h()`` does the same.)"""
    head = tag
    for name, value in (attrs or {}).items():
        if value is None or value is False:
            continue
        head += f" {name}" if value is True else f' {name}="{html.escape(str(value), quote=True)}"'
    return _Html(f"<{head}>{''.join(_children(list(children)))}</{tag}>")


# --- Reading the data defensively: a missing or odd field shows as a dash, never a 500.


def _obj(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _arr(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list | tuple):
        return []
    return [v for v in value if isinstance(v, Mapping)]


def _strs(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past float range
        return None
    return number if math.isfinite(number) else None


def _str(value: object, default: str = _DASH) -> str:
    return default if value is None else str(value)


# --- Formats, identical to the script's (rounding half up on both sides, never banker's).


def _fixed(value: float, digits: int) -> str:
    scale = 10**digits
    return f"{math.floor(value * scale + 0.5) / scale:.{digits}f}"


def _fmt_int(value: object) -> str:
    n = _num(value)
    return _DASH if n is None else str(math.trunc(n))


def _fmt_span(seconds: float) -> str:
    s = math.floor(seconds)
    if s < 90:
        return f"{s} s"
    if s < 90 * 60:
        return f"{s // 60} min"
    if s < 48 * 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _fmt_rel(t: float, now: float) -> str:
    delta = t - now
    if abs(delta) < 1:
        return "now"
    span = _fmt_span(abs(delta))
    return f"in {span}" if delta > 0 else f"{span} ago"


def _fmt_abs(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(t)


def _fmt_ms(value: object) -> str:
    v = _num(value)
    if v is None:
        return _DASH
    return f"{_fixed(v, 0 if v >= 100 else 1)} ms"


def _fmt_rate(value: object) -> str:
    v = _num(value)
    return _DASH if v is None else _fixed(v, 2)


def _fmt_pct(value: object) -> str:
    v = _num(value)
    return _DASH if v is None else f"{_fixed(v * 100, 1)} %"


def _fmt_bytes(value: object) -> str:
    v = _num(value)
    if v is None:
        return _DASH
    if v < 1024:
        return f"{math.trunc(v)} B"
    if v < 1024 * 1024:
        return f"{_fixed(v / 1024, 1)} KiB"
    return f"{_fixed(v / (1024 * 1024), 1)} MiB"


def _when(value: object, now: float) -> _Html | str:
    t = _num(value)
    if t is None:
        return _DASH
    return _el(
        "span",
        {"class": "when"},
        _el("span", {"class": "rel"}, _fmt_rel(t, now)),
        " ",
        _el("span", {"class": "abs"}, f"({_fmt_abs(t)})"),
    )


def _js_number(value: float) -> str:
    """`value` as JavaScript's String() writes it (no ".0" on whole numbers)."""
    return str(int(value)) if value.is_integer() else repr(value)


def _badge(level: str, text: str) -> _Html:
    return _el("span", {"class": f"badge {level}"}, text)


# --- What needs attention.

_KEY_RANK: Final = {"disabled": 0, "cooldown": 1}


def _sorted_keys(d: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return sorted(_arr(d.get("keys")), key=lambda k: _KEY_RANK.get(_str(k.get("state"), ""), 2))


def _failing_checks(d: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(n, _obj(c)) for n, c in _obj(d.get("checks")).items() if _obj(c).get("ok") is not True]


def _model_alarming(m: Mapping[str, Any]) -> bool:
    rate = _num(m.get("error_rate"))
    errors = _num(m.get("errors"))
    return rate is not None and rate >= ERROR_RATE_ALERT and errors is not None and errors > 0


def _alerts(d: Mapping[str, Any], now: float) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if d.get("ready") is not True:
        failing = _failing_checks(d)
        names = [n + (f" ({c.get('detail')})" if c.get("detail") else "") for n, c in failing]
        out.append(
            ("bad", "Not ready" + (": failing checks: " + ", ".join(names) if names else ""))
        )
    if d.get("draining") is True:
        out.append(("warn", "Draining: shutting down, refusing new requests"))
    for k in _sorted_keys(d):
        state = _str(k.get("state"), "")
        name = f"Key {_str(k.get('id'))} ({_str(k.get('provider'))})"
        reason = _str(k.get("reason"), "")
        if state == "disabled":
            out.append(("bad", f"{name} is disabled" + (f": {reason}" if reason else "")))
        elif state == "cooldown":
            until = _num(k.get("until"))
            back = f", back {_fmt_rel(until, now)}" if until is not None else ""
            out.append(
                ("warn", f"{name} is cooling down{back}" + (f": {reason}" if reason else ""))
            )
    config = _obj(d.get("config"))
    reload = _obj(config.get("last_reload"))
    if reload.get("ok") is False:
        at = _num(reload.get("at"))
        error = _str(reload.get("error"), "")
        out.append(
            (
                "bad",
                "Config reload rejected"
                + (f" {_fmt_rel(at, now)}" if at is not None else "")
                + (f": {error}" if error else "")
                + "; still running the previous config",
            )
        )
    restart = _strs(config.get("restart_required"))
    if restart:
        out.append(("warn", "Restart required to apply: " + ", ".join(restart)))
    limiter = _obj(d.get("limiter"))
    if limiter.get("healthy") is False:
        detail = _str(limiter.get("detail"), "")
        out.append(
            (
                "bad",
                f"Rate limiter ({_str(limiter.get('backend'))}) unhealthy"
                + (f": {detail}" if detail else ""),
            )
        )
    for m in _arr(d.get("models")):
        if _model_alarming(m):
            out.append(
                (
                    "bad",
                    f"Model {_str(m.get('model'))}: error rate {_fmt_pct(m.get('error_rate'))}"
                    f" ({_fmt_int(m.get('errors'))} of {_fmt_int(m.get('requests'))} requests)",
                )
            )
    return sorted(out, key=lambda a: a[0] != "bad")


# --- The sections, one function per element the script replaces (same names in the script).


def _meta(d: Mapping[str, Any], now: float) -> _Html:
    uptime = _num(d.get("uptime_s"))
    window = _num(d.get("window_s"))
    return _el(
        "p",
        {"id": "meta", "class": "meta"},
        f"version {_str(d.get('version'))} \u00b7 pid {_fmt_int(d.get('pid'))}"
        f" \u00b7 up {_fmt_span(uptime) if uptime is not None else _DASH}"
        f" \u00b7 window {_fmt_span(window) if window is not None else _DASH}",
    )


def _updated(generated_at: float, now: float, stale: str | None = None) -> _Html:
    return _el(
        "p",
        {"id": "updated", "class": "updated", "data-generated-at": _js_number(generated_at)},
        "Data: ",
        _when(generated_at, now),
        _el("span", {"class": "stale", "id": "stale"}, stale) if stale else None,
    )


def _alerts_section(d: Mapping[str, Any], now: float) -> _Html:
    alerts = _alerts(d, now)
    if not alerts:
        return _el(
            "section",
            {"id": "alerts", "class": "alerts wide clear", "data-count": 0},
            _el("p", {"class": "allclear"}, "All clear: nothing needs attention."),
        )
    return _el(
        "section",
        {"id": "alerts", "class": "alerts wide", "data-count": len(alerts)},
        _el("h2", None, f"Needs attention ({len(alerts)})"),
        _el(
            "ul",
            None,
            [
                _el(
                    "li",
                    {"class": f"alert {level}"},
                    _badge(level, "BAD" if level == "bad" else "WARN"),
                    " ",
                    text,
                )
                for level, text in alerts
            ],
        ),
    )


def _summary(d: Mapping[str, Any], now: float) -> _Html:
    ready = d.get("ready") is True
    checks = [(n, _obj(c)) for n, c in _obj(d.get("checks")).items()]
    keys = _arr(d.get("keys"))
    usable = sum(1 for k in keys if k.get("state") == "ok")
    keys_level = "ok" if usable == len(keys) else "bad" if usable == 0 else "warn"
    window = _num(d.get("window_s"))
    return _el(
        "section",
        {"id": "summary", "class": "tiles wide"},
        _el(
            "div",
            {
                "id": "ready",
                "class": "tile " + ("ok" if ready else "bad"),
                "data-ready": "true" if ready else "false",
            },
            _el("div", {"class": "label"}, "Readiness"),
            _el(
                "div",
                {"class": "big"},
                ("READY" if ready else "NOT READY")
                + (" \u00b7 DRAINING" if d.get("draining") is True else ""),
            ),
            _el(
                "ul",
                {"class": "checks"},
                [
                    _el(
                        "li",
                        {"class": "ok" if c.get("ok") is True else "bad", "data-check": n},
                        _badge(*(("ok", "ok") if c.get("ok") is True else ("bad", "FAIL"))),
                        " ",
                        _el("b", None, n),
                        f": {c.get('detail')}" if c.get("detail") else None,
                    )
                    for n, c in checks
                ],
            ),
        ),
        _el(
            "div",
            {"class": "tile"},
            _el("div", {"class": "label"}, "Live streams"),
            _el("div", {"class": "big", "id": "live-streams"}, _fmt_int(d.get("live_streams"))),
        ),
        _el(
            "div",
            {"class": "tile"},
            _el(
                "div",
                {"class": "label"},
                f"Requests/s ({_fmt_span(window) if window is not None else _DASH})",
            ),
            _el("div", {"class": "big", "id": "rps"}, _fmt_rate(d.get("requests_per_s"))),
        ),
        _el(
            "div",
            {"class": f"tile {keys_level}"},
            _el("div", {"class": "label"}, "Upstream keys usable"),
            _el("div", {"class": "big", "id": "keys-usable"}, f"{usable} / {len(keys)}"),
        ),
    )


def _keys_section(d: Mapping[str, Any], now: float) -> _Html:
    keys = _sorted_keys(d)
    rows = [
        _el(
            "tr",
            {
                "data-key-id": _str(k.get("id")),
                "data-state": _str(k.get("state"), "unknown"),
                "class": "state-" + _str(k.get("state"), "unknown"),
            },
            _el("td", None, _el("code", None, _str(k.get("id")))),
            _el("td", None, _str(k.get("provider"))),
            _el(
                "td",
                None,
                _badge(
                    {"ok": "ok", "cooldown": "warn"}.get(_str(k.get("state"), ""), "bad"),
                    _str(k.get("state"), "unknown"),
                ),
            ),
            _el("td", None, _when(k.get("until"), now)),
            _el("td", None, _str(k.get("reason"))),
            _el("td", {"class": "num"}, _fmt_int(k.get("in_flight"))),
            _el("td", None, _el("code", None, _str(k.get("fingerprint")))),
        )
        for k in keys
    ]
    if not rows:
        rows = [_el("tr", None, _el("td", {"colspan": 7, "class": "empty"}, "No keys"))]
    return _el(
        "section",
        {"id": "keys-section", "class": "card wide"},
        _el("h2", None, f"Upstream keys ({len(keys)})"),
        _el(
            "div",
            {"class": "scroll"},
            _el(
                "table",
                {"id": "keys"},
                _el(
                    "thead",
                    None,
                    _el(
                        "tr",
                        None,
                        [
                            _el("th", None, h)
                            for h in (
                                "Key",
                                "Provider",
                                "State",
                                "Until",
                                "Reason",
                                "In flight",
                                "Fingerprint",
                            )
                        ],
                    ),
                ),
                _el("tbody", None, rows),
            ),
        ),
    )


def _limiter(d: Mapping[str, Any], now: float) -> _Html:
    lim = _obj(d.get("limiter"))
    healthy = lim.get("healthy") is True
    degraded = _num(lim.get("degraded_decisions"))
    errors = _num(lim.get("redis_errors"))
    return _el(
        "section",
        {
            "id": "limiter",
            "class": "card " + ("ok" if healthy else "bad"),
            "data-healthy": "true" if healthy else "false",
        },
        _el("h2", None, "Rate limiter"),
        _el(
            "dl",
            None,
            _el("dt", None, "Backend"),
            _el("dd", None, _str(lim.get("backend"))),
            _el("dt", None, "Health"),
            _el("dd", None, _badge("ok", "healthy") if healthy else _badge("bad", "UNHEALTHY")),
            _el("dt", None, "Detail"),
            _el("dd", None, _str(lim.get("detail"))),
            _el("dt", None, "Degraded decisions"),
            _el(
                "dd",
                {"class": "warn-text" if degraded else None},
                _fmt_int(lim.get("degraded_decisions")),
            ),
            _el("dt", None, "Redis errors"),
            _el(
                "dd",
                {"class": "warn-text" if errors else None},
                _fmt_int(lim.get("redis_errors")),
            ),
        ),
    )


def _config(d: Mapping[str, Any], now: float) -> _Html:
    cfg = _obj(d.get("config"))
    reload_value = cfg.get("last_reload")
    reload = _obj(reload_value)
    rejected = reload.get("ok") is False
    restart = _strs(cfg.get("restart_required"))
    if reload_value is None:
        last: list[object] = ["none since start"]
    elif rejected:
        last = [
            _badge("bad", "REJECTED"),
            " ",
            _when(reload.get("at"), now),
            _el("pre", {"class": "error"}, _str(reload.get("error"))),
        ]
    else:
        last = [_badge("ok", "applied"), " ", _when(reload.get("at"), now)]
    if restart:
        restart_body: list[object] = [
            _el(
                "ul", {"class": "restart"}, [_el("li", None, _el("code", None, r)) for r in restart]
            ),
            _el("p", {"class": "hint"}, "Changed in the file; applies only after a restart."),
        ]
    else:
        restart_body = ["no"]
    level = "bad" if rejected else "warn" if restart else "ok"
    path = cfg.get("path")
    return _el(
        "section",
        {"id": "config", "class": f"card {level}"},
        _el("h2", None, "Config"),
        _el(
            "dl",
            None,
            _el("dt", None, "File"),
            _el(
                "dd", None, _el("code", None, str(path)) if path is not None else "not from a file"
            ),
            _el("dt", None, "Loaded"),
            _el("dd", None, _when(cfg.get("loaded_at"), now)),
            _el("dt", None, "Hash"),
            _el("dd", None, _el("code", None, _str(cfg.get("hash")))),
            _el("dt", None, "Last reload"),
            _el(
                "dd",
                {
                    "id": "last-reload",
                    "data-ok": None if reload_value is None else "false" if rejected else "true",
                },
                last,
            ),
            _el("dt", None, "Restart required"),
            _el(
                "dd",
                {"id": "restart-required", "data-count": len(restart)},
                restart_body,
            ),
        ),
    )


def _models_section(d: Mapping[str, Any], now: float) -> _Html:
    models = _arr(d.get("models"))
    rows = [
        _el(
            "tr",
            {"data-model": _str(m.get("model")), "class": "bad" if _model_alarming(m) else None},
            _el("td", None, _el("code", None, _str(m.get("model")))),
            _el("td", {"class": "num"}, _fmt_int(m.get("requests"))),
            _el("td", {"class": "num"}, _fmt_rate(m.get("requests_per_s"))),
            _el("td", {"class": "num"}, _fmt_ms(m.get("ttft_p50_ms"))),
            _el("td", {"class": "num"}, _fmt_ms(m.get("ttft_p95_ms"))),
            _el("td", {"class": "num"}, _fmt_int(m.get("errors"))),
            _el("td", {"class": "num"}, _fmt_pct(m.get("error_rate"))),
        )
        for m in models
    ]
    if not rows:
        rows = [
            _el(
                "tr", None, _el("td", {"colspan": 7, "class": "empty"}, "No requests in the window")
            )
        ]
    window = _num(d.get("window_s"))
    return _el(
        "section",
        {"id": "models-section", "class": "card wide"},
        _el("h2", None, f"Models (last {_fmt_span(window) if window is not None else _DASH})"),
        _el(
            "div",
            {"class": "scroll"},
            _el(
                "table",
                {"id": "models"},
                _el(
                    "thead",
                    None,
                    _el(
                        "tr",
                        None,
                        [
                            _el("th", None, h)
                            for h in (
                                "Model",
                                "Requests",
                                "Req/s",
                                "TTFT p50",
                                "TTFT p95",
                                "Errors",
                                "Error rate",
                            )
                        ],
                    ),
                ),
                _el("tbody", None, rows),
            ),
        ),
    )


def _streams_section(d: Mapping[str, Any], now: float) -> _Html:
    streams = _arr(d.get("streams"))
    rows = [
        _el(
            "tr",
            {"data-stream-id": _str(s.get("id"))},
            _el("td", None, _el("code", None, _str(s.get("id")))),
            _el("td", None, _str(s.get("caller"))),
            _el("td", None, _str(s.get("model"))),
            _el("td", None, _str(s.get("deployment"))),
            _el("td", None, _el("code", None, _str(s.get("key_id")))),
            _el("td", None, _when(s.get("started_at"), now)),
            _el("td", {"class": "num"}, _fmt_ms(s.get("ttft_ms"))),
            _el("td", {"class": "num"}, _fmt_int(s.get("events"))),
            _el("td", {"class": "num"}, _fmt_bytes(s.get("bytes"))),
        )
        for s in streams
    ]
    if not rows:
        rows = [_el("tr", None, _el("td", {"colspan": 9, "class": "empty"}, "No live streams"))]
    return _el(
        "section",
        {"id": "streams-section", "class": "card wide"},
        _el(
            "h2",
            None,
            f"Live streams ({_fmt_int(d.get('live_streams'))}; "
            f"showing {len(streams)}, newest first)",
        ),
        _el(
            "div",
            {"class": "scroll"},
            _el(
                "table",
                {"id": "streams"},
                _el(
                    "thead",
                    None,
                    _el(
                        "tr",
                        None,
                        [
                            _el("th", None, h)
                            for h in (
                                "Stream",
                                "Caller",
                                "Model",
                                "Deployment",
                                "Key",
                                "Started",
                                "TTFT",
                                "Events",
                                "Bytes",
                            )
                        ],
                    ),
                ),
                _el("tbody", None, rows),
            ),
        ),
    )


def _title(d: Mapping[str, Any], now: float) -> str:
    bad = sum(1 for level, _ in _alerts(d, now) if level == "bad")
    return (f"({bad}!) " if bad else "") + "Gateway status"


_CSS: Final = """
:root { color-scheme: light dark; --bg: #f6f7f9; --fg: #1b1f24; --muted: #5d6673;
  --card: #ffffff; --line: #d9dde3; --ok: #1a7f37; --ok-bg: #e3f5e8; --warn: #9a6700;
  --warn-bg: #fff4d1; --bad: #c62828; --bad-bg: #fde8e8; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0f1216; --fg: #e6e9ed; --muted: #98a2ae; --card: #171b21; --line: #2b323b;
    --ok: #4ac26b; --ok-bg: #13291b; --warn: #e3b341; --warn-bg: #2e2610; --bad: #ff6b6b;
    --bad-bg: #3a1517; }
}
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 20px 40px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px; }
pre.error { white-space: pre-wrap; word-break: break-word; margin: 6px 0 0; padding: 8px;
  background: var(--bad-bg); color: var(--fg); border-left: 4px solid var(--bad); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 18px;
  margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 15px; margin: 0 0 8px; }
.meta, .updated { margin: 0; color: var(--muted); }
.stale { margin-left: 10px; padding: 2px 8px; border-radius: 4px; font-weight: 700;
  background: var(--bad); color: #fff; }
body.is-stale main { opacity: 0.55; }
.noscript { padding: 6px 10px; background: var(--warn-bg); border-left: 4px solid var(--warn); }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 14px; }
.wide { grid-column: 1 / -1; }
.card, .alerts { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; min-width: 0; }
.card.bad { border-left: 6px solid var(--bad); }
.card.warn { border-left: 6px solid var(--warn); }
.alerts { border-left: 6px solid var(--bad); background: var(--bad-bg); }
.alerts.clear { border-left-color: var(--ok); background: var(--ok-bg); }
.alerts ul { margin: 0; padding: 0; list-style: none; }
.alert { padding: 5px 0; font-size: 15px; font-weight: 600; }
.alert.warn { font-weight: 500; }
.allclear { margin: 0; font-weight: 600; color: var(--ok); }
.tiles { display: grid; grid-template-columns: 2fr 1fr 1fr 1fr; gap: 14px; }
@media (max-width: 800px) { .tiles { grid-template-columns: 1fr 1fr; } }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 14px; }
.tile.ok { border-top: 5px solid var(--ok); }
.tile.warn { border-top: 5px solid var(--warn); }
.tile.bad { border-top: 5px solid var(--bad); background: var(--bad-bg); }
.label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: 0.04em; }
.big { font-size: 28px; font-weight: 700; font-variant-numeric: tabular-nums; }
.tile.bad .big { color: var(--bad); }
.checks { margin: 6px 0 0; padding: 0; list-style: none; font-size: 13px; }
.checks li.bad { font-weight: 600; }
.badge { display: inline-block; min-width: 3em; padding: 0 6px; border-radius: 4px;
  font-size: 11.5px; font-weight: 700; text-align: center; text-transform: uppercase; }
.badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.warn { background: var(--warn); color: #000; }
.badge.bad { background: var(--bad); color: #fff; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; white-space: nowrap; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: var(--muted); font-style: italic; }
tr.state-disabled td, tr.bad td { background: var(--bad-bg); }
tr.state-cooldown td { background: var(--warn-bg); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; min-width: 0; overflow-wrap: anywhere; }
.warn-text { color: var(--warn); font-weight: 700; }
ul.restart { margin: 0; padding-left: 18px; color: var(--warn); font-weight: 700; }
.hint { margin: 2px 0 0; color: var(--muted); font-size: 12px; }
.abs { color: var(--muted); font-size: 12px; }
"""

# The script: the Python renderers above, once more, building DOM nodes (never innerHTML).
_SCRIPT: Final = r"""
(() => {
"use strict";
const REFRESH_MS = __REFRESH_MS__;
const FETCH_TIMEOUT_MS = __FETCH_TIMEOUT_MS__;
const DATA_PATH = __DATA_PATH__;
const ERROR_RATE_ALERT = __ERROR_RATE_ALERT__;
const DASH = "\u2014";

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const obj = (v) => (isObj(v) ? v : {});
const arr = (v) => (Array.isArray(v) ? v.filter(isObj) : []);
const strs = (v) => (Array.isArray(v) ? v.map((x) => String(x)) : []);
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const str = (v, dflt = DASH) => (v === null || v === undefined ? dflt : String(v));
const pick = (map, key, dflt) => (Object.prototype.hasOwnProperty.call(map, key) ? map[key] : dflt);

function fixed(v, digits) {
  const scale = 10 ** digits;
  return (Math.floor(v * scale + 0.5) / scale).toFixed(digits);
}
function fmtInt(v) {
  const n = num(v);
  return n === null ? DASH : String(Math.trunc(n));
}
function fmtSpan(seconds) {
  const s = Math.floor(seconds);
  if (s < 90) return s + " s";
  if (s < 90 * 60) return Math.floor(s / 60) + " min";
  if (s < 48 * 3600) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}
function fmtRel(t, now) {
  const delta = t - now;
  if (Math.abs(delta) < 1) return "now";
  const span = fmtSpan(Math.abs(delta));
  return delta > 0 ? "in " + span : span + " ago";
}
function fmtAbs(t) {
  try {
    return new Date(t * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  } catch (e) {
    return String(t);
  }
}
function fmtMs(value) {
  const v = num(value);
  return v === null ? DASH : fixed(v, v >= 100 ? 0 : 1) + " ms";
}
function fmtRate(value) {
  const v = num(value);
  return v === null ? DASH : fixed(v, 2);
}
function fmtPct(value) {
  const v = num(value);
  return v === null ? DASH : fixed(v * 100, 1) + " %";
}
function fmtBytes(value) {
  const v = num(value);
  if (v === null) return DASH;
  if (v < 1024) return Math.trunc(v) + " B";
  if (v < 1024 * 1024) return fixed(v / 1024, 1) + " KiB";
  return fixed(v / (1024 * 1024), 1) + " MiB";
}
function when(value, now) {
  const t = num(value);
  if (t === null) return DASH;
  return h("span", {class: "when"}, h("span", {class: "rel"}, fmtRel(t, now)), " ",
    h("span", {class: "abs"}, "(" + fmtAbs(t) + ")"));
}
function badge(level, text) {
  return h("span", {class: "badge " + level}, text);
}

const KEY_RANK = {disabled: 0, cooldown: 1};
const STATE_LEVEL = {ok: "ok", cooldown: "warn"};
function sortedKeys(d) {
  const rank = (k) => pick(KEY_RANK, str(k.state, ""), 2);
  return arr(d.keys).sort((a, b) => rank(a) - rank(b));
}
function failingChecks(d) {
  return Object.entries(obj(d.checks)).map(([n, c]) => [n, obj(c)])
    .filter(([, c]) => c.ok !== true);
}
function modelAlarming(m) {
  const rate = num(m.error_rate);
  const errors = num(m.errors);
  return rate !== null && rate >= ERROR_RATE_ALERT && errors !== null && errors > 0;
}
function alerts(d, now) {
  const out = [];
  if (d.ready !== true) {
    const names = failingChecks(d).map(([n, c]) => n + (c.detail ? " (" + c.detail + ")" : ""));
    out.push(["bad", "Not ready" + (names.length ? ": failing checks: " + names.join(", ") : "")]);
  }
  if (d.draining === true) out.push(["warn", "Draining: shutting down, refusing new requests"]);
  for (const k of sortedKeys(d)) {
    const state = str(k.state, "");
    const name = "Key " + str(k.id) + " (" + str(k.provider) + ")";
    const reason = str(k.reason, "");
    if (state === "disabled") {
      out.push(["bad", name + " is disabled" + (reason ? ": " + reason : "")]);
    } else if (state === "cooldown") {
      const until = num(k.until);
      const back = until !== null ? ", back " + fmtRel(until, now) : "";
      out.push(["warn", name + " is cooling down" + back + (reason ? ": " + reason : "")]);
    }
  }
  const cfg = obj(d.config);
  const reload = obj(cfg.last_reload);
  if (reload.ok === false) {
    const at = num(reload.at);
    const error = str(reload.error, "");
    out.push(["bad", "Config reload rejected" + (at !== null ? " " + fmtRel(at, now) : "") +
      (error ? ": " + error : "") + "; still running the previous config"]);
  }
  const restart = strs(cfg.restart_required);
  if (restart.length) out.push(["warn", "Restart required to apply: " + restart.join(", ")]);
  const lim = obj(d.limiter);
  if (lim.healthy === false) {
    const detail = str(lim.detail, "");
    out.push(["bad", "Rate limiter (" + str(lim.backend) + ") unhealthy" +
      (detail ? ": " + detail : "")]);
  }
  for (const m of arr(d.models)) {
    if (modelAlarming(m)) {
      out.push(["bad", "Model " + str(m.model) + ": error rate " + fmtPct(m.error_rate) +
        " (" + fmtInt(m.errors) + " of " + fmtInt(m.requests) + " requests)"]);
    }
  }
  const rank = (a) => (a[0] === "bad" ? 0 : 1);
  return out.sort((a, b) => rank(a) - rank(b));
}

function meta(d, now) {
  const uptime = num(d.uptime_s);
  const window = num(d.window_s);
  return h("p", {id: "meta", class: "meta"},
    "version " + str(d.version) + " \u00b7 pid " + fmtInt(d.pid) +
    " \u00b7 up " + (uptime !== null ? fmtSpan(uptime) : DASH) +
    " \u00b7 window " + (window !== null ? fmtSpan(window) : DASH));
}
function updated(generatedAt, now, stale) {
  return h("p", {id: "updated", class: "updated", "data-generated-at": generatedAt,
    "data-stale": stale ? "true" : null},
  "Data: ", when(generatedAt, now),
  stale ? h("span", {class: "stale", id: "stale"}, stale) : null);
}
function alertsSection(d, now) {
  const list = alerts(d, now);
  if (!list.length) {
    return h("section", {id: "alerts", class: "alerts wide clear", "data-count": 0},
      h("p", {class: "allclear"}, "All clear: nothing needs attention."));
  }
  return h("section", {id: "alerts", class: "alerts wide", "data-count": list.length},
    h("h2", null, "Needs attention (" + list.length + ")"),
    h("ul", null, list.map(([level, text]) => h("li", {class: "alert " + level},
      badge(level, level === "bad" ? "BAD" : "WARN"), " ", text))));
}
function summary(d, now) {
  const ready = d.ready === true;
  const checks = Object.entries(obj(d.checks)).map(([n, c]) => [n, obj(c)]);
  const keys = arr(d.keys);
  const usable = keys.filter((k) => k.state === "ok").length;
  const keysLevel = usable === keys.length ? "ok" : usable === 0 ? "bad" : "warn";
  const window = num(d.window_s);
  return h("section", {id: "summary", class: "tiles wide"},
    h("div", {id: "ready", class: "tile " + (ready ? "ok" : "bad"),
      "data-ready": ready ? "true" : "false"},
    h("div", {class: "label"}, "Readiness"),
    h("div", {class: "big"},
      (ready ? "READY" : "NOT READY") + (d.draining === true ? " \u00b7 DRAINING" : "")),
    h("ul", {class: "checks"}, checks.map(([n, c]) =>
      h("li", {class: c.ok === true ? "ok" : "bad", "data-check": n},
        c.ok === true ? badge("ok", "ok") : badge("bad", "FAIL"), " ", h("b", null, n),
        c.detail ? ": " + c.detail : null)))),
    h("div", {class: "tile"}, h("div", {class: "label"}, "Live streams"),
      h("div", {class: "big", id: "live-streams"}, fmtInt(d.live_streams))),
    h("div", {class: "tile"},
      h("div", {class: "label"},
        "Requests/s (" + (window !== null ? fmtSpan(window) : DASH) + ")"),
      h("div", {class: "big", id: "rps"}, fmtRate(d.requests_per_s))),
    h("div", {class: "tile " + keysLevel}, h("div", {class: "label"}, "Upstream keys usable"),
      h("div", {class: "big", id: "keys-usable"}, usable + " / " + keys.length)));
}
function table(id, headers, rows) {
  return h("div", {class: "scroll"}, h("table", {id: id},
    h("thead", null, h("tr", null, headers.map((x) => h("th", null, x)))),
    h("tbody", null, rows)));
}
function emptyRow(span, text) {
  return [h("tr", null, h("td", {colspan: span, class: "empty"}, text))];
}
function keysSection(d, now) {
  const keys = sortedKeys(d);
  let rows = keys.map((k) => h("tr", {"data-key-id": str(k.id),
    "data-state": str(k.state, "unknown"), class: "state-" + str(k.state, "unknown")},
  h("td", null, h("code", null, str(k.id))),
  h("td", null, str(k.provider)),
  h("td", null, badge(pick(STATE_LEVEL, str(k.state, ""), "bad"), str(k.state, "unknown"))),
  h("td", null, when(k.until, now)),
  h("td", null, str(k.reason)),
  h("td", {class: "num"}, fmtInt(k.in_flight)),
  h("td", null, h("code", null, str(k.fingerprint)))));
  if (!rows.length) rows = emptyRow(7, "No keys");
  return h("section", {id: "keys-section", class: "card wide"},
    h("h2", null, "Upstream keys (" + keys.length + ")"),
    table("keys", ["Key", "Provider", "State", "Until", "Reason", "In flight", "Fingerprint"],
      rows));
}
function limiter(d, now) {
  const lim = obj(d.limiter);
  const healthy = lim.healthy === true;
  const degraded = num(lim.degraded_decisions);
  const errors = num(lim.redis_errors);
  return h("section", {id: "limiter", class: "card " + (healthy ? "ok" : "bad"),
    "data-healthy": healthy ? "true" : "false"},
  h("h2", null, "Rate limiter"),
  h("dl", null,
    h("dt", null, "Backend"), h("dd", null, str(lim.backend)),
    h("dt", null, "Health"),
    h("dd", null, healthy ? badge("ok", "healthy") : badge("bad", "UNHEALTHY")),
    h("dt", null, "Detail"), h("dd", null, str(lim.detail)),
    h("dt", null, "Degraded decisions"),
    h("dd", {class: degraded ? "warn-text" : null}, fmtInt(lim.degraded_decisions)),
    h("dt", null, "Redis errors"),
    h("dd", {class: errors ? "warn-text" : null}, fmtInt(lim.redis_errors))));
}
function config(d, now) {
  const cfg = obj(d.config);
  const reloadValue = cfg.last_reload;
  const reload = obj(reloadValue);
  const rejected = reload.ok === false;
  const restart = strs(cfg.restart_required);
  const none = reloadValue === null || reloadValue === undefined;
  let last;
  if (none) {
    last = ["none since start"];
  } else if (rejected) {
    last = [badge("bad", "REJECTED"), " ", when(reload.at, now),
      h("pre", {class: "error"}, str(reload.error))];
  } else {
    last = [badge("ok", "applied"), " ", when(reload.at, now)];
  }
  const restartBody = restart.length
    ? [h("ul", {class: "restart"}, restart.map((r) => h("li", null, h("code", null, r)))),
      h("p", {class: "hint"}, "Changed in the file; applies only after a restart.")]
    : ["no"];
  const level = rejected ? "bad" : restart.length ? "warn" : "ok";
  const path = cfg.path;
  const file = path !== null && path !== undefined ? h("code", null, String(path))
    : "not from a file";
  return h("section", {id: "config", class: "card " + level}, h("h2", null, "Config"),
    h("dl", null,
      h("dt", null, "File"), h("dd", null, file),
      h("dt", null, "Loaded"), h("dd", null, when(cfg.loaded_at, now)),
      h("dt", null, "Hash"), h("dd", null, h("code", null, str(cfg.hash))),
      h("dt", null, "Last reload"),
      h("dd", {id: "last-reload", "data-ok": none ? null : rejected ? "false" : "true"}, last),
      h("dt", null, "Restart required"),
      h("dd", {id: "restart-required", "data-count": restart.length}, restartBody)));
}
function modelsSection(d, now) {
  const models = arr(d.models);
  let rows = models.map((m) => h("tr",
    {"data-model": str(m.model), class: modelAlarming(m) ? "bad" : null},
    h("td", null, h("code", null, str(m.model))),
    h("td", {class: "num"}, fmtInt(m.requests)),
    h("td", {class: "num"}, fmtRate(m.requests_per_s)),
    h("td", {class: "num"}, fmtMs(m.ttft_p50_ms)),
    h("td", {class: "num"}, fmtMs(m.ttft_p95_ms)),
    h("td", {class: "num"}, fmtInt(m.errors)),
    h("td", {class: "num"}, fmtPct(m.error_rate))));
  if (!rows.length) rows = emptyRow(7, "No requests in the window");
  const window = num(d.window_s);
  return h("section", {id: "models-section", class: "card wide"},
    h("h2", null, "Models (last " + (window !== null ? fmtSpan(window) : DASH) + ")"),
    table("models",
      ["Model", "Requests", "Req/s", "TTFT p50", "TTFT p95", "Errors", "Error rate"], rows));
}
function streamsSection(d, now) {
  const streams = arr(d.streams);
  let rows = streams.map((s) => h("tr", {"data-stream-id": str(s.id)},
    h("td", null, h("code", null, str(s.id))),
    h("td", null, str(s.caller)),
    h("td", null, str(s.model)),
    h("td", null, str(s.deployment)),
    h("td", null, h("code", null, str(s.key_id))),
    h("td", null, when(s.started_at, now)),
    h("td", {class: "num"}, fmtMs(s.ttft_ms)),
    h("td", {class: "num"}, fmtInt(s.events)),
    h("td", {class: "num"}, fmtBytes(s.bytes))));
  if (!rows.length) rows = emptyRow(9, "No live streams");
  return h("section", {id: "streams-section", class: "card wide"},
    h("h2", null, "Live streams (" + fmtInt(d.live_streams) + "; showing " + streams.length +
      ", newest first)"),
    table("streams", ["Stream", "Caller", "Model", "Deployment", "Key", "Started", "TTFT",
      "Events", "Bytes"], rows));
}
function title(d, now) {
  const bad = alerts(d, now).filter((a) => a[0] === "bad").length;
  return (bad ? "(" + bad + "!) " : "") + "Gateway status";
}

const SECTIONS = [["meta", meta], ["alerts", alertsSection], ["summary", summary],
  ["keys-section", keysSection], ["limiter", limiter], ["config", config],
  ["models-section", modelsSection], ["streams-section", streamsSection]];

function swap(id, el) {
  const old = document.getElementById(id);
  // An unchanged section is left alone, so a text selection in it survives the refresh.
  if (old && !old.isEqualNode(el)) old.replaceWith(el);
}

// The data's clock, not the browser's: relative times stay right on a skewed laptop.
const first = document.getElementById("updated");
const painted = first ? num(Number(first.dataset.generatedAt)) : null;
let got = {t: painted !== null ? painted : Date.now() / 1000, at: performance.now()};
let failures = 0;
let lastError = "";
let polls = 0;

function dataNow() {
  return got.t + (performance.now() - got.at) / 1000;
}

function renderUpdated() {
  const stale = failures ? "STALE: " + lastError + " (" + failures + " failed " +
    (failures === 1 ? "poll" : "polls") + "); showing the last data" : null;
  swap("updated", updated(got.t, dataNow(), stale));
  document.body.classList.toggle("is-stale", failures > 0);
}

function renderAll(d) {
  const t = num(d.generated_at);
  const now = t !== null ? t : Date.now() / 1000;
  for (const [id, fn] of SECTIONS) swap(id, fn(d, now));
  document.title = title(d, now);
  got = {t: now, at: performance.now()};
}

async function poll() {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  try {
    const resp = await fetch(DATA_PATH, {credentials: "same-origin", cache: "no-store",
      headers: {accept: "application/json"}, signal: ctl.signal});
    if (resp.status === 401 || resp.status === 403) {
      throw new Error("HTTP " + resp.status + ", not authorised: open /status?token=... again");
    }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const d = await resp.json();
    if (!isObj(d)) throw new Error("not a JSON object");
    renderAll(d);
    failures = 0;
    lastError = "";
  } catch (err) {
    failures += 1;
    const aborted = err && err.name === "AbortError";
    lastError = aborted ? "timed out" : String((err && err.message) || err);
  } finally {
    clearTimeout(timer);
    polls += 1;
    document.body.dataset.polls = String(polls);
    renderUpdated();
    setTimeout(poll, REFRESH_MS);
  }
}

poll();
})();
"""


def _script() -> str:
    consts = {
        "__REFRESH_MS__": str(round(STATUS_REFRESH_S * 1000)),
        "__FETCH_TIMEOUT_MS__": str(round(_FETCH_TIMEOUT_S * 1000)),
        "__DATA_PATH__": json.dumps(STATUS_DATA_PATH),
        "__ERROR_RATE_ALERT__": json.dumps(ERROR_RATE_ALERT),
    }
    out = _SCRIPT
    for name, value in consts.items():
        out = out.replace(name, value)
    return out


_PAGE_SCRIPT: Final = _script()


def render_status_page(data: Mapping[str, Any]) -> str:
    """The whole status page for `data` (the JSON of ``GET /status/data``), as one HTML string.

    Pure and total: never raises on missing or mistyped fields (they show as a dash), escapes
    every value, references no external URL. Relative times are measured from
    ``data["generated_at"]`` (the page is rendered as the data is taken). A fresh CSP nonce per
    call lets the inline script and style run while any injected markup could not.
    """
    generated = _num(data.get("generated_at"))
    now = generated if generated is not None else time.time()
    nonce = secrets.token_urlsafe(16)
    csp = (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
    )
    sections = "\n".join(
        fn(data, now)
        for fn in (
            _alerts_section,
            _summary,
            _keys_section,
            _limiter,
            _config,
            _models_section,
            _streams_section,
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=True)}">
<meta name="referrer" content="no-referrer">
<meta name="robots" content="noindex">
<link rel="icon" href="data:,">
<title>{html.escape(_title(data, now))}</title>
<style nonce="{nonce}">{_CSS}</style>
</head>
<body>
<header>
<h1>Gateway status</h1>
{_meta(data, now)}
{_updated(now, now)}
</header>
<noscript><p class="noscript">JavaScript is off: this page shows the state when it was loaded
and does not refresh. Reload to update.</p></noscript>
<main>
{sections}
</main>
<script nonce="{nonce}">{_PAGE_SCRIPT}</script>
</body>
</html>
"""
