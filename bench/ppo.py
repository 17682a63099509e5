"""PPO: rollout + update throughput of rankloop's own PPO (`align/ppo.py`) against TRL 1.12's
`PPOTrainer` (the last TRL that ships one, `trl.experimental.ppo`), on the same model, the same
real prompts and the same reward model, with the same batch of rollouts per step, response
length, PPO epochs, minibatches and sampling temperature; 2 torch threads each.

TRL 1.12 lives in its own bench-only virtualenv (`.bench-venv-trl112`, made on first use:
`python -m venv`, a .pth pointing at the main virtualenv's packages, and `pip install --no-deps
trl==1.12.0`), so the product keeps its pinned TRL. Each side runs as its own process, and the
figure is episodes (prompt + sampled response, scored and trained on) per second of the whole
run, model loading included. Each side also records its curve: the mean score and KL of every
step's rollouts against the wall time since the start, so the figure that matters can be read
off it: the time each takes to reach the score TRL reaches at its end (the mean of TRL's last
three steps; rankloop's time is its first step whose three-step running mean gets there). A
speed ratio at a lower score would mean nothing.

The reward model is the base with a seeded random score head, saved once as a plain HF folder
both sides load: throughput does not depend on what the reward model knows. TRL trains the
full policy and a separate full value model (its design); rankloop trains a LoRA adapter and a
value head on the policy's trunk (its design) — the comparison is of the two as shipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench.common import REPO, Result

VENV = REPO / ".bench-venv-trl112"
SETTINGS = {"batch": 8, "mini_batches": 2, "epochs": 4, "response_length": 48, "temperature": 1.0}
STEPS = 12  # 2 with --quick
SMOOTH = 3  # steps in the running mean a score is read from

OURS = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import torch
    torch.set_num_threads(2)
    from pathlib import Path
    from align.models import load_causal_lm, load_tokenizer
    from align.ppo import PPOConfig, attach_lora, train_ppo
    base, rm_dir, prompts, s, steps = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    from align.training import tune_malloc; tune_malloc()
    tokenizer = load_tokenizer(base)
    from transformers import AutoModelForSequenceClassification
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    config = PPOConfig(steps=steps, batch_size=s["batch"], mini_batch_size=s["batch"] // s["mini_batches"],
                       ppo_epochs=s["epochs"], max_new_tokens=s["response_length"], temperature=s["temperature"])
    policy = attach_lora(load_causal_lm(base), config)
    curve = []
    train_ppo(policy, tokenizer, prompts, reward, config,
              progress_callback=lambda step, m: curve.append([time.perf_counter() - start, m["score"], m["kl"]]))
    print(json.dumps({"seconds": time.perf_counter() - start, "episodes": steps * s["batch"],
                      "score": curve[-1][1], "curve": curve}))
""")

THEIRS = textwrap.dedent("""
    import json, shutil, sys, tempfile, time
    start = time.perf_counter()
    import torch
    torch.set_num_threads(2)
    import trl
    assert trl.__version__.startswith("1.12"), trl.__version__
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    base, rm_dir, prompts, s, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})
    out = tempfile.mkdtemp()
    args = PPOConfig(output_dir=out, per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
                     num_mini_batches=s["mini_batches"], num_ppo_epochs=s["epochs"],
                     total_episodes=steps * s["batch"], response_length=s["response_length"],
                     temperature=s["temperature"], local_rollout_forward_batch_size=s["batch"],
                     stop_token="eos", num_sample_generations=0, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, logging_steps=1, disable_tqdm=True)
    policy = AutoModelForCausalLM.from_pretrained(base)
    ref = AutoModelForCausalLM.from_pretrained(base)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset)
    curve = []
    class Curve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                curve.append([time.perf_counter() - start, float(logs["objective/scores"]), float(logs["objective/kl"])])
    trainer.add_callback(Curve())
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"seconds": time.perf_counter() - start, "episodes": steps * s["batch"],
                      "score": curve[-1][1] if curve else None, "curve": curve}))
""")


def ensure_venv() -> Path:
    """The bench-only virtualenv with TRL 1.12 over the main virtualenv's packages."""
    python = VENV / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)
    site = next(VENV.glob("lib/python*/site-packages"))
    main_site = next(p for p in sys.path if p.endswith("site-packages") and str(REPO / ".venv") in p)
    (site / "rankloop-main.pth").write_text(main_site + "\n")  # after the venv's own packages
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    "trl==1.12.0"], check=True)
    return python


def _run(python, script: str, *args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    out = subprocess.run([str(python), "-c", script, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script.splitlines()[1]}... failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from align.models import load_tokenizer
    from align.reward import load_sequence_classifier
    from bench.dpo import _pairs

    train, _ = _pairs(quick=True)
    prompts = [row["prompt"] for row in train]
    steps = 2 if quick else STEPS
    work = Path(tempfile.mkdtemp(prefix="rankloop-ppo-bench-"))
    tokenizer = load_tokenizer(base_path)
    torch.manual_seed(0)
    reward = load_sequence_classifier(base_path, tokenizer)
    reward.save_pretrained(work / "rm")
    tokenizer.save_pretrained(work / "rm")

    ours = _run(sys.executable, OURS, base_path, work / "rm", json.dumps(prompts), json.dumps(SETTINGS), steps)
    theirs = _run(ensure_venv(), THEIRS, base_path, work / "rm", json.dumps(prompts), json.dumps(SETTINGS), steps)
    target = _running(theirs["curve"])[-1]  # the score TRL reaches at its end
    reached = next((t for t, m in zip([c[0] for c in ours["curve"]], _running(ours["curve"])) if m >= target), None)
    curves = {"rankloop_curve": [[round(x, 3) for x in c] for c in ours["curve"]],
              "trl_curve": [[round(x, 3) for x in c] for c in theirs["curve"]]}
    return [Result(
        name="ppo_time_to_score",
        metric=f"s to reach TRL 1.12's final score ({SMOOTH}-step running mean of scores, {steps} steps of "
               f"{SETTINGS['batch']} rollouts each side)",
        value=reached if reached is not None else float("nan"), baseline=theirs["seconds"],
        baseline_label="TRL 1.12 PPOTrainer, its whole run", unit="s", higher_is_better=False,
        target="faster than TRL to TRL's score",
        details={"trl_final_score": round(target, 3), "rankloop_final_score": round(_running(ours["curve"])[-1], 3),
                 "rankloop_reached": reached is not None, **curves,
                 "note": "curve rows: [seconds since start, mean score of the step's rollouts, mean KL]"},
    ), Result(
        name="ppo_throughput", metric=f"episodes/s, PPO ({steps} steps of {SETTINGS['batch']} rollouts)",
        value=ours["episodes"] / ours["seconds"], baseline=theirs["episodes"] / theirs["seconds"],
        baseline_label="TRL 1.12 PPOTrainer (full policy + value model)", unit="ep/s", higher_is_better=True,
        target="≥ 2×",
        details={"rankloop_s": round(ours["seconds"], 1), "trl_s": round(theirs["seconds"], 1), **SETTINGS,
                 "rankloop_last_score": ours["score"], "trl_last_score": theirs["score"]},
    )]


def _running(curve: list[list[float]]) -> list[float]:
    """The running mean of the scores over the last SMOOTH steps (fewer at the start)."""
    scores = [c[1] for c in curve]
    return [sum(scores[max(0, i + 1 - SMOOTH): i + 1]) / len(scores[max(0, i + 1 - SMOOTH): i + 1])
            for i in range(len(scores))]
