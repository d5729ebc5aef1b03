"""The coordinator's published port served by nginx (Debian's package): TLS, only the Fleet API.

Flower 1.41's SuperLink serves the Fleet API (nodes), the unauthenticated Control API (start runs,
i.e. ship code to every node) and the ServerApp runtime on one port. The SuperLink binds loopback;
nginx, the reverse proxy hospitals' IT already runs, publishes one port and passes only
``POST /v1/fleet/...`` (and ``GET /health``) to it, over TLS on both legs:

- TLS 1.2/1.3 with the SuperLink's certificate (its names include the coordinator's);
- a path allowlist: anything else is 403, before any byte reaches the SuperLink;
- a request size limit (``client_max_body_size``: an update larger than it is refused with 413);
- a per-address rate limit (``limit_req``: a node polls every 0.25 s and heartbeats; a flood is
  answered 503, which a SuperNode retries);
- an access log naming the peer address, path, status, sizes and time of every request (not
  bodies, not the node-authentication headers).

:func:`write_config` writes a complete ``nginx.conf`` for one front (paths inside ``root``);
:func:`argv` starts it in the foreground. For a Debian server, :func:`site_config` is the
``server`` block alone, for ``/etc/nginx/sites-available``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fl.errors import ConfigError

LOG_FORMAT = ('$remote_addr [$time_iso8601] "$request" $status $request_length $body_bytes_sent '
              '$request_time $upstream_response_time')


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise ConfigError("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def site_config(*, listen: str, server_name: str, upstream: str, cert: Path, key: Path, ca_cert: Path,
                upstream_name: str = "localhost", max_body: str = "64m", rate: str = "40r/s", burst: int = 200,
                access_log: Path | str = "/var/log/nginx/oncofed-fleet.log") -> str:
    """The ``server`` block: TLS on ``listen``, only the Fleet API proxied to ``https://upstream``."""
    return f"""
limit_req_zone $binary_remote_addr zone=oncofed_fleet:10m rate={rate};
log_format oncofed_fleet '{LOG_FORMAT}';
upstream oncofed_superlink {{
    server {upstream};
    keepalive 32;
}}
server {{
    listen {listen} ssl;
    server_name {server_name};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:oncofed_tls:10m;
    access_log {access_log} oncofed_fleet;
    client_max_body_size {max_body};
    client_body_buffer_size {max_body};
    proxy_max_temp_file_size 0;
    proxy_buffers 64 64k;
    limit_req zone=oncofed_fleet burst={burst} nodelay;
    limit_req_status 503;
    # the upstream leg, for both proxied locations: TLS to the SuperLink, checked against the CA
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_ssl_trusted_certificate {ca_cert};
    proxy_ssl_verify on;
    proxy_ssl_name {upstream_name};
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;
    proxy_read_timeout 600s;
    proxy_send_timeout 600s;

    location /v1/fleet/ {{
        limit_except POST {{ deny all; }}
        proxy_pass https://oncofed_superlink;
    }}
    location = /health {{
        limit_except GET {{ deny all; }}
        proxy_pass https://oncofed_superlink;
    }}
    location / {{
        return 403 "only the Fleet API is served here\\n";
    }}
}}
"""


def write_config(root: Path, *, listen: str, server_name: str, upstream: str, cert: Path, key: Path,
                 ca_cert: Path, user: str | None = None) -> Path:
    """A whole ``nginx.conf`` under ``root`` (pid, logs, temporary folders there); its path."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    server = site_config(listen=listen, server_name=server_name, upstream=upstream, cert=cert.resolve(),
                         key=key.resolve(), ca_cert=ca_cert.resolve(), access_log=(root / "logs" / "access.log"))
    tmp = root / "tmp"
    text = f"""# written by OncoFed (fl.deploy.nginx); the Fleet API only
{f"user {user};" if user else ""}
worker_processes 1;
daemon off;
pid {root / "nginx.pid"};
error_log {root / "logs" / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    server_tokens off;
    default_type application/octet-stream;
{server}
}}
"""
    path = root / "nginx.conf"
    path.write_text(text, encoding="utf-8")
    return path


def argv(conf: Path) -> list[str]:
    """nginx in the foreground on ``conf`` (checked first: ``nginx -t`` errors name the line)."""
    return [nginx_binary(), "-c", str(conf), "-p", str(conf.parent)]


def check(conf: Path, prefix: list[str] | None = None) -> None:
    """``nginx -t`` on ``conf`` (run under ``prefix``, e.g. inside the host's network namespace where
    it binds); a ConfigError with nginx's own reason."""
    import subprocess

    proc = subprocess.run([*(prefix or []), nginx_binary(), "-t", "-c", str(conf), "-p", str(conf.parent)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        reasons = [line for line in proc.stderr.splitlines() if "[emerg]" in line or "[crit]" in line]
        raise ConfigError(f"{conf}: nginx refuses it: {'; '.join(reasons) or proc.stderr.strip()}")
