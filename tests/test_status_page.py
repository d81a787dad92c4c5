"""The status page: escaping, no external assets, the first paint, and (in headless Chromium)
live updates, the page without JavaScript, the stale marker and the script's re-render matching
the server's first paint."""

from __future__ import annotations

import copy
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.status_page import STATUS_REFRESH_S, render_status_page
from tests.browser import Browser
from tests.support import require_binary

NOW = 1764590000.5  # 2025-12-01 11:53:20.5 UTC
HOSTILE = '<script>alert(1)</script>"\'&amp; x" onmouseover="alert(2)'


def sample(**overrides: Any) -> dict[str, Any]:
    """/status/data as the admin app serves it: one of every bad thing, hostile strings in
    the fields that come from callers, config files and upstreams."""
    data: dict[str, Any] = {
        "generated_at": NOW,
        "version": "0.1.0",
        "pid": 4242,
        "uptime_s": 7325.0,
        "ready": False,
        "draining": False,
        "checks": {
            "config": {"ok": True, "detail": "loaded"},
            "draining": {"ok": True, "detail": "not draining"},
            "limiter": {"ok": False, "detail": "redis: connection refused"},
            "providers": {"ok": True, "detail": "2 of 2 have a usable key"},
        },
        "live_streams": 3,
        "requests_per_s": 1.5,
        "window_s": 300,
        "models": [
            {
                "model": "gpt-test",
                "requests": 120,
                "requests_per_s": 0.4,
                "ttft_p50_ms": 120.0,
                "ttft_p95_ms": 312.25,
                "errors": 1,
                "error_rate": 1 / 120,
            },
            {
                "model": HOSTILE,
                "requests": 10,
                "requests_per_s": 0.03,
                "ttft_p50_ms": None,
                "ttft_p95_ms": None,
                "errors": 3,
                "error_rate": 0.3,
            },
        ],
        "keys": [
            {
                "provider": "openai",
                "id": "oa-1",
                "fingerprint": "fp_abc123def456",
                "state": "ok",
                "until": None,
                "reason": None,
                "in_flight": 2,
            },
            {
                "provider": "openai",
                "id": "oa-2",
                "fingerprint": "fp_0123456789ab",
                "state": "cooldown",
                "until": NOW + 42,
                "reason": "rate_limited",
                "in_flight": 0,
            },
            {
                "provider": "anthropic",
                "id": "an-1",
                "fingerprint": "fp_fedcba987654",
                "state": "disabled",
                "until": None,
                "reason": "auth_error",
                "in_flight": 0,
            },
        ],
        "limiter": {
            "backend": "redis",
            "healthy": False,
            "detail": "connection refused",
            "degraded_decisions": 7,
            "redis_errors": 12,
        },
        "config": {
            "path": "/etc/gw.yaml",
            "loaded_at": NOW - 3600,
            "hash": "sha256:9f86d081884c7d65",
            "last_reload": {"at": NOW - 180, "ok": False, "error": f"models.x: {HOSTILE}"},
            "restart_required": ["server.port", "admin.host"],
        },
        "streams": [
            {
                "id": f"gs_{i:04d}",
                "caller": HOSTILE if i == 0 else f"app-{i}",
                "model": "gpt-test",
                "deployment": "oa/fake-gpt",
                "key_id": "oa-1",
                "started_at": NOW - 12.5 - i,
                "ttft_ms": 12.5 if i else None,
                "events": 40 + i,
                "bytes": 5000 * (i + 1),
            }
            for i in range(3)
        ],
    }
    data.update(overrides)
    return data


def healthy_sample() -> dict[str, Any]:
    data = sample(ready=True, live_streams=0, streams=[])
    data["checks"]["limiter"] = {"ok": True, "detail": "ok"}
    data["models"] = data["models"][:1]
    for key in data["keys"]:
        key.update(state="ok", until=None, reason=None)
    data["limiter"].update(healthy=True, detail="ok", degraded_decisions=0, redis_errors=0)
    data["config"].update(last_reload={"at": NOW - 60, "ok": True, "error": None})
    data["config"]["restart_required"] = []
    return data


# --- A small DOM from the stdlib parser, strict about nesting (our markup must be well formed).


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def by_id(self, element_id: str) -> Node:
        found = [n for n in self.iter() if n.attrs.get("id") == element_id]
        assert len(found) == 1, f"#{element_id}: {len(found)} elements"
        return found[0]

    def all(self, tag: str, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if n.tag == tag and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


class _Builder(HTMLParser):
    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "area", "base", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    builder = _Builder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], [n.tag for n in builder.stack]
    return builder.root


# --- The document itself.


def test_hostile_strings_are_text_never_markup() -> None:
    page = render_status_page(sample())
    assert "<script>alert" not in page
    assert 'onmouseover="alert' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;amp;" in page
    dom = parse(page)
    # The only script is the page's own, and no element grew an event handler attribute.
    assert len(dom.all("script")) == 1
    assert not [n for n in dom.iter() if any(a.startswith("on") for a in n.attrs)]
    # Read back as text, the strings are exactly what the data held.
    streams = dom.by_id("streams")
    assert HOSTILE in [c.text() for c in streams.all("td")]
    assert HOSTILE in [c.text() for c in dom.by_id("models").all("code")]
    assert f"models.x: {HOSTILE}" in dom.by_id("config").all("pre")[0].text()
    assert f"models.x: {HOSTILE}" in dom.by_id("alerts").text()


def test_hostile_key_ids_stay_inside_their_attribute() -> None:
    data = sample()
    data["keys"][0]["id"] = HOSTILE
    dom = parse(render_status_page(data))
    rows = dom.by_id("keys").all("tr", data_key_id=HOSTILE)
    assert len(rows) == 1
    assert HOSTILE in rows[0].text()


def test_no_external_assets() -> None:
    page = render_status_page(sample())
    assert "http://" not in page
    assert "https://" not in page
    assert "//cdn" not in page
    assert "@import" not in page
    assert "url(" not in page
    dom = parse(page)
    assert not [n for n in dom.iter() if "src" in n.attrs]
    hrefs = [n.attrs["href"] for n in dom.iter() if "href" in n.attrs]
    assert all(h is not None and h.startswith("data:") for h in hrefs), hrefs
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    # Inline CSS and JS only, locked to this render's nonce.
    csp = next(n for n in dom.all("meta") if n.attrs.get("http-equiv") == "Content-Security-Policy")
    nonce = dom.all("script")[0].attrs["nonce"]
    assert nonce and f"'nonce-{nonce}'" in (csp.attrs["content"] or "")
    assert dom.all("style")[0].attrs["nonce"] == nonce


def test_first_paint_has_every_section() -> None:
    dom = parse(render_status_page(sample()))
    for element_id in (
        "live-streams",
        "keys",
        "models",
        "config",
        "limiter",
        "ready",
        "streams",
        "updated",
        "alerts",
    ):
        dom.by_id(element_id)
    assert dom.by_id("live-streams").text() == "3"
    rows = {
        r.attrs["data-key-id"]: r for r in dom.by_id("keys").all("tr") if "data-key-id" in r.attrs
    }
    assert {k: r.attrs["data-state"] for k, r in rows.items()} == {
        "oa-1": "ok",
        "oa-2": "cooldown",
        "an-1": "disabled",
    }
    assert all(str(k) in r.text() for k, r in rows.items())
    # The worst keys first.
    assert [
        r.attrs["data-key-id"] for r in dom.by_id("keys").all("tr") if "data-key-id" in r.attrs
    ] == [
        "an-1",
        "oa-2",
        "oa-1",
    ]
    assert len(dom.by_id("streams").all("tr", data_stream_id="gs_0001")) == 1
    models = dom.by_id("models").text()
    assert "gpt-test" in models and "120 ms" in models and "312 ms" in models
    assert "30.0 %" in models
    assert dom.by_id("rps").text() == "1.50"
    ready = dom.by_id("ready")
    assert ready.attrs["data-ready"] == "false"
    assert "NOT READY" in ready.text() and "redis: connection refused" in ready.text()
    limiter = dom.by_id("limiter")
    assert limiter.attrs["data-healthy"] == "false"
    assert "UNHEALTHY" in limiter.text() and "redis" in limiter.text()
    meta = dom.by_id("meta").text()
    assert "pid 4242" in meta and "up 2 h 2 min" in meta


def test_rejected_reload_and_restart_required() -> None:
    dom = parse(render_status_page(sample()))
    config = dom.by_id("config")
    assert "sha256:9f86d081884c7d65" in config.text()
    assert "/etc/gw.yaml" in config.text()
    last = dom.by_id("last-reload")
    assert last.attrs["data-ok"] == "false"
    assert "REJECTED" in last.text()
    assert "3 min ago" in last.text() and "(2025-12-01 11:50:20 UTC)" in last.text()
    restart = dom.by_id("restart-required")
    assert restart.attrs["data-count"] == "2"
    assert [li.text() for li in restart.all("li")] == ["server.port", "admin.host"]
    assert "60 min ago (2025-12-01 10:53:20 UTC)" in config.text()  # loaded_at


def test_bad_things_lead_the_page() -> None:
    page = render_status_page(sample())
    dom = parse(page)
    alerts = dom.by_id("alerts")
    items = [(li.attrs["class"], li.text()) for li in alerts.all("li")]
    texts = [t for _, t in items]
    assert [c for c, _ in items] == ["alert bad"] * 5 + ["alert warn"] * 2, items
    assert texts[0].startswith("BAD Not ready: failing checks: limiter (redis: connection refused)")
    assert any("Key an-1 (anthropic) is disabled: auth_error" in t for t in texts)
    assert any("Config reload rejected 3 min ago: models.x:" in t for t in texts)
    assert any("Rate limiter (redis) unhealthy: connection refused" in t for t in texts)
    assert any("error rate 30.0 % (3 of 10 requests)" in t for t in texts)
    assert any("Key oa-2 (openai) is cooling down, back in 42 s: rate_limited" in t for t in texts)
    assert any("Restart required to apply: server.port, admin.host" in t for t in texts)
    assert alerts.attrs["data-count"] == "7"
    # Above everything else on the page, and in the tab's title.
    assert page.index('id="alerts"') < page.index('id="summary"') < page.index('id="keys"')
    assert dom.all("title")[0].text() == "(5!) Gateway status"


def test_all_clear() -> None:
    dom = parse(render_status_page(healthy_sample()))
    alerts = dom.by_id("alerts")
    assert alerts.attrs["data-count"] == "0"
    assert "All clear" in alerts.text()
    assert dom.by_id("ready").attrs["data-ready"] == "true"
    assert dom.by_id("live-streams").text() == "0"
    assert "No live streams" in dom.by_id("streams").text()
    assert dom.by_id("last-reload").attrs["data-ok"] == "true"
    assert dom.all("title")[0].text() == "Gateway status"


def test_times_relative_and_absolute() -> None:
    dom = parse(render_status_page(sample()))
    updated = dom.by_id("updated")
    assert updated.attrs["data-generated-at"] == "1764590000.5"
    assert "now (2025-12-01 11:53:20 UTC)" in updated.text()
    cooldown = dom.by_id("keys").all("tr", data_key_id="oa-2")[0].text()
    assert "in 42 s (2025-12-01 11:54:02 UTC)" in cooldown
    assert "12 s ago" in dom.by_id("streams").all("tr", data_stream_id="gs_0000")[0].text()


def test_missing_or_odd_fields_do_not_break_the_page() -> None:
    odd: list[dict[str, Any]] = [
        {},
        {"keys": "nope", "models": [1, None], "config": None, "live_streams": "x"},
        {"live_streams": 10**400, "generated_at": "soon", "config": {"loaded_at": 1e300}},
    ]
    for data in odd:
        dom = parse(render_status_page(data))
        assert dom.by_id("live-streams").text() == "\u2014"
        assert dom.by_id("ready").attrs["data-ready"] == "false"
        assert "No keys" in dom.by_id("keys").text()


def test_refresh_interval_is_in_the_script() -> None:
    assert STATUS_REFRESH_S == 1.0
    page = render_status_page(sample())
    assert "const REFRESH_MS = 1000;" in page
    assert 'credentials: "same-origin"' in page and 'cache: "no-store"' in page
    assert "innerHTML" not in page


# --- In a real browser.


@dataclass
class StatusServer:
    url: str
    data: dict[str, Any]
    fail_with: int | None = None  # /status/data answers this status instead, while set


@pytest.fixture
async def status_server() -> AsyncIterator[StatusServer]:
    state = StatusServer(url="", data=sample(live_streams=0))

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=render_status_page(state.data), content_type="text/html")

    async def data(_request: web.Request) -> web.Response:
        if state.fail_with is not None:
            return web.json_response({"error": "scripted"}, status=state.fail_with)
        return web.json_response(state.data)

    app = web.Application()
    app.router.add_get("/status", page)
    app.router.add_get("/status/data", data)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with Browser(require_binary("chromium")) as b:
        yield b
    assert not b.js_errors, b.js_errors


def text_of(selector: str) -> str:
    return f"document.querySelector({selector!r}).textContent"


@pytest.mark.server
async def test_browser_live_update(status_server: StatusServer, browser: Browser) -> None:
    await browser.navigate(status_server.url + "/status")
    await browser.wait_for("Number(document.body.dataset.polls) >= 1")
    assert await browser.evaluate(text_of("#live-streams")) == "0"
    assert (
        await browser.evaluate(
            "document.querySelector('#keys tr[data-key-id=\"oa-1\"]').dataset.state"
        )
        == "ok"
    )

    data = copy.deepcopy(status_server.data)
    data["live_streams"] = 5
    data["keys"][0].update(state="disabled", reason="auth_error")
    data["generated_at"] = NOW + 5
    status_server.data = data

    await browser.wait_for(f"{text_of('#live-streams')} === '5'", timeout_s=5)
    await browser.wait_for(
        "document.querySelector('#keys tr[data-key-id=\"oa-1\"]').dataset.state === 'disabled'",
        timeout_s=5,
    )
    alerts = await browser.evaluate(text_of("#alerts"))
    assert "Key oa-1 (openai) is disabled: auth_error" in alerts
    # Relative times follow the data's clock.
    assert "in 37 s" in await browser.evaluate(text_of("#keys tr[data-key-id='oa-2']"))


@pytest.mark.server
async def test_browser_without_javascript(status_server: StatusServer, browser: Browser) -> None:
    status_server.data = sample()
    await browser.set_javascript_enabled(False)
    await browser.navigate(status_server.url + "/status")
    assert await browser.evaluate(text_of("#live-streams")) == "3"
    states = await browser.evaluate(
        "[...document.querySelectorAll('#keys tr[data-key-id]')]"
        ".map((r) => r.dataset.keyId + '=' + r.dataset.state)"
    )
    assert states == ["an-1=disabled", "oa-2=cooldown", "oa-1=ok"]
    assert "REJECTED" in await browser.evaluate(text_of("#config"))
    # The script never ran: nothing polled.
    assert await browser.evaluate("document.body.dataset.polls === undefined")


@pytest.mark.server
async def test_browser_script_redraws_what_the_server_painted(
    status_server: StatusServer, browser: Browser
) -> None:
    """The script's renderers and the Python ones agree, hostile strings included."""
    status_server.data = sample()
    sections = (
        "meta",
        "updated",
        "alerts",
        "summary",
        "keys-section",
        "limiter",
        "config",
        "models-section",
        "streams-section",
    )
    grab = f"{list(sections)!r}.map((id) => document.getElementById(id).outerHTML)"
    await browser.set_javascript_enabled(False)
    await browser.navigate(status_server.url + "/status")
    painted = await browser.evaluate(grab)
    title = await browser.evaluate("document.title")

    await browser.set_javascript_enabled(True)
    await browser.navigate(status_server.url + "/status")
    # Force a redraw from the same data, so a difference cannot hide behind isEqualNode.
    await browser.wait_for("Number(document.body.dataset.polls) >= 1")
    polls = await browser.evaluate(
        f"{list(sections)!r}.forEach((id) => document.getElementById(id).replaceChildren());"
        "Number(document.body.dataset.polls)"
    )
    await browser.wait_for(f"Number(document.body.dataset.polls) > {polls}")
    redrawn = await browser.evaluate(grab)
    for name, before, after in zip(sections, painted, redrawn, strict=True):
        assert before == after, name
    assert await browser.evaluate("document.title") == title
    assert await browser.evaluate("document.scripts.length") == 1
    cells = await browser.evaluate(
        "[...document.querySelectorAll('#streams td')].map((td) => td.textContent)"
    )
    assert HOSTILE in cells


@pytest.mark.server
async def test_browser_stale_marker(status_server: StatusServer, browser: Browser) -> None:
    status_server.data = sample(live_streams=4)
    await browser.navigate(status_server.url + "/status")
    await browser.wait_for("Number(document.body.dataset.polls) >= 1")
    status_server.fail_with = 503
    await browser.wait_for("document.getElementById('updated').dataset.stale === 'true'", 5)
    updated = await browser.evaluate("document.getElementById('updated').innerText")
    assert "STALE: HTTP 503" in updated
    assert await browser.evaluate(text_of("#live-streams")) == "4"  # the last data stays
    status_server.fail_with = 401
    await browser.wait_for(f"{text_of('#updated')}.includes('not authorised')", 5)
    status_server.fail_with = None
    await browser.wait_for("document.getElementById('updated').dataset.stale === undefined", 5)
    assert await browser.evaluate("document.body.classList.contains('is-stale')") is False


@pytest.mark.server
async def test_browser_screenshot(
    status_server: StatusServer, browser: Browser, tmp_path: Path
) -> None:
    status_server.data = sample()
    await browser.navigate(status_server.url + "/status")
    await browser.wait_for("Number(document.body.dataset.polls) >= 1")
    path = await browser.screenshot(tmp_path / "status.png")
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 0 and height > 0
    assert len(png) > 1000
