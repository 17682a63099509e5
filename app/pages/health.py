"""The admin's Health tab: every background part's state and what went wrong (`app.health`).
Wiring only."""

from __future__ import annotations

import gradio as gr

from app import handlers
from app.health import format_report
from app.pages.common import endpoint, guard

REFRESH_SECONDS = 5.0


def build(ctx, current_user):
    with gr.Tab("Health"):
        gr.Markdown("The training worker, the prefetch queue, the versions in memory and the errors of the app's "
                    "background parts, refreshed every few seconds. Monitoring tools: `GET /health` (200 when "
                    "all is well, 503 when not) or `python -m app health`.")
        refresh = gr.Button("Refresh", elem_id="health-refresh", size="sm")
        report = gr.Markdown(elem_id="health-report")
        timer = gr.Timer(REFRESH_SECONDS, active=False)

    def show(request: gr.Request):
        return guard(lambda: format_report(handlers.health(ctx, current_user(request))))

    refresh.click(show, None, report, api_name=endpoint("health", "admin"))
    timer.tick(show, None, report, api_visibility="private")

    def on_admin_load(request: gr.Request):
        return [show(request), gr.Timer(active=True)]

    return on_admin_load, [report, timer]
