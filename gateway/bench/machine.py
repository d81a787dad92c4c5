"""What the host counts for the benchmark: a process's CPU, memory and open files (/proc), its
children, the kernel's dropped connections, the client thread's own CPU (getrusage), and the
open-file limit the benchmark raises for itself and its children."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_N = TypeVar("_N", int, float)


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process's counters from /proc."""

    cpu_s: float
    rss_mib: float
    hwm_mib: float


def sample_process(pid: int) -> ProcSample | None:
    """The CPU time (see `cpu_seconds`), VmRSS and VmHWM of `pid`; None where /proc is not
    available or the process has gone."""
    cpu = cpu_seconds(pid)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            kib[key] = int(value.split()[0])
    if cpu is None:
        return None
    return ProcSample(
        cpu_s=cpu, rss_mib=kib.get("VmRSS", 0) / 1024, hwm_mib=kib.get("VmHWM", 0) / 1024
    )


def cpu_seconds(pid: int) -> float | None:
    """The CPU time `pid` has used: the sum of its threads' run time from
    /proc/PID/task/*/schedstat (nanoseconds: a cheap proxy such as nginx uses only a few
    clock ticks in a run), else utime+stime from /proc/PID/stat (clock ticks); None without
    /proc or the process. Threads that have exited drop out of the first sum."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        ns = sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in tasks)
        return ns / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14, 15


def rss_mib(pid: int) -> float | None:
    """VmRSS of `pid`; None without /proc or the process."""
    sample = sample_process(pid)
    return sample.rss_mib if sample is not None else None


def open_fds(pid: int) -> int | None:
    """How many file descriptors `pid` holds open (/proc/PID/fd); None where unreadable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def child_pids(pid: int) -> list[int]:
    """The children of `pid` (/proc/PID/task/*/children, or a scan of /proc where the kernel
    lacks that file); empty without /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        return found
    except OSError:
        pass
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    return [int(e) for e in entries if e.isdigit() and _parent(int(e)) == pid]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (system-wide
    TcpExt ListenOverflows); None where /proc/net/netstat is not available."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    # Pairs of lines: "TcpExt: Name1 Name2 ..." then "TcpExt: value1 value2 ...".
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenOverflows")
            return int(value) if value is not None else None
    return None


def client_cpu_seconds() -> float:
    """CPU time (user + system) of the calling thread: the client's event loop, without the
    OTLP sink's thread; the whole process where per-thread usage is not available."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def raise_open_file_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit (the children started
    afterwards inherit it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


@dataclass(frozen=True, slots=True)
class RunCost:
    """What the host counted over one run: the charged process's counters before and after it
    (None for a direct run, or without /proc), the upstream's (the fake provider's) CPU
    seconds, the client thread's CPU seconds, the wall time, and the connections dropped by
    full listen queues in between (None without /proc)."""

    before: ProcSample | None
    after: ProcSample | None
    upstream_cpu_s: float | None
    client_cpu_s: float
    wall_s: float
    listen_overflows: int | None


@dataclass(frozen=True, slots=True)
class CostMeter:
    """The readings taken as a run starts; `stop()` takes them again as it ends."""

    pid: int | None  # the process charged (None: none, a direct run)
    upstream_pid: int
    before: ProcSample | None
    upstream_cpu_s: float | None
    client_cpu_s: float
    started: float
    overflows: int | None

    @classmethod
    def start(cls, pid: int | None, upstream_pid: int) -> CostMeter:
        return cls(
            pid=pid,
            upstream_pid=upstream_pid,
            before=sample_process(pid) if pid is not None else None,
            upstream_cpu_s=cpu_seconds(upstream_pid),
            client_cpu_s=client_cpu_seconds(),
            started=time.perf_counter(),
            overflows=listen_overflows(),
        )

    def stop(self) -> RunCost:
        wall_s = time.perf_counter() - self.started
        client_s = client_cpu_seconds() - self.client_cpu_s
        after = sample_process(self.pid) if self.pid is not None else None
        upstream_now = cpu_seconds(self.upstream_pid)
        overflows = listen_overflows()
        return RunCost(
            before=self.before,
            after=after,
            upstream_cpu_s=_delta(upstream_now, self.upstream_cpu_s),
            client_cpu_s=client_s,
            wall_s=wall_s,
            listen_overflows=_delta(overflows, self.overflows),
        )


def _delta(now: _N | None, then: _N | None) -> _N | None:
    return now - then if now is not None and then is not None else None
