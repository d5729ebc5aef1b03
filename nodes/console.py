"""The node console (``fl node console --data DIR``): the hospital operator's own view of this node.

It shows the node's policy, the apps its operator approved (hash, note, date) and revoked, the
privacy ledgers as curves of spent budget against the total with every entry, each request served
or refused and why, the last ``fl node check``'s summary and the worker's state. It reads only the
node's own state folder and listens on this machine (127.0.0.1) unless given TLS with client
certificates; nothing it shows leaves the node.

Its only writes are approving and revoking an app: the same functions as ``fl node approve`` (the
same hash check, the same allowlist and log), after a confirmation page that repeats the hash, and
only on a same-origin POST carrying the console's CSRF value (:mod:`fl.console.web`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from fl.console.web import Assets, Guard, GuardMiddleware, Pages
from fl.console.web import read_object as _json
from fl.errors import OncoFedError
from nodes import requests_log
from nodes.budget import client_counts, record_counts
from nodes.ledger import Ledger, LedgerError
from nodes.policy import load_policy, state_dir
from nodes.supernode import approve, approved_apps, check_hash, revoke

ENTRIES_PER_PAGE = 200
REQUESTS_SHOWN = 200


@dataclasses.dataclass
class _Cached:
    """A ledger's entries, read again only when the file changed (a long ledger's chain check)."""

    stamp: tuple[int, int] | None = None
    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def read(self, ledger: Ledger) -> list[dict[str, Any]]:
        try:
            st = ledger.path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            return []
        if stamp != self.stamp:
            self.entries, self.stamp = ledger.entries(), stamp
        return self.entries


CURVE_POINTS = 2000  # a longer ledger's curve is drawn through every k-th entry and the newest


def curve(entries: list[dict[str, Any]], budget: float | None, title: str) -> dict[str, Any]:
    """Epsilon spent after each entry, as the node recorded it when it wrote the entry (an entry
    that spends nothing carries the level before it). Spent budget only grows, so drawing every
    k-th entry of a long ledger (and always the newest) changes the curve by less than one stride's
    spend; the table lists every entry."""
    level, index, eps = 0.0, [], []
    for e in entries:
        if e.get("epsilon_after") is not None:
            level = float(e["epsilon_after"])
        index.append(int(e["seq"]))
        eps.append(level)
    stride = max(-(-len(index) // CURVE_POINTS), 1)
    if stride > 1:
        keep = [*range(0, len(index) - 1, stride), len(index) - 1]
        index, eps = [index[i] for i in keep], [eps[i] for i in keep]
        title += f" (every {stride}th of {len(entries)} entries drawn)"
    return {"index": index, "epsilon": eps, "budget": budget, "title": title}


def spent(entries: list[dict[str, Any]]) -> float:
    """Epsilon spent, as the node's accountant recorded it with the newest entry that spends (each
    entry's ``epsilon_after`` is the accountant over every event before it and its own, computed when
    it was written; ``fl node budget`` recomputes it from the events)."""
    return next((float(e["epsilon_after"]) for e in reversed(entries) if e.get("epsilon_after") is not None), 0.0)


def node_view(data: Path, record: _Cached, client: _Cached, page: int) -> dict[str, Any]:
    state = state_dir(data)
    policy = load_policy(state)
    problems = []
    try:
        entries = record.read(Ledger.in_dir(state))
        contributions = client.read(Ledger.contributions_in(state))
    except LedgerError as exc:  # shown, not hidden: the node refuses to train until it is resolved
        entries, contributions, problems = [], [], [str(exc)]
    budget = {"spent": spent(entries), "budget": policy.epsilon or None, "delta": policy.delta,
              "accountant": policy.accountant, **record_counts(entries), **client_counts(contributions),
              "client_spent": spent(contributions), "client_budget": policy.client_epsilon or None}
    pages = max((len(entries) + ENTRIES_PER_PAGE - 1) // ENTRIES_PER_PAGE, 1)
    page = min(max(page, 1), pages)
    newest_first = entries[::-1][(page - 1) * ENTRIES_PER_PAGE: page * ENTRIES_PER_PAGE]
    requests, counts = requests_log.read(state, REQUESTS_SHOWN)
    worker = _json(state / "worker" / "worker.json")
    return {
        "data": str(data), "state": str(state), "problems": problems,
        "policy": dataclasses.asdict(policy), "apps": approved_apps(state), "budget": budget,
        "ledger": {"entries": newest_first, "total": len(entries), "page": page, "pages": pages},
        "charts": {"record": curve(entries, policy.epsilon or None, "Record-level ε spent (DP-SGD, noisy releases)"),
                   "client": curve(contributions, policy.client_epsilon or None,
                                   "Client-level ε against the coordinator (own noise)")},
        "requests": requests[::-1], "request_counts": counts,
        "check": _json(state / "check-summary.json"), "worker": worker,
        "worker_age": time.time() - (state / "worker" / "worker.json").stat().st_mtime if worker else None,
    }


def node_app(data_dir: Path, guard: Guard) -> Any:
    data = data_dir.resolve()
    state = state_dir(data)
    pages = Pages(guard, "node", f"OncoFed node: {data.name}")
    assets = Assets.load()
    record, client = _Cached(), _Cached()

    def page(template: str, **context: Any) -> Response:
        return pages.render(template, assets=assets.names, **context)

    def home(request: Request) -> Response:
        try:
            number = int(request.query_params.get("page", "1"))
        except ValueError:
            number = 1
        flash = request.query_params.get("done")
        return page("node.html", n=node_view(data, record, client, number), flash=flash,
                    failed=request.query_params.get("failed"))

    async def index(request: Request) -> Response:
        return await asyncio.to_thread(home, request)

    async def confirm(request: Request) -> Response:
        """Step 1 of approving or revoking: a page that repeats the hash and asks to confirm."""
        form = await request.form()
        if (why := guard.check_write(request, form)) is not None:
            return PlainTextResponse(why, status_code=403)
        action = request.path_params["action"]
        try:
            fab = check_hash(str(form.get("app", "")))
        except OncoFedError as exc:
            return RedirectResponse(f"/?failed={_q(str(exc))}", status_code=303)
        return page("node_confirm.html", action=action, app=fab, note=str(form.get("note", ""))[:500])

    async def act(request: Request) -> Response:
        """Step 2: the same checks and writes as ``fl node approve`` (and revoke), once confirmed."""
        form = await request.form()
        if (why := guard.check_write(request, form)) is not None:
            return PlainTextResponse(why, status_code=403)
        action = request.path_params["action"]
        if form.get("confirm") != "yes":
            return PlainTextResponse("not confirmed: nothing was changed", status_code=400)
        fab, note = str(form.get("app", "")), str(form.get("note", ""))[:500]
        try:
            await asyncio.to_thread(approve if action == "approve" else revoke, state, fab, note)
        except OncoFedError as exc:
            return RedirectResponse(f"/?failed={_q(str(exc))}", status_code=303)
        return RedirectResponse(f"/?done={_q(f'{action}d {fab.strip().lower()[:16]}...')}", status_code=303)

    async def static(request: Request) -> Response:
        return assets.response(request.path_params["file"])

    routes = [Route("/", index), Route("/apps/{action:str}/confirm", confirm, methods=["POST"]),
              Route("/apps/{action:str}", act, methods=["POST"]), Route("/static/{file}", static)]
    app = Starlette(routes=routes, exception_handlers={404: _refuse, 405: _refuse})
    return GuardMiddleware(_only_actions(app), guard)


async def _refuse(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("no such page", status_code=404)


def _only_actions(app: Any) -> Any:
    """Approve and revoke are the only actions; any other path under /apps/ is not one."""
    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/apps/"):
            action = scope["path"].split("/")[2]
            if action not in ("approve", "revoke"):
                await PlainTextResponse("no such action", status_code=404)(scope, receive, send)
                return
        await app(scope, receive, send)
    return wrapped


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:300], safe="")
