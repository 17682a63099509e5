"""Handlers of the admin training pages: queue rounds, watch them, manage versions, the
promotion gate settings, and the dashboard. Admin only, checked in every function.

Training never runs in the app: `queue_round` writes a row and the worker process picks it up.
"""

from __future__ import annotations

import dataclasses
import json

import yaml

from annotations import gate, model_versions, round_records, store
from annotations.errors import InvalidInput
from app.handlers import AppContext, _admin

require_admin = _admin

METHODS = tuple(model_versions.METHODS)  # the one list of training methods


def method_defaults(method: str) -> dict:
    """Every config key of a round of `method` with its default (round keys first)."""
    from align.round_config import RoundConfig, method_configs

    if method not in METHODS:
        raise InvalidInput(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")
    out = {}
    for cls in (RoundConfig, method_configs()[method]):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out[f.name] = default
    return out


def form_fields(method: str) -> list[dict]:
    """The round form's fields for `method`: one per config key, round keys first, each with
    its kind (bool, int, float or text), default, help text and section ("round" / "method")."""
    import typing

    from align.round_config import RoundConfig, method_configs

    if method not in METHODS:
        raise InvalidInput(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")
    fields = []
    for section, cls in (("round", RoundConfig), ("method", method_configs()[method])):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            options = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
            kind = options[0] if len(options) == 1 and options[0] in (bool, int, float) else str
            if default is None:
                kind = str  # typed in a text box: empty means none (a number box cannot be empty)
            fields.append({"name": f.name, "kind": kind.__name__ if kind is not str else "text",
                           "default": default, "help": f.metadata.get("help", ""), "section": section,
                           "optional": type(None) in typing.get_args(hints[f.name])})
    return fields


def shown_default(field: dict):
    """A field's default as its form control shows it."""
    default = field["default"]
    if field["kind"] == "text":
        if default is None:
            return ""
        return ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return default


def form_values(method: str, raw: dict) -> tuple[dict, dict]:
    """The form's values → (the keys that differ from their defaults, {key: what is wrong with
    it}), each key checked on its own so that a message can stand beside its field."""
    from align.config import ConfigError
    from align.round_config import parse_round_config

    values, errors = {}, {}
    for field in form_fields(method):
        name, value = field["name"], raw.get(field["name"])
        if field["kind"] == "text":
            value = "" if value is None else str(value).strip()
            if value == str(shown_default(field)):
                continue
            if value == "" and field["optional"]:
                value = None
        elif value is None or value == "":
            if field["default"] is None:
                continue
            errors[name] = f"{name} needs a value (its default is {field['default']})"
            continue
        elif field["kind"] == "int" and float(value) == int(float(value)):
            value = int(float(value))
        if value == field["default"]:
            continue
        try:
            parse_round_config(method, {name: value})
        except (ConfigError, ValueError, TypeError) as e:
            message = str(e)
            errors[name] = message.split(": ", 1)[1] if message.startswith(("round config: ", f"{method} config: ")) \
                else message
            continue
        values[name] = value
    return values, errors


def parse_overrides(text: str) -> dict:
    """`key: value` lines (YAML) into a dict; an empty text is no override."""
    if not (text or "").strip():
        return {}
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInput(f"the overrides are not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise InvalidInput("write overrides as `key: value` lines")
    return values


def queue_round(ctx: AppContext, user: dict | None, method: str, overrides: str = "", *,
                data: str | None = None, fields: dict | None = None) -> int:
    """Validate the round's config and queue it for the worker; returns the round id. `fields`
    (the form's changed keys) come first, the YAML `overrides` over them."""
    from align.config import ConfigError
    from align.round_config import parse_round_config

    user = _admin(user)
    values = {**(fields or {}), **parse_overrides(overrides)}
    if data:
        values.setdefault("data", data)
    try:
        parse_round_config(method, values)
    except (ConfigError, ValueError, TypeError) as e:
        raise InvalidInput(str(e)) from None
    return round_records.create_round(ctx.db(), method, values, created_by=user["id"])


def rounds_table(ctx: AppContext, user: dict | None, limit: int = 20) -> list[list]:
    _admin(user)
    rows = []
    for r in round_records.list_rounds(ctx.db(), limit=limit):
        rows.append([r["id"], r["method"], r["status"], f"{100 * (r['progress'] or 0):.0f}%", r["version"] or "",
                     r["n_pairs"] or "", headline(r["metrics"]), r["created_at"]])
    return rows


def round_detail(ctx: AppContext, user: dict | None, round_id: int | None) -> dict:
    """Status, progress, log tail, error, metrics and the per-step curves of one round (the
    newest if `round_id` is empty)."""
    _admin(user)
    db = ctx.db()
    round_id = round_id or round_records.latest_round_id(db)
    if round_id is None:
        return {"round": None, "curves": []}
    r = round_records.get_round(db, int(round_id))
    curves = [{"step": m["step"], "metric": m["key"], "value": m["value"]} for m in round_records.step_metrics(db, r["id"])]
    return {"round": r, "curves": curves}


def cancel_round(ctx: AppContext, user: dict | None, round_id: int | None) -> str:
    _admin(user)
    if not round_id:
        raise InvalidInput("pick a round to cancel")
    previous = round_records.cancel_round(ctx.db(), int(round_id))
    return f"Round {int(round_id)} cancelled" + (" (the worker stops at its next step)" if previous == "running" else "")


def versions_table(ctx: AppContext, user: dict | None) -> list[list]:
    _admin(user)
    rows = []
    db = ctx.db()
    for v in model_versions.list_versions(db):
        r = round_records.get_round(db, v["round_id"]) if v["round_id"] else None
        rows.append([v["version"], v["kind"], v["state"], v["parent"] or "", v["method"], v["round_id"] or "",
                     (r["data_hash"] or "")[:12] if r else "", r["n_pairs"] if r else "", headline(v["metrics"]),
                     json.dumps(r["config"], sort_keys=True)[:200] if r else "", v["created_at"]])
    return rows


def check_gate(ctx: AppContext, user: dict | None, version: str) -> dict:
    _admin(user)
    return gate.check_gate(ctx.db(), (version or "").strip())


def promotion_question(ctx: AppContext, user: dict | None, version: str) -> str:
    """What promoting `version` would do, asked before the page does it (InvalidInput if it cannot)."""
    _admin(user)
    db, name = ctx.db(), (version or "").strip()
    if not name:
        raise InvalidInput("pick a version to promote")
    row = model_versions.find_version(db, name)
    if row is None:
        raise InvalidInput(f"there is no version {name!r}")
    if row["state"] == "live":
        raise InvalidInput(f"{name} is already the live {row['kind']} version")
    live = model_versions.get_live_version(db, row["kind"])
    return (f"Make **{name}** the live {row['kind']} version? "
            + (f"**{live['version']}** retires. " if live else "")
            + ("Every new answer, item and chat reply comes from it at once." if row["kind"] == "policy"
               else "Rounds and suggestions use it from now on."))


def rollback_question(ctx: AppContext, user: dict | None, kind: str = "policy") -> str:
    """What a rollback would do, asked before the page does it (InvalidInput if it cannot)."""
    _admin(user)
    live = model_versions.get_live_version(ctx.db(), kind)
    if live is None or not live["parent"]:
        raise InvalidInput(f"the live {kind} version has no parent to roll back to")
    return f"Roll back? **{live['version']}** retires and its parent **{live['parent']}** is live again."


def promote(ctx: AppContext, user: dict | None, version: str) -> str:
    _admin(user)
    result = model_versions.promote(ctx.db(), (version or "").strip())
    if ctx.live is not None:
        ctx.live.check()  # hot-load now rather than at the next poll
    return f"{result['live']} is live" + (f"; {result['retired']} retired" if result["retired"] else "")


def rollback(ctx: AppContext, user: dict | None, kind: str = "policy") -> str:
    _admin(user)
    result = model_versions.rollback(ctx.db(), kind)
    if ctx.live is not None:
        ctx.live.check()
    return f"rolled back: {result['live']} is live again; {result['retired']} retired"


def gate_settings(ctx: AppContext, user: dict | None) -> dict:
    _admin(user)
    return gate.gate_settings(ctx.db())


def save_gate_settings(ctx: AppContext, user: dict | None, **values) -> dict:
    """Validate and store the promotion gate's settings (`annotations.gate.GATE_DEFAULTS`)."""
    _admin(user)
    return gate.save_gate_settings(ctx.db(), values)


def headline(metrics: dict) -> str:
    """A round's or a version's held-out figures in one line, each with its interval and n."""
    from annotations.intervals import describe

    parts = []
    for key, label, value in (("heldout_accuracy_interval", "RM accuracy", "accuracy"),
                              ("heldout_implicit_accuracy_interval", "implicit accuracy", "accuracy"),
                              ("gate_comparison", "win rate vs parent", "win_rate")):
        figure = metrics.get(key)
        if isinstance(figure, dict) and figure.get("n"):
            parts.append(f"{label} {describe(figure, value)}")
    kl = metrics.get("kl_to_base_interval")
    if isinstance(kl, dict) and kl.get("n"):
        parts.append(f"KL {kl['mean']:.3f} ± {kl['se']:.3f} (n={kl['n']})")
    return "; ".join(parts)


def dashboard(ctx: AppContext, user: dict | None) -> dict:
    """Pairs per round, annotator throughput, agreement, and reward / KL / win rate per round."""
    from annotations.quality import agreement_report

    _admin(user)
    db = ctx.db()
    rounds = []
    for r in reversed(round_records.list_rounds(db, limit=200, status="succeeded")):
        m = r["metrics"]
        rounds.append({"round": r["id"], "method": r["method"], "version": r["version"], "pairs": r["n_pairs"] or 0,
                       "figures": headline(m),
                       **{k: m.get(k) for k in ("heldout_accuracy", "heldout_implicit_accuracy", "kl_to_base",
                                                "win_rate_vs_parent")}})
    throughput = [[r["name"], r["day"], r["judgements"], r["mean_decision_ms"]] for r in store.annotator_throughput(db)]
    report = agreement_report(db)
    from annotations.suggestions import suggestion_agreement

    return {"rounds": rounds, "throughput": throughput, "suggestions": suggestion_agreement(db),
            "agreement": {"pairwise_agreement": report.get("pairwise_agreement"), "alpha": report.get("alpha"),
                          "judgements": report.get("judgements")},
            "pairs_total": store.count_rows(db, "pairs")}
