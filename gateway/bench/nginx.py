"""nginx as a benchmark target: the binary found, a config with the proxy settings of
deploy/nginx/gateway.conf in front of the fake provider, checked with `nginx -t`, and the
worker process whose cost the benchmark charges."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gateway.bench.machine import child_pids
from gateway.bench.servers import find_binary
from gateway.bench.settings import BenchError

CHECK_TIMEOUT_S = 10.0
# Beside the sockets of the streams: the listening socket, the idle upstream keep-alive pool
# (64), the channel to the master.
SPARE_CONNECTIONS = 80

# The `location` block is deploy/nginx/gateway.conf's, with the gateway's address replaced by
# the fake provider's; keep the two in step. `worker_processes 1`: one process serves, as one
# gateway process does; the master only supervises it (the worker is what is measured).
_CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {log} warn;

events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    upstream fake_provider {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_timeout 60s;
    }}

    server {{
        # The backlog of the gateway's listening socket (server.backlog), not nginx's 511.
        listen 127.0.0.1:{port} backlog=1024;
        client_max_body_size 40m;
        client_body_buffer_size 1m;

        location / {{
            proxy_pass http://fake_provider;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_cache off;
            proxy_request_buffering on;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            send_timeout 3600s;
            gzip off;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """The nginx executable (PATH, /usr/sbin, /usr/bin). Raises BenchError without one."""
    path = find_binary("nginx")
    if path is None:
        raise BenchError(
            "the nginx target needs nginx, which is not on PATH nor in /usr/sbin or /usr/bin: "
            "install it (e.g. apt-get install nginx) or leave nginx out of --targets"
        )
    return path


def write_config(directory: Path, log: Path, port: int, upstream_port: int, streams: int) -> Path:
    """nginx.conf in `directory` (which also holds its pid file and temp paths; its error log
    is `log`) for a proxy on loopback `port` in front of the fake provider on `upstream_port`,
    with room for `streams` streams at once (each holds a client and an upstream connection)."""
    directory.mkdir(parents=True, exist_ok=True)
    needed = 2 * streams + SPARE_CONNECTIONS
    # When fewer than 1/16 of its connections are free, nginx starts closing "reusable" ones,
    # which include accepted connections whose request has not arrived yet: the clients see
    # them dropped ("worker_connections are not enough, reusing connections").
    connections = needed + needed // 15 + 1
    text = _CONFIG.format(
        dir=directory,
        log=log,
        port=port,
        upstream_port=upstream_port,
        connections=connections,
        nofile=connections + SPARE_CONNECTIONS,  # files beside the sockets: logs, epoll
    )
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def nginx_argv(binary: str, config: Path, log: Path) -> list[str]:
    """The command line that runs `config` in the foreground, its startup errors in `log`
    rather than in the system's error log."""
    return [binary, "-p", str(config.parent), "-c", str(config), "-e", str(log)]


def check_config(binary: str, config: Path, log: Path) -> None:
    """`nginx -t` on `config`. Raises BenchError with nginx's own words when it is refused."""
    try:
        proc = subprocess.run(  # noqa: S603  (a server binary, no shell)
            [*nginx_argv(binary, config, log), "-t", "-q"],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"nginx -t could not run: {exc}") from None
    if proc.returncode != 0:
        raise BenchError(f"nginx refused its benchmark config:\n{proc.stderr.strip()}")


def worker_pid(master_pid: int) -> int:
    """The one worker the nginx master `master_pid` forked. Raises BenchError when there is
    not exactly one (the config asks for one)."""
    children = child_pids(master_pid)
    if len(children) != 1:
        raise BenchError(f"nginx (pid {master_pid}) has {len(children)} worker processes, not 1")
    return children[0]
