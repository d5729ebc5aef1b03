"""The coordinator's console (``fl console``): runs live while they train, models with their
lineage, validations, gates, cards and AI Act dossiers. Read-only: it has no route that writes.

Pages are rendered on the server (Jinja2); the charts are Plotly figures drawn by the browser from
JSON in the page; a run's page follows the run with server-sent events (``/runs/NAME/events``),
which send the run's view again whenever its ``metrics.jsonl`` or ``status.json`` changes.
"""

from __future__ import annotations

import asyncio
import json
from html import escape
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fl.console import views
from fl.console.web import Assets, Guard, GuardMiddleware, Pages
from fl.registry import Registry
from fl.registry.card import card_data, render
from fl.registry.diff import diff
from fl.registry.dossier import dossier_data
from fl.registry.dossier_html import CSS_NAME, css, render_body
from fl.server.run_folder import METRICS_FILE, STATUS_FILE, SUMMARY_FILE

EVENT_POLL_S = 0.5  # how often a live view looks at its run's files
KEEPALIVE_S = 15.0


class CoordinatorConsole:
    """The pages, each a method taking the request (run in a worker thread: they read files)."""

    def __init__(self, registry_root: Path, runs_root: Path, guard: Guard) -> None:
        self.registry, self.runs = Registry(registry_root), runs_root
        self.pages = Pages(guard, "coordinator", "OncoFed console")
        self.assets = Assets.load()
        self.assets.add(CSS_NAME, css().encode())
        self.verified = views.VerifyCache()

    def page(self, template: str, status: int = 200, **context: Any) -> Response:
        return self.pages.render(template, status=status, assets=self.assets.names, **context)

    def endpoint(self, handler: Any) -> Any:
        async def serve(request: Request) -> Response:
            try:
                return await asyncio.to_thread(handler, request)
            except views.NotFound as exc:
                return self.page("error.html", status=404, message=str(exc))
        return serve

    def version_of(self, request: Request) -> Any:
        return views.get_version(self.registry, request.path_params["name"], request.path_params["version"])

    def checked(self, version: Any) -> list[Any] | None:
        """The model's versions when the cached check found its chain sound (None: check again)."""
        return None if self.verified.status(self.registry, version.name) else self.registry.versions(version.name)

    def home(self, request: Request) -> Response:
        return self.page("home.html", runs=views.runs_overview(self.runs),
                         models=views.models_overview(self.registry, self.verified), registry=self.registry.root,
                         runs_root=self.runs)

    def run(self, request: Request) -> Response:
        folder = views.run_folder(self.runs, request.path_params["run"])
        return self.page("run.html", run=views.finite(views.run_view(folder)))

    async def run_events(self, request: Request) -> Response:
        try:
            folder = views.run_folder(self.runs, request.path_params["run"])
        except views.NotFound as exc:
            return self.page("error.html", status=404, message=str(exc))
        return StreamingResponse(_events(request, folder), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    def model(self, request: Request) -> Response:
        return self.page("model.html", model=views.model_view(self.registry, request.path_params["name"], self.verified))

    def version(self, request: Request) -> Response:
        return self.page("version.html", v=views.version_view(self.registry, self.version_of(request), self.verified))

    def card(self, request: Request) -> Response:
        v = self.version_of(request)
        return self.page("card.html", ref=v.ref(), name=v.name, number=v.number,
                         card_html=_markdown(render(card_data(self.registry, v, self.checked(v)))))

    def dossier(self, request: Request) -> Response:
        v = self.version_of(request)
        return self.page("dossier.html", ref=v.ref(), name=v.name, number=v.number,
                         body=render_body(dossier_data(self.registry, v, lambda: self.verified.status(self.registry,
                                                                                                       v.name))))

    def compare(self, request: Request) -> Response:
        name = request.path_params["name"]
        a = views.get_version(self.registry, name, request.query_params.get("a", ""))
        b = views.get_version(self.registry, name, request.query_params.get("b", ""))
        return self.page("diff.html", name=name, d=views.finite(diff(a, b)))

    async def static(self, request: Request) -> Response:
        return self.assets.response(request.path_params["file"])

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self.page("error.html", status=404, message="no such page")


async def _events(request: Request, folder: Path) -> Any:
    """The run's view each time one of its files changes, until it is finished; a comment line
    now and then keeps the connection open."""
    def stamp() -> tuple[Any, ...]:
        out = []
        for name in (METRICS_FILE, STATUS_FILE, SUMMARY_FILE):
            try:
                st = (folder / name).stat()
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    last, idle = None, 0.0
    while not await request.is_disconnected():
        now = stamp()
        if now != last:
            last, idle = now, 0.0
            view = await asyncio.to_thread(lambda: views.finite(views.run_view(folder)))
            yield f"data: {json.dumps(view)}\n\n"
            if view["status"]["state"] == "finished":
                yield "event: finished\ndata: {}\n\n"
                return
        elif idle >= KEEPALIVE_S:
            idle = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(EVENT_POLL_S)
        idle += EVENT_POLL_S


def coordinator_app(registry_root: Path, runs_root: Path, guard: Guard) -> Any:
    c = CoordinatorConsole(registry_root, runs_root, guard)
    routes = [
        Route("/", c.endpoint(c.home)),
        Route("/runs/{run}", c.endpoint(c.run)),
        Route("/runs/{run}/events", c.run_events),
        Route("/models/{name}", c.endpoint(c.model)),
        Route("/models/{name}/diff", c.endpoint(c.compare)),
        Route("/models/{name}/{version}", c.endpoint(c.version)),
        Route("/models/{name}/{version}/card", c.endpoint(c.card)),
        Route("/models/{name}/{version}/dossier", c.endpoint(c.dossier)),
        Route("/static/{file}", c.static),
    ]
    return GuardMiddleware(Starlette(routes=routes, exception_handlers={404: c.not_found}), guard)


def _markdown(text: str) -> str:
    """A model card's Markdown as HTML; the text is escaped first (a bundle's metadata is not ours)."""
    import markdown

    return markdown.markdown(escape(text, quote=False), extensions=["tables"])
