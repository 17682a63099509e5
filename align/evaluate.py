"""Evaluating a round's version on data it never trained on.

- `reward_accuracy`: how often a reward model scores the chosen answer above the rejected one.
- `dpo_implicit_accuracy`: the same question asked of a policy through DPO's implicit reward
  beta * (log π(answer) - log π_ref(answer)), the reference being the base (adapter disabled).
- `kl_to_reference`: how far the policy has moved: answers sampled from it, and at each of
  their positions the exact KL between the policy's and the reference's next-token
  distributions over the whole vocabulary, summed per answer (nats per answer, never
  negative), with its standard error over answers.
- `win_rate`: answers of two versions to the same prompts, judged by a reward model, with the
  interval of the win rate (the promotion gate decides on its lower bound).
- `sample_answers`: a few greedy answers side by side, for people to read.
- `figure_lines`: the stored figures of a round or version as text, each with its interval and n.

Policies are PeftModels holding adapters named by version (`align.models.load_policy`);
'base' means the adapter disabled. Everything runs in batches without gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch

from align.models import BASE_VERSION, using_version
from align.reward import answer_text, score
from align.training import truncate

Messages = list[dict]


# ---------------------------------------------------------------- reward models


def reward_correct(rm, tokenizer, rows: Sequence[dict], batch_size: int = 8, max_length: int = 512) -> list[bool]:
    """For each preference row, whether the reward model scores its chosen answer strictly above
    the rejected one. `rows` are TRL preference rows ({"prompt", "chosen", "rejected"})."""
    if not rows:
        raise ValueError("no rows to evaluate")
    prompts = [row["prompt"] for row in rows]
    answers = [answer_text(r["chosen"]) for r in rows] + [answer_text(r["rejected"]) for r in rows]
    scores = score(rm, tokenizer, prompts + prompts, answers, batch_size, max_length)  # each prompt run once
    chosen, rejected = scores[: len(rows)], scores[len(rows):]
    return (chosen > rejected).tolist()


def reward_accuracy(rm, tokenizer, rows: Sequence[dict], batch_size: int = 8, max_length: int = 512) -> float:
    """Fraction of preference rows whose chosen answer the reward model scores strictly above the
    rejected one (`reward_correct`'s mean)."""
    correct = reward_correct(rm, tokenizer, rows, batch_size, max_length)
    return sum(correct) / len(correct)


# ---------------------------------------------------------------- log-probabilities


def _prompt_and_answer_ids(tokenizer, messages: Messages, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """Prompt and answer token ids as TRL's DPO trainer makes them: the answer is where the
    templated prompt (with the generation prompt) and the full conversation diverge."""
    prompt = list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
    full = list(tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": answer}],
                                              tokenize=True, return_dict=True)["input_ids"])
    shared = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        shared += 1
    prompt_ids, (answer_ids,) = truncate(full[:shared], [full[shared:]], max_length, "left")
    return prompt_ids, answer_ids


def _padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _token_logprobs(model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..n-1, shape (batch, n-1)."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        position_ids=None if position_ids is None else position_ids.to(device),
    ).logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()


@torch.no_grad()
def answer_logprobs(
    model, tokenizer, prompts: Sequence[Messages], answers: Sequence[str], batch_size: int = 8, max_length: int = 512
) -> torch.Tensor:
    """Summed log-probability of each answer's tokens given its prompt, shape (n,), under `model`
    as it is (whichever adapter is active)."""
    pairs = [_prompt_and_answer_ids(tokenizer, m, a, max_length) for m, a in zip(prompts, answers)]
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        ids, mask = _padded([p + a for p, a in batch], tokenizer.pad_token_id)
        answer_mask = torch.zeros_like(mask)
        for i, (p, a) in enumerate(batch):
            answer_mask[i, len(p): len(p) + len(a)] = 1
        logprobs = _token_logprobs(model, ids, mask)
        out.append((logprobs * answer_mask[:, 1:]).sum(dim=1))
    return torch.cat(out) if out else torch.zeros(0)


def _fused_head(model) -> None:
    """Give `model` TRL's fused LM head (once): `model(..., shift_labels=..., fused_lm_head=True)`
    returns per-token log-probs, computed in tiles for the labelled positions only, without the
    (batch, length, vocabulary) logits — 1 GB for 8 answers of 600 tokens to SmolLM2."""
    from trl.trainer.utils import add_fused_lm_head

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "_rankloop_fused_head", False):
        add_fused_lm_head(inner)
        inner._rankloop_fused_head = True


def sequence_answer_logps(model, prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    """Summed log-probabilities of each answer after its prompt (token ids), shape (n,), one
    right-padded batch, through the fused LM head."""
    _fused_head(model)
    device = next(model.parameters()).device
    ids, mask = _padded([list(p) + list(a) for p, a in zip(prompts, answers)], pad_id)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        for j, token in enumerate(a):
            if len(p) + j >= 1:
                labels[i, len(p) + j - 1] = token  # position t predicts token t + 1
    logps = model(input_ids=ids.to(device), attention_mask=mask.to(device), shift_labels=labels.to(device),
                  fused_lm_head=True, use_cache=False).log_probs
    return (logps * (labels != -100).to(device)).sum(dim=1).float().cpu()


def pair_token_ids(tokenizer, row: dict, max_length: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of a preference row, the prompt cut from the left
    so that it fits with the longer answer, as the packed DPO trainer sees the pair."""
    prompt, chosen = _prompt_and_answer_ids(tokenizer, row["prompt"], answer_text(row["chosen"]), 10**9)
    _, rejected = _prompt_and_answer_ids(tokenizer, row["prompt"], answer_text(row["rejected"]), 10**9)
    prompt, (chosen, rejected) = truncate(prompt, [chosen, rejected], max_length, "left")
    return prompt, chosen, rejected


def pair_logprobs(model, tokenizer, rows: Sequence[dict], batch_size: int = 8, max_length: int = 512):
    """Summed log-probabilities of each row's chosen and rejected answers under `model` as it is,
    both answers in one packed sequence (`align.packing`), rows batched by length."""
    from align.packing import pack_pairs, packed_logps

    _fused_head(model)
    triples = [pair_token_ids(tokenizer, row, max_length) for row in rows]
    order = sorted(range(len(triples)), key=lambda i: sum(map(len, triples[i])))
    chosen, rejected = torch.zeros(len(rows)), torch.zeros(len(rows))
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in pack_pairs([triples[i] for i in index], tokenizer.pad_token_id).items()}
            good, bad, _, _ = packed_logps(model, batch)
            chosen[index], rejected[index] = good.float().cpu(), bad.float().cpu()
    return chosen, rejected


def implicit_rewards(
    policy, tokenizer, rows: Sequence[dict], beta: float, batch_size: int = 8, max_length: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards beta * (log π - log π_ref) of the chosen and rejected answers.

    π is `policy` with its active adapter, π_ref the same model with adapters disabled (the base).
    """
    chosen, rejected = pair_logprobs(policy, tokenizer, rows, batch_size, max_length)
    with using_version(policy, BASE_VERSION):
        ref_chosen, ref_rejected = pair_logprobs(policy, tokenizer, rows, batch_size, max_length)
    return beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def dpo_implicit_accuracy(
    policy, tokenizer, rows: Sequence[dict], beta: float = 0.1, batch_size: int = 8, max_length: int = 512
) -> float:
    """Fraction of preference rows whose chosen answer gets the higher implicit reward."""
    if not rows:
        raise ValueError("no rows to evaluate")
    chosen, rejected = implicit_rewards(policy, tokenizer, rows, beta, batch_size, max_length)
    return (chosen > rejected).float().mean().item()


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Messages],
    max_new_tokens: int = 64,
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_tokens: int = 1024,
) -> list[dict]:
    """One answer per prompt from `model` as it is. Each result holds "text" and, for scoring,
    "prompt_ids" and "answer_ids" (up to and including EOS, no padding)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    generation = GenerationConfig(
        do_sample=do_sample, max_new_tokens=max_new_tokens, temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None, top_k=0 if do_sample else None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    results = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            list(tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])[-max_prompt_tokens:]
            for m in prompts[start:start + batch_size]
        ]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left padding: every answer starts at the same column
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=generation)
        for e, row in zip(encoded, output[:, width:].cpu().tolist()):
            answer = []
            for token in row:
                if token == tokenizer.pad_token_id:
                    break
                answer.append(token)
                if token == tokenizer.eos_token_id:
                    break
            results.append({
                "prompt_ids": e,
                "answer_ids": answer,
                "text": tokenizer.decode(answer, skip_special_tokens=True).strip(),
            })
    return results


def _left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, attention mask and position ids of sequences left-padded to one width (so that every
    sequence ends in the last column)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _answer_distributions(model, prompts_ids, answers_ids, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over the whole vocabulary at each answer position (the positions that
    predict answer tokens), shape (batch, longest answer, vocabulary), and their mask. Only the
    last positions are run through the LM head (`logits_to_keep`)."""
    device = next(model.parameters()).device
    ids, mask, positions = _left_padded([list(p) + list(a) for p, a in zip(prompts_ids, answers_ids)], pad_id)
    longest = max(len(a) for a in answers_ids)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=longest + 1, use_cache=False).logits[:, :-1].float()
    answer_mask = torch.zeros((len(answers_ids), longest), dtype=torch.bool)
    for i, a in enumerate(answers_ids):
        answer_mask[i, longest - len(a):] = True
    return logits.log_softmax(-1), answer_mask.to(device)


@torch.no_grad()
def kl_to_reference(
    policy,
    tokenizer,
    prompts: Sequence[Messages],
    max_new_tokens: int = 64,
    *,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """KL(π || π_ref) per answer, exactly over the vocabulary at each position, on answers
    sampled from `policy` (active adapter, temperature 1, no truncation of the distribution);
    π_ref is the same model with adapters disabled. Returns the mean over answers with its
    standard error and n (`annotations.intervals.mean_interval`), plus "per_answer".

    Each position contributes sum_v π(v) log(π(v) / π_ref(v)) >= 0, so unlike the Monte-Carlo
    estimate (the sampled tokens' log-ratio, which can come out negative) the figure can never
    be below 0; it is 0 for the base itself.
    """
    from annotations.intervals import mean_interval

    if not prompts:
        raise ValueError("no prompts to sample from")
    samples = [s for s in generate(policy, tokenizer, prompts, max_new_tokens, seed=seed, batch_size=batch_size)
               if s["answer_ids"]]
    per_answer: list[float] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        prompts_ids, answers_ids = [s["prompt_ids"] for s in batch], [s["answer_ids"] for s in batch]
        policy_logps, mask = _answer_distributions(policy, prompts_ids, answers_ids, tokenizer.pad_token_id)
        with using_version(policy, BASE_VERSION):
            reference_logps, _ = _answer_distributions(policy, prompts_ids, answers_ids, tokenizer.pad_token_id)
        per_position = (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1).clamp(min=0.0)
        per_answer += (per_position * mask).sum(dim=1).cpu().tolist()
    return {**mean_interval(per_answer), "per_answer": per_answer}


def _answers_of(policy, tokenizer, prompts, version, **kwargs) -> list[str]:
    with using_version(policy, version):
        return [r["text"] for r in generate(policy, tokenizer, prompts, **kwargs)]


def win_rate(
    rm,
    tokenizer,
    policy_model,
    prompts: Sequence[Messages],
    version_a: str,
    version_b: str,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict:
    """How often `version_a`'s answer beats `version_b`'s on the same prompt, judged by `rm`.

    Both versions sample with the same settings and seed. Equal scores (or identical answers)
    are ties and count half. Returns {"win_rate", "wins", "ties", "losses", "n"} and the
    interval of the win rate (`annotations.intervals.win_rate`: "low", "high", "lower_bound").
    """
    from annotations.intervals import win_rate as win_rate_figure

    if not prompts:
        raise ValueError("no prompts to compare on")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   batch_size=batch_size)
    answers_a = _answers_of(policy_model, tokenizer, prompts, version_a, **options)
    answers_b = _answers_of(policy_model, tokenizer, prompts, version_b, **options)
    scores = score(rm, tokenizer, list(prompts) + list(prompts), list(answers_a) + list(answers_b), batch_size,
                   max_length)  # each prompt run once for both answers
    scores_a, scores_b = scores[: len(prompts)], scores[len(prompts):]
    wins = ties = 0
    for text_a, text_b, sa, sb in zip(answers_a, answers_b, scores_a.tolist(), scores_b.tolist()):
        if text_a == text_b or sa == sb:
            ties += 1
        elif sa > sb:
            wins += 1
    figure = win_rate_figure(wins, ties, len(prompts) - wins - ties)
    return {key: figure[key] for key in ("win_rate", "wins", "ties", "losses", "n", "low", "high", "lower_bound")}


def sample_answers(
    policy_model,
    tokenizer,
    prompts: Sequence[Messages],
    versions: Sequence[str],
    max_new_tokens: int = 64,
    *,
    max_chars: int = 600,
) -> list[dict]:
    """Greedy answers of each version to each prompt, side by side:
    [{"prompt": last user turn, "answers": {version: text}}]."""
    answers = {v: _answers_of(policy_model, tokenizer, prompts, v, max_new_tokens=max_new_tokens, do_sample=False)
               for v in versions}
    return [
        {"prompt": messages[-1]["content"][:max_chars],
         "answers": {v: answers[v][i][:max_chars] for v in versions}}
        for i, messages in enumerate(prompts)
    ]


# ---------------------------------------------------------------- figures as text


FIGURES = (
    ("heldout_accuracy_interval", "held-out accuracy", "accuracy"),
    ("heldout_implicit_accuracy_interval", "held-out implicit accuracy", "accuracy"),
    ("kl_to_base_interval", "KL to the base (nats/answer)", "mean"),
    ("gate_comparison", "win rate over its parent", "win_rate"),
)


def figures(metrics: dict) -> list[tuple[str, str]]:
    """(label, value with its interval and n) of each evaluation figure in stored `metrics`."""
    from annotations.intervals import describe

    out = []
    for key, label, value in FIGURES:
        figure = metrics.get(key)
        if isinstance(figure, dict) and figure.get("n"):
            text = describe(figure, value, digits=3)
            if key == "kl_to_base_interval":
                text = f"{figure['mean']:.4f} ± {figure['se']:.4f} (SE), n={figure['n']}"
            if key == "gate_comparison":
                text += f", judged by {figure['judge']}"
            out.append((label, text))
    return out


def figure_lines(metrics: dict) -> list[str]:
    """The evaluation figures with their intervals and n, one line each."""
    return [f"{label:30} {text}" for label, text in figures(metrics)]
