"""The Gradio Blocks: wiring only. Logic lives in `handlers`; this module resolves the
request's user, calls the handler, turns domain errors into `gr.Error`, and renders."""

from __future__ import annotations

import gradio as gr

from annotations.errors import AnnotationsError
from app import handlers
from app.auth import user_from_request

# Keyboard shortcuts for the annotate page; ignored while typing in a text field.
SHORTCUTS_JS = """
() => {
  const keys = {"1": "choose-a", "2": "choose-b", "3": "choose-tie", "4": "choose-both-bad", "n": "next-item"};
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" || target.isContentEditable)) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const id = keys[event.key.toLowerCase()];
    if (!id) return;
    const button = document.getElementById(id);
    if (button) { event.preventDefault(); button.click(); }
  });
}
"""

SHORTCUTS_HELP = "Keys: **1** A is better · **2** B is better · **3** tie · **4** both bad · **n** next item"


def _guard(fn):
    """Run a handler, turning domain errors into a visible Gradio error."""
    try:
        return fn()
    except AnnotationsError as e:
        raise gr.Error(str(e)) from None
    except ValueError as e:
        raise gr.Error(str(e)) from None


def _prompt_messages(view):
    if not view:
        return []
    shown = []
    for m in view["messages"]:
        if m["role"] == "system":
            shown.append({"role": "user", "content": f"[system prompt] {m['content']}"})
        else:
            shown.append({"role": m["role"], "content": m["content"]})
    return shown


def build_ui(ctx: handlers.AppContext) -> gr.Blocks:
    def current_user(request: gr.Request):
        return user_from_request(ctx.db, request)

    def render(view, progress, note=""):
        answers = view["answers"] if view else []
        header = (
            f"**Item {view['item_id']}** · judged by you so far: {progress['done']} · items ready: {progress['ready']}"
            if view
            else f"No item is ready for you yet (items being generated: {progress['pending']}). "
            "Press **Next item** in a few seconds."
        )
        return (
            view,
            header + (f"\n\n{note}" if note else ""),
            _prompt_messages(view),
            answers[0]["text"] if len(answers) > 0 else "",
            answers[1]["text"] if len(answers) > 1 else "",
        )

    def load_item(view, request: gr.Request):
        def run():
            user = current_user(request)
            # Keep the item on screen if the page still holds one (a reload re-leases it anyway).
            new_view = handlers.next_item(ctx, user)
            return render(new_view, handlers.annotator_progress(ctx, user))

        return _guard(run)

    def make_submit(choice):
        def submit(view, request: gr.Request):
            def run():
                user = current_user(request)
                result = handlers.submit_pairwise(ctx, user, view, choice)
                note = f"Saved judgement {result['judgement_id']} ({result['pairs']} pair(s))."
                new_view = handlers.next_item(ctx, user)
                return render(new_view, handlers.annotator_progress(ctx, user), note)

            return _guard(run)

        submit.__name__ = f"submit_{choice}"
        return submit

    with gr.Blocks(title="rankloop") as demo:
        gr.Markdown("# rankloop")
        with gr.Tab("Annotate"):
            view = gr.State(None)
            header = gr.Markdown(elem_id="annotate-header")
            prompt = gr.Chatbot(label="Prompt", height=260, elem_id="prompt")
            with gr.Row():
                answer_a = gr.Textbox(label="Answer A", lines=10, max_lines=30, interactive=False, elem_id="answer-a")
                answer_b = gr.Textbox(label="Answer B", lines=10, max_lines=30, interactive=False, elem_id="answer-b")
            with gr.Row():
                choose_a = gr.Button("A is better (1)", elem_id="choose-a", variant="primary")
                choose_b = gr.Button("B is better (2)", elem_id="choose-b", variant="primary")
                choose_tie = gr.Button("Tie (3)", elem_id="choose-tie")
                choose_bad = gr.Button("Both bad (4)", elem_id="choose-both-bad", variant="stop")
                next_button = gr.Button("Next item (n)", elem_id="next-item")
            gr.Markdown(SHORTCUTS_HELP)

        outputs = [view, header, prompt, answer_a, answer_b]
        demo.load(load_item, [view], outputs, api_name="next_item")
        next_button.click(load_item, [view], outputs, api_visibility="undocumented")
        for button, choice in ((choose_a, "A"), (choose_b, "B"), (choose_tie, "tie"), (choose_bad, "both_bad")):
            button.click(make_submit(choice), [view], outputs, api_name=f"submit_{choice}",
                         concurrency_limit=None)
    return demo
