"""TEMPORARY stand-ins for `prefrank.ops.linear_sequence_logprobs` and `prefrank.losses`, which are being
built on other branches. The lead deletes this module at merge time and points the single import in
`prefrank/train/api.py` at the real modules; every trainer call site goes through the DESIGN.md names.

These implement only the subset of each contract the trainer calls, in plain PyTorch:
- `linear_sequence_logprobs`: only labelled tokens enter the matmul, in chunks; the per-token log-prob is
  `-cross_entropy`, so no full-vocabulary log_softmax tensor is ever built. No segment_ids / temperature.
- `dpo_loss`: sigmoid loss only.
- `listwise_dpo_loss`: Plackett-Luce ranker only (through the real `prefrank.ops.plackett_luce_nll`).
- `smpro_loss`: NOT SMPRO's relaxed-sort block target (that needs the sortnet family): a tie-aware
  Plackett-Luce across-group term plus the DESIGN anchor term softplus(-r) on the best group.
- `misp_dpo_loss`: the DESIGN formula (top-1 Plackett-Luce over negatives with log(K·q) correction).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from prefrank.ops import plackett_luce_nll


class PreferenceLossOutput(NamedTuple):
    loss: torch.Tensor
    metrics: dict


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="sum",
                             chunk_size=None):
    lead_shape = labels.shape[:-1]
    flat_labels = labels.reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    positions = (flat_labels != ignore_index).nonzero().squeeze(1)
    sequence_of_token = positions // labels.shape[-1]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    token_logps = []
    step = chunk_size or 1024
    for start in range(0, positions.numel(), step):
        rows = positions[start:start + step]
        logits = F.linear(flat_hidden[rows], weight, bias).to(out_dtype)
        token_logps.append(-F.cross_entropy(logits, flat_labels[rows], reduction="none"))
    num_sequences = math.prod(lead_shape)
    logps = torch.zeros(num_sequences, dtype=out_dtype, device=hidden.device)
    if token_logps:
        logps = logps.index_add(0, sequence_of_token, torch.cat(token_logps))
    if reduction == "mean":
        counts = torch.bincount(sequence_of_token, minlength=num_sequences).clamp(min=1)
        logps = logps / counts
    return logps.reshape(lead_shape)


def _pair_metrics(chosen_rewards, rejected_rewards):
    return {
        "rewards/chosen": chosen_rewards.mean().detach(),
        "rewards/rejected": rejected_rewards.mean().detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().detach(),
    }


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    if loss_type != "sigmoid":
        raise ValueError(f"loss_type={loss_type!r}: the trainer's stand-in only has 'sigmoid'")
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    losses = (-F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing)
    return PreferenceLossOutput(losses.mean(), _pair_metrics(chosen, rejected))


def _group_metrics(rewards, groups):
    valid = groups >= 0
    best = groups == groups.masked_fill(~valid, 2**31).min(-1, keepdim=True).values
    worst = groups == groups.max(-1, keepdim=True).values
    best_mean = (rewards * best).sum(-1) / best.sum(-1)
    worst_mean = (rewards * worst).sum(-1) / worst.sum(-1)
    # metric names as in the losses branch (best-vs-worst here instead of its best-vs-rest / pairwise counts)
    metrics = {"rewards/margin": (best_mean - worst_mean).mean().detach(),
               "rewards/ranking_accuracy": (best_mean > worst_mean).float().mean().detach()}
    for level in range(int(groups.max()) + 1):
        at_level = groups == level
        if at_level.any():
            metrics[f"rewards/group_{level}"] = rewards[at_level].mean().detach()
    return metrics


def listwise_dpo_loss(policy_logps, ref_logps, *, groups=None, beta=0.1, ties="breslow"):
    rewards = beta * (policy_logps - ref_logps)
    losses = plackett_luce_nll(rewards, groups=groups, ties=ties)
    return PreferenceLossOutput(losses.mean(), _group_metrics(rewards, groups))


def smpro_loss(policy_logps, ref_logps, groups, *, beta=0.1, anchor_weight=1.0):
    rewards = beta * (policy_logps - ref_logps)
    across = plackett_luce_nll(rewards, groups=groups, ties="breslow")
    best = groups == groups.masked_fill(groups < 0, 2**31).min(-1, keepdim=True).values
    anchor = (F.softplus(-rewards) * best).sum(-1) / best.sum(-1)
    return PreferenceLossOutput((across + anchor_weight * anchor).mean(), _group_metrics(rewards, groups))


def misp_dpo_loss(policy_pos, ref_pos, policy_negs, ref_negs, *, log_q=None, beta=0.5, mask=None, text=None,
                  text_weight=1.0):
    pos_rewards = beta * (policy_pos - ref_pos)
    neg_rewards = beta * (policy_negs - ref_negs)
    logits = neg_rewards - pos_rewards.unsqueeze(-1)
    if log_q is not None:
        logits = logits - (math.log(policy_negs.shape[-1]) + log_q)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    loss = F.softplus(torch.logsumexp(logits, dim=-1)).mean()
    groups = torch.ones_like(logits, dtype=torch.long)
    if mask is not None:
        groups = groups.masked_fill(~mask, -1)
    groups = torch.cat([torch.zeros_like(groups[:, :1]), groups], dim=-1)
    metrics = _group_metrics(torch.cat([pos_rewards[:, None], neg_rewards], dim=-1), groups)
    if text is not None:
        text_out = dpo_loss(*text, beta=beta)
        loss = loss + text_weight * text_out.loss
        metrics.update({"text/" + key: value for key, value in text_out.metrics.items()})
    return PreferenceLossOutput(loss, metrics)
