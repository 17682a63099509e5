"""PPO per episode, rankloop against TRL 1.12, where the answer is known: a tiny model and a
rule-based reward, the setting of `tests/align/test_ppo.py::test_ppo_reaches_trls_score_on_the_rule_based_reward`.

Does rankloop's PPO (`align/ppo.py`) learn as much per episode as TRL 1.12's `PPOTrainer`? The
135M-model benchmark (`bench/ppo.py`) compares the two as shipped (TRL: full fine-tune, a separate
value model, its default learning rate 3e-6; rankloop: a LoRA adapter and a value head on the
policy's trunk), on a random-head reward model and few steps: it measures speed, and says little
about learning. Here everything else is held equal so that only the algorithms differ:

- the policy: the tiny 2-layer Llama of `tests/tiny.py`, taught to answer with one of six
  sentences (one in six starts with "yes"); the same LoRA (r 4, alpha 8, all linear layers) on
  both sides, the reference being the adapter switched off;
- the reward: 1 when the answer holds "yes", else 0 (a frozen module both sides call the same way);
- 30 steps of 16 rollouts, 2 minibatches, 4 PPO epochs, 6 new tokens, temperature 1, learning
  rate 3e-4, KL coefficient 0.01; TRL's critic is its separate value model (the policy's trunk,
  a zero head), rankloop's the value head on the policy's trunk (zero: a rule has no head);
- seeds 0-5, one torch thread each, TRL in its bench-only virtualenv (bench/ppo.py).

Reported: each side's mean score of the last five steps and the first step whose three-step
running mean reaches 0.9, as mean and standard error over the seeds. Run: `python -m bench --only
ppo_tiny` (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from bench.common import REPO, Result
from bench.ppo import _run, ensure_venv

SEEDS = range(6)
SETTINGS = {"steps": 30, "batch": 16, "mini_batches": 2, "epochs": 4, "length": 6, "lr": 3e-4, "kl": 0.01,
            "r": 4, "alpha": 8, "temperature": 1.0}
LEVEL = 0.9  # the score both must reach

COMMON = textwrap.dedent('''
    import json, sys
    from types import SimpleNamespace
    import torch
    from torch import nn
    torch.set_num_threads(1)
    root, seed, s = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tests.tiny import PPO_PROMPTS
    tok = AutoTokenizer.from_pretrained(root)

    class Trunk(nn.Module):  # hidden state 1 from the first "yes" on, else 0
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b
        def forward(self, input_ids, **kwargs):
            hit = (input_ids[:, :-1] == self.a) & (input_ids[:, 1:] == self.b)
            hit = torch.cat([torch.zeros_like(hit[:, :1]), hit], dim=1)
            return SimpleNamespace(hidden_states=((hit.long().cumsum(1) > 0).float().unsqueeze(-1),))

    class SaysYes(nn.Module):
        """The rule as a frozen reward model, read at the answer's last token by either side."""
        base_model_prefix = "backbone"
        def __init__(self, a, b, pad):
            super().__init__()
            self.backbone, self.score = Trunk(a, b), nn.Linear(1, 1)
            with torch.no_grad():
                self.score.weight.fill_(1.0)
                self.score.bias.zero_()
            self.config = SimpleNamespace(pad_token_id=pad)
            self.requires_grad_(False)
        def forward(self, input_ids, attention_mask=None, **kwargs):
            hidden = self.backbone(input_ids).hidden_states[-1]
            last = (torch.arange(input_ids.shape[1]) * (input_ids != self.config.pad_token_id)).argmax(1)
            return SimpleNamespace(logits=self.score(hidden)[torch.arange(len(input_ids)), last])

    reward = SaysYes(*tok.encode("yes"), tok.pad_token_id)
''')

OURS = COMMON + textwrap.dedent('''
    from align.ppo import PPOConfig, attach_lora, train_ppo
    config = PPOConfig(steps=s["steps"], batch_size=s["batch"], mini_batch_size=s["batch"] // s["mini_batches"],
                       ppo_epochs=s["epochs"], max_new_tokens=s["length"], learning_rate=s["lr"], kl_coef=s["kl"],
                       lora_r=s["r"], lora_alpha=s["alpha"], temperature=s["temperature"], seed=seed)
    history = train_ppo(attach_lora(AutoModelForCausalLM.from_pretrained(root), config), tok, PPO_PROMPTS, reward,
                        config)
    print(json.dumps({"scores": [h["score"] for h in history], "kl": [h["kl"] for h in history]}))
''')

THEIRS = COMMON + textwrap.dedent('''
    import shutil, tempfile
    import trl
    assert trl.__version__.startswith("1.12"), trl.__version__
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    tok.padding_side = "left"
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in PPO_PROMPTS] * 64
    out = tempfile.mkdtemp()
    args = PPOConfig(output_dir=out, per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
                     num_mini_batches=s["mini_batches"], num_ppo_epochs=s["epochs"],
                     total_episodes=s["steps"] * s["batch"], response_length=s["length"], learning_rate=s["lr"],
                     kl_coef=s["kl"], temperature=s["temperature"], local_rollout_forward_batch_size=s["batch"],
                     stop_token="eos", num_sample_generations=0, report_to=[], save_strategy="no", seed=seed,
                     use_cpu=True, bf16=False, logging_steps=1, disable_tqdm=True)
    torch.manual_seed(seed)
    value = AutoModelForSequenceClassification.from_pretrained(root, num_labels=1)
    with torch.no_grad():
        value.score.weight.zero_()
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(root),
                         ref_model=None, reward_model=reward, value_model=value,
                         train_dataset=Dataset.from_dict({"input_ids": ids}),
                         peft_config=LoraConfig(r=s["r"], lora_alpha=s["alpha"], target_modules="all-linear",
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainer.train()
    log = trainer.state.log_history
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"scores": [h["objective/scores"] for h in log if "objective/scores" in h],
                      "kl": [h["objective/kl"] for h in log if "objective/kl" in h]}))
''')


def summary(runs: list[dict]) -> dict:
    """Per side: the last five steps' mean score, the first step whose 3-step running mean reaches
    LEVEL (the run's length + 1 if never) and the last five steps' KL, as mean and standard error
    over the seeds."""
    def stats(values):
        return {"mean": round(statistics.fmean(values), 3),
                "se": round(statistics.stdev(values) / len(values) ** 0.5, 3) if len(values) > 1 else None,
                "values": [round(v, 3) for v in values]}

    last, reach, kl = [], [], []
    for run in runs:
        scores = run["scores"]
        running = [statistics.fmean(scores[max(0, i - 2): i + 1]) for i in range(len(scores))]
        last.append(statistics.fmean(scores[-5:]))
        reach.append(next((i + 1 for i, m in enumerate(running) if m >= LEVEL), len(scores) + 1))
        kl.append(statistics.fmean(run["kl"][-5:]))
    return {"last_five_score": stats(last), "steps_to_level": stats(reach), "last_five_kl": stats(kl)}


def run(base_path: Path, quick: bool = False) -> list[Result]:
    from tests.tiny import build_model, build_tokenizer, teach_sentences

    settings = {**SETTINGS, "steps": 6} if quick else SETTINGS
    seeds = list(SEEDS)[:2] if quick else list(SEEDS)
    root = Path(tempfile.mkdtemp(prefix="rankloop-ppo-tiny-"))
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    teach_sentences(model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    trl = ensure_venv()
    ours, theirs = [], []
    for seed in seeds:
        ours.append(_run(sys.executable, OURS, root, seed, json.dumps(settings)))
        theirs.append(_run(trl, THEIRS, root, seed, json.dumps(settings)))
        print(f"seed {seed}: rankloop {ours[-1]['scores']}\n        TRL 1.12 {theirs[-1]['scores']}", flush=True)
    mine, reference = summary(ours), summary(theirs)
    return [Result(
        name="ppo_tiny_steps_to_score",
        metric=f"PPO steps (of {settings['batch']} rollouts) until the 3-step running mean score reaches {LEVEL}, "
               f"tiny model, rule-based reward, same LoRA and settings, mean over {len(seeds)} seeds",
        value=mine["steps_to_level"]["mean"], baseline=reference["steps_to_level"]["mean"],
        baseline_label="TRL 1.12 PPOTrainer, same LoRA, settings and reward", unit="steps", higher_is_better=False,
        target="as many steps as TRL or fewer (within the standard errors), the same final score",
        details={"quality": f"score of the last five steps {mine['last_five_score']['mean']:.3f} ± "
                            f"{mine['last_five_score']['se']:.3f} vs {reference['last_five_score']['mean']:.3f} ± "
                            f"{reference['last_five_score']['se']:.3f} (mean ± SE, {len(seeds)} seeds)",
                 "rankloop": mine, "trl": reference, "settings": settings, "seeds": seeds,
                 "reproduce": "python -m bench --only ppo_tiny", "source": str(Path(__file__).relative_to(REPO))},
    )]
