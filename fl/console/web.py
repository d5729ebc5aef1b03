"""What both consoles share: the access token, the security headers, templates, static assets and
the server.

Safety, in the order a request meets it (:class:`Guard`):

- **Host.** Only the host names the console was bound for are answered (a page elsewhere that
  points its own name at 127.0.0.1, DNS rebinding, gets 421).
- **Token.** Every request carries the random access token printed at start: as ``?token=`` once
  (the console then sets it as an ``HttpOnly``, ``SameSite=Strict`` cookie and redirects to the
  address without it, so it stays out of history and ``Referer``), as that cookie, or as
  ``Authorization: Bearer``. A missing or wrong token gets 403 and nothing else.
- **Writes.** The only writes (the node console's approve and revoke) are POSTs whose ``Origin``
  is the console's own and whose form carries a CSRF value derived from the token; anything else
  gets 403 before the form is read.
- **Headers.** A strict content security policy (no inline script, no eval, nothing from another
  origin), no framing, no referrer to other sites, no caching of pages.

Assets come from installed packages: ours from ``fl/console/static`` and Plotly's JavaScript from
the ``plotly`` package (``plotly/package_data/plotly.min.js``); nothing is fetched from a CDN.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from fl.errors import ConfigError

COOKIE = "oncofed_console"
LOOPBACK = "127.0.0.1"

# Plotly's JavaScript puts its own rules into a <style> element unless the page already holds one
# with this id and class (then it leaves styling to the page: we serve the same rules as a file,
# :func:`plotly_css`). Its bundle also carries MapLibre's stylesheet, which it injects at load as a
# <style> element: that one fixed text (unused here) is allowed by its hash, for the pinned version.
PLOTLY_STYLE_ID = "plotly.js-style-global"
PLOTLY_INLINE_STYLE_HASHES = ("sha256-ji27qzEtxXZW+7dun6UwjHXJ18e6WAin1VvNtkzIE/o=",)

CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self' " + " ".join(f"'{h}'" for h in PLOTLY_INLINE_STYLE_HASHES),
    "img-src 'self' data:", "font-src 'self'", "connect-src 'self'", "base-uri 'none'", "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make the browser send "Origin: null" with our own forms
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def new_token() -> str:
    """A random access token (256 bits), as Jupyter and TensorBoard print at start."""
    return secrets.token_urlsafe(32)


@dataclass
class Guard:
    """The access token, the allowed hosts and the CSRF value of one console."""

    token: str
    hosts: set[str]
    origins: set[str]
    tls: bool = False

    @property
    def csrf(self) -> str:
        return hmac.new(self.token.encode(), b"oncofed-console-csrf", hashlib.sha256).hexdigest()

    def authorised(self, request: Request) -> bool:
        offered = [request.cookies.get(COOKIE, ""), request.query_params.get("token", "")]
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            offered.append(bearer[7:].strip())
        return any(o and hmac.compare_digest(o.encode(), self.token.encode()) for o in offered)

    def check_write(self, request: Request, form: Any) -> str | None:
        """Why a POST is refused, or None: its Origin must be the console's own and its form must
        carry the CSRF value (a page on another site can send neither)."""
        origin = request.headers.get("origin")
        if origin is None or origin not in self.origins:
            return f"cross-site request refused (Origin {origin or 'missing'})"
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), self.csrf.encode()):
            return "request refused: the form's CSRF value is missing or wrong"
        return None


class GuardMiddleware:
    """Host check, token, then the security headers on every response (pure ASGI, so server-sent
    events stream through it)."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = request.headers.get("host", "")
        if host not in self.guard.hosts:
            response: Response = PlainTextResponse(f"host {host!r} is not this console's", status_code=421)
        elif not self.guard.authorised(request):
            response = PlainTextResponse("access token missing or wrong: open the address the console printed "
                                         "at start (…/?token=…)", status_code=403)
        elif request.method == "GET" and request.query_params.get("token"):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            response = RedirectResponse(request.url.path + (f"?{urlencode(rest)}" if rest else ""), status_code=303)
            response.set_cookie(COOKIE, self.guard.token, httponly=True, samesite="strict", secure=self.guard.tls,
                                path="/")
        else:
            await self.app(scope, receive, _with_headers(send, static=scope["path"].startswith("/static/")))
            return
        await response(scope, receive, _with_headers(send, static=False))


def _with_headers(send: Callable[..., Any], *, static: bool) -> Callable[..., Any]:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
            headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            cache = "private, max-age=86400, immutable" if static else "no-store"
            headers.append((b"cache-control", cache.encode()))
            message = {**message, "headers": headers}
        await send(message)
    return wrapped


def read_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file as a console shows it: None where it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ----- templates and assets -----------------------------------------------------------------------
def _json_for_script(value: Any) -> str:
    """JSON to put inside ``<script type="application/json">`` (no ``</script>`` can close it early)."""
    text = json.dumps(value, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _short(value: Any, n: int = 12) -> str:
    return "-" if value is None else str(value)[:n]


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None:
        return "-"
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def _when(value: Any) -> str:
    if value in (None, ""):
        return "-"
    if isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return str(value).replace("T", " ")[:19] + (" UTC" if str(value).endswith(("Z", "+00:00")) else "")


def templates() -> Environment:
    env = Environment(loader=PackageLoader("fl.console", "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(tojson_script=_json_for_script, short=_short, num=_num, when=_when)
    return env


class Pages:
    """Renders a template with what every page needs (the CSRF value, the console's kind)."""

    def __init__(self, guard: Guard, kind: str, title: str) -> None:
        self.env, self.guard, self.kind, self.title = templates(), guard, kind, title

    def render(self, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(csrf=self.guard.csrf, console=self.kind,
                                                      console_title=self.title, plotly_style_id=PLOTLY_STYLE_ID,
                                                      **context)
        return HTMLResponse(html, status_code=status)


def plotly_js() -> bytes:
    """Plotly's JavaScript, from the installed ``plotly`` package."""
    return resources.files("plotly").joinpath("package_data/plotly.min.js").read_bytes()


_RULE = re.compile(r"""(?:"([^"]+)"|([A-Z]))\s*:\s*(?:'([^']*)'|"([^"]*)")\s*(,|\})""")


def plotly_css(js: bytes) -> str:
    """Plotly's own stylesheet, read out of its JavaScript (the rules object whose keys start
    ``X,X div``; X is ``.js-plotly-plot .plotly``, Y ``.plotly-notifier``), so a strict content
    security policy need not allow inline styles."""
    text = js.decode("utf-8", "replace")
    start = text.find('{"X,X div"')
    if start < 0:
        raise ConfigError("plotly: its stylesheet was not found in plotly.min.js (an unsupported plotly version)")
    rules, pos = [], start + 1
    while (m := _RULE.match(text, pos)) is not None:
        selector = (m[1] or m[2]).replace("X", ".js-plotly-plot .plotly").replace("Y", ".plotly-notifier")
        rules.append(f"{selector}{{{m[3] if m[3] is not None else m[4]}}}")
        pos = m.end()
        if m[5] == "}":
            break
    if len(rules) < 10:
        raise ConfigError("plotly: its stylesheet in plotly.min.js could not be read (an unsupported plotly version)")
    return "\n".join(rules) + "\n"


@dataclass
class Assets:
    """Static files: ours and Plotly's, read once, served with a long cache life under names that
    carry their content hash."""

    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls) -> Assets:
        assets = cls()
        static = resources.files("fl.console").joinpath("static")
        for item in static.iterdir():
            if item.name.endswith((".css", ".js")):
                assets.add(item.name, item.read_bytes())
        js = plotly_js()
        assets.add("plotly.min.js", js)
        assets.add("plotly.css", plotly_css(js).encode())
        return assets

    def add(self, name: str, content: bytes) -> None:
        stem, _, ext = name.rpartition(".")
        hashed = f"{stem}.{hashlib.sha256(content).hexdigest()[:12]}.{ext}"
        media = "text/css; charset=utf-8" if ext == "css" else "text/javascript; charset=utf-8"
        self.files[hashed], self.names[name] = (content, media), f"/static/{hashed}"

    def response(self, name: str) -> Response:
        if name not in self.files:
            return PlainTextResponse("no such asset", status_code=404)
        content, media = self.files[name]
        return Response(content, media_type=media)


# ----- serving -----------------------------------------------------------------------------------
def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class Tls:
    """TLS with client certificates: the console's certificate and key, and the CA whose
    certificates it accepts from browsers."""

    cert: Path
    key: Path
    client_ca: Path

    def check(self) -> None:
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--client-ca", self.client_ca)):
            if not path.is_file():
                raise ConfigError(f"{flag}: {path} not found")


def bind(host: str, port: int, tls: Tls | None) -> socket.socket:
    """The listening socket; a console bound beyond loopback needs TLS with client certificates."""
    if not _loopback(host) and tls is None:
        raise ConfigError(f"--host {host}: a console reachable beyond this machine needs TLS with client "
                          "certificates (--tls-cert, --tls-key, --client-ca); or keep the default 127.0.0.1")
    if tls is not None:
        tls.check()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(64)
    return sock


def guard_for(sock: socket.socket, host: str, token: str, tls: Tls | None) -> Guard:
    port = sock.getsockname()[1]
    names = {host, f"[{host}]" if ":" in host else host}
    if _loopback(host):
        names |= {LOOPBACK, "localhost"}
    hosts = {f"{n}:{port}" for n in names}
    scheme = "https" if tls else "http"
    return Guard(token=token, hosts=hosts, origins={f"{scheme}://{h}" for h in hosts}, tls=tls is not None)


def url_of(sock: socket.socket, host: str, tls: Tls | None) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


class Running:
    """A console served by uvicorn in a background thread (tests, benchmarks) or the foreground."""

    def __init__(self, app: Any, sock: socket.socket, tls: Tls | None) -> None:
        import uvicorn

        options: dict[str, Any] = {"log_level": "warning", "access_log": False, "lifespan": "off", "ws": "none",
                                   "timeout_graceful_shutdown": 1}
        if tls is not None:
            options.update(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key), ssl_ca_certs=str(tls.client_ca),
                           ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.sock = sock
        self.thread: threading.Thread | None = None

    def serve(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> Running:
        self.thread = threading.Thread(target=self.serve, name="oncofed-console", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the console did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()


