"""The annotate tab: wiring of components to `app.handlers` (no logic of its own)."""

from __future__ import annotations

import gradio as gr

from app import handlers
from app.pages.common import answer_html, guard, prompt_for_chatbot, shown_inline, wire
from app.pages.rank_board import board_html

MAX_ANSWERS = len(handlers.LETTERS)

SHORTCUTS_HELP = (
    "**Keys** (outside text fields; `Esc` leaves a field): "
    "pairwise **1** A better · **2** B better · **3** tie · **4** both bad — "
    "ranking **r** type the ranking, then `Enter` to submit · **0** all bad — "
    "**e** write a better answer · **c** copy the best answer into the editor (`Ctrl+Enter` submits from the editor) · "
    "**u** / **d** thumbs up / down · **k** skip · **f** flag · **n** next item · **g** guidelines"
)

SKIP_CHOICES = list(handlers.store.SKIP_REASONS)


TRUNCATED_MARK = "✂ cut off at the length limit"


def answer_label(answer: dict | None, letter: str) -> str:
    """An answer box's label: its letter, and a visible mark when the model was cut off."""
    if answer and answer.get("truncated"):
        return f"Answer {letter} — {TRUNCATED_MARK}"
    return f"Answer {letter}"


def suggestion_text(suggested: dict | None, pairwise: bool) -> str:
    """The reward model's suggestion as the page shows it: marked as a suggestion, with its scores."""
    if not suggested:
        return ""
    scores = " · ".join(f"{letter} {value:+.2f}" for letter, value in suggested["scores"])
    if pairwise:
        first = suggested["ranking"].split(" > ")[0]
        what = "no preference" if " = " in first else f"**{first}**"
    else:
        what = f"**{suggested['ranking']}** (already in the ranking box: `r` then Enter accepts it, typing replaces it)"
    return f"**Suggestion** from reward model {suggested['version']}: {what}. Scores: {scores}. Judge for yourself."


EMPTY_POLL_S = 3  # while nobody has an item, the page asks this often whether one is ready
READ_TAB_JS = "() => [localStorage.getItem('rankloop-tab') || 'annotate']"


def build(ctx, current_user):
    """Create the annotate tab's components and events inside the current Blocks."""
    view = gr.State(None)
    header = gr.Markdown(elem_id="annotate-header")
    with gr.Accordion("Guidelines", open=False, elem_id="guidelines-panel"):
        guidelines = gr.Markdown(elem_id="guidelines")
    # Shown as written (escaped, no markdown), like the answers: see prompt_for_chatbot.
    # opens at the start of the prompt (a long one would otherwise open scrolled to its end)
    prompt = gr.Chatbot(label="Prompt", height=240, elem_id="prompt", render_markdown=False, autoscroll=False)
    answers = []
    # wide cards, two to a row (side by side for a pair, 2 x 2 for four), stacked in a narrow
    # window; each grows with its answer and opens at its start
    # (markdown rendered, nothing active: common.answer_html)
    cards = []
    with gr.Row(equal_height=True, elem_id="answers"):
        for i, letter in enumerate(handlers.LETTERS):
            with gr.Column(min_width=440, visible=i < 2) as card:
                answers.append(gr.HTML(label=f"Answer {letter}", show_label=True, container=True, padding=True,
                                       elem_id=f"answer-{letter.lower()}", min_height=120, autoscroll=False))
            cards.append(card)
    suggestion = gr.Markdown(visible=False, elem_id="suggestion")  # the reward model's, marked as such
    with gr.Row(visible=True, elem_id="pairwise-controls") as pairwise_row:
        choose_a = gr.Button("A is better (1)", elem_id="choose-a", variant="primary")
        choose_b = gr.Button("B is better (2)", elem_id="choose-b", variant="primary")
        choose_tie = gr.Button("Tie (3)", elem_id="choose-tie")
        choose_bad = gr.Button("Both bad (4)", elem_id="choose-both-bad", variant="stop")
    board = gr.HTML(visible=False, elem_id="rank-board")  # drag and drop, with ties (app/pages/rank_board.py)
    with gr.Row(visible=False, elem_id="ranking-controls") as ranking_row:
        ranking = gr.Textbox(label="Ranking, best first ('>' between levels, '=' for ties) — Enter submits",
                             placeholder="e.g. B > A = C > D", elem_id="ranking", scale=4)
        submit_ranking = gr.Button("Submit ranking", elem_id="submit-ranking", variant="primary", scale=1)
        all_bad = gr.Button("All bad (0)", elem_id="all-bad", variant="stop", scale=1)
    # a refusal (an unreadable ranking, an item gone) is written here, beside the controls
    message = gr.Markdown(visible=False, elem_id="annotate-message")
    with gr.Row():
        thumbs_up = gr.CheckboxGroup(choices=["A", "B"], label="Thumbs up (u)", elem_id="thumbs-up")
        thumbs_down = gr.CheckboxGroup(choices=["A", "B"], label="Thumbs down (d)", elem_id="thumbs-down")
    with gr.Row():
        edited = gr.Textbox(label="Write a better answer (optional; stored as the best answer)", lines=4,
                            elem_id="edited", scale=4)
        copy_best = gr.Button("Copy best answer (c)", elem_id="copy-best", scale=1)
    with gr.Row():
        skip_reason = gr.Dropdown(SKIP_CHOICES, value=SKIP_CHOICES[0], label="Skip reason", elem_id="skip-reason")
        skip_button = gr.Button("Skip (k)", elem_id="skip")
        flag_letters = gr.CheckboxGroup(choices=["A", "B"], label="Flag as unsafe (none ticked: the prompt)",
                                        elem_id="flag-letters")
        flag_button = gr.Button("Flag (f)", elem_id="flag", variant="stop")
        next_button = gr.Button("Next item (n)", elem_id="next-item")
    gr.Markdown(SHORTCUTS_HELP)
    history_parts = build_history(ctx, current_user)
    # while the queue is dry the page asks by itself, and deals the next item once one is ready
    empty_poll = gr.Timer(EMPTY_POLL_S, active=False)
    shown_tab = gr.Textbox(visible=False, elem_id="annotate-shown-tab")
    actions = [choose_a, choose_b, choose_tie, choose_bad, submit_ranking, all_bad, copy_best, skip_button,
               flag_button]

    def render(view_value, progress, note=""):
        shown = view_value["answers"] if view_value else []
        k = len(shown)
        letters = [a["letter"] for a in shown]
        if view_value:
            head = (f"**Item {view_value['item_id']}** ({view_value['mode']}, {k} answers) · "
                    f"your judgements: {progress['done']} (today {progress['today']}) · ready: {progress['ready']}")
        else:
            head = (f"**No item is waiting for you.** {progress['pending']} being generated; the next one "
                    f"appears here by itself as soon as it is ready.")
        pairwise = bool(view_value) and k == 2 and view_value["mode"] == "pairwise"
        suggested = (view_value or {}).get("suggestion")
        return [
            view_value,
            head + (f"\n\n{note}" if note else ""),
            prompt_for_chatbot(view_value["messages"] if view_value else []),
            *[gr.update(value=answer_html(shown[i]["text"]) if i < k else "",
                        label=answer_label(shown[i] if i < k else None, handlers.LETTERS[i]))
              for i in range(MAX_ANSWERS)],
            *[gr.update(visible=i < k or (not view_value and i < 2)) for i in range(MAX_ANSWERS)],
            gr.update(visible=pairwise or not view_value),
            gr.update(visible=bool(view_value) and not pairwise),
            suggested["ranking"] if suggested and not pairwise else "",  # ranking: the suggestion, to accept or change
            "",  # edited
            gr.update(choices=letters, value=[]),
            gr.update(choices=letters, value=[]),
            gr.update(choices=letters, value=[]),
            *[gr.update(interactive=bool(view_value)) for _ in actions],
            gr.Timer(active=not view_value),
            gr.update(value=suggestion_text(suggested, pairwise), visible=bool(suggested)),
            gr.update(value=board_html(shown, suggested["ranking"] if suggested else "") if view_value else "",
                      visible=bool(view_value) and not pairwise),
        ]

    outputs = [view, header, prompt, *answers, *cards, pairwise_row, ranking_row, ranking, edited,
               thumbs_up, thumbs_down, flag_letters, *actions, empty_poll, suggestion, board]

    def load(request: gr.Request):
        def run():
            user = current_user(request)
            return render(handlers.next_item(ctx, user), handlers.annotator_progress(ctx, user))
        return guard(run)

    def poll(tab, request: gr.Request):
        def run():
            user = current_user(request)
            progress = handlers.annotator_progress(ctx, user)
            if tab != "annotate" or not progress["ready"]:
                return [gr.skip() for _ in outputs]
            return render(handlers.next_item(ctx, user), progress)
        return guard(run)

    def after_submit(user, result):
        note = f"Saved judgement {result['judgement_id']} ({result['pairs']} pair(s))."
        return render(handlers.next_item(ctx, user), handlers.annotator_progress(ctx, user), note)

    def make_pairwise(choice):
        def submit(view_value, edited_text, up, down, request: gr.Request):
            def run():
                user = current_user(request)
                result = handlers.submit_pairwise(ctx, user, view_value, choice, edited=edited_text,
                                                  thumbs_up=up, thumbs_down=down)
                return after_submit(user, result)
            return guard(run)
        submit.__name__ = f"submit_{choice}"
        return submit

    def submit_ranked(view_value, ranking_text, edited_text, up, down, request: gr.Request):
        def run():
            user = current_user(request)
            result = handlers.submit_ranking(ctx, user, view_value, ranking_text, edited=edited_text,
                                             thumbs_up=up, thumbs_down=down)
            return after_submit(user, result)
        return guard(run)

    def submit_all_bad(view_value, edited_text, up, down, request: gr.Request):
        def run():
            user = current_user(request)
            result = handlers.submit_ranking(ctx, user, view_value, "", all_bad=True, edited=edited_text,
                                             thumbs_up=up, thumbs_down=down)
            return after_submit(user, result)
        return guard(run)

    def do_skip(view_value, reason, request: gr.Request):
        def run():
            user = current_user(request)
            handlers.skip(ctx, user, view_value, reason)
            return render(handlers.next_item(ctx, user), handlers.annotator_progress(ctx, user),
                          f"Skipped ({reason}).")
        return guard(run)

    def do_flag(view_value, letters, reason, request: gr.Request):
        def run():
            n = handlers.flag(ctx, current_user(request), view_value, letters, reason="unsafe")
            shown = ", ".join(str(letter).strip().upper()[:1] for letter in letters)  # not the raw API input
            gr.Info(f"Flagged {shown or 'the prompt'} ({n}).")
        return guard(run)

    def do_copy_best(view_value, ranking_text, request: gr.Request):
        def run():
            handlers.whoami(current_user(request))
            return handlers.best_answer_text(view_value, ranking_text)
        return guard(run)

    # a refusal is written beside the controls and leaves the page as it was (common.wire)
    extra = [edited, thumbs_up, thumbs_down]
    shown = {"progress_on": [header]}
    for button, choice in ((choose_a, "A"), (choose_b, "B"), (choose_tie, "tie"), (choose_bad, "both_bad")):
        wire(button.click, make_pairwise(choice), [view, *extra], outputs, message, f"submit_{choice}", **shown)
    wire(submit_ranking.click, submit_ranked, [view, ranking, *extra], outputs, message, "submit_ranking", **shown)
    wire(ranking.submit, submit_ranked, [view, ranking, *extra], outputs, message, **shown)
    wire(all_bad.click, submit_all_bad, [view, *extra], outputs, message, "submit_all_bad", **shown)
    wire(skip_button.click, do_skip, [view, skip_reason], outputs, message, "skip", **shown)
    wire(flag_button.click, do_flag, [view, flag_letters, skip_reason], [], message, "flag")
    wire(copy_best.click, do_copy_best, [view, ranking], [edited], message, "copy_best")
    wire(next_button.click, load, None, outputs, message, "next_item", **shown)
    empty_poll.tick(shown_inline(poll, len(outputs)), [shown_tab], [*outputs, message], js=READ_TAB_JS,
                    api_visibility="private", show_progress="hidden")
    return {"load": load, "outputs": outputs, "guidelines": guidelines, "view": view, **history_parts}


HISTORY_HEADERS = ["judgement", "submitted", "prompt", "your judgement", "can change until"]


def history_rows(entries: list[dict]) -> list[list]:
    rows = []
    for e in entries:
        prompt = e["prompt"] if len(e["prompt"]) <= 90 else e["prompt"][:89] + "…"
        until = e["open_until"].replace("T", " ").rstrip("Z") + " UTC" if e["open_until"] else f"closed: {e['why_closed']}"
        rows.append([e["judgement_id"], e["submitted_at"][:19].replace("T", " "), prompt, e["ranking"], until])
    return rows


def reopen_html(reopened: dict) -> str:
    """The reopened item as it was judged: the prompt, the answers in the letters shown then."""
    import html

    turns = [m for m in reopened["messages"] if m["role"] == "user"]
    parts = [f'<div class="rankloop-reopen-prompt"><strong>Judgement {reopened["judgement_id"]}</strong> · '
             f'you said <code>{html.escape(reopened["current"])}</code><br>'
             f'{html.escape(turns[-1]["content"] if turns else "", quote=False)}</div>']
    if reopened.get("written"):
        parts.append("<p><em>Your written answer stays first:</em></p>" + answer_html(reopened["written"]))
    for answer in reopened["answers"]:
        parts.append(f'<h4>Answer {answer["letter"]}</h4>{answer_html(answer["text"])}')
    return "\n".join(parts)


def build_history(ctx, current_user):
    """"Your recent judgements": the last ones with what was said, and a way to change one
    within the project's window (annotations/judgement_history.py)."""
    with gr.Accordion("Your recent judgements — reopen one to change it", open=False,
                      elem_id="history-panel") as panel:
        history = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False, wrap=True, elem_id="history")
        with gr.Row():
            reopen_id = gr.Number(label="Judgement number", precision=0, minimum=1, elem_id="reopen-id")
            reopen_button = gr.Button("Reopen", elem_id="reopen")
            refresh = gr.Button("Refresh the list", elem_id="history-refresh")
        note = gr.Markdown(elem_id="history-note")
        message = gr.Markdown(visible=False, elem_id="history-message")
        reopened = gr.State(None)
        with gr.Group(visible=False, elem_id="reopen-panel") as reopen_panel:
            shown = gr.HTML(elem_id="reopen-view")
            with gr.Row():
                ranking = gr.Textbox(label="New judgement, best first (B > A = C, or 'both bad') — Enter saves",
                                     elem_id="reopen-ranking", scale=3)
                save = gr.Button("Save the change", variant="primary", elem_id="reopen-save", scale=1)
                cancel = gr.Button("Cancel", elem_id="reopen-cancel", scale=1)

    def show(request: gr.Request):
        def run():
            return history_rows(handlers.recent_judgements(ctx, current_user(request)))
        return guard(run)

    def do_reopen(judgement_id, request: gr.Request):
        def run():
            value = handlers.reopen_judgement(ctx, current_user(request), judgement_id)
            current = value["current"]
            return [value, reopen_html(value), "" if current.startswith("both bad") else current,
                    gr.update(visible=True), ""]
        return guard(run)

    def do_revise(value, ranking_text, request: gr.Request):
        def run():
            user = current_user(request)
            result = handlers.revise_judgement(ctx, user, value, ranking_text)
            done = (f"Changed judgement {result['previous_id']}: it is now judgement {result['judgement_id']} "
                    f"({result['pairs']} pair(s), derived again).")
            return [None, "", "", gr.update(visible=False), done,
                    history_rows(handlers.recent_judgements(ctx, user))]
        return guard(run)

    def close():
        return [None, "", "", gr.update(visible=False), ""]

    opened = [reopened, shown, ranking, reopen_panel, note]
    wire(panel.expand, show, None, [history], message, "recent_judgements")
    wire(refresh.click, show, None, [history], message)
    wire(reopen_button.click, do_reopen, [reopen_id], opened, message, "reopen_judgement")
    wire(save.click, do_revise, [reopened, ranking], [*opened, history], message, "revise_judgement")
    wire(ranking.submit, do_revise, [reopened, ranking], [*opened, history], message)
    cancel.click(close, None, opened, api_visibility="private", show_progress="hidden")
    return {"history": history}
