"""``fl server gateway``: expose only the SuperLink's Fleet API to the hospitals.

Flower 1.41's SuperLink serves the Fleet API (nodes), the Control API (submit and stop runs:
whoever reaches it runs code on every node) and the ServerApp runtime on one port, without
authenticating the Control API. So the SuperLink binds an address only the coordinator
reaches (``127.0.0.1`` by default) and this gateway, the only thing published to the
network, passes through ``POST /v1/fleet/...`` and answers everything else with 403.

It is a filter in front of Flower's own HTTP API, not a transport: requests and responses go
through byte for byte (the node-authentication headers included), over TLS on both legs.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

FLEET_PREFIX = "/v1/fleet/"
_HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate"}


def make_app(upstream: str, ca_cert: Path) -> Any:
    """A Starlette app forwarding Fleet API calls to ``https://upstream``."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    context = ssl.create_default_context(cafile=str(ca_cert))
    client = httpx.AsyncClient(base_url=f"https://{upstream}", verify=context, timeout=httpx.Timeout(600.0))

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            return PlainTextResponse("only the Fleet API is served here\n", status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream_response = await client.post(path, content=await request.body(), headers=headers)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"SuperLink unreachable: {type(exc).__name__}\n", status_code=502)
        out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in _HOP_BY_HOP
                       and k.lower() != "content-encoding"}
        return Response(upstream_response.content, status_code=upstream_response.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
                     lifespan=lifespan)


def serve(*, upstream: str, ca_cert: Path, cert: Path, key: Path, host: str, port: int) -> None:
    """Run the gateway in the foreground (TLS with the SuperLink's certificate)."""
    import uvicorn

    uvicorn.run(make_app(upstream, ca_cert), host=host, port=port, ssl_certfile=str(cert), ssl_keyfile=str(key),
                log_level="warning", access_log=False)
