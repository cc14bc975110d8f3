"""The real MLflow UI, in headless Chromium, on the store a real small federation wrote.

One in-process federation (two sites, two rounds, real DP-SGD, ledgers and MLflow logging) is
logged to the workspace's SQLite store; ``mlflow server`` serves it on a free loopback port, and
Chromium opens the pages medfed links to (:mod:`medfed.tracking.ui_links`), each in a fresh
profile, as a first-time user sees them. Chromium is driven through the DevTools protocol on a
pipe (``--remote-debugging-pipe``): each page is read once what the test looks for is drawn, or
after a deadline (the UI loads its charts lazily, so a fixed wait is either slow or flaky). It
may resolve no host name but 127.0.0.1. Skipped where Chromium is not installed (Debian:
``apt-get install chromium``; ``.ci/run`` installs it where it can).
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medfed.api.demo import prepare_federation
from medfed.tracking import default_tracking_uri
from medfed.tracking.info import TrackingInfo, read_tracking_info
from medfed.tracking.ui_links import experiment_url, model_version_url, run_url
from medfed.transport.inprocess import run_in_process
from medfed.transport.processes import free_port
from medfed.workspace import RunPaths

pytestmark = pytest.mark.slow

ROUNDS = 2
SITES = ("site-a", "site-b")
# What the round loop logs once per round (step = round) on the parent run and a site's run.
PARENT_ROUND_METRICS = ("dice_global", "train_loss", "epsilon_max", "round_seconds", "bytes_moved")
SITE_ROUND_METRICS = ("train_loss", "dice_before", "epsilon_spent", "epsilon_remaining")
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
PAGE_TIMEOUT_S = 60.0
# True once every chart of the page is drawn, with its points.
CHARTS_DRAWN = (
    "(() => { const plots = [...document.querySelectorAll('.js-plotly-plot')];"
    " const titles = document.querySelectorAll('h4[title]').length;"
    " return titles > 0 && plots.length === titles"
    " && plots.every(p => p.querySelector('path.point')); })()"
)


@dataclass(frozen=True)
class Served:
    """The federation's store, served by `mlflow server`, and the run's place in it."""

    port: int
    uri: str
    info: TrackingInfo
    summary: dict[str, Any]
    scratch: Path

    def run_page(self, run_id: str) -> str:
        url = run_url(
            tracking_uri=self.uri,
            experiment_id=self.info.experiment_id,
            run_id=run_id,
            port=self.port,
        )
        assert url is not None
        return url


@dataclass(frozen=True)
class Page:
    """A page as drawn: its title, its visible text and its DOM."""

    title: str
    text: str
    dom: str


Browse = Callable[[str, str], Page]


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip(
            "Chromium is not installed: the MLflow UI test needs a headless browser "
            "(apt-get install chromium; .ci/run installs it where it can)"
        )
    return found


@pytest.fixture(scope="module")
def served(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("mlflow-ui")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # anything MLflow writes relative to the cwd lands here
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        setup = prepare_federation(
            root=root / "fed", sites=len(SITES), cases=16, rounds=ROUNDS, local_epochs=1
        )
        uri = default_tracking_uri(workspace_root=setup.workspace.root)
        result = run_in_process(
            workspace=setup.workspace,
            site_configs=setup.site_configs,
            settings=setup.settings,
            tracking_uri=uri,
        )
    assert result.status == "finished", result.reason
    paths = RunPaths(directory=setup.workspace.root / "runs" / setup.settings.run_name)
    info = read_tracking_info(paths=paths)
    assert info is not None and info.tracking_uri == uri
    summary = json.loads(paths.summary.read_text(encoding="utf-8"))
    with _mlflow_server(uri=uri, directory=root) as port:
        yield Served(port=port, uri=uri, info=info, summary=summary, scratch=root)


@pytest.fixture
def browse(chromium: str, served: Served) -> Browse:
    """Open a page of the served UI in a fresh Chromium; the page once ``ready`` (JavaScript)
    is true, or at the deadline. A screenshot of each page is kept beside the store."""
    shots = served.scratch / "screenshots"
    shots.mkdir(exist_ok=True)

    def load(url: str, ready: str) -> Page:
        assert url.startswith(f"http://127.0.0.1:{served.port}/"), url
        with (
            tempfile.TemporaryDirectory(prefix="chromium-", dir=served.scratch) as profile,
            _devtools(chromium, profile=Path(profile)) as tools,
        ):
            page = tools.open(url, ready=ready, timeout_s=PAGE_TIMEOUT_S)
            shot = tools.call("Page.captureScreenshot", session=tools.session)
        name = re.sub(r"[^A-Za-z0-9]+", "-", url.split("#", 1)[-1])[:120]
        (shots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
        return page

    return load


def test_the_experiment_opens_on_its_runs_not_on_traces(served: Served, browse: Browse) -> None:
    url = experiment_url(
        tracking_uri=served.uri, experiment_id=served.info.experiment_id, port=served.port
    )
    assert url is not None
    # Runs are listed as they load: wait for all of them, the count and the parent run's row
    # (the count can be drawn before the rows), or for the GenAI view's button.
    every_run = rf"\b{1 + len(SITES)} matching runs"
    page = browse(
        url,
        _showing(
            f"{every_run}|Detect Issues",
            r"(^|\s)demo(\s|$)|Detect Issues",
            "Federated training|Detect Issues",
        ),
    )
    assert page.title.startswith("Runs - Experiment"), page.title
    assert re.search(every_run, page.text), page.text[:2000]
    assert "demo" in page.text.split() and "Federated training" in page.text
    assert "Detect Issues" not in page.text and "Token Usage" not in page.text

    # The address MLflow 3.17 itself links to, without a view, still opens the GenAI view:
    # the reason medfed's links name theirs.
    plain = browse(
        f"http://127.0.0.1:{served.port}/#/experiments/{served.info.experiment_id}",
        _showing(f"{every_run}|Detect Issues"),
    )
    assert plain.title.startswith("Overview - Experiment"), (
        f"MLflow now opens the experiment as {plain.title!r} without workflowType: the view "
        "parameter of medfed.tracking.ui_links may no longer be needed"
    )


def test_the_parent_run_shows_its_sites_description_and_model(
    served: Served, browse: Browse
) -> None:
    spent = ", ".join(
        f"{site} {_rounded_up(served.summary['budgets']['sites'][site]['epsilon_spent'])} of 8"
        for site in SITES
    )
    shown = {
        # in any order, white space around the comma as the layout has it
        "child runs": r"Child runs\s+demo/site-[ab]\s*,\s*demo/site-[ab]\b",
        # (the UI puts a count in an element of its own)
        "logged model": r"Logged models\s*\(\s*1\s*\)",
        "registered model": r"Registered models\s+medfed-demo\s+v1",
        # The description (Markdown), its first two paragraphs shown before "Show more": what
        # ran, and each site's epsilon.
        "what ran": re.escape(
            "Federated training run demo: 2 sites (site-a, site-b), strategy fedavg, "
            f"{ROUNDS} of {ROUNDS} rounds; finished."
        ),
        "epsilons": re.escape(f"epsilon spent (privacy unit: one patient; rounded up): {spent}."),
        **{metric: rf"^{metric}\s" for metric in (*PARENT_ROUND_METRICS, "dice_final")},
    }
    page = browse(served.run_page(served.info.parent_run_id), _showing(*shown.values()))
    for what, pattern in shown.items():
        assert re.search(pattern, page.text, flags=re.M), (what, page.text[:4000])
    names = re.search(shown["child runs"], page.text)
    assert names is not None
    assert all(f"demo/{site}" in names.group(0) for site in SITES)


def test_the_runs_charts_have_one_point_per_round(served: Served, browse: Browse) -> None:
    def charts(run_id: str) -> dict[str, list[tuple[float, float]]]:
        url = served.run_page(run_id).replace("?", "/model-metrics?")
        return _chart_points(browse(url, CHARTS_DRAWN).dom)

    parent = charts(served.info.parent_run_id)
    site = charts(served.info.site_runs["site-a"])
    for drawn, metrics in ((parent, PARENT_ROUND_METRICS), (site, SITE_ROUND_METRICS)):
        for metric in metrics:
            assert metric in drawn, sorted(drawn)
            assert len(drawn[metric]) == ROUNDS, (metric, drawn[metric])
    # Epsilon only grows round by round and what remains shrinks (SVG's y axis points down).
    for drawn, metric in ((parent, "epsilon_max"), (site, "epsilon_spent")):
        (_, first), (_, second) = drawn[metric]
        assert second < first, (metric, drawn[metric])
    (_, first), (_, second) = site["epsilon_remaining"]
    assert second > first, site["epsilon_remaining"]


def test_the_model_version_states_the_guarantee(served: Served, browse: Browse) -> None:
    url = model_version_url(
        tracking_uri=served.uri, name="medfed-demo", version="1", port=served.port
    )
    assert url is not None
    lines = [
        f"{site}: epsilon {_rounded_up(budget['epsilon_spent'])} at delta 1e-05 "
        f"({budget['accountant']} accountant, cap {budget['epsilon_cap']:g})"
        for site, budget in sorted(served.summary["budgets"]["sites"].items())
    ]
    assert len(lines) == len(SITES)
    shown = [re.escape(text) for text in ("Privacy guarantee per site", *lines)]
    page = browse(url, _showing(*shown))
    for pattern in shown:
        assert re.search(pattern, page.text), (pattern, page.text[:3000])


# The browser and the server -------------------------------------------------------------------


class _DevTools:
    """The DevTools protocol on Chromium's pipe: JSON messages ended by a NUL byte."""

    def __init__(self, *, send_fd: int, receive_fd: int) -> None:
        self.send_fd, self.receive_fd = send_fd, receive_fd
        self.buffer = b""
        self.next_id = 0
        self.session: str | None = None

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:  # events come in between; skip them
            reply = self._receive(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, (method, reply["error"])
                return dict(reply.get("result") or {})

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.receive_fd], [], [], max(left, 0))
            if not readable:
                raise AssertionError("Chromium did not answer in time")
            chunk = os.read(self.receive_fd, 1 << 16)
            if not chunk:
                raise AssertionError("Chromium closed its DevTools pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return dict(json.loads(message))

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True},
            session=self.session,
        )
        return result.get("result", {}).get("value")

    def open(self, url: str, *, ready: str, timeout_s: float) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        self.call("Page.enable", session=self.session)
        # Tall: every chart of a run is in view, so the UI draws them all.
        screen = {"width": 1400, "height": 2400, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", screen, session=self.session)
        self.call("Page.navigate", {"url": url}, session=self.session)
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(f"Boolean(document.body && ({ready}))"):
            if time.monotonic() > deadline:
                break  # the assertions say what is missing
            time.sleep(0.25)
        return Page(
            title=str(self.evaluate("document.title")),
            text=str(self.evaluate("document.body.innerText")),
            dom=str(self.evaluate("document.documentElement.outerHTML")),
        )


@contextmanager
def _devtools(executable: str, *, profile: Path) -> Iterator[_DevTools]:
    """Chromium, headless, in ``profile``; stopped (its process group) on exit."""
    commands_read, commands_write = os.pipe()
    replies_read, replies_write = os.pipe()
    # Chromium reads commands on fd 3 and writes replies on fd 4: a trampoline moves the pipe
    # ends there (first above 4, so that moving one cannot overwrite the other).
    theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, replies_write)]
    for fd in (commands_read, replies_write):
        os.close(fd)
    trampoline = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    arguments = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--remote-debugging-pipe",
        f"--user-data-dir={profile}",  # empty: the UI as a first-time user sees it
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "about:blank",
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", trampoline, *map(str, theirs), executable, *arguments],
        pass_fds=theirs,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for fd in theirs:
        os.close(fd)
    tools = _DevTools(send_fd=commands_write, receive_fd=replies_read)
    try:
        yield tools
    finally:
        try:
            tools.call("Browser.close")
            process.wait(timeout=15)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        os.close(commands_write)
        os.close(replies_read)


@contextmanager
def _mlflow_server(*, uri: str, directory: Path) -> Iterator[int]:
    """`mlflow server` on the store, on a free loopback port (yielded); its process group is
    stopped on exit, whatever happened."""
    port = free_port()
    log_path = directory / "mlflow-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            cwd=directory,
            start_new_session=True,  # its own process group: uvicorn's worker stops with it
        )
        try:
            _wait_until_up(process, port=port, log_path=log_path)
            yield port
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            except ProcessLookupError:
                pass


def _wait_until_up(
    process: subprocess.Popen[bytes], *, port: int, log_path: Path, timeout_s: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer: {log_path.read_text()[-2000:]}")


def _showing(*patterns: str) -> str:
    """JavaScript: true once the page's text matches every regular expression (Python's and
    JavaScript's syntax agree on the ones used here; ``^`` is a line's start)."""
    tests = ", ".join(f"new RegExp({json.dumps(p)}, 'm')" for p in patterns)
    return f"[{tests}].every(r => r.test(document.body.innerText))"


def _chart_points(dom: str) -> dict[str, list[tuple[float, float]]]:
    """Each metric chart's distinct plotted points (x, y in pixels), by the chart's title."""
    parts = re.split(r'<h4[^>]*\btitle="([^"]+)"[^>]*>', dom)
    charts: dict[str, list[tuple[float, float]]] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        points = re.findall(r'class="point" transform="translate\(([-\d.]+),\s*([-\d.]+)\)', body)
        if points:
            charts[name] = sorted({(float(x), float(y)) for x, y in points})
    return charts


def _rounded_up(epsilon: float) -> str:
    """As the descriptions print epsilon: 3 decimals, rounded up."""
    return f"{math.ceil(epsilon * 1000 - 1e-9) / 1000:.3f}"
