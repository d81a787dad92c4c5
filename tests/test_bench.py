"""`gateway bench`: a tiny sweep and a tiny soak end to end (subprocesses, every target, the
report), SIGTERM stopping every child, the nginx config against the deployed one, and the pure
parts (client counting, settings, the summary of repeats). Nothing here asserts a speed:
figures belong in the benchmark's output."""

from __future__ import annotations

import math
import random
import re
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from gateway.bench import BenchError, BenchSettings, EventCounter, percentile
from gateway.bench.nginx import check_config, write_config
from gateway.bench.processes import bench_config, child_environment, validate_config
from gateway.bench.report import render
from gateway.bench.runner import KEYS
from gateway.bench.servers import free_ports
from gateway.bench.soak import check_open_files
from gateway.bench.summary import RunResult, Stat, summarise
from gateway.bench.workload import MODEL
from gateway.cli import build_parser
from tests.support import require_binary, sha

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_percentile_is_exact_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0], 99) == 3.0  # fewer than 100 samples: p99 is the max
    assert math.isnan(percentile([], 50))


def test_event_counter_matches_whole_stream_count_at_any_split() -> None:
    stream = b"".join(
        [b'data: {"role":"assistant"}\n\n']
        + [b'data: {"content":"tok\\n\\n%d"}\n\n' % i for i in range(30)]
        + [b"data: [DONE]\n\n"]
    )
    rng = random.Random(7)
    for _ in range(200):
        counter = EventCounter()
        total = 0
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 40)
            total += counter.feed(stream[pos : pos + step])
            pos += step
        assert total == 32
        assert counter.ended_with_done
    truncated = EventCounter()
    assert truncated.feed(stream[:-3]) == 31
    assert not truncated.ended_with_done


def test_packaged_config_validates_with_the_variables_the_bench_sets() -> None:
    fake = "http://127.0.0.1:9"
    with resources.as_file(bench_config()) as path:
        quiet = validate_config(path, child_environment(fake, 8, ""))
        traced = validate_config(path, child_environment(fake, 8, "http://127.0.0.1:7"))
        prod = validate_config(path, child_environment(fake, 8, "", production=True))
    assert quiet.server.port == 8
    assert quiet.providers["fake-openai"].base_url == fake + "/v1"
    assert MODEL in quiet.models
    # Quiet logging: per-stream log lines would be charged to the gateway's cost.
    assert (quiet.telemetry.access_log, quiet.telemetry.log_level) == (False, "warning")
    assert quiet.telemetry.otlp_endpoint == ""  # no export: a no-op tracer
    assert (traced.telemetry.otlp_endpoint, traced.telemetry.sample_ratio) == (
        "http://127.0.0.1:7",
        1.0,
    )
    # gateway-prod: the access log written (info is its level), tracing still off.
    assert (prod.telemetry.access_log, prod.telemetry.log_level) == (True, "info")
    assert prod.telemetry.otlp_endpoint == ""
    keys = {k.sha256: k for k in prod.auth.api_keys}
    unlimited, limited = keys[sha(KEYS["gateway"])], keys[sha(KEYS["gateway-prod"])]
    assert unlimited.tier is None
    assert limited.tier is not None
    tier = prod.tiers[limited.tier]
    limits = (
        tier.requests_per_minute,
        tier.tokens_per_minute,
        tier.concurrent_streams,
        tier.concurrent_requests,
    )
    assert all(limit is not None for limit in limits)


def test_the_budget_targets_meter_a_caller_with_budgets_only() -> None:
    fake = "http://127.0.0.1:9"
    with resources.as_file(bench_config()) as path:
        memory = validate_config(path, child_environment(fake, 8, ""))
        shared = validate_config(
            path, child_environment(fake, 8, "", redis_url="redis://127.0.0.1:7/0")
        )
    assert memory.state.backend == "memory"
    assert (shared.state.backend, shared.state.redis_url) == ("redis", "redis://127.0.0.1:7/0")
    assert KEYS["gateway-budget"] == KEYS["gateway-budget-redis"]
    key = {k.sha256: k for k in memory.auth.api_keys}[sha(KEYS["gateway-budget"])]
    assert key.tier is not None
    tier = memory.tiers[key.tier]
    # Budgets only (no per-minute limit), every one set and too high to run out.
    assert tier.requests_per_minute is None and tier.tokens_per_minute is None
    assert tier.budget is not None
    assert tier.budget.tokens_per_day and tier.budget.tokens_per_day >= 10**12
    assert tier.budget.cost_per_day and tier.budget.cost_per_day >= 10**5
    # A cost budget: every deployment is priced (the loader refuses it otherwise).
    for deployments in memory.models.values():
        assert all(d.pricing is not None for d in deployments.deployments)


@pytest.mark.server
@pytest.mark.timeout(120)
def test_the_budget_targets_run_in_memory_and_on_a_redis_server() -> None:
    require_binary("redis-server")
    targets = ("gateway", "gateway-budget", "gateway-budget-redis")
    proc = _bench(
        *("--concurrency", "2", "--gaps", "0", "--chunks", "5", "--streams", "12"),
        *("--max-seconds", "20", "--targets", ",".join(targets)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table(proc.stdout)
    assert [r["target"] for r in rows] == list(targets)
    assert all(r["errors"] == "0" and r["streams"] == "12" for r in rows)
    assert "budgets in a redis-server" in proc.stdout


def _location_directives(conf: str) -> set[str]:
    """The directives of the `location / { ... }` block of an nginx config, one per line."""
    block = conf.split("location / {", 1)[1].split("}", 1)[0]
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return {line for line in lines if line}


def test_nginx_config_has_the_deployed_proxy_settings(tmp_path: Path) -> None:
    deployed = (REPO_ROOT / "deploy" / "nginx" / "gateway.conf").read_text()
    conf = write_config(tmp_path, tmp_path / "nginx.log", 8081, 9911, streams=100)
    text = conf.read_text()
    # The same location block but for the upstream's name.
    wanted = {d for d in _location_directives(deployed) if not d.startswith("proxy_pass ")}
    assert wanted <= _location_directives(text)
    assert "proxy_buffering off;" in wanted
    for directive in (
        "daemon off;",
        "worker_processes 1;",
        "listen 127.0.0.1:8081 backlog=1024;",
        "server 127.0.0.1:9911;",
        "keepalive 64;",
        f"pid {tmp_path}/nginx.pid;",
    ):
        assert directive in text, directive
    # A client and an upstream connection per stream, and nginx closes connections awaiting
    # their request once fewer than 1/16 of its connections are free: room beyond that.
    connections = int(re.findall(r"worker_connections (\d+);", text)[0])
    assert connections - connections // 16 >= 2 * 100
    check_config(require_binary("nginx"), conf, tmp_path / "nginx.log")


def _settings(*argv: str) -> BenchSettings:
    return BenchSettings.from_args(build_parser().parse_args(["bench", *argv]))


def test_targets_default_by_mode_and_are_checked() -> None:
    assert _settings().targets == ("direct", "nginx", "gateway")
    assert _settings("--soak", "10").targets == ("gateway",)
    assert _settings("--targets", "gateway-prod,direct").targets == ("gateway-prod", "direct")
    for bad in ("", "direct,haproxy", "nginx,nginx"):
        with pytest.raises(BenchError, match="--targets"):
            _settings("--targets", bad)
    with pytest.raises(BenchError, match="--repeats"):
        _settings("--repeats", "0")


def test_a_soak_beyond_the_open_file_limit_is_refused_up_front() -> None:
    check_open_files(_settings("--soak", "1000"), 2100)
    with pytest.raises(BenchError, match="open files") as caught:
        check_open_files(_settings("--soak", "1000"), 2000)
    assert "at most 968 streams" in str(caught.value)
    # Direct to the fake: one socket per stream.
    check_open_files(_settings("--soak", "1000", "--targets", "direct"), 1100)


def _run(target: str, repeat: int, **figures: float | None) -> RunResult:
    values: dict[str, float | None] = {
        "streams_per_s": 100.0,
        "ttft_p50": 1.0,
        "ttft_p99": 2.0,
        "cpu_ms_per_stream": None,
    }
    values.update(figures)
    return RunResult(
        target=target,
        repeat=repeat,
        gap_ms=0,
        concurrency=1,
        streams=10,
        errors=0,
        error_kinds="",
        streams_per_s=values["streams_per_s"] or 0.0,
        ttft_p50=values["ttft_p50"] or 0.0,
        ttft_p99=values["ttft_p99"] or 0.0,
        gap_p50=0.0,
        gap_p99=0.0,
        stream_p50=1.0,
        client_cpu_pct=50.0,
        cpu_ms_per_stream=values["cpu_ms_per_stream"],
    )


def test_repeats_are_summarised_as_medians_and_compared_within_each_repeat() -> None:
    runs = []
    for repeat, (direct, nginx, gw) in enumerate(
        [(1.0, 1.2, 2.0), (1.5, 1.6, 2.6), (0.9, 1.0, 1.8)]
    ):
        runs += [
            _run("direct", repeat, ttft_p50=direct),
            _run("nginx", repeat, ttft_p50=nginx, cpu_ms_per_stream=0.2, streams_per_s=200.0),
            _run("gateway", repeat, ttft_p50=gw, cpu_ms_per_stream=1.0 + repeat),
        ]
    by_target = {s.target: s for s in summarise(runs)}
    assert list(by_target) == ["direct", "nginx", "gateway"]
    gateway = by_target["gateway"]
    assert (gateway.runs, gateway.ttft_p50) == (3, Stat(2.0, 1.8, 2.6))
    # +TTFT: gateway - direct of the same repeat (1.0, 1.1, 0.9), then the median.
    assert gateway.added_ttft_p50.median == pytest.approx(1.0)
    assert gateway.cpu_vs_nginx.median == pytest.approx(2.0 / 0.2)
    assert gateway.streams_per_s_vs_nginx == Stat(0.5, 0.5, 0.5)
    assert by_target["direct"].added_ttft_p50 == Stat(None, None, None)
    assert by_target["nginx"].cpu_vs_nginx == Stat(None, None, None)
    assert by_target["direct"].cpu_ms_per_stream == Stat(None, None, None)


def test_free_ports_are_distinct() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(0 < p < 65536 for p in ports)


def _table(stdout: str, first: str = "gap_ms") -> list[dict[str, str]]:
    """The rows of the plain-text table whose header starts with `first`, by column."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        cells = line.split()
        if not cells:
            break
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _bench(*argv: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "bench", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


TARGETS = ("direct", "nginx", "gateway", "gateway-prod")
PROXIES = TARGETS[1:]


def _assert_range(row: dict[str, str], column: str) -> None:
    low, _, high = row[f"{column}_range"].partition("-")
    assert float(low) <= float(row[column]) <= float(high), (column, row)


@pytest.mark.server
@pytest.mark.timeout(120)
def test_bench_runs_every_target_interleaved_at_each_concurrency() -> None:
    require_binary("nginx")
    proc = _bench(
        *("--concurrency", "1,4", "--gaps", "0", "--chunks", "5", "--streams", "12"),
        *("--repeats", "2", "--max-seconds", "20", "--targets", ",".join(TARGETS)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nearest rank" in proc.stdout
    assert "Python 3." in proc.stdout
    assert "nginx/" in proc.stdout
    # Interleaved: every target once per repeat, then the next repeat.
    # (Result lines only: a warning about a busy client names the run too.)
    order = re.findall(r"concurrency (\d+), ([a-z-]+), repeat (\d+): \d+ streams", proc.stderr)
    assert order == [(c, t, r) for c in ("1", "4") for r in ("1", "2") for t in TARGETS]
    rows = _table(proc.stdout)
    assert [(r["gap_ms"], r["conc"], r["target"]) for r in rows] == [
        ("0", c, t) for c in ("1", "4") for t in TARGETS
    ]
    for row in rows:
        _assert_sweep_row(row)


def _assert_sweep_row(row: dict[str, str]) -> None:
    assert row["streams"] == "12"
    assert row["errors"] == "0"
    for column in ("streams/s", "ttft_p50", "ttft_p99", "gap_p50", "gap_p99", "stream_p50"):
        value = float(row[column])
        assert math.isfinite(value), (column, row)
        assert value >= 0, (column, row)
    assert float(row["ttft_p50"]) <= float(row["ttft_p99"])
    assert float(row["gap_p50"]) <= float(row["gap_p99"])
    for column in ("streams/s", "ttft_p50", "ttft_p99"):
        _assert_range(row, column)
    assert math.isfinite(float(row["client_cpu%"]))
    proxy_only = ("+ttft_p50", "+ttft_p99", "cpu_ms/stream", "rss_mib", "peak_rss_mib")
    if row["target"] in PROXIES:
        for column in proxy_only:
            assert math.isfinite(float(row[column])), (column, row)
        _assert_range(row, "cpu_ms/stream")
        assert float(row["rss_mib"]) > 0
        assert float(row["rss_mib"]) <= float(row["peak_rss_mib"])
    else:
        assert all(row[column] == "-" for column in (*proxy_only, "cpu_ms/stream_range"))
    # Ratios against nginx: for the others, not for nginx itself.
    if row["target"] == "nginx":
        assert (row["sps_vs_nginx"], row["cpu_vs_nginx"]) == ("-", "-")
    else:
        assert float(row["sps_vs_nginx"]) > 0
    if row["target"].startswith("gateway"):
        assert float(row["cpu_vs_nginx"]) > 0


@pytest.mark.server
@pytest.mark.timeout(120)
def test_soak_holds_the_streams_through_each_target_in_turn() -> None:
    require_binary("nginx")
    proc = _bench(
        *("--soak", "20", "--soak-chunks", "3", "--soak-gap-ms", "100"),
        *("--max-seconds", "20", "--targets", ",".join(TARGETS)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Soak: 20 OpenAI chat completion streams of 3 content chunks 100 ms apart" in (
        proc.stdout
    )
    rows = _table(proc.stdout, first="target")
    assert [r["target"] for r in rows] == list(TARGETS)
    for row in rows:
        assert (row["streams"], row["errors"]) == ("20", "0"), row
        assert 0 < int(row["held"]) <= 20
        assert float(row["fake_cpu_s"]) >= 0
        figures = ("rss_idle", "rss_peak", "rss_after", "kib/stream", "fds_peak", "fds_after")
        if row["target"] == "direct":
            assert all(row[column] == "-" for column in (*figures, "target_cpu_s"))
            continue
        assert float(row["rss_idle"]) > 0
        assert float(row["rss_idle"]) <= float(row["rss_peak"])
        assert int(row["fds_peak"]) > 0
        assert int(row["fds_after"]) > 0
        assert float(row["target_cpu_s"]) >= 0


@pytest.mark.server
@pytest.mark.timeout(90)
def test_sigterm_mid_soak_stops_every_child_process() -> None:
    require_binary("nginx")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "bench", "--soak", "10", "--targets", "nginx,gateway"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    pids = []
    for line in proc.stderr:
        pids += [int(pid) for pid in re.findall(r" pid (\d+)", line)]
        if line.startswith("bench: soak: "):
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(pids) == 4  # the fake provider, nginx's master and worker, the gateway
    assert not [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited orphan nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_markdown_report_shows_the_spread_of_repeats() -> None:
    runs = [
        _run(target, repeat, ttft_p50=1.0 + repeat, cpu_ms_per_stream=0.5)
        for repeat in range(2)
        for target in ("direct", "nginx", "gateway")
    ]
    text = render(_settings("--repeats", "2", "--markdown"), runs)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| upstream gap | concurrency | target | errors | streams |")
    assert len(table) == 2 + 3
    assert "| gateway | 0 | 10 | 100.0 (100.0-100.0) |" in table[4]
    assert "1.500 (1.000-2.000)" in table[4]
    assert "- Targets: direct = the fake provider itself" in text
