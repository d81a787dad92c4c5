"""`gateway bench-limiter` runs end to end against a real redis-server and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import require_binary

ROOT = Path(__file__).parents[1]


def test_bench_limiter_prints_rows_for_both_backends() -> None:
    require_binary("redis-server")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "bench-limiter",
            "--requests",
            "200",
            "--concurrency",
            "1,4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A request is what a limited request costs now: one decision, then one settle.
    assert "request = admit + settle" in result.stdout
    rows = re.findall(
        r"^\| (memory|redis) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$",
        result.stdout,
        re.M,
    )
    assert [(r[0], r[1]) for r in rows] == [
        ("memory", "1"),
        ("redis", "1"),
        ("memory", "4"),
        ("redis", "4"),
    ]
    for row in rows:
        p50, p99 = float(row[2]), float(row[3])
        assert 0 < p50 <= p99
