"""The consoles, against a registry and node ledgers made by a real federation (local DP, noisy
scores), in a real headless Chromium where one is installed: the run view follows the run live,
the lineage and validation pages, the node's ledger curve against its actual spend, the dossier
printed to PDF; and the requests a console refuses (no token, wrong token, another site's POST,
a path out of the registry)."""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import browser
import httpx
import pytest

from fl.cli import main
from fl.console import views
from fl.console.coordinator import coordinator_app
from fl.console.web import COOKIE, CSP, Running, bind, guard_for, new_token, plotly_css, plotly_js
from fl.errors import ConfigError
from fl.learn import get_task
from fl.learn.synth import synthesize
from fl.registry import Registry
from nodes.budget import budget_report
from nodes.console import node_app
from nodes.policy import state_dir
from nodes.supernode import load_allowlist

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3
APP = "ab" * 32  # an app hash the node operator approves from the page


class Served:
    """A console on a free loopback port, in this process."""

    def __init__(self, make: Any) -> None:
        self.sock = bind("127.0.0.1", 0, None)
        self.guard = guard_for(self.sock, "127.0.0.1", new_token(), None)
        self.running = Running(make(self.guard), self.sock, None).start()
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"authorization": f"Bearer {token or self.guard.token}"} if token != "" else {}
        return httpx.Client(base_url=self.base, headers=headers, follow_redirects=False, timeout=60, **kw)

    def enter(self, driver: Any, path: str = "/") -> None:
        """Open ``path`` the way a user does: the printed address with the token, once."""
        driver.get(f"{self.base}{path}{'&' if '?' in path else '?'}token={self.guard.token}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two synthetic hospitals, the coordinator's console already up, and a 3-round federation
    with local DP and noisy scores started in the background (the first test watches it live)."""
    out = tmp_path_factory.mktemp("console")
    synthesize(out / "data", nodes=2, task=get_task("seg2d"), seed=5, image_size=32)
    registry, runs = out / "registry", out / "runs"
    runs.mkdir()
    coordinator = Served(lambda guard: coordinator_app(registry, runs, guard))
    log = open(out / "run.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl.cli", "run", str(REPO / "configs" / "dp-local.toml"), "--out", str(runs),
         "--set", f"data.root='{out / 'data'}'", "--set", "data.nodes=2", "--set", "data.synthesize=false",
         "--set", "data.image_size=32", "--set", f"rounds={ROUNDS}", "--set", "train.epochs=1",
         "--set", f"registry.root='{registry}'", "--set", "output.run_name='live'",
         "--set", "node_policy.release_metrics='noisy'", "--set", "node_policy.metrics_noise_multiplier=4.0"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    state: dict[str, Any] = {"out": out, "registry": registry, "runs": runs, "proc": proc, "log": out / "run.log",
                             "coordinator": coordinator, "validated": False}
    yield state
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()
    coordinator.running.stop()


def finished(world: dict[str, Any]) -> dict[str, Any]:
    """The federation done, then validated at both sites (``fl validate``, once)."""
    proc = world["proc"]
    assert proc.wait(timeout=900) == 0, world["log"].read_text()[-4000:]
    if not world["validated"]:
        out = world["out"]
        assert main(["validate", f"dp-local:v{ROUNDS}", str(REPO / "configs" / "dp-local.toml"),
                     "--set", f"data.root='{out / 'data'}'", "--set", "data.nodes=2", "--set", "data.synthesize=false",
                     "--set", "data.image_size=32", "--set", f"registry.root='{world['registry']}'",
                     "--set", "node_policy.release_metrics='noisy'", "--out", str(out / "runs-validate")]) == 0
        world["validated"] = True
    return world


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    yield from browser.chromium()


# ----- in the browser ------------------------------------------------------------------------------
def test_the_run_view_follows_the_federation_live(world: dict[str, Any], driver: Any, tmp_path: Path) -> None:
    """Opened while the run starts, the page is never reloaded: each round arrives by server-sent
    event, until the run is finished with every round in the table."""
    deadline = time.monotonic() + 300
    while not (world["runs"] / "live" / "config.toml").exists():
        assert world["proc"].poll() is None and time.monotonic() < deadline, world["log"].read_text()[-3000:]
        time.sleep(0.2)
    world["coordinator"].enter(driver, "/runs/live")
    driver.execute_script("window.__notReloaded = true;")
    seen, shot = [], None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        rounds, state, kept = driver.execute_script(
            "return [document.body.dataset.rounds, document.body.dataset.state, window.__notReloaded === true]")
        assert kept, "the page was reloaded"
        if rounds is not None and (not seen or seen[-1] != (int(rounds), state)):
            seen.append((int(rounds), state))
        if shot is None and rounds is not None and int(rounds) >= 2 and state == "running":
            shot = browser.shots_dir(tmp_path) / "run-live.png"
            driver.save_screenshot(str(shot))
        if state == "finished":
            break
        time.sleep(0.25)
    running = [n for n, state in seen if state == "running"]
    assert len(set(running)) >= 2, seen  # at least two updates came while it trained
    assert seen[-1] == (ROUNDS + 1, "finished"), seen  # the initial evaluation and every round
    rows = driver.find_elements("css selector", "#rounds tbody tr")
    assert len(rows) == ROUNDS + 1
    # under DP: the noisy aggregate score is drawn, no training loss (the manifest's rule)
    names = driver.execute_script("return document.getElementById('chart-score').data.map(t => t.name)")
    assert "score (aggregate)" in names and "train loss" not in names
    eps = driver.execute_script("return document.getElementById('chart-epsilon').data.map(t => t.name)")
    assert any(n.startswith("record-level") for n in eps) and "node budget" in eps
    assert browser.csp_violations(driver) == []
    assert shot is not None and shot.stat().st_size > 10_000


def test_lineage_validation_and_diff_pages(world: dict[str, Any], driver: Any, tmp_path: Path) -> None:
    finished(world)
    c = world["coordinator"]
    c.enter(driver, "/models/dp-local")
    circles = driver.find_elements("css selector", "#lineage circle.node")
    assert len(circles) == ROUNDS
    assert len(driver.find_elements("css selector", "#lineage line.edge.run")) == ROUNDS - 1
    assert "verified" in driver.find_element("id", "verify").text
    driver.save_screenshot(str(browser.shots_dir(tmp_path) / "lineage.png"))
    driver.get(f"{c.base}/models/dp-local/v{ROUNDS}")
    rows = driver.find_elements("css selector", "#validations tbody tr")
    records = Registry(world["registry"]).validations(Registry(world["registry"]).get(f"dp-local:v{ROUNDS}"))
    assert len(rows) == len({r["site"] for r in records}) == 2
    worst = min(records, key=lambda r: r["score"])
    assert worst["site"] in driver.find_element("css selector", "#validations tr.worst").text
    assert f"{worst['ci_low']:.3f}" in driver.find_element("css selector", "#validations tr.worst").text
    driver.save_screenshot(str(browser.shots_dir(tmp_path) / "validation.png"))
    driver.get(f"{c.base}/models/dp-local/diff?a=v1&b=v{ROUNDS}")
    assert len(driver.find_elements("css selector", "#diff-params tbody tr")) > 5
    assert browser.csp_violations(driver) == []


def test_the_dossier_prints_to_pdf(world: dict[str, Any], driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.print_page_options import PrintOptions

    finished(world)
    c = world["coordinator"]
    c.enter(driver, f"/models/dp-local/v{ROUNDS}/dossier")
    text = driver.find_element("id", "dossier").text
    assert "not a conformity assessment" in text and "Art. 10" in text and "Annex IV 2(g)" in text
    assert "chains and hashes verified" in text
    driver.save_screenshot(str(browser.shots_dir(tmp_path) / "dossier.png"))
    options = PrintOptions()
    options.page_height, options.page_width = 29.7, 21.0  # A4, in cm
    pdf = base64.b64decode(driver.print_page(options))
    assert pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-1024:] and len(pdf) > 20_000


def test_the_node_ledger_curve_is_the_nodes_actual_spend(world: dict[str, Any], driver: Any,
                                                          tmp_path: Path) -> None:
    finished(world)
    data = world["out"] / "data" / "node-0"
    node = Served(lambda guard: node_app(data, guard))
    try:
        node.enter(driver, "/")
        spent = budget_report(data)["spent_epsilon"]  # the accountant over every event of the ledger
        curve = driver.execute_script("const d = document.getElementById('chart-record').data; "
                                      "return [d[0].y, d[1] ? d[1].y : null]")
        assert curve[0][-1] == pytest.approx(spent, rel=1e-9) and spent > 0
        assert curve[1] == [50.0, 50.0]  # the node's budget, from its policy
        assert len(curve[0]) == len(driver.find_elements("css selector", "#ledger tbody tr"))
        served = driver.find_element("id", "requests").text
        assert "train" in served and "evaluate" in served and "served" in served
        driver.save_screenshot(str(browser.shots_dir(tmp_path) / "node-ledger.png"))
        assert browser.csp_violations(driver) == []

        # approving from the page: a confirmation that repeats the hash, then the CLI's own function
        driver.find_element("id", "approve-hash").send_keys(APP)
        driver.find_element("id", "approve-note").send_keys("reviewed v0.1")
        driver.find_element("id", "approve-button").click()
        assert browser.element(driver, "confirm-hash").text == APP
        assert APP not in load_allowlist(state_dir(data))  # nothing yet
        driver.find_element("id", "confirm-button").click()
        assert "approved" in browser.element(driver, "flash").text
        assert APP in load_allowlist(state_dir(data))
        assert "reviewed v0.1" in driver.find_element("id", "apps").text
    finally:
        node.running.stop()


def _body_text(driver: Any) -> str:
    """The page's text, or "" while the browser is between pages (the forged form's submission
    navigates: its page may have no body yet, or lose the one just found)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("tag name", "body").text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_a_page_on_another_origin_cannot_approve_an_app(world: dict[str, Any], driver: Any) -> None:
    """The operator is logged in (cookie set); a page on another port of the same machine posts the
    approve form with the user's cookie. The console refuses it on its Origin."""
    finished(world)
    data = world["out"] / "data" / "node-1"
    node = Served(lambda guard: node_app(data, guard))
    forged = "cd" * 32
    page = (f'<form method="post" action="{node.base}/apps/approve"><input name="app" value="{forged}">'
            '<input name="confirm" value="yes"><input name="csrf" value="guessed"></form>'
            "<script>document.forms[0].submit()</script>").encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        node.enter(driver, "/")  # the operator's session: the cookie is in this browser
        driver.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        deadline = time.monotonic() + 20
        while "refused" not in _body_text(driver) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cross-site request refused" in _body_text(driver)
        assert forged not in load_allowlist(state_dir(data))
    finally:
        evil.shutdown()
        node.running.stop()


def test_without_the_token_the_browser_gets_nothing(world: dict[str, Any], driver: Any) -> None:
    c = world["coordinator"]
    driver.delete_all_cookies()
    driver.get(f"{c.base}/models/dp-local")
    body = driver.find_element("tag name", "body").text
    assert "access token missing or wrong" in body and "dp-local" not in body


# ----- over HTTP -----------------------------------------------------------------------------------
def test_refused_requests(world: dict[str, Any]) -> None:
    c = world["coordinator"]
    with c.client("") as anonymous:
        assert anonymous.get("/").status_code == 403
        assert anonymous.get("/?token=wrong").status_code == 403
        assert anonymous.get("/", headers={"authorization": "Bearer wrong"}).status_code == 403
        assert anonymous.get("/", cookies={COOKIE: "wrong"}).status_code == 403
        entered = anonymous.get(f"/models?x=1&token={c.guard.token}")
        assert entered.status_code == 303 and entered.headers["location"] == "/models?x=1"  # the token leaves the URL
        cookie = entered.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        # a page elsewhere that points its own name at 127.0.0.1 (DNS rebinding)
        assert anonymous.get("/", headers={"host": "evil.example:80"}).status_code == 421
    with c.client() as user:
        home = user.get("/")
        assert home.status_code == 200
        csp = home.headers["content-security-policy"]
        assert csp == CSP and "unsafe-inline" not in csp and "unsafe-eval" not in csp and "default-src 'none'" in csp
        assert home.headers["x-frame-options"] == "DENY" and home.headers["x-content-type-options"] == "nosniff"
        for path in ("/models/..%2F..%2F..%2Fetc/v1", "/models/dp-local/..%2F..%2F..%2Fetc%2Fpasswd",
                     "/models/%2E%2E", "/runs/..%2F..", "/runs/%2Fetc", "/static/..%2Fweb.py",
                     "/models/dp-local/v1%2F..%2F..%2F..%2Fetc%2Fpasswd/dossier"):
            response = user.get(path)
            assert response.status_code == 404, path
            assert "root:" not in response.text and "import" not in response.text
        # read-only: no route takes a write
        assert user.post("/", data={"x": "1"}).status_code in (404, 405)


def test_node_console_writes_only_with_origin_csrf_and_confirmation(world: dict[str, Any]) -> None:
    finished(world)
    data = world["out"] / "data" / "node-1"
    node = Served(lambda guard: node_app(data, guard))
    fab = "ef" * 32
    origin = {"origin": node.base}
    try:
        with node.client() as user:
            good = {"csrf": node.guard.csrf, "app": fab, "confirm": "yes", "note": "n"}
            assert user.post("/apps/approve", data=good).status_code == 403  # no Origin header
            assert user.post("/apps/approve", data=good, headers={"origin": "http://127.0.0.1:1"}).status_code == 403
            assert user.post("/apps/approve", data={**good, "csrf": "x"}, headers=origin).status_code == 403
            assert user.post("/apps/approve", data={**good, "confirm": ""}, headers=origin).status_code == 400
            assert user.post("/apps/launch", data=good, headers=origin).status_code == 404
            assert fab not in load_allowlist(state_dir(data))
            bad = user.post("/apps/approve", data={**good, "app": "../../etc"}, headers=origin)
            assert bad.status_code == 303 and "not%20a%20SHA-256" in bad.headers["location"]
            assert user.post("/apps/approve", data=good, headers=origin).status_code == 303
            assert fab in load_allowlist(state_dir(data))
            assert user.post("/apps/revoke", data=good, headers=origin).status_code == 303
            assert fab not in load_allowlist(state_dir(data))
            page = user.get("/").text
            assert "revoked" in page and fab in page
        with node.client("") as anonymous:
            assert anonymous.post("/apps/approve", data=good, headers=origin).status_code == 403
    finally:
        node.running.stop()


def test_under_dp_the_run_view_shows_only_releases(world: dict[str, Any], tmp_path: Path) -> None:
    """The run's noisy scores are shown; what a node with an exact-release policy would add beside
    them (its training loss, its exact score) and the figures in the server's rejections are not."""
    finished(world)
    view = views.run_view(world["runs"] / "live")
    shown = [s for s in view["charts"]["score"]["aggregate"] if s is not None]
    assert view["privacy"]["dp"] and len(shown) == ROUNDS + 1
    assert all(r["dp_released"] for r in view["table"])
    folder = tmp_path / "exact"
    shutil.copytree(world["runs"] / "live", folder)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    last["train"]["aggregate"]["train-loss"] = 0.123
    node = next(iter(last["evaluate"]["nodes"]))
    last["evaluate"]["nodes"][node] = {"dice": 0.777, "num-examples": 5}  # exact: no metrics-dp flag
    last["evaluate"]["dp_released"] = False
    last["failures"] = {"9": "rejected, update norm 3.2109 > bound 1.0"}
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    view = views.run_view(folder)
    assert view["charts"]["score"]["train_loss"][-1] is None and view["charts"]["score"]["aggregate"][-1] is None
    assert 0.777 not in view["charts"]["score"]["nodes"].get(node, [[], []])[1]
    assert "3.2109" not in json.dumps(view) and "figures withheld" in view["table"][-1]["failures"]["9"]
    config = (folder / "config.toml").read_text().replace("enabled = true", "enabled = false")
    (folder / "config.toml").write_text(config)  # the same records without DP: all shown
    plain = views.run_view(folder)
    assert plain["charts"]["score"]["train_loss"][-1] == 0.123 and "3.2109" in json.dumps(plain)


def test_the_dossier_ties_each_statement_to_its_record(world: dict[str, Any], tmp_path: Path) -> None:
    finished(world)
    registry = Registry(world["registry"])
    assert main(["models", "dossier", f"dp-local:v{ROUNDS}", "--registry", str(world["registry"]),
                 "--out", str(tmp_path / "d")]) == 0
    d = json.loads((tmp_path / "d" / "dossier.json").read_text())
    assert d["verify"]["ok"] and "not a conformity assessment" in d["draft"]
    assert all(s["serves"] for s in d["sections"])
    hashes = {v.hash for v in registry.versions("dp-local")}
    manifest_sources = [st["source"] for s in d["sections"] for st in s["statements"]
                        if st["source"] and st["source"]["record"].startswith("manifest ")]
    assert manifest_sources and all(src["hash"] in hashes for src in manifest_sources)
    record_hashes = {r["hash"] for r in registry.validations(registry.get(f"dp-local:v{ROUNDS}"))}
    assert {st["source"]["hash"] for s in d["sections"] for st in s["statements"]
            if st["source"] and st["source"]["record"].startswith("validation record")} <= record_hashes | {""}
    assert "## Validation and accuracy" in (tmp_path / "d" / "DOSSIER.md").read_text()
    # a manifest edited after commit: the dossier says so instead of vouching for it
    copy = tmp_path / "reg"
    shutil.copytree(world["registry"], copy)
    path = copy / "dp-local" / "v2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["round"] = 7
    path.write_text(json.dumps(manifest))
    assert main(["models", "dossier", f"dp-local:v{ROUNDS}", "--registry", str(copy), "--out", str(tmp_path / "e")]) == 0
    tampered = json.loads((tmp_path / "e" / "dossier.json").read_text())
    assert not tampered["verify"]["ok"] and "v2" in tampered["verify"]["result"]


def test_a_console_beyond_loopback_needs_tls_with_client_certificates() -> None:
    with pytest.raises(ConfigError, match="needs TLS with client certificates"):
        bind("0.0.0.0", 0, None)


def test_plotly_styles_come_from_its_own_package() -> None:
    rules = plotly_css(plotly_js())
    assert ".js-plotly-plot .plotly .main-svg{position:absolute;top:0;left:0;pointer-events:none;}" in rules
    assert len(rules.splitlines()) > 30
