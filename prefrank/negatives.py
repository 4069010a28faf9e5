"""MISP-DPO negative-image selection (Li et al., ICLR 2026; papers.md §3.2–3.4).

Pipeline for one training example (prompt x, preferred image m_p) and a pool of M candidate images:

1. joint embedding   e(m, x) = vec(h_v(m) h_t(x)ᵀ)                       :func:`joint_embedding`
2. differences       d_i = e(m_p, x) − e(m_i, x)                           :func:`difference_vectors`
3. sparse autoencoder (sigmoid latents, KL sparsity, 128 latents) on d      :class:`SparseAutoencoder`,
                                                                             :func:`train_sae`
4. score             s_i = ℓ_i / max_j ℓ_j + v_i / max_j v_j                :func:`selection_scores`
                     ℓ_i = ‖d_i − D(E(d_i))‖², v_i = ‖E(d_i)‖₁
5. greedy diverse    K = 3 picks, i* = argmax s_i + w·min_{j∈S}(1 − cos(E(d_i), E(d_j)))
                                                                             :func:`greedy_diverse_select`
6. proposal          q_i = softmax(s_i / τ) over the pool; the selected log q_k go to
                     ``prefrank.losses.misp_dpo_loss(..., log_q=...)``, which applies log(K·q_k)
                                                                             :func:`proposal_log_probs`

The image and text encoders are pluggable (any callables batch → (N, D) tensor): the reference trainer plugs
in the policy's own vision tower and token embeddings; a real CLIP plugs in the same way
(``JointEmbedder(clip.get_image_features, clip_text_fn)``).

Pools of different sizes (e.g. per-example candidate sets) are padded to one M and passed with a ``mask``
(..., M) bool, True = valid candidate, to steps 4–6: the maxima, the greedy picks and q run over the valid
candidates only (invalid ones get score and log q = -inf); ``mask=None`` = every candidate valid.

What the paper leaves open and what we chose (papers.md §3.3/§3.6 flag these as unknown):

- Encoders (CLIP variant unknown): pluggable. Each embedding is L2-normalised before the outer product (CLIP
  embeddings are compared by cosine); an optional fixed random Gaussian projection per side keeps the joint
  dimension small (768-d CLIP gives 589,824-d otherwise).
- SAE: sigmoid latents (the classic KL-sparse autoencoder, which KL(ρ‖ρ̂) presupposes), linear decoder,
  ρ = 0.05 (unknown in the paper), γ = 1 and 128 latents (the paper's). Inputs are divided by one global
  RMS scale fixed at fit time so the sigmoid units start unsaturated whatever the encoder's scale.
- SAE training data: the difference vectors of every (example, candidate) pair of the current round; scores
  are normalised by the max over each example's own pool (its valid candidates).
- Greedy step 1 has an empty diversity term (argmax s_i); ties go to the lowest index; diversity weight
  default 1.0 (unknown in the paper, where it is also called β).
- q: softmax(s/τ) with τ = 1 by default. Whether the paper applies 1/q to the *greedy* set is unknown: the
  default "greedy" mode returns the selected items' log q (the combination the issue asks for, flagged as our
  reading); mode "sample" draws K i.i.d. from q, for which the log(K·q) correction gives the consistent
  sampled-softmax estimator of papers.md §3.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prefrank import _checks

__all__ = [
    "JointEmbedder", "joint_embedding", "difference_vectors", "SparseAutoencoder", "kl_sparsity", "train_sae",
    "selection_scores", "greedy_diverse_select", "proposal_log_probs", "importance_log_weights",
    "sample_from_proposal", "NegativeSelection", "select_negatives",
]


# ------------------------------------------------------------------------------------------------------------
# 1–2. Joint embedding and difference vectors
# ------------------------------------------------------------------------------------------------------------

def joint_embedding(image_emb, text_emb, *, normalize=True):
    """vec(h_v h_tᵀ) for each row: ``image_emb`` (..., Dv), ``text_emb`` (..., Dt) broadcast against each other
    on the leading dims → (..., Dv·Dt). ``normalize`` L2-normalises h_v and h_t first (so ‖e‖ = 1)."""
    _checks.float_tensor("image_emb", image_emb)
    _checks.float_tensor("text_emb", text_emb)
    _checks.same_device("image_emb", image_emb, text_emb=text_emb)
    if image_emb.dim() < 1 or text_emb.dim() < 1:
        raise ValueError("image_emb and text_emb must have a feature dimension")
    if normalize:
        image_emb = nn.functional.normalize(image_emb, dim=-1)
        text_emb = nn.functional.normalize(text_emb, dim=-1)
    outer = image_emb.unsqueeze(-1) * text_emb.unsqueeze(-2)
    return outer.flatten(-2)


def difference_vectors(positive, candidates):
    """d_i = e(m_p, x) − e(m_i, x): ``positive`` (..., D), ``candidates`` (..., M, D) → (..., M, D)."""
    _checks.float_tensor("positive", positive)
    _checks.float_tensor("candidates", candidates)
    if candidates.dim() != positive.dim() + 1 or candidates.shape[-1] != positive.shape[-1]:
        raise ValueError(f"candidates must be (..., M, D) for positive (..., D) = {tuple(positive.shape)}, "
                         f"got {tuple(candidates.shape)}")
    return positive.unsqueeze(-2) - candidates


class JointEmbedder:
    """Pluggable joint embedder: ``JointEmbedder(image_encoder, text_encoder)(images, prompts)`` → (N, P).

    ``image_encoder(images)`` → (N, Dv) and ``text_encoder(prompts)`` → (N, Dt) are any callables (the
    policy's vision tower, a CLIP, …). ``image_proj``/``text_proj`` (int or None): project each side with a
    fixed random Gaussian matrix (seeded by ``seed``, built on first use from the seen width) before the
    outer product, so P = image_proj·text_proj instead of Dv·Dt.
    """

    def __init__(self, image_encoder: Callable, text_encoder: Callable, *, image_proj=None, text_proj=None,
                 seed=0):
        if not callable(image_encoder) or not callable(text_encoder):
            raise TypeError("image_encoder and text_encoder must be callables returning (N, D) tensors")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_proj = _checks.positive_int_or_none("image_proj", image_proj)
        self.text_proj = _checks.positive_int_or_none("text_proj", text_proj)
        self.seed = seed
        self._matrices: dict[str, torch.Tensor] = {}

    def _project(self, side, emb, out_dim):
        if out_dim is None:
            return emb
        matrix = self._matrices.get(side)
        if matrix is None or matrix.shape[0] != emb.shape[-1]:
            gen = torch.Generator().manual_seed(self.seed + (0 if side == "image" else 1))
            matrix = torch.randn(emb.shape[-1], out_dim, generator=gen, dtype=torch.float64) / math.sqrt(out_dim)
            self._matrices[side] = matrix
        return emb @ matrix.to(device=emb.device, dtype=emb.dtype)

    def encode_images(self, images):
        return self._project("image", self._encoded("image_encoder", self.image_encoder(images)), self.image_proj)

    def encode_texts(self, prompts):
        return self._project("text", self._encoded("text_encoder", self.text_encoder(prompts)), self.text_proj)

    @staticmethod
    def _encoded(name, emb):
        _checks.float_tensor(f"{name}(...) output", emb)
        if emb.dim() != 2:
            raise ValueError(f"{name} must return an (N, D) tensor, got shape {tuple(emb.shape)}")
        return emb

    def __call__(self, images, prompts):
        return joint_embedding(self.encode_images(images), self.encode_texts(prompts))


# ------------------------------------------------------------------------------------------------------------
# 3. Sparse autoencoder
# ------------------------------------------------------------------------------------------------------------

def kl_sparsity(rho, rho_hat, eps=1e-6):
    """Σ_j KL(ρ‖ρ̂_j) = Σ_j ρ log(ρ/ρ̂_j) + (1−ρ) log((1−ρ)/(1−ρ̂_j)) for mean activations ``rho_hat`` (L,)."""
    rho_hat = rho_hat.clamp(eps, 1 - eps)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class SparseAutoencoder(nn.Module):
    """Classic KL-sparse autoencoder: E(d) = sigmoid(W_e d/scale + b_e), D(z) = (W_d z + b_d)·scale.

    ``scale`` (a buffer, set by :func:`train_sae` to the RMS of the training vectors) makes the encoder see
    unit-scale inputs; reconstructions and errors are reported in the caller's units.
    """

    def __init__(self, in_dim, latent_dim=128):
        super().__init__()
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"in_dim must be a positive int, got {in_dim!r}")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        self.encoder = nn.Linear(in_dim, latent_dim)
        self.decoder = nn.Linear(latent_dim, in_dim)
        self.register_buffer("scale", torch.ones(()))

    def encode(self, d):
        return torch.sigmoid(self.encoder(d / self.scale))

    def decode(self, z):
        return self.decoder(z) * self.scale

    def forward(self, d):
        z = self.encode(d)
        return self.decode(z), z

    def reconstruction_error(self, d):
        """ℓ = ‖d − D(E(d))‖² per row (..., D) → (...)."""
        recon, _ = self(d)
        return (d - recon).pow(2).sum(-1)

    def loss(self, d, *, rho=0.05, gamma=1.0):
        """Mean over rows of ‖d − D(E(d))‖²/scale² + γ·Σ_j KL(ρ‖ρ̂_j), ρ̂ = batch-mean activation."""
        recon, z = self(d)
        recon_err = ((d - recon) / self.scale).pow(2).sum(-1).mean()
        return recon_err + gamma * kl_sparsity(rho, z.reshape(-1, z.shape[-1]).mean(0))


@dataclass
class SAEFit:
    """Result of :func:`train_sae`: the model and its per-step training losses."""
    sae: SparseAutoencoder
    losses: list[float]


def train_sae(vectors, *, latent_dim=128, rho=0.05, gamma=1.0, steps=200, lr=1e-2, batch_size=256,
              weight_decay=0.0, seed=0):
    """Fit a :class:`SparseAutoencoder` on ``vectors`` (N, D) with Adam (deterministic given ``seed``)."""
    _checks.float_tensor("vectors", vectors)
    if vectors.dim() != 2 or vectors.shape[0] < 1:
        raise ValueError(f"vectors must be a non-empty (N, D) tensor, got shape {tuple(vectors.shape)}")
    if not 0 < rho < 1:
        raise ValueError(f"rho must be in (0, 1), got {rho}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _checks.positive_int_or_none("steps", steps)
    _checks.positive_int_or_none("batch_size", batch_size)
    data = vectors.detach()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = SparseAutoencoder(data.shape[1], latent_dim).to(device=data.device, dtype=data.dtype)
    rms = data.pow(2).sum(-1).mean().sqrt()
    sae.scale.fill_(float(rms) if float(rms) > 0 else 1.0)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        if data.shape[0] > batch_size:
            idx = torch.randperm(data.shape[0], generator=gen)[:batch_size].to(data.device)
            batch = data[idx]
        else:
            batch = data
        loss = sae.loss(batch, rho=rho, gamma=gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    sae.eval()
    return SAEFit(sae, losses)


# ------------------------------------------------------------------------------------------------------------
# 4–6. Score, greedy diverse selection, proposal
# ------------------------------------------------------------------------------------------------------------

def _checked_mask(mask, pool_shape, pool_name, device):
    """``mask`` (..., M) bool with the pool shape of ``pool_name`` (True = valid candidate), or None."""
    if mask is None:
        return None
    _checks.bool_tensor("mask", mask)
    if mask.shape != pool_shape:
        raise ValueError(f"mask must have the pool shape {tuple(pool_shape)} of {pool_name}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but {pool_name} is on {device}")
    return mask


def _require_valid(mask, k, what):
    """Every pool of ``mask`` must hold at least ``k`` valid candidates (``what`` says why)."""
    fewest = int(mask.sum(-1).min()) if mask.numel() else k
    if fewest < k:
        raise ValueError(f"mask leaves a pool with {fewest} valid candidate(s); {what} needs at least k={k}")


def _max_normalised(x, mask=None):
    if mask is not None:  # invalid entries (possibly garbage, e.g. NaN padding) neither set the max nor get a value
        x = x.masked_fill(~mask, 0)
    top = x.amax(-1, keepdim=True)
    return torch.where(top > 0, x / torch.where(top > 0, top, 1), torch.zeros_like(x))


@torch.no_grad()
def selection_scores(sae, diffs, *, mask=None):
    """s_i = ℓ_i / max_j ℓ_j + v_i / max_j v_j over each pool.

    ``diffs`` (..., M, D) → (scores (..., M), latents (..., M, L), recon (..., M), l1 (..., M)), where
    ℓ = reconstruction error (novel/hard), v = ‖E(d)‖₁ (semantic deviation); the max runs over the M
    candidates of each pool (a pool whose max is 0 contributes 0 for that term).

    ``mask`` (..., M) bool, True = valid candidate (pools of different sizes padded to one M): the maxima run
    over the valid candidates only and invalid candidates score -inf (never picked, q = 0); their latents,
    ℓ and v are returned as computed.
    """
    _checks.float_tensor("diffs", diffs)
    if diffs.dim() < 2 or diffs.shape[-2] < 1:
        raise ValueError(f"diffs must be (..., M, D) with M >= 1, got shape {tuple(diffs.shape)}")
    mask = _checked_mask(mask, diffs.shape[:-1], "diffs (..., M, D)", diffs.device)
    recon, latents = sae(diffs)
    recon_err = (diffs - recon).pow(2).sum(-1)
    l1 = latents.abs().sum(-1)
    scores = _max_normalised(recon_err, mask) + _max_normalised(l1, mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores, latents, recon_err, l1


def greedy_diverse_select(scores, latents, k=3, *, diversity_weight=1.0, mask=None):
    """Algorithm 1 of MISP-DPO: K greedy picks maximising s_i + w·min_{j∈S}(1 − cos(z_i, z_j)).

    ``scores`` (..., M), ``latents`` (..., M, L) → indices (..., k) int64 in pick order. The first pick is
    argmax s (empty diversity term); ties go to the lowest index. ``mask`` (..., M) bool, True = valid: only
    valid candidates are picked (each pool needs at least k of them).
    """
    _checks.float_tensor("scores", scores)
    _checks.float_tensor("latents", latents)
    if latents.shape[:-1] != scores.shape:
        raise ValueError(f"latents must be (..., M, L) for scores {tuple(scores.shape)}, "
                         f"got {tuple(latents.shape)}")
    m = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"k must be an int in [1, M={m}], got {k!r}")
    if diversity_weight < 0:
        raise ValueError(f"diversity_weight must be >= 0, got {diversity_weight}")
    mask = _checked_mask(mask, scores.shape, "scores (..., M)", scores.device)
    if mask is not None:
        _require_valid(mask, k, "greedy selection of k picks")
    unit = nn.functional.normalize(latents, dim=-1)
    distance = 1 - unit @ unit.transpose(-1, -2)                       # (..., M, M)
    min_distance = torch.zeros_like(scores)                            # empty set: no diversity term
    taken = torch.zeros_like(scores, dtype=torch.bool) if mask is None else ~mask   # invalid = never pickable
    picks = []
    for step in range(k):
        objective = scores + diversity_weight * min_distance
        objective = objective.masked_fill(taken, float("-inf"))
        pick = objective.argmax(-1)                                    # first max = lowest index on ties
        picks.append(pick)
        taken = taken.scatter(-1, pick.unsqueeze(-1), True)
        to_pick = distance.gather(-1, pick[..., None, None].expand(*pick.shape, m, 1)).squeeze(-1)
        min_distance = to_pick if step == 0 else torch.minimum(min_distance, to_pick)
    return torch.stack(picks, -1)


def proposal_log_probs(scores, *, tau=1.0, mask=None):
    """log q_i with q = softmax(s / τ) over each pool: ``scores`` (..., M) → (..., M) (log-sum-exp = 0).

    ``mask`` (..., M) bool, True = valid: q is the softmax over the valid candidates only (log q = -inf on
    invalid ones, whatever their score); each pool needs at least one valid candidate.
    """
    _checks.float_tensor("scores", scores)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    mask = _checked_mask(mask, scores.shape, "scores (..., M)", scores.device)
    if mask is None:
        return torch.log_softmax(scores / tau, dim=-1)
    _require_valid(mask, 1, "the proposal q")
    return torch.log_softmax((scores / tau).masked_fill(~mask, float("-inf")), dim=-1)


def importance_log_weights(log_q_selected):
    """The log(K·q_k) correction ``misp_dpo_loss`` subtracts from a_k: (..., K) → (..., K).

    Zero for uniform sampling (q_k = 1/M with K = M, or any q_k = 1/K): the estimator then reduces to the
    plain multi-negative loss.
    """
    _checks.float_tensor("log_q_selected", log_q_selected)
    return log_q_selected + math.log(log_q_selected.shape[-1])


def sample_from_proposal(log_q, k, *, generator=None):
    """K i.i.d. draws (with replacement) from q = exp(log_q) per pool: (..., M) → indices (..., k).

    Candidates with log q = -inf (e.g. masked out in :func:`proposal_log_probs`) have q = 0 and are never drawn.
    """
    _checks.float_tensor("log_q", log_q)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if log_q.numel() and not bool(torch.isfinite(log_q).any(-1).all()):
        raise ValueError("log_q must give every pool at least one candidate with finite log q")
    probs = log_q.detach().exp().reshape(-1, log_q.shape[-1]).cpu().double()
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    return draws.reshape(*log_q.shape[:-1], k).to(log_q.device)


@dataclass
class NegativeSelection:
    """Selected negatives of each pool: ``indices`` (B, K) into the pool, their ``log_q`` (B, K) for
    ``misp_dpo_loss(log_q=...)``, and the pool-wide ``scores`` / ``log_q_pool`` (B, M) for inspection."""
    indices: torch.Tensor
    log_q: torch.Tensor
    scores: torch.Tensor
    log_q_pool: torch.Tensor


def select_negatives(sae, diffs, k=3, *, mode="greedy", diversity_weight=1.0, tau=1.0, generator=None,
                     mask=None):
    """Score pools ``diffs`` (B, M, D) with ``sae`` and pick K negatives per pool.

    mode "greedy": :func:`greedy_diverse_select` (the paper's default pipeline); "sample": K i.i.d. draws
    from q = softmax(s/τ). Either way ``log_q`` holds log q of the picked items.

    ``mask`` (B, M) bool, True = valid candidate, for pools of different sizes padded to one M: scores are
    normalised over, q is a softmax over, and picks come from the valid candidates only (``scores`` = -inf and
    ``log_q_pool`` = -inf on invalid ones); every pool needs at least k valid candidates.
    """
    _checks.choice("mode", mode, ("greedy", "sample"))
    _checks.float_tensor("diffs", diffs)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    mask = _checked_mask(mask, diffs.shape[:-1], "diffs (B, M, D)", diffs.device)
    if mask is not None:
        _require_valid(mask, k, "selecting k negatives per pool")
    scores, latents, _, _ = selection_scores(sae, diffs, mask=mask)
    log_q_pool = proposal_log_probs(scores, tau=tau, mask=mask)
    if mode == "greedy":
        indices = greedy_diverse_select(scores, latents, k, diversity_weight=diversity_weight, mask=mask)
    else:
        indices = sample_from_proposal(log_q_pool, k, generator=generator)
    return NegativeSelection(indices, log_q_pool.gather(-1, indices), scores, log_q_pool)
