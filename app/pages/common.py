"""Helpers shared by the pages: error translation and rendering of prompts."""

from __future__ import annotations

import functools
import html
import logging

import gradio as gr

from annotations.errors import AnnotationsError, PermissionDenied

logger = logging.getLogger(__name__)


def visible_error(message: str) -> gr.Error:
    """A refusal the person sees where they are looking, logged as one line (not a traceback:
    a wrong ranking or password is not a server fault)."""
    logger.info("refused: %s", message)
    return gr.Error(message, print_exception=False)


def guard(fn):
    """Run a handler; domain errors become a visible `gr.Error` (and, for the API, an error
    response) instead of a stack trace."""
    try:
        return fn()
    except PermissionDenied as e:
        raise visible_error(f"Permission denied: {e}") from None
    except (AnnotationsError, ValueError, KeyError) as e:
        raise visible_error(str(e).strip("'\"")) from None


MESSAGE_PREFIX = "⚠ "


def shown_inline(fn, n_outputs: int):
    """The page's own copy of an event handler with `n_outputs` outputs, plus one: the page's
    message box, beside the controls. A refusal is written there and every other field stays as
    it was (a raised gr.Error would mark every output "Error" and cover the page); success clears
    it. The API keeps the raising handler, so a client still gets an error."""
    @functools.wraps(fn)  # Gradio reads the signature (and gr.Request) through it
    def on_page(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except gr.Error as e:
            message = gr.update(value=MESSAGE_PREFIX + html.escape(str(e.message), quote=False), visible=True)
            return message if n_outputs == 0 else [*(gr.skip() for _ in range(n_outputs)), message]
        cleared = gr.update(value="", visible=False)
        if n_outputs == 0:
            return cleared
        return [*(result if n_outputs > 1 else [result]), cleared]

    return on_page


def wire(trigger, fn, inputs, outputs, message, api_name: str | None = None, role: str = "annotator",
         progress_on=None) -> None:
    """Wire `fn` twice: to the page's `trigger` (refusals written in `message`: shown_inline),
    and, if `api_name`, to the API, where a refusal is an error response. The API's copy hangs
    on a hidden trigger, so a click never runs both."""
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    if api_name:  # first: Gradio names an event after its function, and the API copy must get the name
        hidden = gr.Button(visible=False, elem_id=f"api-{api_name.replace('_', '-')}")
        hidden.click(fn, inputs, outputs, api_name=endpoint(api_name, role))
    trigger(shown_inline(fn, len(outputs)), inputs, [*outputs, message], api_visibility="private",
            show_progress="minimal" if progress_on else "hidden", show_progress_on=progress_on)


def _markdown():
    from markdown_it import MarkdownIt

    # html=False: a tag in the text is shown as text, never an element. No images (nothing remote
    # is ever fetched from an answer), no links (nothing to click through to), so what renders is
    # only paragraphs, emphasis, lists, headings, quotes, tables and code.
    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"]) \
        .disable(["image", "link", "autolink"])


_MARKDOWN = _markdown()


LONG_ANSWER_CHARS = 1200  # a longer answer shows its start, and the rest one click away


def answer_html(text: str) -> str:
    """A model answer as the annotate page shows it: its markdown rendered (lists, code blocks,
    emphasis), everything else as inert text. See `_markdown` for what cannot render. A long
    answer shows its first paragraphs and folds the rest under "Show the whole answer", so four
    long answers do not push the judging buttons off the screen (nothing is cut: it opens)."""
    head, rest = split_long(text or "")
    if not rest:
        return f'<div class="rankloop-answer">{_MARKDOWN.render(head)}</div>'
    words = len(rest.split())
    return (f'<div class="rankloop-answer">{_MARKDOWN.render(head)}<details class="rankloop-more">'
            f'<summary>Show the whole answer ({words} more word{"s" if words != 1 else ""})</summary>'
            f'{_MARKDOWN.render(rest)}</details></div>')


def split_long(text: str, limit: int = LONG_ANSWER_CHARS) -> tuple[str, str]:
    """(start, rest) of a long answer, cut at the first paragraph break after `limit`
    characters that is outside a code block; ("text", "") when it is short or has no such break."""
    if len(text) <= limit:
        return text, ""
    fenced, position = False, 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        position += len(line)
        if position >= limit and not fenced and not line.strip() and text[position:].strip():
            return text[:position].rstrip(), text[position:].strip()
    return text, ""


def prompt_for_chatbot(messages):
    """Chat messages for a gr.Chatbot with `render_markdown=False`, shown exactly as written:
    HTML-escaped, so a tag in someone's prompt is text on the annotator's screen, never an
    element (Gradio's sanitiser alone would still let `<img src=...>` through). A system
    prompt is shown as a marked user-side note."""
    shown = []
    for m in messages or []:
        if m["role"] == "system":
            shown.append({"role": "user", "content": html.escape(f"[system prompt] {m['content']}", quote=False)})
        else:
            shown.append({"role": m["role"], "content": html.escape(m["content"], quote=False)})
    return shown


# Every public API endpoint with the role its handler requires ('annotator' admits admins too).
# `endpoint` refuses a name missing here, and the role test enumerates the running app's API
# against this table, so no endpoint can slip in without a reviewed role.
ENDPOINT_ROLES: dict[str, str] = {
    "next_item": "annotator",
    "submit_A": "annotator",
    "submit_B": "annotator",
    "submit_tie": "annotator",
    "submit_both_bad": "annotator",
    "submit_ranking": "annotator",
    "submit_all_bad": "annotator",
    "skip": "annotator",
    "flag": "annotator",
    "copy_best": "annotator",
    "recent_judgements": "annotator",
    "reopen_judgement": "annotator",
    "revise_judgement": "annotator",
    "save_settings": "admin",
    "requeue_items": "admin",
    "save_weights": "admin",
    "save_available_versions": "admin",
    "save_guidelines": "admin",
    "import_file": "admin",
    "export_pairs": "admin",
    "queue_prompt": "admin",
    "mark_gold": "admin",
    "add_account": "admin",
    "create_api_key": "admin",
    "revoke_api_key": "admin",
    "quality_report": "admin",
    "health": "admin",
    "queue_round": "admin",
    "round_status": "admin",
    "cancel_round": "admin",
    "promote": "admin",
    "check_gate": "admin",
    "rollback": "admin",
    "save_gate": "admin",
    "dashboard": "admin",
    "chat": "annotator",
    "rate_reply": "annotator",
    "send_to_annotation": "annotator",
    "arena_random_prompt": "annotator",
    "arena_battle": "annotator",
    "arena_vote_A": "annotator",
    "arena_vote_B": "annotator",
    "arena_vote_tie": "annotator",
    "arena_vote_both_bad": "annotator",
    "arena_leaderboard": "annotator",
}


def endpoint(name: str, role: str) -> str:
    """The API name for an event, checked against ENDPOINT_ROLES."""
    if ENDPOINT_ROLES.get(name) != role:
        raise ValueError(f"endpoint {name!r} must be declared with role {role!r} in ENDPOINT_ROLES")
    return name
