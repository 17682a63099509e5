"""Evaluating a round's new version on held-out data (main process only): reward accuracy, or
implicit accuracy, exact KL to the base and the promotion gate's seeded comparison."""

from __future__ import annotations

from pathlib import Path

from align.models import BASE_VERSION
from align.processes import process_state
from align.round_config import RoundConfig
from align.round_progress import TRAIN_PROGRESS_SHARE
from align.round_stages import checkpoint

GATE_GENERATION_BATCH = 16  # answers sampled together for the gate's comparison


def evaluated(db, plan: dict, share: float, what: str) -> None:
    """Move the round's progress bar through evaluation (training filled it to
    TRAIN_PROGRESS_SHARE): `share` of the evaluation is done, `what` was measured."""
    from annotations.round_records import update_round

    update_round(db, plan["round_id"], progress=TRAIN_PROGRESS_SHARE + (1 - TRAIN_PROGRESS_SHARE) * share,
                 log_line=f"evaluated: {what}")


def evaluate_round(db, plan: dict, round_config: RoundConfig, method_config) -> dict:
    """Held-out metrics of the new version (main process only)."""
    from annotations.training_data import select_pairs, select_prompts

    from annotations import intervals

    from align import evaluate
    from align.models import load_policy, load_tokenizer, using_version
    from align.reward import load_reward_model
    from align.training import preference_rows

    base, staging = Path(plan["base_path"]), Path(plan["staging"])
    device = process_state().device  # the GPU this process trained on, or the CPU
    max_length = getattr(method_config, "max_length", 512)
    batch = round_config.eval_batch_size
    pairs = select_pairs(db, None, "heldout", until_id=plan["pair_until"])[: round_config.eval_pairs]
    rows = preference_rows(pairs)
    metrics: dict = {"heldout_pairs": len(rows)}
    checkpoint("evaluate")

    if plan["kind"] == "reward":
        if rows:
            rm, tokenizer = load_reward_model(base, staging)
            rm.to(device)
            correct = evaluate.reward_correct(rm, tokenizer, rows, batch, max_length)
            del rm
            metrics["heldout_accuracy"] = sum(correct) / len(correct)
            metrics["heldout_accuracy_interval"] = {**intervals.accuracy(sum(correct), len(correct)),
                                                    "correct": sum(correct)}
            evaluated(db, plan, 0.5, f"held-out accuracy on {len(rows)} pairs")
            if plan["parent_path"]:
                parent_rm, _ = load_reward_model(base, Path(plan["parent_path"]))
                parent_rm.to(device)
                live_correct = evaluate.reward_correct(parent_rm, tokenizer, rows, batch, max_length)
                metrics["parent_heldout_accuracy"] = sum(live_correct) / len(live_correct)
                # paired on the same pairs: what the gate compares (annotations/gate.py)
                metrics["versus_live"] = {
                    "live": plan["parent"], "n": len(rows),
                    "only_candidate_right": sum(c and not p for c, p in zip(correct, live_correct)),
                    "only_live_right": sum(p and not c for c, p in zip(correct, live_correct))}
                evaluated(db, plan, 0.95, f"the live reward model's accuracy on the same {len(rows)} pairs")
        return metrics

    version, parent = plan["version"], plan["parent"] or BASE_VERSION
    adapters = {version: staging}
    if plan["parent_path"]:
        adapters[parent] = Path(plan["parent_path"])
    tokenizer = load_tokenizer(base)
    policy = load_policy(base, adapters).to(device)
    beta = getattr(method_config, "beta", 0.1)
    if rows:
        with using_version(policy, version):
            chosen, rejected = evaluate.implicit_rewards(policy, tokenizer, rows, beta, batch, max_length)
        correct = int((chosen > rejected).sum().item())
        metrics["heldout_implicit_accuracy"] = correct / len(rows)
        metrics["heldout_implicit_accuracy_interval"] = {**intervals.accuracy(correct, len(rows)), "correct": correct}
        metrics["heldout_implicit_margin"] = (chosen - rejected).mean().item()
        evaluated(db, plan, 0.2, f"implicit accuracy on {len(rows)} held-out pairs")
    prompts = [p["messages"] for p in select_prompts(db, "heldout", limit=round_config.eval_prompts)]
    if not prompts:
        prompts = [pair["messages"] for pair in pairs][: round_config.eval_prompts]
    tokens = round_config.eval_max_new_tokens
    if prompts:
        with using_version(policy, version):
            kl = evaluate.kl_to_reference(policy, tokenizer, prompts, tokens, batch_size=batch)
        metrics["kl_to_base"] = kl["mean"]
        metrics["kl_to_base_interval"] = {k: kl[k] for k in ("mean", "se", "low", "high", "n", "too_few")}
        metrics["eval_prompts"] = len(prompts)
        evaluated(db, plan, 0.4, f"KL to the base on {len(prompts)} prompts")
    if plan["reward_path"] and round_config.gate_prompts:
        metrics["gate_comparison"] = gate_comparison(db, plan, round_config, policy, tokenizer, device, max_length)
        metrics["win_rate_vs_parent"] = metrics["gate_comparison"]["win_rate"]
        evaluated(db, plan, 0.9, f"the gate's comparison on {metrics['gate_comparison']['n']} prompts")
    if prompts and round_config.eval_samples:
        metrics["samples"] = evaluate.sample_answers(policy, tokenizer, prompts[: round_config.eval_samples],
                                                     [parent, version], tokens)
        evaluated(db, plan, 0.97, f"{len(metrics['samples'])} side-by-side samples")
    return metrics


def gate_comparison(db, plan: dict, round_config: RoundConfig, policy, tokenizer, device, max_length: int) -> dict:
    """The new version against its parent on paired answers to a fresh, seeded random sample of
    held-out prompts, judged by the reward model: what the promotion gate decides on
    (annotations/gate.py). Records the seed and the prompt ids, so anyone can redo it."""
    import random

    from annotations.training_data import select_prompts

    from align import evaluate
    from align.reward import load_reward_model

    heldout = select_prompts(db, "heldout")
    seed = round_config.gate_seed if round_config.gate_seed is not None else plan["round_id"]
    sample = random.Random(seed).sample(heldout, min(round_config.gate_prompts, len(heldout)))
    out = {"opponent": plan["parent"] or BASE_VERSION, "judge": plan["reward"],
           # PPO maximised this very reward model: it must not judge the result (reward hacking)
           "judge_optimised": plan["method"] == "ppo", "seed": seed, "prompt_ids": [p["id"] for p in sample],
           "wins": 0, "ties": 0, "losses": 0, "n": 0, "win_rate": None}
    if not sample:
        return out
    rm, _ = load_reward_model(Path(plan["base_path"]), Path(plan["reward_path"]))
    rm.to(device)
    result = evaluate.win_rate(rm, tokenizer, policy, [p["messages"] for p in sample], plan["version"],
                               out["opponent"], round_config.eval_max_new_tokens, seed=seed,
                               batch_size=max(round_config.eval_batch_size, GATE_GENERATION_BATCH),
                               max_length=max_length)
    return {**out, **result}
