"""The chat and arena tabs: wiring only (logic in `app.chat_and_arena`)."""

from __future__ import annotations

import gradio as gr

from annotations.arena import PROVISIONAL_BATTLES
from annotations.errors import AnnotationsError
from app import chat_and_arena
from app.pages.common import endpoint, guard, visible_error, wire


def _decoding_controls():
    with gr.Accordion("Decoding", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature")
            top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top_p")
            repetition_penalty = gr.Slider(1, 2, value=1.1, step=0.05, label="repetition_penalty")
            max_new_tokens = gr.Slider(8, 512, value=160, step=8, label="max new tokens")
    return [temperature, top_p, repetition_penalty, max_new_tokens]


def _sampling(t, p, r, m):
    return {"temperature": t, "top_p": p, "repetition_penalty": r, "max_new_tokens": int(m)}


def build_chat(ctx, current_user):
    conversation = gr.State(None)  # the id of the conversation the server stores; its messages stay there
    with gr.Row():
        version = gr.Dropdown([chat_and_arena.LIVE], value=chat_and_arena.LIVE, label="Version", elem_id="chat-version", scale=1)
        status = gr.Markdown(elem_id="chat-status")
    decoding = _decoding_controls()
    chatbot = gr.Chatbot(label="Chat (thumbs up / down on a reply rates it)", height=420, elem_id="chatbot")
    with gr.Row():
        message = gr.Textbox(placeholder="Message (Enter sends)", show_label=False, elem_id="chat-input", scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
    with gr.Row():
        new_chat = gr.Button("New chat", elem_id="chat-new")
        to_annotation = gr.Button("Send to annotation", elem_id="chat-to-annotation")

    def respond(history, text, conv, version_name, t, p, r, m, request: gr.Request):
        user = current_user(request)
        conv = conv or chat_and_arena.new_conversation()
        shown = list(history or []) + [{"role": "user", "content": text}]
        try:
            for out in chat_and_arena.chat_stream(ctx, user, text, conversation=conv, version=version_name,
                                        sampling=_sampling(t, p, r, m)):
                reply, produced_by = out[0], out[1]
                done = len(out) == 3
                yield (shown + [{"role": "assistant", "content": reply}], "", conv,
                       f"Answered by **{produced_by}** — rate it with 👍 / 👎" if done
                       else f"Writing… (**{produced_by}**)")
        except (AnnotationsError, ValueError, KeyError) as e:
            raise visible_error(str(e).strip("'\"")) from None

    def rate(history, conv, data: gr.LikeData, request: gr.Request):
        def run():
            user = current_user(request)
            chat_and_arena._annotator(user)  # the role first, before reading anything else the request sent
            index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
            if not isinstance(index, int) or not isinstance(history, list) or not 0 <= index < len(history):
                raise chat_and_arena.InvalidInput("that message is not one of your stored replies in this conversation")
            position = sum(1 for m in history[: index + 1] if isinstance(m, dict) and m.get("role") == "assistant") - 1
            liked = data.liked if data.liked in (True, False) else None
            chat_and_arena.rate_shown_reply(ctx, user, conv, position, data.value, liked)
            return ("Rated 👍: thank you." if liked else "Rated 👎: thank you." if liked is False
                    else "Rating removed.")
        return guard(run)

    def annotate(conv, request: gr.Request):
        def run():
            item_id = chat_and_arena.send_to_annotation(ctx, current_user(request), conv)
            return f"Queued as annotation item {item_id}."
        return guard(run)

    def reset():
        return [], None, ""

    inputs = [chatbot, message, conversation, version, *decoding]
    outputs = [chatbot, message, conversation, status]
    send.click(respond, inputs, outputs, api_name=endpoint("chat", "annotator"))
    message.submit(respond, inputs, outputs, api_visibility="undocumented")
    chatbot.like(rate, [chatbot, conversation], status, api_name=endpoint("rate_reply", "annotator"))
    to_annotation.click(annotate, [conversation], status, api_name=endpoint("send_to_annotation", "annotator"))
    new_chat.click(reset, None, [chatbot, conversation, status], api_visibility="private")
    # the chatbot's own clear button starts a new conversation too (the old one stays stored, rated as it was)
    chatbot.clear(reset, None, [chatbot, conversation, status], api_visibility="private")

    return {"version": version}


def build_arena(ctx, current_user):
    battle = gr.State(None)
    gr.Markdown("Two versions answer the same prompt; you see them blind, vote, and then learn which was which. "
                "By default the live version meets its parent.")
    notice = gr.Markdown(visible=False, elem_id="arena-notice")  # the empty state of a fresh install
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", elem_id="arena-prompt", scale=4)
        random_prompt = gr.Button("Random held-out prompt", elem_id="arena-random", scale=1)
    with gr.Row():
        version_a = gr.Dropdown([chat_and_arena.LIVE], value=chat_and_arena.LIVE, label="Version 1 (live: live vs parent)")
        version_b = gr.Dropdown([chat_and_arena.LIVE], value=chat_and_arena.LIVE, label="Version 2")
        fight = gr.Button("Battle", variant="primary", elem_id="arena-battle")
    message = gr.Markdown(visible=False, elem_id="arena-message")
    decoding = _decoding_controls()
    with gr.Row():
        answer_a = gr.Textbox(label="Answer A", lines=10, interactive=False, elem_id="arena-a")
        answer_b = gr.Textbox(label="Answer B", lines=10, interactive=False, elem_id="arena-b")
    with gr.Row():
        votes = {w: gr.Button(label, elem_id=f"arena-vote-{w.lower()}", interactive=False) for w, label in
                 (("A", "A is better"), ("B", "B is better"), ("tie", "Tie"), ("both_bad", "Both bad"))}
    reveal = gr.Markdown(elem_id="arena-reveal")
    gr.Markdown("### Leaderboard (Bradley–Terry, Elo scale, 95% interval)\nA version with fewer than "
                f"{PROVISIONAL_BATTLES} battles is marked *provisional*: its interval is wide and its rank may change.")
    refresh = gr.Button("Refresh leaderboard", elem_id="arena-refresh")
    board = gr.Dataframe(headers=["version", "score", "95% interval", "battles", "wins", "ties", "note"],
                         interactive=False, elem_id="arena-leaderboard")
    parents = gr.Dataframe(headers=["version", "parent", "votes", "win rate", "95% interval", "note"],
                           interactive=False, label="Human win rate over parent")
    vote_buttons = list(votes.values())

    def arena_state(user):
        """[notice, battle button]: the empty state while there is nothing to compare."""
        waits = chat_and_arena.arena_notice(ctx, user)
        return [gr.update(value=waits or "", visible=bool(waits)), gr.update(interactive=not waits)]

    def do_random(request: gr.Request):
        return guard(lambda: chat_and_arena.random_prompt(ctx, current_user(request)))

    def do_battle(text, a, b, t, p, r, m, request: gr.Request):
        def run():
            result = chat_and_arena.start_battle(ctx, current_user(request), text, a, b, _sampling(t, p, r, m))
            return (result["battle_id"], result["answers"][0], result["answers"][1], "Vote to reveal the versions.",
                    *[gr.update(interactive=True) for _ in vote_buttons])
        return guard(run)

    def make_vote(winner):
        def do_vote(battle_id, request: gr.Request):
            def run():
                result = chat_and_arena.vote(ctx, current_user(request), battle_id, winner)
                return (f"You voted **{winner}**. A was **{result['version_a']}**, B was **{result['version_b']}**."
                        + (" Stored as a preference pair." if result["pair_id"] else ""),
                        *[gr.update(interactive=False) for _ in vote_buttons])  # one vote per battle
            return guard(run)
        do_vote.__name__ = f"vote_{winner}"
        return do_vote

    def do_refresh(request: gr.Request):
        def run():
            rows, over_parent = chat_and_arena.leaderboard(ctx, current_user(request))
            board_rows = [[r["version"], r["score"], "fixed (anchor)" if r["anchor"] else f"{r['ci_low']} – {r['ci_high']}",
                           r["battles"], r["wins"], r["ties"], "provisional" if r["provisional"] else ""] for r in rows]
            parent_rows = [[r["version"], r["parent"], r["battles"], r["win_rate"], f"{r['ci_low']} – {r['ci_high']}",
                            "too few to trust" if r["too_few"] else ""] for r in over_parent]
            return board_rows, parent_rows
        return guard(run)

    # refusals are written beside the controls, and the page stays as it was (common.wire)
    wire(random_prompt.click, do_random, None, [prompt], message, "arena_random_prompt")
    wire(fight.click, do_battle, [prompt, version_a, version_b, *decoding],
         [battle, answer_a, answer_b, reveal, *vote_buttons], message, "arena_battle", progress_on=[reveal])
    for winner, button in votes.items():
        wire(button.click, make_vote(winner), [battle], [reveal, *vote_buttons], message, f"arena_vote_{winner}")
    wire(refresh.click, do_refresh, None, [board, parents], message, "arena_leaderboard")
    return {"version_a": version_a, "version_b": version_b, "leaderboard": (do_refresh, [board, parents]),
            "state": arena_state, "state_outputs": [notice, fight]}
