"""Assembling the app: store, policy server, prefetcher, authenticator and UI."""

from __future__ import annotations

import logging
from pathlib import Path

from annotations import open_db
from app import bootstrap, handlers
from app.auth import Authenticator, user_from_request
from app.guard import FileOwners
from app.health import ErrorLog
from app.live import LiveWatcher, WorkerProcess
from app.prefetch import Prefetcher
from app.serving import PolicyServer, configure_threads

logger = logging.getLogger(__name__)


def create_app(home: Path, base: Path, *, threads: int = 2, prefetch: int = 4, demo_prompts: bool = True,
               worker: bool = False, live_poll_seconds: float = 0.1, dtype: str = "auto",
               inference: dict | None = None, device: str = "auto"):
    """Returns (context, blocks, authenticator, created_admin or None).

    Starts the prefetcher, the live-version watcher (hot-loading), and with `worker` the
    training worker as a child process. `inference` ({"url", "model", "api_key", "lora"}: see
    app/remote.py) takes answers from an external OpenAI-compatible server instead of the
    in-process model."""
    from app.ui import build_ui

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    db_path = home / "rankloop.db"
    db = open_db(db_path)
    created_admin = bootstrap.ensure_admin(db)
    if demo_prompts:
        bootstrap.seed_demo_prompts(db)
    db.close()

    configure_threads(threads)
    ctx = handlers.AppContext(db_path=db_path, file_owners=FileOwners(), errors=ErrorLog())
    if inference:
        from app.remote import RemoteServer

        ctx.server = RemoteServer(base, inference["url"], inference["model"], api_key=inference.get("api_key"),
                                  lora=bool(inference.get("lora")))
        logger.info("answers come from the inference server %s", ctx.server.describe())
    else:
        ctx.server = PolicyServer(base, dtype=dtype, device=device)
        logger.info("answers computed %s", ctx.server.describe())
    ctx.live = LiveWatcher(ctx, poll_seconds=live_poll_seconds, serve_threads=threads).start()
    if prefetch > 0:
        from app.reward_scores import RewardScorer

        ctx.prefetcher = Prefetcher(ctx.db, ctx.server, target_ready=prefetch, errors=ctx.errors,
                                    scorer=RewardScorer(base, ctx.server)).start()
    if worker:
        ctx.worker = WorkerProcess(db_path, base, log_path=home / "worker.log").start()
    demo = build_ui(ctx)
    ctx.upload_dir = Path(demo.GRADIO_CACHE)
    return ctx, demo, Authenticator(ctx.db), created_admin


def shutdown(ctx, demo=None) -> None:
    """Stop the background threads and the worker (tests and a clean exit)."""
    for part in (ctx.prefetcher, getattr(ctx, "live", None), getattr(ctx, "worker", None)):
        if part is not None:
            part.stop()
    if demo is not None:
        demo.close()


# Gradio's login form says "Incorrect credentials" whatever the server answered: show a person
# who is locked out (HTTP 429, app.auth) what the server said, where they are looking.
LOGIN_NOTICE_HEAD = """<script>
(() => {
  const original = window.fetch;
  window.fetch = async (...args) => {
    const response = await original(...args);
    const url = String((args[0] && args[0].url) || args[0]);
    if (response.status === 429 && /\\/login\\/?$/.test(url)) {
      response.clone().json().then((body) => {
        let note = document.getElementById("rankloop-login-note");
        if (!note) {
          note = document.createElement("div");
          note.id = "rankloop-login-note";
          note.setAttribute("role", "alert");
          note.style.cssText = "margin:1em auto;max-width:30em;padding:.75em 1em;border-radius:6px;" +
            "background:#fef2f2;color:#991b1b;border:1px solid #fca5a5;font:16px sans-serif;text-align:center";
          document.body.prepend(note);
        }
        note.textContent = body.detail;
      }).catch(() => {});
    }
    return response;
  };
})();
</script>"""


def launch(demo, auth: Authenticator, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True,
           ctx=None):
    """Start serving (queue, login, shortcuts) behind the HTTP guard (`app.guard`), with the
    OpenAI-compatible API under /v1/ (`app.openai_api`) when given `ctx`. With block=False,
    returns once listening."""
    from starlette.middleware import Middleware

    from annotations.formats import MAX_IMPORT_BYTES
    from app.guard import Guard
    from app.pages.rank_board import BOARD_CSS
    from app.ui import SHORTCUTS_JS

    from app.health import health_report
    from app.openai_api import build_api

    owners = ctx.file_owners if ctx is not None else FileOwners()
    connect = ctx.db if ctx is not None else auth._connect

    def role_of(name):
        user = user_from_request(connect, type("Request", (), {"username": name})())
        return user["role"] if user else None

    demo.queue(default_concurrency_limit=8)
    return demo.launch(
        server_name=host, server_port=port, auth=auth.check_login_async, auth_message="Log in to rankloop",
        ssr_mode=False, show_error=True, js=SHORTCUTS_JS, css=BOARD_CSS, head=LOGIN_NOTICE_HEAD,
        prevent_thread_lock=not block,
        quiet=not block, max_file_size=MAX_IMPORT_BYTES,  # uploads are for admins, and no larger than an import
        enable_monitoring=False,  # per-endpoint counts and timings are nobody's business but an admin's
        app_kwargs={"middleware": [Middleware(Guard, role_of=role_of, owners=owners,
                                              health=(lambda: health_report(ctx)) if ctx is not None else None,
                                              api=build_api(ctx) if ctx is not None else None)]},
    )
