"""Shared fixtures. The hub is switched off before anything imports transformers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
HH_DEV = SHARED_DATA / "hh-rlhf-harmless-dev.jsonl.gz"


@pytest.fixture
def db(tmp_path):
    """A real, migrated SQLite store in a temporary folder."""
    from annotations import open_db

    database = open_db(tmp_path / "rankloop.db")
    yield database
    database.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama (a few thousand parameters) with a locally trained tokenizer."""
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def hh_dev():
    if not HH_DEV.exists():
        pytest.skip(f"{HH_DEV} is absent (the shared data folder is not beside the repo)")
    return HH_DEV


@pytest.fixture(scope="session")
def real_base_dir():
    """The prepared default base model (SmolLM2-135M-Instruct); prepared on first use."""
    from align.models import default_base_path, is_prepared, prepare_base

    path = default_base_path()  # $RANKLOOP_HOME/models/..., which `make test` prepares first
    if not is_prepared(path):
        prepare_base(path)
    return path


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by Playwright (no browser download)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def browser_login(page, url: str, name: str, password: str) -> None:
    """Fill Gradio's login form and wait for the app to load: until the page's own load has run
    (it says who is logged in, and opens the tab used last), a click on a tab can be undone."""
    page.goto(url)
    page.locator("input[type=text]").first.fill(name)
    page.locator("input[type=password]").first.fill(password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_function("(document.querySelector('#who') || {innerText: ''}).innerText.includes('Logged in')",
                           timeout=60_000)


class AppProcess:
    """`python -m app` (what `make run` starts) as a subprocess on a free port, with an
    annotator account made through the CLI first; use as a context manager."""

    def __init__(self, home: Path, base: Path, annotator: tuple[str, str], *app_args: str,
                 admin_password: str = "admin-password-1"):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.home, self.base, self.annotator, self.app_args = Path(home), Path(base), annotator, app_args
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = {**os.environ, "RANKLOOP_HOME": str(home), "RANKLOOP_ADMIN_PASSWORD": admin_password,
                    "PORT": str(self.port)}

    def __enter__(self):
        import subprocess
        import sys

        import httpx

        from tests.app.conftest import wait_until

        subprocess.run([sys.executable, "-m", "annotations", "--db", str(self.home / "rankloop.db"), "add-user",
                        self.annotator[0], "--role", "annotator", "--password", self.annotator[1]],
                       check=True, env=self.env, cwd=REPO)
        self.log = open(self.home / "app.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "app", "--base", str(self.base), *self.app_args],
                                        env=self.env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

        def up():
            assert self.process.poll() is None, (self.home / "app.log").read_text()[-3000:]
            try:
                return httpx.get(self.url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=180, interval=0.5, message="the app to serve its page")
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(60)
        self.log.close()
