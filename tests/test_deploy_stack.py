"""deploy/compose.yaml and the files it mounts agree with each other and with the gateway.

No container engine runs where these tests run, so the stack is checked by reading it: every
mounted file and the build context exist; the host names and ports one service uses to reach
another (nginx -> gateway API, Prometheus -> gateway admin listener, gateway -> collector,
fake provider and Redis, Grafana -> Prometheus) are the other service's name and the port it
listens on; deploy/gateway.yaml passes the gateway's own validation with the environment
compose gives it; the Grafana dashboard is provisionable and every metric and label its
queries use is one gateway.metrics exports, so that renaming one breaks this test rather than
blanking a panel.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import GatewayConfig, build_runtime
from gateway.config.loader import load_config_checked
from gateway.metrics import ERROR_OUTCOMES
from tests.support import require_binary
from tests.test_prometheus_rules import TARGET_LABELS, parse_query, queryable_series

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
GATEWAY_YAML = DEPLOY / "gateway.yaml"
NGINX_DEPLOYED = DEPLOY / "nginx" / "gateway.conf"
DASHBOARD = DEPLOY / "grafana" / "gateway.json"

SERVICES = {"gateway", "fake-provider", "redis", "nginx", "prometheus", "grafana", "otel-collector"}
# What compose passes for each ${VAR} of deploy/gateway.yaml (test values).
GATEWAY_ENV = {
    "GATEWAY_ADMIN_TOKEN": "compose-test-admin-token-0123",
    "FAKE_OPENAI_KEY": "sk-fake-compose-test",
    "FAKE_ANTHROPIC_KEY": "sk-ant-fake-compose-test",
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
PROMETHEUS_PORT = 9090  # its default --web.listen-address


# --- reading the files -----------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    found = compose()["services"][name]
    assert isinstance(found, dict)
    return found


def bind_mounts(name: str) -> dict[Path, PurePosixPath]:
    """A service's bind mounts: host path (resolved against deploy/) -> container path."""
    mounts: dict[Path, PurePosixPath] = {}
    for volume in service(name).get("volumes", ()):
        if isinstance(volume, dict):
            assert volume.get("type") == "bind", f"{name}: only bind mounts here: {volume}"
            source, target = volume["source"], volume["target"]
        else:
            source, target, *_ = volume.split(":")
            assert source.startswith((".", "/")), f"{name}: a named volume {volume!r}"
        mounts[(DEPLOY / source).resolve()] = PurePosixPath(target)
    return mounts


def mount_target(name: str, host: Path) -> PurePosixPath:
    """Where `host` appears in the service's container (a file or a directory mounted above it)."""
    host = host.resolve()
    for source, target in bind_mounts(name).items():
        if host == source:
            return target
        if source in host.parents:
            return target.joinpath(*host.relative_to(source).parts)
    raise AssertionError(f"{name} does not mount {host.relative_to(ROOT)}")


def mounted_source(name: str, target: PurePosixPath) -> Path:
    """The host file of the container path `target` (itself mounted, or under a mounted dir)."""
    for source, mounted in bind_mounts(name).items():
        if target == mounted:
            return source
        if mounted in target.parents:
            return source.joinpath(*target.relative_to(mounted).parts)
    raise AssertionError(f"{name} mounts nothing at {target}")


def command(name: str) -> list[str]:
    argv = service(name).get("command", [])
    assert isinstance(argv, list), f"{name}: write its command as a list (no shell splitting)"
    return [str(a) for a in argv]


def option(argv: list[str], flag: str) -> str:
    """The value of `--flag VALUE` or `--flag=VALUE`."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no {flag} in {argv}")


def container_ports(name: str) -> set[int]:
    """The container side of a service's published ports ("127.0.0.1:8080:80" -> 80)."""
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service(name).get("ports", ())}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@cache
def gateway_config() -> GatewayConfig:
    loaded = load_config_checked(GATEWAY_YAML, env=GATEWAY_ENV)
    # Every secret comes from the environment: no inline-secret warnings.
    assert loaded.warnings == (), [str(w) for w in loaded.warnings]
    return loaded.config


def env_refs(value: Any) -> Iterator[tuple[str, bool]]:
    """Every ${VAR} in the YAML's values (comments excluded): (name, has a default)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from env_refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from env_refs(item)
    elif isinstance(value, str):
        for match in _ENV_REF.finditer(value):
            yield match.group(1), match.group(2) is not None


# --- compose ---------------------------------------------------------------------------------


def test_compose_has_the_stack_and_no_obsolete_keys() -> None:
    assert "version" not in compose(), "the top-level `version:` is obsolete in Compose v2"
    assert set(compose()["services"]) == SERVICES
    for name in SERVICES:
        spec = service(name)
        assert "image" in spec or "build" in spec, name
        image = spec.get("image", "")
        # Pinned: a moving `latest` makes the stack change under the files checked here.
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: pin its image ({image!r})"


def test_every_bind_mount_and_build_context_exists() -> None:
    for name in SERVICES:
        for source, target in bind_mounts(name).items():
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert source.is_relative_to(DEPLOY), f"{name} mounts {source} from outside deploy/"
            assert target.is_absolute(), f"{name}: {target}"
        for volume in service(name).get("volumes", ()):
            # Configuration only: nothing in the stack writes to the repository.
            read_only = (
                volume.get("read_only") if isinstance(volume, dict) else volume[-3:] == ":ro"
            )
            assert read_only, f"{name}: mount {volume} read-only"
        build = service(name).get("build")
        if build is not None:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


def test_the_fake_provider_runs_the_gateway_image() -> None:
    gateway, fake = service("gateway"), service("fake-provider")
    assert fake["image"] == gateway["image"]
    assert fake.get("build") == gateway.get("build")
    assert command("fake-provider")[0] == "fake-provider"
    assert option(command("fake-provider"), "--host") == "0.0.0.0"


def test_the_gateway_serves_the_mounted_config_with_its_environment() -> None:
    argv = command("gateway")
    assert argv[0] == "serve"
    assert option(argv, "--config") == str(mount_target("gateway", GATEWAY_YAML))
    environment = service("gateway").get("environment", {})
    assert isinstance(environment, dict)
    refs = dict(env_refs(yaml.safe_load(GATEWAY_YAML.read_text())))
    needed = {name for name, has_default in refs.items() if not has_default}
    assert needed <= environment.keys(), (
        f"compose does not pass {sorted(needed - set(environment))}"
    )
    assert needed == GATEWAY_ENV.keys(), "keep GATEWAY_ENV to what deploy/gateway.yaml reads"
    # The admin token has no default anywhere: compose refuses to start without it.
    assert ":?" in environment["GATEWAY_ADMIN_TOKEN"]


def test_healthy_dependencies_have_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name in SERVICES:
        depends = service(name).get("depends_on", {})
        if not isinstance(depends, dict):
            continue
        for other, condition in depends.items():
            assert other in SERVICES, f"{name} depends on unknown {other}"
            if condition.get("condition") != "service_healthy":
                continue
            own = service(other).get("healthcheck")
            # The image built from the repository's Dockerfile brings its own HEALTHCHECK.
            inherited = "build" in service(other) and "\nHEALTHCHECK " in dockerfile
            assert own or inherited, f"{name} waits for {other} to be healthy; it has no check"


def test_dockerfile_exposes_both_listeners() -> None:
    config = gateway_config()
    assert config.admin is not None
    exposed = {
        int(port)
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("EXPOSE ")
        for port in line.split()[1:]
    }
    assert {config.server.port, config.admin.port} <= exposed


# --- deploy/gateway.yaml -----------------------------------------------------------------------


def test_the_gateway_config_builds() -> None:
    runtime = build_runtime(gateway_config())
    assert runtime.routes
    config = gateway_config()
    assert config.admin is not None
    # Secrets appear nowhere but in the environment.
    text = GATEWAY_YAML.read_text()
    for secret in GATEWAY_ENV.values():
        assert secret not in text
    assert config.admin.token.get_secret_value() == GATEWAY_ENV["GATEWAY_ADMIN_TOKEN"]


def test_the_gateway_reaches_the_fake_provider_and_redis() -> None:
    config = gateway_config()
    fake_port = int(option(command("fake-provider"), "--port"))
    for name, provider in config.providers.items():
        url = urlsplit(provider.base_url)
        assert (url.hostname, url.port) == ("fake-provider", fake_port), name
    assert config.state.backend == "redis"
    redis = urlsplit(config.state.redis_url)
    assert (redis.hostname, redis.port or 6379) == ("redis", 6379)
    assert "redis" in service("gateway")["depends_on"]


def test_traces_go_to_the_collector_service() -> None:
    endpoint = urlsplit(gateway_config().telemetry.otlp_endpoint)
    assert endpoint.hostname == "otel-collector"
    config_path = PurePosixPath(option(command("otel-collector"), "--config"))
    collector = yaml.safe_load(mounted_source("otel-collector", config_path).read_text())
    receiver = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    host, port = host_port(receiver)
    assert host in {"0.0.0.0", ""}, "the receiver must listen beyond the container's loopback"
    assert endpoint.port == port
    # The gateway exports over OTLP/HTTP (the exporter adds /v1/traces).
    assert endpoint.scheme == "http"
    assert endpoint.path in {"", "/", "/v1/traces"}
    traces = collector["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    for stage in ("receivers", "processors", "exporters"):
        assert set(traces.get(stage, ())) <= set(collector.get(stage, {})), stage
    assert {"debug", "logging"} & set(traces["exporters"])


# --- nginx -------------------------------------------------------------------------------------


def nginx_conf() -> Path:
    return mounted_source("nginx", PurePosixPath("/etc/nginx/conf.d/default.conf"))


def nginx_directives(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def upstream_servers(text: str) -> dict[str, list[str]]:
    """upstream name -> the addresses of its `server` lines."""
    blocks = re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", text)
    return {
        name: re.findall(r"^\s*server\s+([^\s;]+)", body, flags=re.MULTILINE)
        for name, body in blocks
    }


def test_nginx_proxies_to_the_gateway_api_port() -> None:
    conf = nginx_conf()
    assert conf != NGINX_DEPLOYED.resolve(), "gateway.conf's upstream is 127.0.0.1"
    text = conf.read_text()
    upstreams = upstream_servers(text)
    assert upstreams, "no upstream block"
    (passed,) = re.findall(r"proxy_pass\s+http://([^\s;/]+)", text)
    assert [host_port(a) for a in upstreams[passed]] == [("gateway", gateway_config().server.port)]
    listen = {int(p) for p in re.findall(r"^\s*listen\s+(?:\S+:)?(\d+)", text, re.MULTILINE)}
    assert container_ports("nginx") <= listen


def test_compose_nginx_is_the_deployed_config_but_for_the_upstream() -> None:
    # The same proxy settings as deploy/nginx/gateway.conf (and, through tests/test_bench.py,
    # the benchmark's nginx): only the upstream's address differs.
    def settings(text: str) -> list[str]:
        return [d for d in nginx_directives(text) if not re.match(r"server\s+[^\s;]+:\d+;", d)]

    assert settings(nginx_conf().read_text()) == settings(NGINX_DEPLOYED.read_text())


@pytest.mark.server
def test_nginx_accepts_the_compose_config(tmp_path: Path) -> None:
    binary = require_binary("nginx")
    # The service name resolves inside the compose network only.
    site = tmp_path / "site.conf"
    site.write_text(nginx_conf().read_text().replace("server gateway:", "server 127.0.0.1:"))
    main = tmp_path / "nginx.conf"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log warn;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp_paths}\n    include {site};\n}}\n"
    )
    log = tmp_path / "error.log"
    proc = subprocess.run(
        [binary, "-p", str(tmp_path), "-c", str(main), "-e", str(log), "-t", "-q"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# --- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_admin_listener() -> None:
    argv = command("prometheus")
    config_path = PurePosixPath(option(argv, "--config.file"))
    prometheus = yaml.safe_load(mounted_source("prometheus", config_path).read_text())
    # Its rule files too (they are resolved against the config file's directory).
    for rule_file in prometheus["rule_files"]:
        assert mounted_source("prometheus", config_path.parent / rule_file).is_file()
    (job,) = (j for j in prometheus["scrape_configs"] if j["job_name"] == "llm-gateway")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    admin = gateway_config().admin
    assert admin is not None
    assert targets == {f"gateway:{admin.port}"}
    assert admin.port != gateway_config().server.port
    # Loopback would be unreachable from the prometheus container.
    assert admin.host in {"0.0.0.0", "::"}
    assert admin.port in container_ports("gateway")
    assert all(not a.startswith("--web.listen-address") for a in argv)
    assert PROMETHEUS_PORT in container_ports("prometheus")


# --- Grafana -----------------------------------------------------------------------------------

_PROVISIONING = PurePosixPath("/etc/grafana/provisioning")


def provisioned(kind: str) -> list[dict[str, Any]]:
    """Every entry of the provisioning files Grafana reads from `kind` (datasources, ...)."""
    directory = mounted_source("grafana", _PROVISIONING / kind)
    entries: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        assert data["apiVersion"] == 1, path
        entries += data["datasources" if kind == "datasources" else "providers"]
    assert entries, f"nothing provisioned in {directory}"
    return entries


def datasource_uid() -> str:
    (source,) = provisioned("datasources")
    assert source["type"] == "prometheus"
    return str(source["uid"])


@cache
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def queries() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every panel target."""
    return [
        (
            f"panel {panel['title']!r} {target['refId']}",
            target["expr"],
            target.get("legendFormat", ""),
        )
        for panel in panels()
        for target in panel.get("targets", ())
    ]


def test_grafana_queries_the_prometheus_service() -> None:
    (source,) = provisioned("datasources")
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    assert source["access"] == "proxy", "the browser cannot resolve compose service names"


def test_grafana_loads_the_mounted_dashboard() -> None:
    (provider,) = provisioned("dashboards")
    assert provider["type"] == "file"
    assert mount_target("grafana", DASHBOARD).parent == PurePosixPath(provider["options"]["path"])


def test_the_dashboard_is_provisionable() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert board["schemaVersion"] >= 36  # datasources referenced by uid
    assert board.get("id") is None  # a provisioned dashboard gets its id from Grafana
    uid = datasource_uid()
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels():
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == uid, panel["title"]
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), panel["title"]
    variables = board["templating"]["list"]
    assert {v["name"] for v in variables} >= {"instance", "model"}
    for variable in variables:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def dashboard_problems(board: dict[str, Any]) -> list[str]:
    """What in the dashboard's queries gateway.metrics does not export: unknown metrics,
    labels a metric lacks, legends printing a label the aggregation drops."""
    exported = queryable_series()
    problems: list[str] = []

    def check(where: str, expr: str, legend: str) -> None:
        query = parse_query(expr)
        if not query.selectors:
            problems.append(f"{where}: no metric in {expr!r}")
        available = set(TARGET_LABELS)
        for selector in query.selectors:
            if selector.metric not in exported:
                problems.append(f"{where}: gateway.metrics exports no {selector.metric}")
                continue
            labels = exported[selector.metric] | TARGET_LABELS
            available |= labels
            for label, _, _ in selector.matchers:
                if label not in labels:
                    problems.append(f"{where}: {selector.metric} has no label {label}")
        if not query.grouping <= available:
            problems.append(f"{where}: groups by {sorted(query.grouping - available)}")
        printed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        kept = query.grouping or available
        if not printed <= kept:
            problems.append(f"{where}: its legend prints {sorted(printed - kept)}, dropped")

    for panel in [p for top in board["panels"] for p in (top, *top.get("panels", []))]:
        for target in panel.get("targets", ()):
            where = f"panel {panel['title']!r} {target['refId']}"
            check(where, target["expr"], target.get("legendFormat", ""))
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"].strip())
        assert match, f"variable {variable['name']}: not label_values(selector, label)"
        check(f"variable {variable['name']}", match[1], "{{" + match[2] + "}}")
    return problems


def test_every_metric_and_label_the_dashboard_uses_is_exported() -> None:
    assert dashboard_problems(dashboard()) == []


def test_the_metric_check_catches_a_misspelt_metric_or_label() -> None:
    # The check above must be able to fail: the dashboard with one name broken.
    text = DASHBOARD.read_text()
    for good, bad in (
        ("llm_gateway_requests_total{", "llm_gateway_request_total{"),
        # The family's name: a histogram is queried by its _bucket series.
        ("time_to_first_chunk_seconds_bucket", "time_to_first_chunk_seconds"),
        ("by (gen_ai_provider_name, reason)", "by (gen_ai_provider_name, cause)"),
        ("{{outcome}}", "{{status}}"),
    ):
        assert good in text, good
        broken = json.loads(text.replace(good, bad))
        assert dashboard_problems(broken), f"{good!r} -> {bad!r} went unnoticed"


def test_the_dashboard_shows_every_gateway_metric_on_call_needs() -> None:
    used = {s.metric for _, expr, _ in queries() for s in parse_query(expr).selectors}
    assert {
        "gen_ai_client_operation_time_to_first_chunk_seconds_bucket",
        "llm_gateway_overhead_seconds_bucket",
        "llm_gateway_active_streams",
        "llm_gateway_requests_total",
        "llm_gateway_retries_total",
        "llm_gateway_upstream_key_state",
        "llm_gateway_upstream_key_in_flight",
        "llm_gateway_limiter_decisions_total",
        "llm_gateway_queue_depth",
        "llm_gateway_queue_wait_seconds_bucket",
        "llm_gateway_hedges_total",
        "llm_gateway_stream_resumes_total",
    } <= used


def test_the_dashboard_error_ratio_counts_exactly_the_error_outcomes() -> None:
    regexes = [
        (where, value)
        for where, expr, _ in queries()
        for selector in parse_query(expr).selectors
        for label, op, value in selector.matchers
        if label == "outcome"
    ]
    assert regexes, "no error ratio"
    for where, value in regexes:
        assert sorted(value.split("|")) == sorted(ERROR_OUTCOMES), f"{where}: not ERROR_OUTCOMES"


def test_every_query_follows_the_dashboard_variables() -> None:
    # A query that ignores $instance or $model shows more than the dashboard says it does.
    exported = queryable_series()
    for where, expr, _ in queries():
        for selector in parse_query(expr).selectors:
            matchers = {(label, op): value for label, op, value in selector.matchers}
            assert matchers.get(("job", "=")) == "llm-gateway", where
            assert matchers.get(("instance", "=~")) == "$instance", where
            if "gen_ai_request_model" in exported[selector.metric]:
                assert matchers.get(("gen_ai_request_model", "=~")) == "$model", where
