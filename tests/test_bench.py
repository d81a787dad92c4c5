"""`gateway bench`: a tiny sweep end to end (subprocesses, both paths, the report), and the
client's pure parts. Nothing here asserts a speed: figures belong in the benchmark's output."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from gateway.bench import EventCounter, percentile
from gateway.bench.processes import bench_config, child_environment, validate_config
from gateway.bench.servers import free_ports
from gateway.bench.workload import MODEL

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


def test_free_ports_are_distinct() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(0 < p < 65536 for p in ports)


def _table(stdout: str) -> list[dict[str, str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["gap_ms"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        cells = line.split()
        if not cells:
            break
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.mark.timeout(120)
def test_bench_runs_both_paths_at_each_concurrency() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "bench",
            "--concurrency",
            "1,4",
            "--gaps",
            "0",
            "--chunks",
            "5",
            "--streams",
            "12",
            "--max-seconds",
            "20",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nearest rank" in proc.stdout
    assert "Python 3." in proc.stdout
    rows = _table(proc.stdout)
    assert [(r["gap_ms"], r["conc"], r["path"]) for r in rows] == [
        ("0", "1", "direct"),
        ("0", "1", "gateway"),
        ("0", "4", "direct"),
        ("0", "4", "gateway"),
    ]
    for row in rows:
        assert row["streams"] == "12"
        assert row["errors"] == "0"
        for column in ("streams/s", "ttft_p50", "ttft_p99", "gap_p50", "gap_p99", "stream_p50"):
            value = float(row[column])
            assert math.isfinite(value), (column, row)
            assert value >= 0, (column, row)
        assert float(row["ttft_p50"]) <= float(row["ttft_p99"])
        assert float(row["gap_p50"]) <= float(row["gap_p99"])
        gateway_only = ("+ttft_p50", "+ttft_p99", "cpu_ms/stream", "rss_mib", "peak_rss_mib")
        if row["path"] == "gateway":
            for column in gateway_only:
                assert math.isfinite(float(row[column])), (column, row)
            assert float(row["rss_mib"]) > 0
            assert float(row["rss_mib"]) <= float(row["peak_rss_mib"])
        else:
            assert all(row[column] == "-" for column in gateway_only)
