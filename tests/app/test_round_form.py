"""The admin round form's fields (app/round_admin.py: form_fields, form_values): one typed field
per config key, only changed values sent, and each bad value named for its own field."""

from app import round_admin


def test_every_config_key_has_a_typed_field_with_its_default_and_help():
    fields = {f["name"]: f for f in round_admin.form_fields("dpo")}
    assert fields["beta"] == {"name": "beta", "kind": "float", "default": 0.1, "section": "method", "optional": False,
                              "help": fields["beta"]["help"]} and "pull towards the reference" in fields["beta"]["help"]
    assert fields["eval_pairs"]["kind"] == "int" and fields["eval_pairs"]["section"] == "round"
    assert fields["continue_from_parent"]["kind"] == "bool"
    assert fields["min_weight"]["kind"] == "text" and fields["min_weight"]["optional"]  # empty: none
    assert fields["processes"]["default"] == 1 and fields["launch"]["default"] == "auto"
    assert set(f["name"] for f in round_admin.form_fields("ppo")) >= {"kl_coef", "steps", "reward_model"}


def defaults(method):
    return {f["name"]: round_admin.shown_default(f) for f in round_admin.form_fields(method)}


def test_only_changed_values_are_sent_and_each_bad_one_is_named_for_its_field():
    raw = defaults("dpo")
    assert round_admin.form_values("dpo", raw) == ({}, {})
    raw.update(beta=0.2, max_steps=3.0, min_weight="0.5", loss_type="ipo")
    assert round_admin.form_values("dpo", raw) == ({"min_weight": "0.5", "max_steps": 3, "beta": 0.2,
                                                    "loss_type": "ipo"}, {})
    raw.update(eval_pairs=-5, loss_type="hinge-ish", processes=None, data="everything")
    changed, errors = round_admin.form_values("dpo", raw)
    assert errors == {
        "eval_pairs": "eval_pairs must be 0 or more, got -5.",
        "processes": "processes needs a value (its default is 1)",
        "data": "data must be 'all' or 'new', got 'everything'.",
        "loss_type": errors["loss_type"],
    } and "hinge-ish" in errors["loss_type"]
    assert changed == {"min_weight": "0.5", "max_steps": 3, "beta": 0.2}
