"""The programs in ``examples/`` run, each as a subprocess with real python-socketio
clients (and the monitor page in Chromium), and the README's code is theirs: every
``python`` block of the README names the example it comes from
(``<!-- example: examples/NAME.py -->`` on the line before) and appears there verbatim.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import socketio
from conftest import REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.server

EXAMPLES = REPO_ROOT / "examples"
MARKER = re.compile(r"<!-- example: (examples/[\w.]+) -->\n```python\n(.*?)```", re.DOTALL)
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- the README's code is the examples' -------------------------------------------------------


def test_every_readme_python_block_is_an_excerpt_of_an_example() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = readme.count("```python\n")
    marked = MARKER.findall(readme)
    assert blocks and len(marked) == blocks, (
        f"{blocks - len(marked)} python block(s) of the README name no example "
        "(put <!-- example: examples/NAME.py --> on the line before)"
    )
    for path, code in marked:
        source = (REPO_ROOT / path).read_text(encoding="utf-8")
        # verbatim, though a block from inside a function may be shown dedented
        assert any(textwrap.indent(code, " " * n) in source for n in (0, 4, 8)), (
            f"this README block is not verbatim in {path}:\n{code}"
        )


def test_every_example_names_the_extras_it_needs() -> None:
    for path in sorted(EXAMPLES.glob("*.py")):
        doc = path.read_text(encoding="utf-8").split('"""')[1]
        assert "Needs:" in doc and "pip install" in doc, path.name


# -- running them ------------------------------------------------------------------------------


class Example:
    def __init__(self, name: str, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"{name}.log"
        full_env = {
            **os.environ,
            "PORT": str(self.port),
            "DATABASE_URL": f"sqlite:///{tmp_path}/{name}.db",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLES / f"{name}.py")],
                cwd=tmp_path,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._listening, 30, f"{name} to listen; log:\n{self.log()}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the example exited ({self.proc.returncode}):\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, namespace: str, **kwargs: Any) -> socketio.Client:
        client = socketio.Client(reconnection=False)
        client.connect(
            self.url, namespaces=[namespace], transports=["websocket"], wait_timeout=10, **kwargs
        )
        return client

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Example]]:
    started: list[Example] = []

    def start_(name: str, **env: str) -> Example:
        example = Example(name, tmp_path, env)
        started.append(example)
        return example

    yield start_
    for example in started:
        example.stop()


def _pool_idle(example: Example, token: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "monitor_client.py"), example.url, token, "--once"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"\S+: healthy, 0/\d+ in use, 0 waiting, 0 leaks\n", result.stdout), (
        result.stdout
    )


def test_chat(start: Callable[..., Example]) -> None:
    chat = start("chat", DBCTX_MONITOR_AUTH="example-token")
    with pytest.raises(socketio.exceptions.ConnectionError):
        chat.client("/chat")  # no name: refused
    ada = chat.client("/chat", auth={"name": "ada"})
    bob = chat.client("/chat", auth={"name": "bob"})
    heard: list[Any] = []
    bob.on("message", heard.append, namespace="/chat")
    try:
        ack = ada.call("send", {"text": "hello"}, namespace="/chat", timeout=10)
        assert ack == {"ok": True, "id": 1}
        wait_for(lambda: heard == [{"id": 1, "text": "hello"}], 10, "bob to hear ada")
        bad = ada.call("send", "hello", namespace="/chat", timeout=10)
        assert bad["error"] == "invalid_request"
        history = bob.call("history", namespace="/chat", timeout=10)
        assert history == {"messages": [{"id": 1, "text": "hello"}]}
        reports = chat.client("/reports")
        assert reports.call("count", namespace="/reports", timeout=10) == {"messages": 1}
        reports.disconnect()
    finally:
        ada.disconnect()
        bob.disconnect()
    _pool_idle(chat, "example-token")
    # the monitor from Python, as pushes
    watch = subprocess.run(
        [sys.executable, str(EXAMPLES / "monitor_client.py"), chat.url, "example-token",
         "--count", "2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert len(re.findall(r"^\S+: healthy, \d+/\d+ in use", watch.stdout, re.M)) == 2
    refused = subprocess.run(
        [sys.executable, str(EXAMPLES / "monitor_client.py"), chat.url, "wrong", "--once"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0 and "ConnectionError" in refused.stderr


def test_adopt(start: Callable[..., Example]) -> None:
    notes = start("adopt")
    client = notes.client("/notes")
    other = notes.client("/notes")
    added: list[Any] = []
    other.on("added", added.append, namespace="/notes")
    try:
        assert client.call("add", {"text": "one"}, namespace="/notes", timeout=10) == {"ok": True}
        # the plain handler's KeyError: an error ack (it would hang without the pipeline),
        # rolled back, and its held emit dropped
        failed = client.call("add", {}, namespace="/notes", timeout=10)
        assert failed["error"] == "internal_error"
        assert client.call("count", namespace="/notes", timeout=10) == 1
        wait_for(lambda: added == [{"text": "one"}], 10, "the broadcast of the committed add")
        cleared = client.call("clear", namespace="/notes", timeout=10)
        assert cleared == {"ok": True, "deleted": 1}
        assert client.call("count", namespace="/notes", timeout=10) == 0
    finally:
        client.disconnect()
        other.disconnect()
    assert added == [{"text": "one"}]


def test_background(start: Callable[..., Example]) -> None:
    prices = start("background", TICK="0.2")
    client = prices.client("/prices")
    ticks: list[dict[str, int]] = []
    client.on("prices", ticks.append, namespace="/prices")
    try:
        wait_for(
            lambda: len([t for t in ticks if set(t) == {"BTC", "ETH"}]) >= 3,
            15,
            f"three price ticks; got {ticks}",
        )
        snapshot = client.call("snapshot", namespace="/prices", timeout=10)
        assert set(snapshot) == {"BTC", "ETH"} and all(v >= 1 for v in snapshot.values())
        with _HTTP.open(prices.url + "/status", timeout=5) as response:
            status = json.loads(response.read())
        assert status["symbols"] == 2 and status["health"]["healthy"] is True
        assert status["pool"]["bind"] == "default"
        assert status["metrics"]["/prices:snapshot"]["count"] == 1
    finally:
        client.disconnect()


def test_monitor_page_is_served_with_its_client(start: Callable[..., Example]) -> None:
    page = start("monitor_page", DBCTX_MONITOR_AUTH="page-token")
    with _HTTP.open(page.url + "/?token=page-token", timeout=5) as response:
        html = response.read().decode()
    assert 'src="/vendor/socket.io-client/socket.io.min.js"' in html
    assert "http://" not in html and "https://" not in html  # nothing from the internet
    with _HTTP.open(page.url + "/vendor/socket.io-client/socket.io.min.js", timeout=5) as r:
        assert r.status == 200 and len(r.read()) > 10_000


def test_monitor_page_in_a_browser(start: Callable[..., Example]) -> None:
    from test_browser import CHROMIUM, CHROMIUM_ARGS, _browser_problem

    problem = _browser_problem()
    if problem is not None:
        pytest.skip(problem)
    from playwright.sync_api import expect, sync_playwright

    page_app = start("monitor_page", DBCTX_MONITOR_AUTH="page-token")
    worker = page_app.client("/work")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_app.url + "/?token=page-token")
            expect(page.locator("#state")).to_have_text("connected", timeout=15_000)
            expect(page.locator("#status")).to_have_text("healthy", timeout=15_000)
            for _ in range(5):
                assert worker.call("ping", namespace="/work", timeout=10) == 1
            expect(page.locator("#events")).to_have_text("5", timeout=15_000)
            expect(page.locator("#in-use")).to_have_text(re.compile(r"^0 / \d+$"))
            refused = browser.new_page()
            refused.goto(page_app.url + "/?token=wrong")
            expect(refused.locator("#state")).to_have_text(re.compile("^refused"), timeout=15_000)
            expect(refused.locator("#status")).to_have_text("\u2013")
            assert errors == []
        finally:
            browser.close()
            worker.disconnect()
    time.sleep(0)  # nothing left running: the fixture stops the app
