"""Self-generated preference data: SMPRO groups, corruptions, MISP-DPO negative selection."""

import json
import math

import pytest
import torch

from prefrank import negatives as neg
from prefrank.train import corruptions as cor
from prefrank.train import preference_groups as pg
from prefrank.train.methods import METHODS

# ------------------------------------------------------------------------------------------------------------
# SMPRO groups
# ------------------------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert pg.normalize_answer("  Two  Red\tcircles. ") == "two red circles"
    assert pg.normalize_answer('"Yes!"') == "yes"
    assert pg.normalize_answer("3") != pg.normalize_answer("4")
    with pytest.raises(TypeError, match="answers"):
        pg.normalize_answer(3)


def test_build_groups_dedup_ordering_and_positive_removal():
    positives = ["Two", "two.", "three"]
    negatives = [["TWO", "four", "Four ", "five"],     # t=500: "TWO" is a positive → dropped; "Four " dup
                 ["four", "two"],                       # t=800: all already used → empty group dropped
                 ["six", "five", "seven"]]              # t=950: "five" already in level 1
    responses, groups = pg.build_groups(positives, negatives)
    assert responses == ["Two", "three", "four", "five", "six", "seven"]
    assert groups == [0, 0, 1, 1, 2, 2]                 # levels renumbered contiguously, severity order kept


def test_build_groups_cap_and_errors():
    responses, groups = pg.build_groups(["a", "b", "c"], [["c", "d", "e", "f"]], max_per_group=2)
    # "c" is a positive beyond the cap: still excluded from the negatives
    assert responses == ["a", "b", "d", "e"] and groups == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="positives"):
        pg.build_groups([], [["x"]])
    with pytest.raises(ValueError, match="max_per_group"):
        pg.build_groups(["a"], [["x"]], max_per_group=0)
    with pytest.raises(TypeError, match="negative group"):
        pg.build_groups(["a"], ["xyz"])


def test_pad_groups_to_batch():
    responses, groups = pg.pad_groups([["a", "b", "c"], ["d", "e"]], [[0, 1, 2], [0, 1]])
    assert responses == [["a", "b", "c"], ["d", "e", ""]]
    assert groups.dtype == torch.long
    assert groups.tolist() == [[0, 1, 2], [0, 1, -1]]
    _, wide = pg.pad_groups([["a"]], [[0]], k=3)
    assert wide.tolist() == [[0, -1, -1]]
    with pytest.raises(ValueError, match="k=1"):
        pg.pad_groups([["a", "b"]], [[0, 1]], k=1)
    with pytest.raises(ValueError, match="group labels"):
        pg.pad_groups([["a", "b"]], [[0]])


def _fake_generate(calls):
    """A policy stand-in: answers depend on how noisy the image is (mean |x|) and on sampling."""
    def generate(views, questions, do_sample, temperature, generator):
        calls.append(do_sample)
        noise = torch.stack([view.std() for view in views])
        out = []
        for b, _ in enumerate(questions):
            if do_sample:
                out.append(["red", "Red.", "crimson"][int(torch.randint(3, (1,), generator=generator))])
            else:
                out.append("red" if noise[b] < 0.6 else ("blue" if noise[b] < 0.9 else "green"))
        return out
    return generate


def test_generate_group_records_and_jsonl_cache(tmp_path):
    calls = []
    gen = torch.Generator().manual_seed(0)
    pixels = torch.full((2, 3, 8, 8), 0.2)
    pixels[:, :, :4] = -0.2
    ladder = cor.corruption_ladder("diffusion")
    records = pg.generate_group_records(_fake_generate(calls), pixels, ["colour?", "colour?"], [7, 8], ladder,
                                        num_samples=3, temperature=1.0, generator=gen)
    assert calls == [False, True, True, True, False, False, False]        # budget: 1 + 3 + 3 views
    for record in records:
        assert record.groups[0] == 0 and record.groups == sorted(record.groups)
        positives = {pg.normalize_answer(r) for r, g in zip(record.responses, record.groups) if g == 0}
        assert "red" in positives
        negatives = [pg.normalize_answer(r) for r, g in zip(record.responses, record.groups) if g > 0]
        assert not positives & set(negatives) and len(negatives) == len(set(negatives))
        assert record.meta["corruptions"] == ["diffusion@500", "diffusion@800", "diffusion@950"]
    path = tmp_path / "round0" / "groups.jsonl"
    pg.save_records_jsonl(path, records)
    loaded = pg.load_records_jsonl(path)
    assert [r.to_json() for r in loaded] == [r.to_json() for r in records]
    path.write_text(path.read_text() + json.dumps({"image": 1, "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=":3:"):
        pg.load_records_jsonl(path)


# ------------------------------------------------------------------------------------------------------------
# Corruptions
# ------------------------------------------------------------------------------------------------------------


def test_seva_schedule_matches_formula():
    alpha_bar = cor.seva_alphas_cumprod()
    assert alpha_bar.shape == (1000,)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all()) and 0 < float(alpha_bar[-1]) < float(alpha_bar[0]) < 1
    for t in cor.SEVA_STEPS:                          # independent scalar recomputation of the formula
        prod = 1.0
        for s in range(t + 1):
            beta = 1 / (1 + math.exp(-(-6 + 12 * s / 999))) * (5e-3 - 1e-5) + 1e-5
            prod *= 1 - beta
        assert float(alpha_bar[t]) == pytest.approx(prod, rel=1e-12)
    signal = [float(alpha_bar[t]) for t in cor.SEVA_STEPS]            # ≈ 0.745, 0.218, 0.104
    assert signal[0] > 0.7 and signal[1] < 0.25 and signal[2] < 0.11  # t=950 keeps ~1/3 of the signal amplitude


def test_diffusion_noise_formula_and_determinism():
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x_copy = x0.clone()
    noisy = cor.diffusion_noise(x0, 800, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    ab = float(cor.seva_alphas_cumprod()[800])
    torch.testing.assert_close(noisy, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps)
    torch.testing.assert_close(x0, x_copy, rtol=0, atol=0)            # input untouched
    again = cor.diffusion_noise(x0, 800, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(noisy, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="t must"):
        cor.diffusion_noise(x0, 1000)


@pytest.mark.parametrize("family", sorted(cor.FAMILIES))
def test_severity_increases_corruption(family):
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    errors = []
    for corruption in cor.corruption_ladder(family):
        out = corruption(x0, generator=torch.Generator().manual_seed(3), patch_size=4)
        assert out.shape == x0.shape and torch.isfinite(out).all()
        errors.append(float((out - x0).pow(2).mean()))
    assert errors[0] > 0
    assert all(b > a for a, b in zip(errors, errors[1:])), errors


def test_patch_shuffle_moves_chosen_patches_only():
    x0 = torch.arange(16.0).repeat_interleave(4 * 4).reshape(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(1, 16, 16)
    out = cor.patch_shuffle(x0, 0.5, patch_size=4, generator=torch.Generator().manual_seed(0))
    patches_in = x0.reshape(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16)
    patches_out = out.reshape(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16)
    moved = (patches_in != patches_out).any(-1)
    assert int(moved.sum()) == 8                                      # a derangement of the 8 chosen patches
    assert sorted(patches_out[:, 0].tolist()) == sorted(patches_in[:, 0].tolist())
    with pytest.raises(ValueError, match="patch_size"):
        cor.patch_shuffle(x0, 0.5, patch_size=5)


def test_corruption_ladder_validation():
    assert [c.name for c in cor.corruption_ladder()] == ["diffusion@500", "diffusion@800", "diffusion@950"]
    with pytest.raises(ValueError, match="increasing"):
        cor.corruption_ladder("blur", [2.0, 1.0])
    with pytest.raises(ValueError, match="family"):
        cor.corruption_ladder("jpeg")


# ------------------------------------------------------------------------------------------------------------
# MISP-DPO negative selection
# ------------------------------------------------------------------------------------------------------------


def test_joint_embedding_is_outer_product():
    hv, ht = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    e = neg.joint_embedding(hv, ht, normalize=False)
    assert e.shape == (3, 20)
    torch.testing.assert_close(e[1].reshape(4, 5), torch.outer(hv[1], ht[1]))
    unit = neg.joint_embedding(hv, ht)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    d = neg.difference_vectors(unit[0], unit[1:])
    torch.testing.assert_close(d, unit[0] - unit[1:])


def test_joint_embedder_pluggable_and_projected():
    embedder = neg.JointEmbedder(lambda imgs: imgs.flatten(1), lambda texts: torch.tensor(
        [[float(len(t)), 1.0, 0.0] for t in texts]), image_proj=6, text_proj=2, seed=3)
    e = embedder(torch.rand(4, 2, 3, 3), ["a", "bb", "ccc", "dddd"])
    assert e.shape == (4, 12)
    e2 = neg.JointEmbedder(embedder.image_encoder, embedder.text_encoder, image_proj=6, text_proj=2, seed=3)(
        torch.rand(1, 2, 3, 3), ["a"])
    assert e2.shape == (1, 12)
    with pytest.raises(ValueError, match="image_encoder"):
        neg.JointEmbedder(lambda x: torch.ones(2), lambda t: torch.ones(2, 2))(torch.ones(1), ["a"])


def test_sae_training_reduces_reconstruction_error():
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 40, generator=gen)                        # data on a 6-d subspace
    data = torch.rand(256, 6, generator=gen) @ basis
    fit = neg.train_sae(data, latent_dim=128, steps=150, lr=1e-2, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        before = neg.SparseAutoencoder(40, 128)
    before.scale.fill_(float(fit.sae.scale))
    with torch.no_grad():
        err_before = float(before.reconstruction_error(data).mean())
        err_after = float(fit.sae.reconstruction_error(data).mean())
        mean_activation = fit.sae.encode(data).mean()
    assert err_after < 0.1 * err_before, (err_before, err_after)
    assert fit.losses[-1] < 0.2 * fit.losses[0]
    assert float(mean_activation) < 0.2                               # the KL term keeps latents sparse
    again = neg.train_sae(data, latent_dim=128, steps=10, lr=1e-2, seed=0)
    assert again.losses == fit.losses[:10]                            # deterministic given the seed


def test_kl_sparsity_zero_at_target():
    assert float(neg.kl_sparsity(0.05, torch.full((128,), 0.05))) == pytest.approx(0.0, abs=1e-9)
    assert float(neg.kl_sparsity(0.05, torch.full((4,), 0.5))) > 0


class _FixedSAE(torch.nn.Module):
    """Constructed SAE: latents and reconstructions given per candidate (scores are then known exactly)."""

    def __init__(self, latents, recon_err):
        super().__init__()
        self.latents, self.recon_err = latents, recon_err

    def forward(self, d):
        recon = d.clone()
        recon[..., 0] -= self.recon_err.sqrt()                        # ‖d − recon‖² = recon_err
        return recon, self.latents


def test_selection_scores_formula():
    latents = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [3.0, 1.0]])
    recon_err = torch.tensor([1.0, 4.0, 0.5, 2.0])
    scores, lat, recon, l1 = neg.selection_scores(_FixedSAE(latents, recon_err), torch.zeros(4, 3))
    torch.testing.assert_close(recon, recon_err)
    torch.testing.assert_close(l1, torch.tensor([1.0, 2.0, 1.0, 4.0]))
    torch.testing.assert_close(scores, recon_err / 4 + l1 / 4)


def test_greedy_selection_prefers_novel_and_diverse():
    # candidates 0 and 1 are the most novel but nearly identical in latent space; 2 is slightly less novel but
    # points elsewhere; 3 is boring.
    scores = torch.tensor([2.0, 1.95, 1.7, 0.2, 1.0])
    latents = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                            [0.7, 0.7, 0.0]])
    picks = neg.greedy_diverse_select(scores, latents, k=3, diversity_weight=1.0)
    assert picks.tolist() == [0, 2, 1]   # 2 beats the near-duplicate 1 (1.7 + 1 > 1.95 + ~0)
    # without diversity: pure score order
    assert neg.greedy_diverse_select(scores, latents, k=3, diversity_weight=0.0).tolist() == [0, 1, 2]
    # strong diversity: the orthogonal boring candidate beats the near-duplicate
    strong = neg.greedy_diverse_select(scores, latents, k=3, diversity_weight=10.0).tolist()
    assert strong[:2] == [0, 2] and strong[2] == 3
    # batched = per-row
    batch = neg.greedy_diverse_select(torch.stack([scores, scores.flip(0)]),
                                      torch.stack([latents, latents.flip(0)]), k=3)
    assert batch[0].tolist() == picks.tolist()
    assert batch[1].tolist() == [4 - i for i in picks.tolist()]
    with pytest.raises(ValueError, match="k must"):
        neg.greedy_diverse_select(scores, latents, k=6)


def test_end_to_end_selection_finds_planted_negatives():
    # Pool: 20 near-copies of the positive plus 3 planted candidates that differ along different directions.
    gen = torch.Generator().manual_seed(4)
    dim = 24
    positive = torch.randn(dim, generator=gen)
    pool = positive + 0.02 * torch.randn(23, dim, generator=gen)
    for j, i in enumerate((5, 11, 17)):
        pool[i, j * 8:(j + 1) * 8] += 3.0
    diffs = neg.difference_vectors(positive, pool)
    fit = neg.train_sae(diffs.reshape(-1, dim), latent_dim=128, steps=200, seed=0)
    selection = neg.select_negatives(fit.sae, diffs[None], k=3)
    assert sorted(selection.indices[0].tolist()) == [5, 11, 17]
    torch.testing.assert_close(selection.log_q, selection.log_q_pool.gather(-1, selection.indices))


def test_proposal_and_importance_weights():
    scores = torch.randn(3, 7, dtype=torch.float64)
    log_q = neg.proposal_log_probs(scores, tau=0.5)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(log_q, torch.log_softmax(scores / 0.5, -1))
    # uniform q over K = M candidates: the log(K·q) correction vanishes
    uniform = neg.proposal_log_probs(torch.zeros(2, 3))
    torch.testing.assert_close(neg.importance_log_weights(uniform), torch.zeros(2, 3))
    # E_q[1/(K q)·K] over the pool = M: Σ_i q_i · exp(−log(K q_i))·K = M for K draws
    w = (-neg.importance_log_weights(log_q[:, :1])).exp()             # K = 1
    torch.testing.assert_close((log_q.exp() * (-log_q).exp()).sum(-1), torch.full((3,), 7.0, dtype=torch.float64))
    assert w.shape == (3, 1)
    with pytest.raises(ValueError, match="tau"):
        neg.proposal_log_probs(scores, tau=0.0)


def test_sampled_negatives_estimator_is_unbiased():
    # Ẑ = (1/K) Σ_k e^{a_k}/q_k estimates Z = Σ_i e^{a_i} (papers.md §3.2): check the mean over many draws.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(9, dtype=torch.float64, generator=gen)
    log_q = neg.proposal_log_probs(torch.randn(9, dtype=torch.float64, generator=gen))
    idx = neg.sample_from_proposal(log_q.expand(20000, 9), 3, generator=gen)
    z_hat = (a[idx] - log_q[idx]).exp().mean(-1)
    assert float(z_hat.mean()) == pytest.approx(float(a.exp().sum()), rel=0.03)
    corrected = a[idx] - neg.importance_log_weights(log_q[idx])
    torch.testing.assert_close(corrected.exp().sum(-1), z_hat)        # what misp_dpo_loss's LSE sees


def _masked_case():
    # candidate 2 has by far the largest reconstruction error and latent norm: without the mask it would win
    # the first greedy pick and dominate q, and its maxima would shrink every other score.
    latents = torch.tensor([[1.0, 0.0], [0.0, 2.0], [90.0, 90.0], [0.5, 0.5], [3.0, 1.0], [0.2, 0.9]])
    recon_err = torch.tensor([1.0, 4.0, 500.0, 0.5, 2.0, 3.0])
    mask = torch.tensor([True, True, False, True, True, True])
    return _FixedSAE(latents, recon_err), latents, recon_err, mask


def test_masked_scores_normalise_over_valid_candidates():
    sae, latents, recon_err, mask = _masked_case()
    scores, _, recon, l1 = neg.selection_scores(sae, torch.zeros(6, 3), mask=mask)
    valid = mask.nonzero().squeeze(-1)
    expected = recon_err[valid] / recon_err[valid].max() + l1[valid] / l1[valid].max()
    torch.testing.assert_close(scores[valid], expected)               # the huge invalid entry sets no max
    assert scores[2] == float("-inf")
    torch.testing.assert_close(recon, recon_err)                      # ℓ, v returned as computed
    unmasked, _, _, _ = neg.selection_scores(sae, torch.zeros(6, 3))
    assert float(unmasked[valid].max()) < 0.1                         # what the mask protects against
    # garbage (NaN) padding stays out of the valid scores
    nan_sae = _FixedSAE(latents, recon_err.clone().index_fill_(0, torch.tensor([2]), float("nan")))
    scores_nan, _, _, _ = neg.selection_scores(nan_sae, torch.zeros(6, 3), mask=mask)
    torch.testing.assert_close(scores_nan[valid], expected)


def test_masked_proposal_is_softmax_over_valid_candidates():
    scores = torch.randn(3, 7, dtype=torch.float64)
    scores[0, 4] = 50.0                                               # invalid and largest
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4] = mask[0, 0] = mask[2, 6] = False
    log_q = neg.proposal_log_probs(scores, tau=0.5, mask=mask)
    assert torch.isneginf(log_q[~mask]).all() and torch.isfinite(log_q[mask]).all()
    torch.testing.assert_close(torch.logsumexp(log_q, -1), torch.zeros(3, dtype=torch.float64))
    for row in range(3):
        torch.testing.assert_close(log_q[row, mask[row]], torch.log_softmax(scores[row, mask[row]] / 0.5, -1))
    # draws from a masked q never hit an invalid candidate
    draws = neg.sample_from_proposal(log_q, 500, generator=torch.Generator().manual_seed(0))
    assert mask.gather(-1, draws).all()
    with pytest.raises(ValueError, match="finite log q"):
        neg.sample_from_proposal(torch.full((2, 3), float("-inf")), 1)


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_masked_selection_never_picks_an_invalid_candidate(mode):
    _, latents, recon_err, mask = _masked_case()
    sae, diffs = _FixedSAE(latents[None], recon_err[None]), torch.zeros(1, 6, 3)
    unmasked = neg.select_negatives(sae, diffs, 3, mode=mode, generator=torch.Generator().manual_seed(0))
    assert 2 in unmasked.indices[0].tolist()                          # the case is one the mask must fix
    for seed in range(20):
        sel = neg.select_negatives(sae, diffs, 3, mode=mode, mask=mask[None],
                                   generator=torch.Generator().manual_seed(seed))
        assert 2 not in sel.indices[0].tolist()
        assert torch.isfinite(sel.log_q).all()
        torch.testing.assert_close(sel.log_q, sel.log_q_pool.gather(-1, sel.indices))
        assert torch.isneginf(sel.log_q_pool[0, 2]) and torch.isneginf(sel.scores[0, 2])
    if mode == "greedy":                                              # finite scores: the mask alone excludes 2
        for weight in (0.0, 1.0, 10.0):
            picks = neg.greedy_diverse_select(recon_err, latents, 5, diversity_weight=weight, mask=mask)
            assert sorted(picks.tolist()) == [0, 1, 3, 4, 5]
            assert picks[0] == 1                                      # the best valid score goes first


def test_masked_selection_equals_selection_on_the_unpadded_pools(seed):
    # pools of 9 and 5 valid candidates padded to M = 9 (padding = NaN garbage) select exactly what each pool
    # selects on its own
    gen = torch.Generator().manual_seed(seed)
    diffs = torch.randn(2, 9, 12, dtype=torch.float64, generator=gen)
    sae = neg.train_sae(diffs.reshape(-1, 12), latent_dim=16, steps=20, seed=seed).sae
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    padded = diffs.clone()
    padded[1, 5:] = float("nan")
    for mode in ("greedy", "sample"):
        sel = neg.select_negatives(sae, padded, 4, mode=mode, tau=0.7, mask=mask,
                                   generator=torch.Generator().manual_seed(seed))
        for row, size in ((0, 9), (1, 5)):
            alone = neg.select_negatives(sae, diffs[row:row + 1, :size], 4, mode=mode, tau=0.7,
                                         generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(sel.scores[row, :size], alone.scores[0])
            torch.testing.assert_close(sel.log_q_pool[row, :size], alone.log_q_pool[0])
            if mode == "greedy":                                      # draws of a batch interleave per row
                assert sel.indices[row].tolist() == alone.indices[0].tolist()
                torch.testing.assert_close(sel.log_q[row], alone.log_q[0])
    # greedy_diverse_select alone: same picks as on the valid sub-pool
    scores, latents, _, _ = neg.selection_scores(sae, padded, mask=mask)
    picks = neg.greedy_diverse_select(scores, latents, 5, mask=mask)
    alone_scores, alone_latents, _, _ = neg.selection_scores(sae, diffs[1, :5])
    assert picks[1].tolist() == neg.greedy_diverse_select(alone_scores, alone_latents, 5).tolist()


def test_all_true_mask_is_bit_identical_to_no_mask(seed):
    gen = torch.Generator().manual_seed(seed)
    diffs = torch.randn(3, 8, 10, generator=gen)
    sae = neg.train_sae(diffs.reshape(-1, 10), latent_dim=16, steps=10, seed=seed).sae
    everything = torch.ones(3, 8, dtype=torch.bool)
    for mode in ("greedy", "sample"):
        plain = neg.select_negatives(sae, diffs, 3, mode=mode, generator=torch.Generator().manual_seed(1))
        masked = neg.select_negatives(sae, diffs, 3, mode=mode, generator=torch.Generator().manual_seed(1),
                                      mask=everything)
        for name in ("indices", "log_q", "scores", "log_q_pool"):
            assert torch.equal(getattr(plain, name), getattr(masked, name)), (mode, name)


def test_bad_masks_raise():
    sae, latents, recon_err, mask = _masked_case()
    diffs, scores = torch.zeros(1, 6, 3), recon_err[None]
    with pytest.raises(TypeError, match="mask"):
        neg.selection_scores(sae, diffs, mask=mask[None].float())
    with pytest.raises(ValueError, match="mask"):
        neg.selection_scores(sae, diffs, mask=mask)                    # (M,) for pools (1, M)
    with pytest.raises(ValueError, match="mask"):
        neg.proposal_log_probs(scores, mask=mask[None, :5])
    with pytest.raises(ValueError, match="mask.*at least one|mask.*k=1"):
        neg.proposal_log_probs(scores, mask=torch.zeros(1, 6, dtype=torch.bool))
    few = torch.tensor([[True, False, False, True, False, False]])
    with pytest.raises(ValueError, match="mask.*k=3"):
        neg.greedy_diverse_select(scores, latents[None], 3, mask=few)
    for mode in ("greedy", "sample"):
        with pytest.raises(ValueError, match="mask.*k=3"):
            neg.select_negatives(sae, diffs, 3, mode=mode, mask=few)
    with pytest.raises(TypeError, match="mask"):
        neg.greedy_diverse_select(scores, latents[None], 3, mask=[mask.tolist()])


# ------------------------------------------------------------------------------------------------------------
# Trainer integration: online SMPRO rounds and MISP-DPO selection on the tiny offline LLaVA
# ------------------------------------------------------------------------------------------------------------


def _tiny(tmp_path, method, **overrides):
    from prefrank.train.config import TrainConfig

    values = dict(method=method, out=str(tmp_path / method), steps=2, batch_size=4, num_train=4, num_eval=2,
                  lr=1e-3, max_new_tokens=4, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def test_online_smpro_round_end_to_end(tmp_path, monkeypatch):
    from prefrank.train import selfpref
    from prefrank.train.loop import Trainer

    config = _tiny(tmp_path, "smpro", self_generate="online", regenerate_every=1,
                   selfpref={"num_samples": 1, "corruption": "diffusion"})
    trainer = Trainer(config)
    assert type(trainer.method) is METHODS["smpro"]
    before = {k: v.clone() for k, v in trainer.vlm.model.state_dict().items()}
    summary = trainer.train()
    cache = tmp_path / "smpro" / "selfpref"
    rounds = json.loads((cache / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]                      # regenerated by the updated policy
    for index in (0, 1):
        for record in pg.load_records_jsonl(cache / f"round_{index:04d}.jsonl"):
            levels = sorted(set(record.groups))
            assert levels == list(range(len(levels))) and record.groups[0] == 0
            assert len(record.meta["generated"]["clean"]) == 2          # greedy + 1 sample
            assert len(record.meta["generated"]) == 4                   # clean + t = 500, 800, 950
    for record in trainer.train_data.records:                          # training data = the last round's
        assert max(record.groups) >= 1
    assert summary["step"] == 2 and math.isfinite(summary["final_metrics"]["loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.vlm.model.state_dict().items())

    # a resumed run reloads the cached round instead of generating it again
    def no_generation(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the cached round")

    monkeypatch.setattr(selfpref, "smpro_round", no_generation)
    resumed = Trainer(_tiny(tmp_path, "smpro", self_generate="online", regenerate_every=1, resume=True,
                            selfpref={"num_samples": 1}))
    cached = selfpref.records_from_groups(resumed.self_generator.base_records,
                                          pg.load_records_jsonl(cache / "round_0000.jsonl"))
    assert [r.responses for r in resumed.train_data.records] == [r.responses for r in cached]


def test_misp_dpo_selection_in_trainer(tmp_path):
    from prefrank.train.loop import Trainer

    trainer = Trainer(_tiny(tmp_path, "misp_dpo", steps=1, num_negatives=3, self_generate="offline",
                            selfpref={"pool_size": 6, "sae_steps": 20, "proj_dim": 8}))
    assert type(trainer.method) is METHODS["misp_dpo"]
    summary = json.loads((tmp_path / "misp_dpo" / "selfpref" / "misp_negatives.json").read_text())
    for record, row in zip(trainer.train_data.records, summary["rows"]):
        assert len(record.negative_images) == 3 and len(set(row["negatives"])) == 3
        assert all(v < 0 for v in record.negative_log_q)               # log q of a 6-image pool
        assert record.groups == [0, 1] and record.responses[0] == record.answer
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and "loss/image" in metrics and "loss/text" in metrics


@pytest.mark.parametrize("selection", ["greedy", "sample", "uniform"])
def test_misp_select_candidate_sets_differ_in_size(monkeypatch, selection):
    # record 0: the policy gives its chosen answer on gallery images 4..11 → 4 allowed → 4 candidates;
    # record 1: no supporting image → 12 allowed → its full candidates_per_record = 8 (a shared (N, m) tensor
    # cut to the smallest set would give it 4); record 2: only 2 allowed < num_negatives → the whole gallery.
    from prefrank.train import selfpref
    from prefrank.train.data import PreferenceRecord, synthetic_dataset
    from prefrank.train.model import build_tiny_vlm

    def gallery_answers(vlm, pool, questions, pairs, options, **kwargs):
        def answer(k, question):
            if question.startswith("What color"):
                return "red" if k >= 4 else "green"
            if question.startswith("What shape"):
                return "circle" if k >= 2 else "square"
            return "one"
        return {(k, q): answer(k, questions[q]) for k, q in pairs}

    sae_inputs, train_sae = [], neg.train_sae

    def recording_train_sae(vectors, **kwargs):
        sae_inputs.append(vectors.clone())
        return train_sae(vectors, **kwargs)

    monkeypatch.setattr(selfpref, "_pool_answers", gallery_answers)
    monkeypatch.setattr(selfpref.neg, "train_sae", recording_train_sae)
    images = [r.image for r in synthetic_dataset(3, seed=1)]
    records = [PreferenceRecord(images[0], "What color is the shape?", ["red", "blue"], [0, 1], "red"),
               PreferenceRecord(images[1], "How many shapes are there?", ["two", "three"], [0, 1], "two"),
               PreferenceRecord(images[2], "What shape is shown?", ["circle", "square"], [0, 1], "circle")]
    options = selfpref.SelfPrefOptions.from_dict({"pool_size": 12, "candidates_per_record": 8, "sae_steps": 5,
                                                  "proj_dim": 4, "selection": selection})
    out, summary = selfpref.misp_select(build_tiny_vlm(), records, options, num_negatives=3, max_new_tokens=2,
                                        device="cpu")
    rows = summary["rows"]
    assert [row["allowed"] for row in rows] == [4, 12, 12]
    assert [row["candidates"] for row in rows] == [4, 8, 8]
    assert summary["candidates"] == {"mean": pytest.approx(20 / 3), "min": 4, "max": 8}
    assert set(rows[0]["negatives"]) <= {0, 1, 2, 3}                  # padding of its row is never picked
    for record, row in zip(out, rows):
        assert len(record.negative_images) == 3
        if selection != "sample":                                     # "sample" draws with replacement
            assert len(set(row["negatives"])) == 3
        if selection == "uniform":
            assert record.negative_log_q is None
        else:
            assert all(math.isfinite(v) and v < 0 for v in record.negative_log_q)
    assert [v.shape[0] for v in sae_inputs] == [4 + 8 + 8]            # fitted on the valid differences only


def test_self_generation_config_errors(tmp_path):
    from prefrank.train.loop import Trainer

    with pytest.raises(ValueError, match="misp_dpo selects"):
        Trainer(_tiny(tmp_path, "misp_dpo", self_generate="online", regenerate_every=1))
    with pytest.raises(ValueError, match="reference='model'"):
        Trainer(_tiny(tmp_path, "smpro", self_generate="online", regenerate_every=1, reference="precomputed"))
    with pytest.raises(ValueError, match="unknown option"):
        Trainer(_tiny(tmp_path, "smpro", self_generate="offline", selfpref={"num_sample": 1}))
    with pytest.raises(ValueError, match="needs method"):
        Trainer(_tiny(tmp_path, "dpo", self_generate="offline"))


def test_records_from_groups_filter_and_index_check():
    from prefrank.train import selfpref
    from prefrank.train.data import PreferenceRecord

    base = [PreferenceRecord(image=None, question=f"q{i}", responses=[""], groups=[0], answer=f"a{i}")
            for i in range(3)]
    groups = [pg.GroupRecord(0, "q0", ["x", "y"], [0, 1]), pg.GroupRecord(2, "q2", ["z"], [0])]
    records = selfpref.records_from_groups(base, groups)
    assert [(r.question, r.responses, r.groups, r.answer) for r in records] == [("q0", ["x", "y"], [0, 1], "a0")]
    stats = selfpref.group_statistics(groups)
    assert stats == {"prompts": 2, "prompts_with_negatives": 1, "mean_candidates": 2.0, "mean_levels": 2.0}
    with pytest.raises(ValueError, match="not an index"):
        selfpref.records_from_groups(base, [pg.GroupRecord(5, "q", ["x", "y"], [0, 1])])
