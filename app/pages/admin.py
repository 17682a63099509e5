"""The admin tab: project settings, data in and out, accounts, gold items. Wiring only;
every handler re-checks the admin role on the server."""

from __future__ import annotations

import gradio as gr

from annotations.model_versions import list_versions
from annotations.quality import WEIGHT_SOURCES
from app import api_key_admin, handlers
from app.pages.common import guard, wire

SAMPLING_KEYS = ("temperature", "top_p", "repetition_penalty", "max_new_tokens")


def build(ctx, current_user, annotate_view):
    with gr.Tab("Settings & data"):
        gr.Markdown("### Project settings (apply to newly queued items)")
        with gr.Row():
            mode = gr.Radio(["pairwise", "ranking"], label="Judgement mode", elem_id="setting-mode")
            k = gr.Slider(2, 6, step=1, label="Answers per ranking item (K)", elem_id="setting-k")
            overlap = gr.Slider(1, 20, step=1, label="Judgements per item (overlap)", elem_id="setting-overlap")
            pair_policy = gr.Radio(list(handlers.store.PAIR_POLICIES), label="Ranking → pairs policy")
        with gr.Row():
            temperature = gr.Slider(0, 2, step=0.05, label="temperature")
            top_p = gr.Slider(0.05, 1, step=0.05, label="top_p")
            repetition_penalty = gr.Slider(1, 2, step=0.05, label="repetition_penalty")
            max_new_tokens = gr.Slider(8, 512, step=8, label="max_new_tokens")
        with gr.Row():
            answer_instruction = gr.Textbox(
                label="Answer instruction (the system message answers are sampled under when a prompt has none; "
                      "empty: none)", elem_id="setting-instruction", scale=3)
            exclude_truncated = gr.Checkbox(label="Keep cut-off answers out of items (sample them again)",
                                            elem_id="setting-exclude-truncated", scale=1)
            reopen_minutes = gr.Number(label="Minutes a judgement may be changed after it is given (0: never)",
                                       minimum=0, maximum=10_080, precision=0, elem_id="setting-reopen-minutes",
                                       scale=1)
        selection = gr.Radio(
            [(f"{name}: {words}", name) for name, words in handlers.SELECTION_WORDS.items()],
            label="Which ready item is served next (uncertainty and model disagreement score each item's answers "
                  "with the live reward model as it is prefetched)", elem_id="setting-selection")
        suggestions = gr.Checkbox(label="Show the live reward model's suggested ranking to annotators (turn off for "
                                        "blind studies)", elem_id="setting-suggestions")
        with gr.Row():
            save_settings = gr.Button("Save settings", elem_id="save-settings", scale=3)
            requeue = gr.Button("Requeue unjudged items with the saved mode, K and overlap", elem_id="requeue-items",
                                scale=2)
        settings_status = gr.Markdown(elem_id="settings-status")
        settings_message = gr.Markdown(visible=False, elem_id="settings-message")

        gr.Markdown("### Training weights\nEach pair's loss weight is its source's weight, times its item's agreement "
                    "among annotators and its annotator's trust from gold items (when ticked). A weight of 0 keeps "
                    "a source out of training.")
        with gr.Row():
            weight_agreement = gr.Checkbox(label="× item agreement", elem_id="weight-agreement")
            weight_trust = gr.Checkbox(label="× annotator trust (gold accuracy)", elem_id="weight-trust")
            source_weights = {source: gr.Number(label=f"{source} weight", minimum=0, maximum=10,
                                                elem_id=f"weight-{source}")
                              for source in WEIGHT_SOURCES}
            save_weights = gr.Button("Save weights", elem_id="save-weights")
        weights_status = gr.Markdown(elem_id="weights-status")
        weights_message = gr.Markdown(visible=False, elem_id="weights-message")

        gr.Markdown("### Guidelines shown to annotators (markdown)")
        guidelines_text = gr.Textbox(lines=8, label="Guidelines", elem_id="guidelines-editor")
        save_guidelines = gr.Button("Save guidelines")
        guidelines_message = gr.Markdown(visible=False, elem_id="guidelines-message")

        gr.Markdown("### Import")
        with gr.Row():
            upload = gr.File(label="Prompts or preferences (JSONL, JSONL.gz, CSV, parquet)", type="filepath")
            import_format = gr.Radio(["prompts", "trl", "hh"], value="prompts", label="Format")
            import_button = gr.Button("Import", elem_id="import")
        import_status = gr.Textbox(label="Import report", lines=4, interactive=False)
        import_message = gr.Markdown(visible=False, elem_id="import-message")

        gr.Markdown("### Export preference pairs (TRL format)")
        with gr.Row():
            export_split = gr.Radio(["all", "train", "heldout"], value="all", label="Split")
            export_format = gr.Radio(list(handlers.EXPORT_FORMATS), value="jsonl",
                                     label="File format (csv: for spreadsheets)")
            min_agreement = gr.Number(label="Min. item agreement (0-1, blank: all)", value=None)
            min_accuracy = gr.Number(label="Min. annotator gold accuracy (0-1, blank: all)", value=None)
            export_button = gr.Button("Export", elem_id="export")
        export_file = gr.File(label="Download", interactive=False)
        export_message = gr.Markdown(visible=False, elem_id="export-message")

        gr.Markdown("### Queue a prompt (optionally answered by specific versions, for contrast)")
        with gr.Row():
            queue_text = gr.Textbox(label="Prompt", scale=3)
            queue_versions = gr.Dropdown([], multiselect=True, label="Versions (empty: live)", allow_custom_value=True)
            queue_button = gr.Button("Queue")
        queue_status = gr.Markdown()
        queue_message = gr.Markdown(visible=False, elem_id="queue-message")

        gr.Markdown("### Versions annotators may pick in chat and the arena\nAlways: the live version, its parent "
                    "and the candidates. Add older ones here (each one an annotator picks is loaded into memory).")
        with gr.Row():
            extra_versions = gr.Dropdown([], multiselect=True, label="Also available", elem_id="available-versions",
                                         scale=3)
            save_available = gr.Button("Save", elem_id="save-available")
        available_status = gr.Markdown(elem_id="available-status")
        available_message = gr.Markdown(visible=False, elem_id="available-message")

        gr.Markdown("### Gold item: make the item on your annotate tab gold, with this ranking as its answer")
        with gr.Row():
            gold_ranking = gr.Textbox(label="Known ranking, e.g. A > B", scale=3)
            gold_button = gr.Button("Mark gold")
        gold_status = gr.Markdown()
        gold_message = gr.Markdown(visible=False, elem_id="gold-message")

        gr.Markdown("### Annotation quality")
        quality_button = gr.Button("Compute agreement and gold accuracy", elem_id="quality")
        quality = gr.Code(label="Quality report", language=None, elem_id="quality-report")
        quality_message = gr.Markdown(visible=False, elem_id="quality-message")

        gr.Markdown("### Accounts")
        with gr.Row():
            new_name = gr.Textbox(label="Name")
            new_role = gr.Radio(["annotator", "admin"], value="annotator", label="Role")
            new_password = gr.Textbox(label="Password (8+ characters)", type="password")
            add_button = gr.Button("Add account")
        accounts_message = gr.Markdown(visible=False, elem_id="accounts-message")
        accounts = gr.Dataframe(headers=["name", "role", "judgements", "created"], interactive=False)

        gr.Markdown("### API keys\nA key lets a program use the OpenAI-compatible API (`/v1/chat/completions`) as "
                    "the account it belongs to, with that account's role (see docs/scaling.md in the "
                    "repository). The key is shown once, when it is made.")
        with gr.Row():
            key_owner = gr.Textbox(label="Account", elem_id="api-key-owner")
            key_label = gr.Textbox(label="Label (what it is for)", elem_id="api-key-label")
            create_key = gr.Button("Make a key", elem_id="api-key-create")
        new_key = gr.Textbox(label="The new key: copy it now, it is not shown again", interactive=False,
                             visible=False, elem_id="api-key-new", buttons=["copy"])
        with gr.Row():
            revoke_id = gr.Number(label="Key id to revoke", precision=0, elem_id="api-key-revoke-id")
            revoke_key = gr.Button("Revoke", variant="stop", elem_id="api-key-revoke")
        keys_message = gr.Markdown(visible=False, elem_id="api-keys-message")
        keys = gr.Dataframe(headers=["id", "account", "label", "starts with", "created", "last used", "revoked"],
                            interactive=False, elem_id="api-keys")

    def load_settings(request: gr.Request):
        def run():
            user = current_user(request)
            values = handlers.project_settings(ctx, user)
            sampling = values["sampling"]
            versions = [v["version"] for v in list_versions(ctx.db(), "policy")]
            weights = handlers.weighting(ctx, user)
            extra = handlers.available_versions(ctx, user)["extra"]
            return (values["mode"], values["k"], values["overlap"], values["pair_policy"],
                    *[sampling[key] for key in SAMPLING_KEYS], values["exclude_truncated"],
                    values["answer_instruction"], values["reopen_window_minutes"], values["selection_policy"],
                    values["suggestions"],
                    handlers.guidelines(ctx, user), gr.update(choices=versions), handlers.list_accounts(ctx, user),
                    key_rows(user),
                    weights["agreement"], weights["annotator_accuracy"],
                    *[weights["sources"][source] for source in WEIGHT_SOURCES],
                    gr.update(choices=versions, value=extra))
        return guard(run)

    def do_save_settings(mode_v, k_v, overlap_v, policy_v, t, p, r, m, exclude_v, instruction_v, reopen_v=None,
                         selection_v=None, suggestions_v=None, request: gr.Request = None):
        def run():
            values = handlers.save_project_settings(
                ctx, current_user(request), mode=mode_v, k=k_v, overlap=overlap_v, pair_policy=policy_v,
                sampling={"temperature": t, "top_p": p, "repetition_penalty": r, "max_new_tokens": int(m)},
                exclude_truncated=exclude_v, answer_instruction=instruction_v or "", reopen_window_minutes=reopen_v,
                selection_policy=selection_v, suggestions=suggestions_v)
            values["queued_unlike"] = handlers.queued_unlike_settings(ctx, current_user(request))
            return handlers.describe_settings(values)
        return guard(run)

    def do_save_weights(agreement_v, trust_v, annotation_w, arena_w, chat_w, import_w, request: gr.Request):
        def run():
            sources = dict(zip(WEIGHT_SOURCES, (annotation_w, arena_w, chat_w, import_w)))
            if any(v is None for v in sources.values()):
                raise handlers.InvalidInput("give every source a weight (0 leaves it out of training)")
            return handlers.save_weighting(ctx, current_user(request), agreement=agreement_v,
                                           annotator_accuracy=trust_v, sources=sources)
        return guard(run)

    def do_save_guidelines(text, request: gr.Request):
        def run():
            handlers.save_guidelines(ctx, current_user(request), text)
            gr.Info("Guidelines saved.")
        return guard(run)

    def do_import(path, fmt, request: gr.Request):
        return guard(lambda: handlers.import_upload(ctx, current_user(request), path, fmt))

    def do_export(split, file_format, agreement, accuracy, request: gr.Request):
        def run():
            path, n = handlers.export_download(ctx, current_user(request), split=None if split == "all" else split,
                                               file_format=file_format, min_agreement=agreement,
                                               min_annotator_accuracy=accuracy)
            gr.Info(f"Exported {n} pairs.")
            return path
        return guard(run)

    def do_queue(text, versions, request: gr.Request):
        def run():
            item_id = handlers.queue_prompt(ctx, current_user(request), text, versions=versions)
            return f"Queued item {item_id}."
        return guard(run)

    def do_save_available(names, request: gr.Request):
        return guard(lambda: handlers.save_available_versions(ctx, current_user(request), names))

    def do_gold(view_value, ranking_text, request: gr.Request):
        def run():
            item_id = handlers.mark_gold(ctx, current_user(request), view_value, ranking_text)
            return f"Item {item_id} is gold."
        return guard(run)

    def do_add(name, role, password, request: gr.Request):
        def run():
            user = current_user(request)
            gr.Info(handlers.add_account(ctx, user, name, role, password))
            return handlers.list_accounts(ctx, user), "", ""
        return guard(run)

    def key_rows(user):
        return [[k["id"], k["user"], k["label"], k["prefix"] + "…", k["created_at"], k["last_used_at"] or "",
                 k["revoked_at"] or ""] for k in api_key_admin.list_api_keys(ctx, user)]

    def do_create_key(owner, label, request: gr.Request):
        def run():
            user = current_user(request)
            made = api_key_admin.create_api_key(ctx, user, (owner or "").strip(), label)
            return gr.update(value=made["key"], visible=True), key_rows(user)
        return guard(run)

    def do_revoke_key(key_id, request: gr.Request):
        def run():
            user = current_user(request)
            if key_id is None:
                raise handlers.InvalidInput("give the id of the key to revoke (first column below)")
            if not api_key_admin.revoke_api_key(ctx, user, int(key_id)):
                raise handlers.InvalidInput(f"key {int(key_id)} was revoked already")
            return gr.update(value="", visible=False), key_rows(user)
        return guard(run)

    def do_quality(request: gr.Request):
        return guard(lambda: handlers.quality_report(ctx, current_user(request)))

    setting_inputs = [mode, k, overlap, pair_policy, temperature, top_p, repetition_penalty, max_new_tokens,
                      exclude_truncated, answer_instruction, reopen_minutes, selection, suggestions]
    # a refusal is written under the control that caused it; the page stays as it was (common.wire)
    wire(save_settings.click, do_save_settings, setting_inputs, settings_status, settings_message, "save_settings",
         role="admin")

    def do_requeue(request: gr.Request):
        return guard(lambda: handlers.requeue_with_settings(ctx, current_user(request)))

    wire(requeue.click, do_requeue, None, settings_status, settings_message, "requeue_items", role="admin")
    weight_inputs = [weight_agreement, weight_trust, *source_weights.values()]
    wire(save_weights.click, do_save_weights, weight_inputs, weights_status, weights_message, "save_weights",
         role="admin")
    wire(save_guidelines.click, do_save_guidelines, guidelines_text, [], guidelines_message, "save_guidelines",
         role="admin")
    wire(import_button.click, do_import, [upload, import_format], import_status, import_message, "import_file",
         role="admin")
    wire(export_button.click, do_export, [export_split, export_format, min_agreement, min_accuracy], export_file,
         export_message, "export_pairs", role="admin")
    wire(queue_button.click, do_queue, [queue_text, queue_versions], queue_status, queue_message, "queue_prompt",
         role="admin")
    wire(save_available.click, do_save_available, extra_versions, available_status, available_message,
         "save_available_versions", role="admin")
    wire(gold_button.click, do_gold, [annotate_view, gold_ranking], gold_status, gold_message, "mark_gold",
         role="admin")
    wire(add_button.click, do_add, [new_name, new_role, new_password], [accounts, new_name, new_password],
         accounts_message, "add_account", role="admin")
    wire(quality_button.click, do_quality, None, quality, quality_message, "quality_report", role="admin")
    wire(create_key.click, do_create_key, [key_owner, key_label], [new_key, keys], keys_message, "create_api_key",
         role="admin")
    wire(revoke_key.click, do_revoke_key, revoke_id, [new_key, keys], keys_message, "revoke_api_key", role="admin")
    return load_settings, [*setting_inputs, guidelines_text, queue_versions, accounts, keys, *weight_inputs,
                           extra_versions]
