"""PPO for rankloop: a small, readable implementation over a LoRA policy.

The pieces (see DESIGN.md, "Training"):

- policy: a causal LM wrapped in a PEFT LoRA adapter (`attach_lora`); only the adapter trains.
- reference: the same model with the adapter disabled (`with policy.disable_adapter():`),
  so there is no second copy of the weights.
- reward: frozen. Either a sequence-classification reward model (`num_labels=1`, score read at
  the last non-pad token) sharing the policy's tokenizer, or any Python callable
  `reward_fn(prompts, responses) -> tensor of shape (batch,)` for rule-based rewards.
- critic: a linear value head over the policy's last hidden state (it shares the policy's trunk).

One step samples a batch of responses, scores them, turns the score and a per-token KL penalty
into per-token rewards, estimates advantages with GAE, and then runs a few epochs of clipped
policy and value updates over minibatches of that batch. The file reads top to bottom: the pure
functions first (each tested against hand-worked numbers), then the config, then the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
RewardFn = Callable[[list[str], list[str]], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Pure functions. Every tensor is (batch, response_length); `mask` is 1 on response tokens and
# 0 on padding (the tokens after a response's EOS).
# ---------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1 (all of them, or along `dim`).

    Masked positions count for nothing, whatever they hold; an all-zero mask gives 0.
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divided by n, not n - 1) of `values` where `mask` is 1."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shift and scale `values` to mean 0 and variance 1 over the unmasked positions.

    Statistics are taken over the whole batch (population variance); masked positions come
    back as 0.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    return whitened * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where `mask` is 1, per row (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(dim=1)


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    score_clip: float,
) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every response token plus the score on the last one.

    reward[t] = -kl_coef * (logprobs[t] - ref_logprobs[t]), and the score of the whole response,
    clipped to [-score_clip, score_clip], is added on the last unmasked token of each row.
    Masked positions get 0.
    """
    kl = logprobs - ref_logprobs
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    clipped = scores.to(rewards.dtype).clamp(-score_clip, score_clip)
    rewards[rows, last_token_index(mask)] += clipped
    return rewards * mask


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, walking each response backwards.

    delta[t] = rewards[t] + gamma * values[t + 1] - values[t]   (values past the end count as 0)
    advantages[t] = delta[t] + gamma * lam * advantages[t + 1]
    returns = advantages + values

    Masked positions (padding after the response) hold neither reward nor value and get 0
    advantage and return. Returns (advantages, returns).
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss, averaged over unmasked tokens.

    ratio = exp(logprobs - old_logprobs); per token the loss is the larger (more pessimistic)
    of -advantage * ratio and -advantage * clip(ratio, 1 - cliprange, 1 + cliprange).
    Returns (loss, clip fraction): the fraction of tokens where the clipped term was the larger.
    """
    # Masked positions get ratio 1, so whatever they hold cannot overflow into inf * 0 = nan.
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return loss, clipfrac


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: half the larger squared error of the new and the clipped value.

    The clipped value stays within cliprange_value of the value seen during the rollout, so the
    critic cannot jump far from it in one batch. Returns (loss, clip fraction): the fraction of
    unmasked tokens where the clipped error was the larger.
    """
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over unmasked positions.

    1 means the critic predicts the returns exactly, 0 means it does no better than their mean,
    below 0 worse than that. NaN when the returns do not vary.
    """
    variance = masked_var(returns, mask)
    if variance.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / variance).item()


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def option(default, help: str):
    """A config field with its help text (for --help and the admin page)."""
    return field(default=default, metadata={"help": help})


@dataclass
class PPOConfig:
    """Everything one PPO run needs; the defaults fit a small model on a laptop CPU."""

    steps: int = option(20, "PPO steps: each samples `batch_size` rollouts and trains on them.")
    batch_size: int = option(8, "Rollouts (prompt + sampled response) per step.")
    mini_batch_size: int = option(4, "Rollouts per gradient update; must divide batch_size.")
    ppo_epochs: int = option(4, "Passes over each batch of rollouts.")
    learning_rate: float = option(1e-4, "AdamW learning rate for the LoRA adapter and the value head.")
    max_grad_norm: float = option(1.0, "Gradients are clipped to this total norm before each update.")
    max_new_tokens: int = option(48, "Longest response sampled; sampling stops earlier at EOS.")
    temperature: float = option(1.0, "Sampling temperature; log-probabilities are taken at the same one.")
    top_k: int = option(0, "Sample among the k likeliest tokens; 0 turns this off.")
    top_p: float = option(1.0, "Nucleus sampling mass; 1.0 turns this off.")
    kl_coef: float = option(0.05, "Weight of the per-token KL penalty against the reference (adapter off).")
    score_clip: float = option(5.0, "Scores are clipped to [-score_clip, score_clip] to become rewards.")
    gamma: float = option(1.0, "Discount factor for GAE.")
    lam: float = option(0.95, "GAE lambda: 0 trusts the critic, 1 trusts the sampled rewards.")
    cliprange: float = option(0.2, "Policy ratio clip: updates stop pulling outside [1 - c, 1 + c].")
    cliprange_value: float = option(0.2, "Value clip: how far a value may move from its rollout value.")
    vf_coef: float = option(0.1, "Weight of the value loss in the total loss.")
    value_init: str = option(
        "reward", "Critic start: 'reward' copies the reward model's score head (when the reward is a model of the "
        "policy's width), 'zero' starts every value at 0."
    )
    seed: int = option(0, "Seed for prompt order and sampling.")
    lora_r: int = option(8, "LoRA rank of the policy adapter (used by attach_lora).")
    lora_alpha: int = option(16, "LoRA scaling alpha (used by attach_lora).")
    lora_target_modules: str | list[str] = option(
        "all-linear", "Modules the adapter wraps: a list of names, or 'all-linear' (used by attach_lora)."
    )
    activation_budget_mib: int = option(
        1024, "MiB of activations a minibatch may keep for its backward pass; one that needs more (long prompts) "
        "recomputes just enough of its lowest layers in the backward pass. 0: no limit."
    )

    def __post_init__(self):
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        positive = ("learning_rate", "max_grad_norm", "temperature", "score_clip", "cliprange", "lora_alpha")
        for name in (*positive, "cliprange_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)}.")
        for name in ("kl_coef", "vf_coef", "activation_budget_mib"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more (0 turns it off), got {getattr(self, name)}.")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.batch_size % self.mini_batch_size:
            largest = min(self.mini_batch_size, self.batch_size)
            fits = max(d for d in range(1, largest + 1) if self.batch_size % d == 0)
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must divide batch_size ({self.batch_size}): "
                f"use mini_batch_size={fits}, or a batch_size that is a multiple of {self.mini_batch_size}."
            )
        if self.value_init not in ("reward", "zero"):
            raise ValueError(f"value_init must be 'reward' or 'zero', got {self.value_init!r}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1.0 turns it off), got {self.top_p}.")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty: name the layers to adapt, or use 'all-linear'.")


def reward_score_head(reward) -> nn.Linear | None:
    """The linear `score` head a sequence-classification reward model reads its score with
    (the trained copy, under PEFT's modules_to_save), or None for a reward function."""
    if not isinstance(reward, nn.Module):
        return None
    heads = {name: module for name, module in reward.named_modules()
             if name.split(".")[-1] in ("score", "default") and "score" in name
             and isinstance(module, nn.Linear) and module.out_features == 1}
    trained = [m for name, m in heads.items() if "modules_to_save" in name]
    return (trained or list(heads.values()) or [None])[0]


def init_value_head(hidden_size: int, reward=None) -> nn.Linear:
    """The critic: a linear head over the policy's last hidden state.

    Initialised from the reward model's score head where there is one of the same width, so
    that the first values already estimate the score (TRL starts its value model as a copy of
    the reward model; here the critic shares the policy's trunk, so only the head is copied).
    Otherwise every value starts at 0: no made-up preferences.
    """
    head = nn.Linear(hidden_size, 1)
    source = reward_score_head(reward)
    with torch.no_grad():
        if source is not None and source.in_features == hidden_size:
            head.weight.copy_(source.weight.detach().float())
            head.bias.copy_(source.bias.detach().float() if source.bias is not None else torch.zeros(1))
        else:
            head.weight.zero_()
            head.bias.zero_()
    return head


def attach_lora(model, config: PPOConfig):
    """Wrap a causal LM in a fresh LoRA adapter described by `config` and return the PeftModel.

    Dropout stays off: PPO compares the policy with itself before and after an update, and
    dropout noise would show up as a policy change.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=config.lora_target_modules,
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# ---------------------------------------------------------------------------------------------
# Rollouts: sample, then score every response token under policy, reference, critic and reward.
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """One batch of sampled responses and what PPO needs to know about them (all detached)."""

    input_ids: torch.Tensor  # (batch, prompt + response): left-padded prompt, response, pad after EOS
    attention_mask: torch.Tensor  # (batch, prompt + response)
    mask: torch.Tensor  # (batch, response): 1 on response tokens up to and including EOS
    logprobs: torch.Tensor  # (batch, response) under the policy
    ref_logprobs: torch.Tensor  # (batch, response) under the reference (adapter disabled)
    values: torch.Tensor  # (batch, response) from the value head
    entropy: torch.Tensor  # (batch, response) of the policy's next-token distribution
    scores: torch.Tensor  # (batch,) from the reward model or reward function, unclipped

    @property
    def response_length(self) -> int:
        return self.mask.shape[1]


def render_prompts(tokenizer, prompts: Sequence[Messages]) -> list[str]:
    """Each prompt's messages through the chat template, ending where the assistant answers."""
    return [
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        for messages in prompts
    ]


def sample_responses(
    policy, tokenizer, prompt_texts: list[str], config: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per prompt in one batched `generate` call.

    Returns (input_ids, attention_mask, mask): prompt (left-padded) and response side by side,
    with every token after a response's first EOS replaced by pad and masked out.
    """
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    prompt = tokenizer(
        prompt_texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    ).to(device)
    generation = GenerationConfig(
        do_sample=True, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    output = policy.generate(
        input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], generation_config=generation
    )
    responses = output[:, prompt["input_ids"].shape[1]:]
    # The first EOS belongs to the response (its probability is part of the policy's choice to
    # stop); everything after it is padding.
    is_eos = responses == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    responses = responses.masked_fill(after_eos, tokenizer.pad_token_id)
    mask = (~after_eos).long()
    input_ids = torch.cat([prompt["input_ids"], responses], dim=1)
    attention_mask = torch.cat([prompt["attention_mask"], mask], dim=1)
    return input_ids, attention_mask, mask


def forward_response(
    model, value_head: nn.Module | None, input_ids, attention_mask, response_length: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probabilities of the response tokens, their values, and the logits that produced them.

    The logits at position t predict token t + 1, so the response's tokens are scored by the
    positions one to the left of them; the value of a response token is read at that same
    position (the state in which the token was chosen). Position ids follow the attention mask,
    as `generate` numbers them: with learned absolute positions, left padding would otherwise
    shift the prompt (rotary positions do not care, being relative).
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    output = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        output_hidden_states=value_head is not None, logits_to_keep=response_length + 1,
    )
    logits = output.logits[:, :-1].float() / temperature
    tokens = input_ids[:, -response_length:]
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    values = None
    if value_head is not None:
        hidden = output.hidden_states[-1][:, -response_length - 1:-1]
        values = value_head(hidden.float()).squeeze(-1)
    return logprobs, values, logits


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax distribution at each position."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def score_responses(
    reward, tokenizer, prompt_texts: list[str], input_ids, attention_mask, mask
) -> torch.Tensor:
    """Scores of the sampled responses, shape (batch,), from a reward model or a reward function.

    A reward model sees prompt and response together and is read at the last non-pad token (its
    own sequence-classification pooling; the tokens after EOS are pad). A reward function gets
    the rendered prompts and the decoded responses, special tokens dropped.
    """
    if isinstance(reward, nn.Module):
        if reward.config.pad_token_id != tokenizer.pad_token_id:
            raise ValueError(
                f"The reward model's config.pad_token_id ({reward.config.pad_token_id}) differs from the "
                f"tokenizer's pad token id ({tokenizer.pad_token_id}); it would read its score at the wrong "
                "token. Set reward_model.config.pad_token_id = tokenizer.pad_token_id."
            )
        device = next(reward.parameters()).device
        # Positions follow the attention mask, as in `forward_response`, so that left padding
        # cannot shift a model with learned absolute positions.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = reward(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
        ).logits
        return logits[:, 0].float().to(input_ids.device)
    responses = tokenizer.batch_decode(input_ids[:, -mask.shape[1]:], skip_special_tokens=True)
    scores = torch.as_tensor(reward(prompt_texts, responses), dtype=torch.float32).to(input_ids.device)
    if scores.shape != (len(responses),):
        raise ValueError(
            f"reward_fn must return one score per response, shape ({len(responses)},); "
            f"got {tuple(scores.shape)}."
        )
    return scores


@torch.no_grad()
def collect_rollouts(
    policy, value_head, tokenizer, prompts: Sequence[Messages], reward, config: PPOConfig
) -> Rollouts:
    """Sample responses to `prompts` and score them under policy, reference, critic and reward."""
    prompt_texts = render_prompts(tokenizer, prompts)
    input_ids, attention_mask, mask = sample_responses(policy, tokenizer, prompt_texts, config)
    rollout = (input_ids, attention_mask, mask.shape[1], config.temperature)
    logprobs, values, logits = forward_response(policy, value_head, *rollout)
    with policy.disable_adapter():
        ref_logprobs, _, _ = forward_response(policy, None, *rollout)
    scores = score_responses(reward, tokenizer, prompt_texts, input_ids, attention_mask, mask)
    return Rollouts(
        input_ids=input_ids, attention_mask=attention_mask, mask=mask,
        logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask, values=values * mask,
        entropy=entropy_from_logits(logits) * mask, scores=scores,
    )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def iterate_prompt_batches(
    prompts: Sequence[Messages], batch_size: int, seed: int
) -> Iterator[list[Messages]]:
    """Endless batches of prompts: each pass over the prompts in a fresh shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending += torch.randperm(len(prompts), generator=generator).tolist()
        yield [prompts[i] for i in pending[:batch_size]]
        pending = pending[batch_size:]


def train_ppo(
    policy,
    tokenizer,
    prompts: Sequence[Messages],
    reward: nn.Module | RewardFn,
    config: PPOConfig,
    progress_callback: Callable[[int, dict[str, float]], None] | None = None,
    state=None,
) -> list[dict[str, float]]:
    """Train the LoRA adapter of `policy` with PPO for `config.steps` steps, in place.

    `policy` is a PeftModel (see `attach_lora`); with its adapter disabled it is the reference.
    `prompts` are chat prompts, each a list of {"role", "content"} messages. `reward` is a frozen
    sequence-classification reward model sharing `tokenizer`, or a function
    `reward(prompts, responses) -> tensor (batch,)` of rendered prompts and decoded responses.
    `progress_callback(step, metrics)` is called after every step.

    `state` (align.processes.process_state()) with several processes: data parallel. Each process
    samples its own `batch_size` prompts (so a step uses batch_size × processes), the trainable
    weights start from the main process's, and gradients are averaged before every update, so
    the weights stay identical everywhere. Metrics are averaged over the processes.

    Returns one metrics dict per step: score (mean, unclipped), kl (mean summed over each
    response), entropy (mean per token), policy_loss, value_loss, clipfrac, value_clipfrac
    (means over the updates), explained_variance and response_length.
    """
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        raise TypeError(
            "train_ppo trains a LoRA adapter: wrap the model first with attach_lora(model, config)."
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "The tokenizer needs a pad token distinct from EOS (pad after EOS is masked out): "
            "use align.models.fix_tokenizer(tokenizer)."
        )
    if not prompts:
        raise ValueError("No prompts to train on.")

    from align.processes import average_gradients, mean_over_processes, sync_parameters

    rank = state.process_index if state is not None else 0
    torch.manual_seed(config.seed)
    device = next(policy.parameters()).device
    value_head = init_value_head(policy.config.hidden_size, reward if config.value_init == "reward" else None)
    value_head = value_head.to(device)
    trainable = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    if state is not None:
        sync_parameters(trainable, state)
    torch.manual_seed(config.seed + rank)  # each process samples its own answers
    # No weight decay: it would pull the adapter towards zero, i.e. towards the reference, a job
    # the KL penalty already does in the units the objective cares about.
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    # Eval mode turns dropout off: the ratio must compare one deterministic function before and
    # after the update. Gradients flow all the same.
    policy.eval()
    if isinstance(reward, nn.Module):
        reward.eval()

    # the layers that keep activations for the backward pass, and what a token costs in each
    from align.training import activation_bytes_per_token, layers_to_recompute, recompute_layers, trained_layers

    layers = trained_layers(policy)
    per_token = activation_bytes_per_token(policy.config)
    budget = config.activation_budget_mib * 2**20

    batches = iterate_prompt_batches(prompts, config.batch_size, config.seed + rank)
    history = []
    for step in range(1, config.steps + 1):
        # 1. Rollouts, and what they earned token by token.
        rollouts = collect_rollouts(policy, value_head, tokenizer, next(batches), reward, config)
        mask = rollouts.mask
        rewards = compute_rewards(
            rollouts.scores, rollouts.logprobs, rollouts.ref_logprobs, mask, config.kl_coef, config.score_clip
        )
        advantages, returns = compute_gae(rewards, rollouts.values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)

        # 2. Several epochs of clipped updates over shuffled minibatches of those rollouts.
        updates = []
        for _ in range(config.ppo_epochs):
            order = torch.randperm(config.batch_size, device=device)
            for start in range(0, config.batch_size, config.mini_batch_size):
                rows = order[start:start + config.mini_batch_size]
                recompute_layers(layers, layers_to_recompute(rollouts.input_ids[rows].numel(), len(layers), per_token,
                                                             policy.config.hidden_size, budget))
                logprobs, values, _ = forward_response(
                    policy, value_head, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                    rollouts.response_length, config.temperature,
                )
                p_loss, p_clipfrac = policy_loss(
                    logprobs, rollouts.logprobs[rows], advantages[rows], mask[rows], config.cliprange
                )
                v_loss, v_clipfrac = value_loss(
                    values, rollouts.values[rows], returns[rows], mask[rows], config.cliprange_value
                )
                optimizer.zero_grad()
                (p_loss + config.vf_coef * v_loss).backward()
                if state is not None:
                    average_gradients(trainable, state)
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                recompute_layers(layers, 0)  # sampling must not checkpoint (it would drop the KV cache)
                updates.append([p_loss.item(), v_loss.item(), p_clipfrac.item(), v_clipfrac.item()])

        # 3. What happened.
        p_loss, v_loss, p_clipfrac, v_clipfrac = torch.tensor(updates).mean(dim=0).tolist()
        metrics = {
            "step": step,
            "score": rollouts.scores.mean().item(),
            "kl": ((rollouts.logprobs - rollouts.ref_logprobs) * mask).sum(dim=1).mean().item(),
            "entropy": masked_mean(rollouts.entropy, mask).item(),
            "policy_loss": p_loss,
            "value_loss": v_loss,
            "clipfrac": p_clipfrac,
            "value_clipfrac": v_clipfrac,
            "explained_variance": explained_variance(rollouts.values, returns, mask),
            "response_length": mask.sum(dim=1).float().mean().item(),
        }
        if state is not None and state.num_processes > 1:
            keys = [key for key in metrics if key != "step"]
            metrics.update(zip(keys, mean_over_processes([metrics[key] for key in keys], state)))
        history.append(metrics)
        logger.info(
            "ppo step %d/%d: score %.3f kl %.3f entropy %.2f clipfrac %.2f value loss %.4f",
            step, config.steps, metrics["score"], metrics["kl"], metrics["entropy"], metrics["clipfrac"],
            metrics["value_loss"],
        )
        if progress_callback is not None:
            progress_callback(step, metrics)
    return history
