"""The Gradio Blocks: the pages assembled, and what happens when a page loads. Wiring only:
logic lives in `handlers`, each page module wires its own tab."""

from __future__ import annotations

import gradio as gr

from app import handlers
from app.auth import user_from_request
from app.chat import policy_versions as chat_versions
from app.pages import admin as admin_page
from app.pages import annotate as annotate_page
from app.pages import chat as chat_page
from app.pages import training as training_page
from app.pages.common import guard

# Keyboard shortcuts. Ignored while typing in a field (Esc leaves it); Ctrl+Enter in the
# editor submits the judgement (the pairwise choice is not implied: it submits a ranking).
SHORTCUTS_JS = """
() => {
  const clicks = {"1": "choose-a", "2": "choose-b", "3": "choose-tie", "4": "choose-both-bad", "0": "all-bad",
                  "n": "next-item", "k": "skip", "f": "flag", "c": "copy-best"};
  const focus = {"r": "#ranking textarea, #ranking input", "e": "#edited textarea",
                 "u": "#thumbs-up input", "d": "#thumbs-down input"};
  const visible = (el) => el && el.offsetParent !== null;
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const typing = target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" || target.isContentEditable);
    if (event.key === "Escape" && typing) { target.blur(); return; }
    if (typing && event.key === "Enter" && event.ctrlKey && target.closest("#edited")) {
      const ranking = document.getElementById("submit-ranking");
      if (visible(ranking)) { event.preventDefault(); ranking.click(); }
      return;
    }
    if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.toLowerCase();
    if (key === "g") { const p = document.querySelector("#guidelines-panel button, #guidelines-panel .label-wrap");
                       if (p) { event.preventDefault(); p.click(); } return; }
    if (clicks[key]) { const b = document.getElementById(clicks[key]);
                       if (visible(b)) { event.preventDefault(); b.click(); } return; }
    if (focus[key]) { const el = document.querySelector(focus[key]);
                      if (el) { event.preventDefault(); el.focus(); } }
  });
}
"""


def build_ui(ctx: handlers.AppContext) -> gr.Blocks:
    def current_user(request: gr.Request):
        return user_from_request(ctx.db, request)

    with gr.Blocks(title="rankloop") as demo:
        with gr.Row():
            gr.Markdown("# rankloop")
            who = gr.Markdown(elem_id="who")
            gr.Button("Log out", link="/logout", size="sm", scale=0)
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                annotate = annotate_page.build(ctx, current_user)
            with gr.Tab("Chat", id="chat"):
                chat_tab = chat_page.build_chat(ctx, current_user)
            with gr.Tab("Arena", id="arena"):
                arena_tab = chat_page.build_arena(ctx, current_user)
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                load_admin, admin_outputs = admin_page.build(ctx, current_user, annotate["view"])
                load_training, training_outputs = training_page.build(ctx, current_user)

        def on_load(request: gr.Request):
            def run():
                user = handlers.whoami(current_user(request))
                page = annotate["load"](request)
                guidelines = handlers.guidelines(ctx, user)
                is_admin = user["role"] == "admin"
                admin_values = ([*load_admin(request), *load_training(request)] if is_admin
                                else [gr.update() for _ in (*admin_outputs, *training_outputs)])
                versions = gr.update(choices=chat_versions(ctx))
                return [f"Logged in as **{user['name']}** ({user['role']})", *page, guidelines,
                        versions, versions, versions, gr.update(visible=is_admin), *admin_values]
            return guard(run)

        demo.load(on_load, None, [who, *annotate["outputs"], annotate["guidelines"], chat_tab["version"],
                                  arena_tab["version_a"], arena_tab["version_b"], admin_tab, *admin_outputs,
                                  *training_outputs],
                  api_visibility="private")
    return demo
