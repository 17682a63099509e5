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
    """Fill Gradio's login form and wait for the app to load."""
    page.goto(url)
    page.locator("input[type=text]").first.fill(name)
    page.locator("input[type=password]").first.fill(password)
    page.get_by_role("button", name="Login").click()
