"""The closed loop, simulated: do rounds of feedback through the app make the policy better?

The setup of Gao, Schulman and Hilton (2022): a **gold** reward model stands in for people.

- Gold: a reward model trained by rankloop on the training split of
  ../shared/data/hh-rlhf-harmless-dev.jsonl.gz (its accuracy on the held-out split is reported
  with its interval). It plays the annotators and judges the result; the loop never trains on
  its scores, only on the simulated people's rankings.
- The app, in this process (`app.server.create_app`, with its training worker as a child
  process, as `make run` starts it): prefetching makes items of K=4 answers from the live policy;
  simulated annotators (bench/annotators.py: Plackett-Luce on gold scores, the temperature
  calibrated so that two of them agree as often as people do, with ties and skips) take items
  through the app's own handlers (`next_item`, `submit_ranking`, `skip`), overlap 2.
- Prompts: the hh prompts, in three disjoint sets: the store's training-split prompts (queued
  for annotation), its held-out-split prompts (queued too: their judgements are the held-out
  pairs the reward model's gate needs, never trained on; they are also the gate's prompts), and
  a judging set that never enters the store (the gold verdicts).
- Each round, through the admin path (`app.round_admin.queue_round`, what the Training page
  calls): a reward-model round, then a DPO round judged by that reward model (the live one, or
  the new candidate when its gate kept it a candidate). The gate decides; the app hot-loads.
- Recorded per round: the gold win rate of the live policy over the base on the judging prompts
  (with its interval), the proxy reward model's verdict on the same answers, KL to the base, the
  gold verdict on the DPO candidate against its parent and whether the gate's decision matched
  it, the time of every stage and the pairs used.

Run: `python -m bench --only loop` (hours on 2 cores: the gold alone trains for 35 min, once; `--quick` is a
smoke run of one small round; RANKLOOP_LOOP_ROUNDS=N sets the number of rounds). Seed: SEED.
The table and the plot go to docs/loop-results.md and docs/img/loop-benchmark.svg.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Result

SEED = 0
K = 4
OVERLAP = 2
ANNOTATORS = 3
MAX_LENGTH = 256
ANSWER_TOKENS = 64
ADMIN = ("loop-admin", "loop-admin-password-1")

# Each round takes about half an hour on 2 cores at these sizes: the reward model retrains from the base on all
# pairs so far (one epoch), DPO continues from the live policy on the round's new pairs.
FULL = {"rounds": 3, "train_items": 16, "heldout_items": 6, "judge_prompts": 100, "gold_pairs": None,
        "gold_epochs": 1, "rm": {"epochs": 1}, "dpo": {"data": "new"}}
QUICK = {"rounds": 1, "train_items": 4, "heldout_items": 2, "judge_prompts": 8, "gold_pairs": 24,
         "gold_epochs": 1, "rm": {"max_steps": 2, "eval_pairs": 8},
         "dpo": {"max_steps": 2, "eval_pairs": 8, "eval_prompts": 2, "gate_prompts": 4}}


def _hh(work: Path):
    """(gold training rows, gold held-out rows, prompt messages of every pair), from a scratch store."""
    from align.training import preference_rows
    from annotations import open_db, training_data
    from annotations.formats import import_file

    db = open_db(work / "hh.db")
    import_file(db, REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz", "hh")
    train = preference_rows(training_data.select_pairs(db, None, "train"))
    heldout = preference_rows(training_data.select_pairs(db, None, "heldout"))
    prompts = [row["prompt"] for row in train + heldout]
    db.close()
    return train, heldout, prompts


def _gold(base: Path, train: list[dict], heldout: list[dict], epochs: int):
    """The gold reward model, trained once and kept under $RANKLOOP_HOME/bench/ (keyed by its
    data and settings), and its held-out accuracy."""
    import hashlib

    from align.evaluate import reward_correct
    from align.models import rankloop_home
    from align.reward import RewardConfig, load_reward_model, train_reward_model
    from annotations.intervals import accuracy

    start = time.perf_counter()
    key = hashlib.sha256(json.dumps([train, MAX_LENGTH, epochs, SEED], sort_keys=True, default=str).encode())
    out = rankloop_home() / "bench" / f"gold-{key.hexdigest()[:12]}"
    if not (out / "adapter_config.json").exists():
        import shutil

        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # what a run stopped halfway left
        train_reward_model(base, train, RewardConfig(max_length=MAX_LENGTH, threads=2, epochs=epochs, seed=SEED),
                           staging)
        staging.rename(out)
    model, tokenizer = load_reward_model(base, out)
    model.eval()
    correct = reward_correct(model, tokenizer, heldout, 8, MAX_LENGTH)
    return model, tokenizer, {**accuracy(sum(correct), len(correct)), "train_pairs": len(train),
                              "seconds": round(time.perf_counter() - start, 1)}


def _wait(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


class Loop:
    """The app and its simulated people."""

    def __init__(self, base: Path, home: Path, gold, tokenizer, sizes: dict):
        from annotations import store
        from app.server import create_app
        from app.serving import SamplingParams

        self.base, self.home, self.gold, self.tokenizer, self.sizes = base, home, gold, tokenizer, sizes
        os.environ["RANKLOOP_ADMIN_USER"], os.environ["RANKLOOP_ADMIN_PASSWORD"] = ADMIN
        self.ctx, _, _, _ = create_app(home, base, threads=2, prefetch=sizes["train_items"] + sizes["heldout_items"],
                                       demo_prompts=False, worker=True)
        self.ctx.prefetcher.sampling = SamplingParams(max_new_tokens=ANSWER_TOKENS)
        db = self.ctx.db()
        store.set_setting(db, "exclude_truncated", False)  # a cut-off answer is judged as it is
        store.set_setting(db, "suggestions", False)  # the people rank blind
        self.admin = store.get_user(db, ADMIN[0])
        self.people = []
        for i in range(ANNOTATORS):
            store.add_user(db, f"sim{i + 1}", "annotator", f"sim{i + 1}-password-1")
            self.people.append(store.get_user(db, f"sim{i + 1}"))

    def close(self):
        from app.server import shutdown

        shutdown(self.ctx)
        for name in ("RANKLOOP_ADMIN_USER", "RANKLOOP_ADMIN_PASSWORD"):
            os.environ.pop(name, None)

    def gold_scores(self, messages, texts) -> list[float]:
        import torch

        from align.reward import score

        with torch.inference_mode():
            return score(self.gold, self.tokenizer, [messages] * len(texts), texts, max_length=MAX_LENGTH).tolist()

    def generate(self, prompt_ids: list[int]) -> float:
        """Queue the prompts as ranking items and wait until the prefetcher has made them all."""
        from annotations import store

        start = time.perf_counter()
        db = self.ctx.db()
        ready_before = store.count_items(db, "ready")
        store.queue_items(db, prompt_ids, mode="ranking", k=K, overlap=OVERLAP)
        self.ctx.wake_prefetcher()
        _wait(lambda: store.count_items(db, "ready") >= ready_before + len(prompt_ids), 3600, "the items' answers")
        return time.perf_counter() - start

    def judge(self, annotators) -> dict:
        """Every person takes items until the queue has none for them. Returns the rankings by item
        (in candidate-id order letters, comparable across people) and the counts."""
        from app import handlers
        from bench.annotators import LETTERS

        start = time.perf_counter()
        by_item: dict[int, dict[str, str | None]] = {}
        submitted = skipped = 0
        active = list(range(len(annotators)))
        while active:
            for i in list(active):
                view = handlers.next_item(self.ctx, self.people[i])
                if view is None:
                    active.remove(i)
                    continue
                texts = [a["text"] for a in view["answers"]]
                ranking = annotators[i].judge(self.gold_scores(view["messages"], texts))
                if ranking is None:
                    handlers.skip(self.ctx, self.people[i], view, "simulated skip")
                    skipped += 1
                    by_item.setdefault(view["item_id"], {})[annotators[i].name] = None
                    continue
                handlers.submit_ranking(self.ctx, self.people[i], view, ranking)
                submitted += 1
                # the same ranking in letters by candidate id, so that two people's compare
                ids = sorted(a["id"] for a in view["answers"])
                by_id = {a["letter"]: LETTERS[ids.index(a["id"])] for a in view["answers"]}
                by_item.setdefault(view["item_id"], {})[annotators[i].name] = "".join(by_id.get(c, c) for c in ranking)
        return {"by_item": by_item, "submitted": submitted, "skipped": skipped,
                "seconds": time.perf_counter() - start}

    def run_round(self, method: str, overrides: dict) -> dict:
        """Queue a round as the Training page does and wait for it and its gate."""
        from annotations.round_records import get_round
        from app import round_admin

        start = time.perf_counter()
        text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in overrides.items())
        round_id = round_admin.queue_round(self.ctx, self.admin, method, text)
        db = self.ctx.db()
        row = _wait(lambda: (r := get_round(db, round_id))["status"] in ("failed", "cancelled") and r
                    or (r["status"] == "succeeded" and "gate" in r["metrics"] and r), 7200, f"round {round_id}", 2)
        if row["status"] != "succeeded":
            raise RuntimeError(f"round {round_id} ({method}) {row['status']}: {row['error']}")
        return {**row, "seconds": time.perf_counter() - start}

    def wait_served(self, version: str) -> float:
        """Seconds until the app serves `version` (its live watcher hot-loads what the gate promoted)."""
        start = time.perf_counter()
        _wait(lambda: self.ctx.server.live_version == version, 600, f"{version} served", 0.05)
        return time.perf_counter() - start


def _judging_answers(base: Path, versions: dict[str, Path], prompts, names: list[str]) -> dict[str, list[str]]:
    """Each version's sampled answers to the judging prompts (same seed and settings for all)."""
    from align.evaluate import _answers_of
    from align.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer(base)
    policy = load_policy(base, {v: p for v, p in versions.items() if v in names} or None)
    policy.eval()
    return {name: _answers_of(policy, tokenizer, prompts, name, max_new_tokens=ANSWER_TOKENS, temperature=0.8,
                              top_p=0.95, seed=SEED, batch_size=8) for name in names}


def _win_rate(rm, tokenizer, prompts, answers_a, answers_b) -> dict:
    import torch

    from align.reward import score
    from annotations.intervals import win_rate

    with torch.inference_mode():
        scores = score(rm, tokenizer, list(prompts) * 2, list(answers_a) + list(answers_b), max_length=MAX_LENGTH)
    n = len(prompts)
    wins = ties = 0
    for a, b, sa, sb in zip(answers_a, answers_b, scores[:n].tolist(), scores[n:].tolist()):
        if a == b or sa == sb:
            ties += 1
        elif sa > sb:
            wins += 1
    return win_rate(wins, ties, n - wins - ties)


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from align.evaluate import kl_to_reference
    from align.models import load_policy, load_tokenizer, using_version
    from align.reward import load_reward_model
    from annotations import model_versions, store
    from annotations.intervals import describe
    from annotations.training_data import select_prompts
    from bench.annotators import SimulatedAnnotator, calibrate_temperature, pairwise_agreement

    torch.set_num_threads(2)
    sizes = dict(QUICK if quick else FULL)
    sizes["rounds"] = int(os.environ.get("RANKLOOP_LOOP_ROUNDS", sizes["rounds"]))  # fewer (or more) rounds
    rng = random.Random(SEED)
    work = Path(tempfile.mkdtemp(prefix="rankloop-loop-bench-"))
    started = time.perf_counter()
    train, heldout, prompts = _hh(work)
    if sizes["gold_pairs"]:
        train = train[: sizes["gold_pairs"]]
    gold, tokenizer, gold_figure = _gold(base_path, train, heldout, sizes["gold_epochs"])
    print(f"gold reward model: held-out accuracy {describe(gold_figure, 'accuracy')}", flush=True)

    # the judging prompts never enter the store; the rest do, split by the store
    rng.shuffle(prompts)
    judging, store_prompts = prompts[: sizes["judge_prompts"]], prompts[sizes["judge_prompts"]:]
    loop = Loop(base_path, work / "home", gold, tokenizer, sizes)
    db = loop.ctx.db()
    ids = [store.add_prompt(db, messages, source="hh")[0] for messages in store_prompts]
    split_of = {p["id"]: "heldout" for p in select_prompts(db, "heldout")}
    train_ids = [i for i in ids if i not in split_of]
    heldout_ids = [i for i in ids if i in split_of]

    # the annotators' temperature: people's agreement on the gaps of the base policy's own answers
    sample = [store.get_prompt(db, i)["messages"] for i in train_ids[:8]]
    base_answers = _judging_answers(base_path, {}, sample * K, ["base"])["base"]
    gaps = []
    for j, messages in enumerate(sample):
        scores = loop.gold_scores(messages, [base_answers[j + len(sample) * r] for r in range(K)])
        gaps += [a - b for x, a in enumerate(scores) for b in scores[x + 1:]]
    temperature = calibrate_temperature(gaps)
    annotators = [SimulatedAnnotator(f"sim{i + 1}", temperature, seed=SEED) for i in range(ANNOTATORS)]

    judged_base = _judging_answers(base_path, {}, judging, ["base"])["base"]
    rounds, agreements = [], []
    for number in range(1, sizes["rounds"] + 1):
        stages: dict[str, float] = {}
        take = (train_ids[: sizes["train_items"]], heldout_ids[: sizes["heldout_items"]])
        train_ids, heldout_ids = train_ids[sizes["train_items"]:], heldout_ids[sizes["heldout_items"]:]
        stages["generation"] = loop.generate(take[0] + take[1])
        judged = loop.judge(annotators)
        stages["judging"] = judged["seconds"]
        both = [tuple(list(r.values())[:2]) for r in judged["by_item"].values() if len(r) >= 2]  # any two people
        try:
            agreements.append(pairwise_agreement(*zip(*both)) if both else None)
        except ValueError:
            agreements.append(None)
        live_before = model_versions.get_live_version(db, "policy")
        parent = live_before["version"] if live_before else "base"
        rm_round = loop.run_round("rm", {"max_length": MAX_LENGTH, **sizes["rm"]})
        stages["reward_model_round"] = rm_round["seconds"]
        rm_gate = rm_round["metrics"]["gate"]
        judge_rm = "live" if rm_gate.get("promoted") else rm_round["version"]
        dpo_round = loop.run_round("dpo", {"max_length": MAX_LENGTH, "reward_model": judge_rm, **sizes["dpo"]})
        stages["dpo_round"] = dpo_round["seconds"]
        gate = dpo_round["metrics"]["gate"]
        candidate = dpo_round["version"]
        if gate.get("promoted"):
            stages["swap"] = loop.wait_served(candidate)
        live = model_versions.get_live_version(db, "policy")
        live_name = live["version"] if live else "base"

        # the verdicts: gold and proxy, on the judging prompts the store never saw
        eval_start = time.perf_counter()
        paths = {v["version"]: Path(v["path"]) for v in model_versions.list_versions(db, "policy") if v.get("path")}
        names = sorted({live_name, candidate, parent} - {"base"})
        answers = {"base": judged_base, **_judging_answers(base_path, paths, judging, names)}
        proxy_row = model_versions.find_version(db, rm_round["version"]) if judge_rm != "live" else \
            model_versions.get_live_version(db, "reward")
        proxy, _ = load_reward_model(base_path, Path(proxy_row["path"]))
        proxy.eval()
        gold_live = _win_rate(gold, tokenizer, judging, answers[live_name], answers["base"])
        proxy_live = _win_rate(proxy, tokenizer, judging, answers[live_name], answers["base"])
        gold_candidate = _win_rate(gold, tokenizer, judging, answers[candidate], answers[parent])
        kl = None
        if live_name != "base":
            policy = load_policy(base_path, {live_name: paths[live_name]})
            with using_version(policy, live_name):
                kl = kl_to_reference(policy, load_tokenizer(base_path), judging, ANSWER_TOKENS, batch_size=8)
        worse = gold_candidate["high"] < 0.5
        better = gold_candidate["low"] > 0.5
        rounds.append({
            "round": number, "live": live_name, "candidate": candidate, "parent": parent,
            "gate_promoted": bool(gate.get("promoted")), "gate_reasons": gate.get("reasons", []),
            "reward_model": rm_round["version"], "reward_model_promoted": bool(rm_gate.get("promoted")),
            "reward_model_heldout": rm_round["metrics"].get("heldout_accuracy_interval"),
            "gold_win_rate_live_vs_base": gold_live, "proxy_win_rate_live_vs_base": proxy_live,
            "gold_win_rate_candidate_vs_parent": gold_candidate,
            "gold_verdict_on_candidate": "better" if better else "worse" if worse else "no clear difference",
            "gate_matched_gold": (gate.get("promoted") and not worse) or (not gate.get("promoted") and not better),
            "kl_to_base": kl and {k: kl[k] for k in ("mean", "se", "n")},
            "pairs_used": {"reward_model": rm_round["n_pairs"], "dpo": dpo_round["n_pairs"]},
            "judgements": judged["submitted"], "skips": judged["skipped"],
            "agreement": agreements[-1] and {"agreement": agreements[-1][0], "pairs": agreements[-1][1]},
            "stages_s": {k: round(v, 1) for k, v in stages.items()},
            "round_s": round(sum(stages.values()), 1), "gold_evaluation_s": round(time.perf_counter() - eval_start, 1),
        })
        print(json.dumps(rounds[-1], default=str)[:2000], flush=True)
        del proxy
        # written after every round: a run stopped halfway keeps the rounds it finished
        report = {"seed": SEED, "quick": quick, "sizes": {k: v for k, v in sizes.items()}, "gold": gold_figure,
                  "annotators": {"count": ANNOTATORS, "overlap": OVERLAP, "k": K, "temperature": temperature,
                                 "target_agreement": 0.63},
                  "rounds": rounds, "total_s": round(time.perf_counter() - started, 1)}
        out = REPO / "bench" / ("loop-quick.json" if quick else "loop.json")
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if not quick:
            _write_doc(report)
    last = rounds[-1]
    loop.close()
    return [Result(
        name="loop_gold_win_rate", metric=f"gold win rate of the live policy over the base after {len(rounds)} "
                                          f"simulated round(s), {len(judging)} unseen prompts",
        value=last["gold_win_rate_live_vs_base"]["win_rate"], baseline=0.5, baseline_label="the base (no rounds)",
        unit="", higher_is_better=True, target=">= 0.70 after 3 rounds, rising every round",
        details={"rounds": [{k: r[k] for k in ("round", "live", "gate_promoted", "gate_matched_gold", "round_s")}
                            for r in rounds], "report": str(out.relative_to(REPO))})]


def _write_doc(report: dict) -> None:
    """docs/loop-results.md's table and docs/img/loop-benchmark.svg (gold and proxy against KL)."""
    from annotations.intervals import describe

    lines = ["| round | live | gold win rate vs base | proxy win rate vs base | KL to base (nats) | gate "
             "| gold on candidate | round time |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        kl = r["kl_to_base"]
        kl_text = "—" if not kl else f"{kl['mean']:.2f} ± {kl['se']:.2f}"
        lines.append(
            f"| {r['round']} | {r['live']} | {describe(r['gold_win_rate_live_vs_base'])} | "
            f"{describe(r['proxy_win_rate_live_vs_base'])} | "
            f"{kl_text} | "
            f"{'promoted' if r['gate_promoted'] else 'kept'} {r['candidate']} | {r['gold_verdict_on_candidate']} | "
            f"{r['round_s'] / 60:.1f} min |")
    gold, people = report["gold"], report["annotators"]
    head = [f"Seed {report['seed']}; sizes {json.dumps(report['sizes'])}; {report['total_s'] / 60:.0f} min in all.",
            "",
            f"Gold reward model: held-out accuracy {describe(gold, 'accuracy')} on the hh held-out split, trained "
            f"on {gold['train_pairs']} pairs. Simulated annotators: {people['count']}, overlap {people['overlap']}, "
            f"K={people['k']}, temperature {people['temperature']:.3f} (calibrated to {people['target_agreement']} "
            "agreement).", ""]
    stages = ["", "| round | judgements (skips) | agreement of two people (pairs) | pairs: reward model / DPO "
              "| generation | judging | reward-model round | DPO round | swap | round | gold evaluation |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        t, agreement = r["stages_s"], r["agreement"]
        agreement_text = "—" if not agreement else f"{agreement['agreement']:.2f} ({agreement['pairs']})"
        stages.append(
            f"| {r['round']} | {r['judgements']} ({r['skips']}) | {agreement_text} | "
            f"{r['pairs_used']['reward_model']} / {r['pairs_used']['dpo']} | "
            + " | ".join((f"{t[k]:.1f} s" if t[k] < 10 else f"{t[k]:.0f} s") if k in t else "—" for k in
                         ("generation", "judging", "reward_model_round", "dpo_round", "swap"))
            + f" | {r['round_s'] / 60:.1f} min | {r['gold_evaluation_s']:.0f} s |")
    path = REPO / "docs" / "loop-results.md"
    path.write_text("<!-- written by `python -m bench --only loop`; do not edit -->\n# Closed-loop results\n\n"
                    + "\n".join(head + lines + stages) + "\n")
    kls = [0.0] + [(r["kl_to_base"] or {}).get("mean", 0.0) for r in report["rounds"]]
    series = {"gold reward model": [0.5] + [r["gold_win_rate_live_vs_base"]["win_rate"] for r in report["rounds"]],
              "proxy (the loop's own reward model)": [0.5] + [r["proxy_win_rate_live_vs_base"]["win_rate"]
                                                           for r in report["rounds"]]}
    (REPO / "docs" / "img" / "loop-benchmark.svg").write_text(_svg_plot(kls, series))


def _svg_plot(xs: list[float], series: dict[str, list[float]]) -> str:
    """A small line chart as SVG (win rate 0-1 against KL), with no plotting library."""
    width, height, left, bottom, top, right = 560, 360, 60, 50, 20, 20
    x_max = max(max(xs), 1e-9) * 1.1
    px = lambda x: left + (width - left - right) * x / x_max  # noqa: E731
    py = lambda y: top + (height - top - bottom) * (1 - y)  # noqa: E731
    colours = ["#1f77b4", "#d62728"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{left}" y1="{py(0)}" x2="{width - right}" y2="{py(0)}" stroke="black"/>',
             f'<line x1="{left}" y1="{py(0)}" x2="{left}" y2="{py(1)}" stroke="black"/>',
             f'<line x1="{left}" y1="{py(0.5)}" x2="{width - right}" y2="{py(0.5)}" stroke="#bbb" '
             'stroke-dasharray="4"/>']
    for y in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<text x="{left - 8}" y="{py(y) + 4}" text-anchor="end">{y:.2f}</text>')
    for i in range(5):
        x = x_max * i / 4
        parts.append(f'<text x="{px(x)}" y="{py(0) + 18}" text-anchor="middle">{x:.2f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">'
                 'KL to the base (nats per answer)</text>')
    parts.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2})">win rate over the base</text>')
    for (name, ys), colour, row in zip(series.items(), colours, range(len(series))):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}"/>' for x, y in zip(xs, ys)]
        parts.append(f'<text x="{left + 12}" y="{top + 14 + 16 * row}" fill="{colour}">{name}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"
