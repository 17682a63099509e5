"""Admin tabs for training: start and watch rounds, versions, dashboard. Wiring only (logic in
`app.round_admin`); each handler re-checks the admin role on the server."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app import round_admin
from app.pages.common import endpoint, guard, wire

ROUND_HEADERS = ["id", "method", "status", "progress", "version", "pairs", "held-out", "created"]
VERSION_HEADERS = ["version", "kind", "state", "parent", "method", "round", "data", "pairs", "metrics", "config",
                   "created"]
GATE_FIELDS = ("auto_promote", "confidence", "min_prompts", "require_human_votes", "human_share", "min_human_votes",
               "gate_items")
GATE_HELP = """### Promotion gate
A new policy version goes live by itself only when it is **clearly** better than the live one. Its round
lets both versions answer the same randomly drawn held-out prompts (88 by default) and a reward model
judges each pair; ties count half. The gate passes when the **lower bound** of the win rate, at the
confidence below, is above 0.5: a version that is no better than the live one then passes at most 5% of
the time (at 95%), while one that truly wins 65% of the time passes about 85% of the time. With too few
prompts it decides nothing. A policy trained against the judging reward model (PPO) is never judged by it.
With *require human votes*, annotators get blind candidate-vs-live pairs in their queue and their votes
decide instead (arena votes count too)."""
DASHBOARD_SERIES = {"heldout_accuracy": "RM accuracy", "heldout_implicit_accuracy": "implicit acc.",
                    "win_rate_vs_parent": "win rate", "kl_to_base": "KL"}
VERSION_STATES = """**States.** A round registers its version as a **candidate**: kept, not serving (the arena and
chat can use it). One version of each kind is **live**: the policy answers new items, chat and the API;
the reward model judges and suggests. Promoting a version makes it live and **retires** the one before;
a retired version can be promoted again at any time (*Roll back* does that for the live policy's parent).
Nothing is deleted. Promote and Roll back say what they will do and wait for *Yes, do it*."""
CURVE_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "score", "kl", "policy_loss", "value_loss")


def _curves_frame(curves):
    rows = [c for c in curves if c["metric"] in CURVE_METRICS or c["metric"].endswith("loss")]
    return pd.DataFrame(rows or [{"step": 0, "metric": "loss", "value": float("nan")}])


def build(ctx, current_user):
    with gr.Tab("Training"):
        gr.Markdown("### Start a round\nThe round runs in the training worker, one at a time; the queue survives "
                    "restarts. Every setting of the chosen method is below with its default; change any, and a "
                    "value that cannot work is refused beside its field.")
        with gr.Row():
            method = gr.Radio(list(round_admin.METHODS), value="dpo", label="Method", elem_id="round-method")
            data = gr.Radio(["all", "new"], value="all", label="Data: all train pairs, or new since the last round")
        form = gr.Column(elem_id="round-form")
        with gr.Accordion("Advanced: settings as YAML (`key: value` lines, over the fields above)", open=False,
                          elem_id="round-advanced"):
            overrides = gr.Code(label="Overrides (YAML)", language="yaml", value="", elem_id="round-overrides")
        start = gr.Button("Queue round", variant="primary", elem_id="round-start")
        start_message = gr.Markdown(visible=False, elem_id="round-start-message")  # a bad key or value, named
        start_status = gr.Markdown(elem_id="round-start-status")

        gr.Markdown("### Rounds")
        rounds = gr.Dataframe(headers=ROUND_HEADERS, interactive=False, elem_id="rounds-table")
        with gr.Row():
            round_id = gr.Number(label="Round (empty: newest)", precision=0, elem_id="round-id")
            cancel = gr.Button("Cancel round", variant="stop", elem_id="round-cancel")
        progress = gr.HTML(elem_id="round-progress")
        # a line needs two points: a round of one or two logged steps is drawn as points
        curves = gr.LinePlot(x="step", y="value", color="metric", label="Training curves", elem_id="round-curves",
                             height=280)
        points = gr.ScatterPlot(x="step", y="value", color="metric", label="Training curves (few steps: points)",
                                elem_id="round-points", height=280, visible=False)
        log_tail = gr.Code(label="Log (last lines)", language=None, elem_id="round-log")
        figures = gr.Markdown(elem_id="round-figures")  # the evaluation, each figure with its interval and n
        with gr.Accordion("All metrics (raw)", open=False):
            metrics = gr.JSON(label="Metrics", elem_id="round-metrics")
        timer = gr.Timer(2.0, active=False)

    with gr.Tab("Versions"):
        gr.Markdown(VERSION_STATES, elem_id="version-states")
        versions = gr.Dataframe(headers=VERSION_HEADERS, interactive=False, elem_id="versions-table")
        with gr.Row():
            # picked from the registered versions (a name typed through the API is checked on the server)
            version = gr.Dropdown([], label="Version", elem_id="version-name", allow_custom_value=True)
            gate_check = gr.Button("Check the gate", elem_id="version-gate")
            promote = gr.Button("Promote…", variant="primary", elem_id="version-promote")
            rollback = gr.Button("Roll back the live policy to its parent…", elem_id="version-rollback")
        with gr.Group(visible=False, elem_id="version-confirm") as confirm_box:
            confirm_text = gr.Markdown(elem_id="version-confirm-text")
            with gr.Row():
                confirm = gr.Button("Yes, do it", variant="primary", elem_id="version-confirm-yes")
                dismiss = gr.Button("Cancel", elem_id="version-confirm-no")
        pending = gr.State(None)  # ("promote", name) or ("rollback", None): what the confirmation is for
        version_message = gr.Markdown(visible=False, elem_id="version-message")
        version_status = gr.Markdown(elem_id="version-status")
        gr.Markdown(GATE_HELP)
        with gr.Row():
            auto = gr.Checkbox(label="Promote automatically when the gate passes", elem_id="gate-auto")
            confidence = gr.Slider(0.5, 0.99, step=0.01, label="Confidence (one-sided)", elem_id="gate-confidence")
            min_prompts = gr.Number(label="Fewest compared prompts to decide on", precision=0,
                                    elem_id="gate-min-prompts")
        with gr.Row():
            human = gr.Checkbox(label="Require human votes (blind candidate-vs-live pairs in the annotation queue)",
                                elem_id="gate-human")
            human_share = gr.Slider(0.05, 1, step=0.05, label="Share of items dealt that are gate pairs",
                                    elem_id="gate-human-share")
            min_human = gr.Number(label="Fewest human votes to decide on", precision=0, elem_id="gate-min-human")
            gate_items = gr.Number(label="Gate pairs queued per candidate", precision=0, elem_id="gate-items")
            save_gate = gr.Button("Save gate", elem_id="gate-save")
        gate_status = gr.Markdown(elem_id="gate-status")

    with gr.Tab("Dashboard"):
        dashboard_refresh = gr.Button("Refresh dashboard", elem_id="dashboard-refresh")
        summary = gr.Markdown(elem_id="dashboard-summary")
        round_table = gr.Dataframe(headers=["round", "method", "version", "pairs",
                                            "held-out figures (95% interval, n)"], interactive=False)
        across = gr.LinePlot(x="round", y="value", color="metric", label="Across rounds (held-out figures; the "
                             "table above gives each with its interval and n)", height=260, elem_id="dashboard-plot")
        throughput = gr.Dataframe(headers=["annotator", "day", "judgements", "mean decision ms"], interactive=False)
        gr.Markdown("**Do people agree with the reward model's suggestions?** Of the answer pairs people ordered, "
                    "the share the suggestion ordered the same way: a running estimate of the live reward model's "
                    "accuracy on fresh data (high acceptance of suggestions unchanged can inflate it; a blind "
                    "study, with suggestions off, is the clean measure).")
        suggestion_table = gr.Dataframe(headers=SUGGESTION_HEADERS, interactive=False, elem_id="dashboard-suggestions")

    def do_start(method_name, data_choice, text, request: gr.Request):
        def run():
            new_id = round_admin.queue_round(ctx, current_user(request), method_name, text, data=data_choice)
            return f"Queued round {new_id}.", round_admin.rounds_table(ctx, current_user(request)), new_id
        return guard(run)

    with form:
        round_form_renderer(ctx, current_user, method, data, overrides, start, start_message, start_status, rounds,
                            round_id)

    def do_refresh(selected, request: gr.Request):
        def run():
            user = current_user(request)
            detail = round_admin.round_detail(ctx, user, selected)
            table = round_admin.rounds_table(ctx, user)
            r = detail["round"]
            if r is None:
                return table, "No rounds yet.", *_curves(_curves_frame([])), "", "", {}
            percent = 100 * (r["progress"] or 0)
            bar = (f"<div><b>Round {r['id']}</b> ({r['method']}) — <b>{r['status']}</b> — {percent:.0f}%"
                   f"<progress value='{percent:.0f}' max='100' style='width:100%'></progress>"
                   + (f"<div style='color:#b91c1c'>Error: {_escape(r['error'])}</div>" if r["error"] else "")
                   + "</div>")
            shown = {k: v for k, v in r["metrics"].items() if k != "samples"}
            return (table, bar, *_curves(_curves_frame(detail["curves"])), r["log_tail"] or "",
                    round_figures(r["metrics"]), shown)
        return guard(run)

    def do_cancel(selected, request: gr.Request):
        return guard(lambda: round_admin.cancel_round(ctx, current_user(request), selected))

    def do_versions(request: gr.Request):
        def run():
            user = current_user(request)
            gate = round_admin.gate_settings(ctx, user)
            return (round_admin.versions_table(ctx, user), *version_choices(user), *[gate[key] for key in GATE_FIELDS])
        return guard(run)

    def do_promote(name, request: gr.Request):
        def run():
            user = current_user(request)
            return round_admin.promote(ctx, user, name), round_admin.versions_table(ctx, user)
        return guard(run)

    def ask_promote(name, request: gr.Request):
        def run():
            question = round_admin.promotion_question(ctx, current_user(request), name)
            return gr.update(visible=True), question, ("promote", (name or "").strip())
        return guard(run)

    def ask_rollback(request: gr.Request):
        def run():
            return gr.update(visible=True), round_admin.rollback_question(ctx, current_user(request)), ("rollback", None)
        return guard(run)

    def do_confirmed(what, request: gr.Request):
        def run():
            if not what:
                raise round_admin.InvalidInput("nothing to confirm: press Promote or Roll back first")
            action, name = what
            status, table = do_promote(name, request) if action == "promote" else do_rollback(request)
            return gr.update(visible=False), None, status, table, *version_choices(current_user(request))
        return guard(run)

    def version_choices(user):
        names = [row[0] for row in round_admin.versions_table(ctx, user)]
        return [gr.update(choices=names)]

    def do_check_gate(name, request: gr.Request):
        def run():
            return gate_verdict(round_admin.check_gate(ctx, current_user(request), name))
        return guard(run)

    def do_rollback(request: gr.Request):
        def run():
            user = current_user(request)
            return round_admin.rollback(ctx, user), round_admin.versions_table(ctx, user)
        return guard(run)

    def do_save_gate(auto_value, confidence_value, prompts_value, human_value, share_value, votes_value, items_value,
                     request: gr.Request):
        def run():
            settings = dict(zip(GATE_FIELDS, (auto_value, confidence_value, prompts_value, human_value, share_value,
                                              votes_value, items_value)))
            for key in ("min_prompts", "min_human_votes", "gate_items"):
                settings[key] = int(settings[key] or 0)
            saved = round_admin.save_gate_settings(ctx, current_user(request), **settings)
            return "Gate saved: " + ("promotes automatically" if saved["auto_promote"] else "never promotes by itself") \
                + f" at {saved['confidence']:.0%} confidence from at least {saved['min_prompts']} prompts" \
                + (f"; people decide, from at least {saved['min_human_votes']} votes" if saved["require_human_votes"]
                   else "") + "."
        return guard(run)

    def do_dashboard(request: gr.Request):
        def run():
            d = round_admin.dashboard(ctx, current_user(request))
            a = d["agreement"]
            text = (f"**{d['pairs_total']}** preference pairs · **{a['judgements'] or 0}** judgements · "
                    f"agreement {_fmt(a['pairwise_agreement'])} · Krippendorff's alpha {_fmt(a['alpha'])}")
            table = [[r["round"], r["method"], r["version"], r["pairs"], r["figures"]] for r in d["rounds"]]
            # short names: the plot's legend has little room, and long ones were cut off
            points = [{"round": r["round"], "metric": name, "value": r[key]} for r in d["rounds"]
                      for key, name in DASHBOARD_SERIES.items() if isinstance(r.get(key), (int, float))]
            frame = pd.DataFrame(points or [{"round": 0, "metric": "win rate", "value": float("nan")}])
            return text, table, frame, d["throughput"], suggestion_rows(d["suggestions"])
        return guard(run)

    # the API's queue_round takes the method, the data choice and YAML; the page's button goes
    # through the typed form (round_form above)
    api_start = gr.Button(visible=False, elem_id="api-queue-round")
    api_start.click(do_start, [method, data, overrides], [start_status, rounds, round_id],
                    api_name=endpoint("queue_round", "admin"))
    refresh_outputs = [rounds, progress, curves, points, log_tail, figures, metrics]
    timer.tick(do_refresh, round_id, refresh_outputs, api_name=endpoint("round_status", "admin"))
    round_id.submit(do_refresh, round_id, refresh_outputs, api_visibility="private")
    cancel.click(do_cancel, round_id, start_status, api_name=endpoint("cancel_round", "admin"))
    # on the page, Promote and Roll back ask first (what goes live, what retires); the API acts at once
    wire(promote.click, ask_promote, version, [confirm_box, confirm_text, pending], version_message)
    wire(rollback.click, ask_rollback, None, [confirm_box, confirm_text, pending], version_message)
    wire(confirm.click, do_confirmed, pending, [confirm_box, pending, version_status, versions, version],
         version_message)
    dismiss.click(lambda: (gr.update(visible=False), None), None, [confirm_box, pending], api_visibility="private")
    api_promote, api_rollback = gr.Button(visible=False), gr.Button(visible=False)
    api_promote.click(do_promote, version, [version_status, versions], api_name=endpoint("promote", "admin"))
    api_rollback.click(do_rollback, None, [version_status, versions], api_name=endpoint("rollback", "admin"))
    wire(gate_check.click, do_check_gate, version, version_status, version_message, "check_gate", role="admin")
    gate_inputs = [auto, confidence, min_prompts, human, human_share, min_human, gate_items]
    save_gate.click(do_save_gate, gate_inputs, gate_status, api_name=endpoint("save_gate", "admin"))
    dashboard_refresh.click(do_dashboard, None, [summary, round_table, across, throughput, suggestion_table],
                            api_name=endpoint("dashboard", "admin"))

    def on_admin_load(request: gr.Request):
        """Values the training tabs show when an admin opens the page (and the timer starts)."""
        return [*do_versions(request), gr.Timer(active=True)]

    return on_admin_load, [versions, version, *gate_inputs, timer]


def round_form_renderer(ctx, current_user, method, data, overrides, start, start_message, start_status, rounds,
                        round_id):
    """The round form, drawn again for each method chosen (gr.render); its Queue button's
    page event is bound here, to the fields of the form on screen."""
    @gr.render(inputs=[method])
    def round_form(method_name):
        """A typed field per config key of the chosen method (round keys first), each with its
        help and default, and a message line under it for a value that cannot work."""
        specs = round_admin.form_fields(method_name or "dpo")
        controls, notes, names = [], [], []  # in the order drawn
        for section, title in (("method", f"{method_name} settings"), ("round", "Round settings (data, parent, "
                                                                               "evaluation, processes)")):
            with gr.Accordion(title, open=section == "method"):
                with gr.Row(equal_height=False):
                    for spec in (s for s in specs if s["section"] == section):
                        with gr.Column(min_width=260):
                            controls.append(_field(spec))
                            names.append(spec["name"])
                            notes.append(gr.Markdown(visible=False, elem_id=f"round-field-{spec['name']}-message",
                                                     elem_classes=["rankloop-field-message"]))

        def start_from_form(request: gr.Request, method_v, data_v, text_v, *values):
            hidden = [gr.update(value="", visible=False) for _ in names]
            try:
                changed, errors = round_admin.form_values(method_v, dict(zip(names, values)))
                if errors:
                    marked = [gr.update(value=f"⚠ {errors[n]}", visible=True) if n in errors else
                              gr.update(value="", visible=False) for n in names]
                    return [gr.skip(), gr.skip(), gr.skip(), gr.update(
                        value=f"⚠ {len(errors)} setting(s) cannot work ({', '.join(errors)}): see the message under "
                              "each.", visible=True),
                        *marked]
                user = current_user(request)
                new_id = guard(lambda: round_admin.queue_round(ctx, user, method_v, text_v, data=data_v,
                                                               fields=changed))
            except gr.Error as e:
                return [gr.skip(), gr.skip(), gr.skip(), gr.update(value=f"⚠ {e.message}", visible=True), *hidden]
            summary = ", ".join(f"{k} = {v}" for k, v in changed.items()) or "all defaults"
            return [f"Queued round {new_id} ({summary}).", round_admin.rounds_table(ctx, user), new_id,
                    gr.update(value="", visible=False), *hidden]

        start.click(start_from_form, [method, data, overrides, *controls],
                    [start_status, rounds, round_id, start_message, *notes], api_visibility="private",
                    show_progress="hidden")


def _field(spec: dict):
    """The form control for one config key."""
    label, info, key = spec["name"], spec["help"] or None, f"round-field-{spec['name']}"
    default = round_admin.shown_default(spec)
    if spec["kind"] == "bool":
        return gr.Checkbox(value=bool(default), label=label, info=info, elem_id=key, interactive=True)
    if spec["kind"] in ("int", "float"):
        return gr.Number(value=default, label=label, info=info, elem_id=key, interactive=True,
                         precision=0 if spec["kind"] == "int" else None)
    return gr.Textbox(value=default, label=label, info=info, elem_id=key, max_lines=1, interactive=True)


def _curves(frame):
    """(line plot update, point plot update): lines once every metric has two steps or more."""
    few = frame.empty or frame.groupby("metric")["step"].nunique().max() < 2
    return gr.update(value=frame, visible=not few), gr.update(value=frame, visible=few)


def round_figures(metrics: dict) -> str:
    """A round's evaluation in words: each figure with its 95% interval and n (align.evaluate)."""
    from align.evaluate import figures

    rows = figures(metrics)
    if not rows:
        return "*No held-out figures yet.*"
    return "| figure | value (95% interval, n) |\n|---|---|\n" + "\n".join(
        f"| {label} | {text} |" for label, text in rows)


SUGGESTION_HEADERS = ["reward model", "annotator", "agreement (95% interval, n pairs)", "judgements",
                      "accepted unchanged"]


def suggestion_rows(report: dict) -> list[list]:
    """Agreement with the suggestions, per reward-model version (annotator "all"), then per annotator."""
    from annotations.intervals import describe

    rows = []
    for entry in [*report["by_version"], *report["by_annotator"]]:
        rows.append([entry["version"], entry.get("annotator", "all"), describe(entry["agreement"], "accuracy"),
                     entry["judgements"], f"{entry['accepted_unchanged']} of {entry['judgements']}"])
    return rows


def gate_verdict(result: dict) -> str:
    """The gate's check in words, with each figure's interval and n."""
    from annotations.intervals import describe

    lines = [f"**{result['version']}** " + ("passes the gate." if result["passed"] else "does not pass the gate:")]
    lines += [f"- {reason}" for reason in result["reasons"]]
    if result.get("reward_model"):
        lines.append(f"- reward model {result['judge']}: win rate {describe(result['reward_model'])}")
    if result.get("human") and result["human"]["n"]:
        lines.append(f"- people: win rate {describe(result['human'])}")
    if result.get("accuracy") and result["accuracy"].get("n"):
        lines.append(f"- held-out accuracy {describe(result['accuracy'], 'accuracy')}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "—"


def _escape(text) -> str:
    import html

    return html.escape(str(text))
