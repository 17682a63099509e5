"""The Gradio Blocks: the pages assembled, and what happens when a page loads. Wiring only:
logic lives in `handlers`, each page module wires its own tab."""

from __future__ import annotations

import gradio as gr

from app import handlers
from app.auth import user_from_request
from app.chat_and_arena import policy_versions as chat_versions
from app.pages import admin as admin_page
from app.pages import annotate as annotate_page
from app.pages import chat as chat_page
from app.pages import health as health_page
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
  document.addEventListener("click", (event) => {  // capture: before the tab's own handlers
    const tab = event.target.closest && event.target.closest("[role=tab]");
    if (tab) {
      window.rankloopClickedTab = tab.innerText.trim().toLowerCase();
      localStorage.setItem("rankloop-tab", window.rankloopClickedTab);
    }
  }, true);
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const typing = target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" || target.isContentEditable);
    if (event.key === "Escape" && typing) { target.blur(); return; }
    if (typing && event.key === "Enter" && event.ctrlKey && target.closest("#edited")) {
      const ranking = document.getElementById("submit-ranking");
      if (visible(ranking)) { event.preventDefault(); ranking.click(); }
      return;
    }
    if (typing && event.key === "Enter" && !event.shiftKey && target.closest("#ranking")) {
      // Enter submits the ranking; the field is left, so the next item's keys are keys again
      setTimeout(() => target.blur(), 0);
      return;
    }
    if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.toLowerCase();
    if (key === "g") { const p = document.querySelector("#guidelines-panel button, #guidelines-panel .label-wrap");
                       if (p) { event.preventDefault(); p.click(); } return; }
    if (clicks[key]) { const b = document.getElementById(clicks[key]);
                       if (visible(b)) { event.preventDefault(); b.click(); } return; }
    if (focus[key]) { const el = document.querySelector(focus[key]);
                      // selected: a suggested ranking already there is accepted with Enter, replaced by typing
                      if (el) { event.preventDefault(); el.focus(); if (el.select && key === "r") el.select(); } }
  });
}
"""


from app.pages.rank_board import BOARD_JS  # noqa: E402 (drag-and-drop ranking: its moves, by delegation)

SHORTCUTS_JS = SHORTCUTS_JS.rstrip().removesuffix("}") + BOARD_JS + "}\n"

# The tab a person last used, kept in their browser (a click on a tab records it, in
# SHORTCUTS_JS): the page opens on it, and an annotation item is dealt (leased) only when the
# Annotate tab is actually what they look at.
TABS = ("annotate", "chat", "arena", "admin")
READ_TAB_JS = "() => [localStorage.getItem('rankloop-tab') || 'annotate']"


def build_ui(ctx: handlers.AppContext) -> gr.Blocks:
    def current_user(request: gr.Request):
        return user_from_request(ctx.db, request)

    with gr.Blocks(title="rankloop") as demo:
        with gr.Row():
            gr.Markdown("# rankloop")
            who = gr.Markdown(elem_id="who")
            gr.Button("Log out", link="/logout", size="sm", scale=0)
        start_tab = gr.Textbox(visible=False, elem_id="start-tab")
        with gr.Tabs(elem_id="main-tabs") as tabs:
            with gr.Tab("Annotate", id="annotate") as annotate_tab:
                annotate = annotate_page.build(ctx, current_user)
            with gr.Tab("Chat", id="chat"):
                chat_tab = chat_page.build_chat(ctx, current_user)
            with gr.Tab("Arena", id="arena") as arena_tab_shown:
                arena_tab = chat_page.build_arena(ctx, current_user)
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                load_admin, admin_outputs = admin_page.build(ctx, current_user, annotate["view"])
                load_training, training_outputs = training_page.build(ctx, current_user)
                load_health, health_outputs = health_page.build(ctx, current_user)

        def on_load(tab, request: gr.Request):
            def run():
                user = handlers.whoami(current_user(request))
                is_admin = user["role"] == "admin"
                shown = tab if tab in TABS and (tab != "admin" or is_admin) else "annotate"
                # an item is dealt only to someone who is looking at the Annotate tab
                page = annotate["load"](request) if shown == "annotate" else [gr.update() for _ in annotate["outputs"]]
                guidelines = handlers.guidelines(ctx, user)
                admin_values = ([*load_admin(request), *load_training(request), *load_health(request)] if is_admin
                                else [gr.update() for _ in (*admin_outputs, *training_outputs, *health_outputs)])
                versions = gr.update(choices=chat_versions(ctx, user))
                return [f"Logged in as **{user['name']}** ({user['role']})", gr.Tabs(selected=shown), *page,
                        guidelines, versions, versions, versions, *arena_tab["state"](user),
                        gr.update(visible=is_admin), *admin_values]
            return guard(run)

        demo.load(on_load, [start_tab], [who, tabs, *annotate["outputs"], annotate["guidelines"], chat_tab["version"],
                                         arena_tab["version_a"], arena_tab["version_b"], *arena_tab["state_outputs"],
                                         admin_tab, *admin_outputs,
                                         *training_outputs, *health_outputs],
                  js=READ_TAB_JS, api_visibility="private")
        def on_annotate_shown(clicked, request: gr.Request):
            # Gradio also fires `select` for the tab shown first when the page opens, before
            # on_load has picked the tab: only a person's click on the tab deals an item here
            if clicked != "annotate":
                return [gr.update() for _ in annotate["outputs"]]
            return annotate["load"](request)

        def on_arena_shown(request: gr.Request):
            # a round may have registered a second version since the page opened
            def run():
                user = handlers.whoami(current_user(request))
                versions = gr.update(choices=chat_versions(ctx, user))
                return [versions, versions, *arena_tab["state"](user)]
            return guard(run)

        arena_tab_shown.select(on_arena_shown, None, [arena_tab["version_a"], arena_tab["version_b"],
                                                      *arena_tab["state_outputs"]], api_visibility="private")
        annotate_tab.select(on_annotate_shown, [start_tab], annotate["outputs"],
                            js="() => [window.rankloopClickedTab || '']", api_visibility="private")
    return demo
