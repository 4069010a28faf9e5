"""Plackett-Luce NLL, forward and forward+backward, against what users run instead (fp32).

Full rankings (a random permutation per list): the three-line torch idiom
``u = s.gather(-1, ranking); (logcumsumexp(u.flip(-1), -1).flip(-1) - u).sum(-1)``, ``torch.compile`` of it and
torchsurv's Cox loss (time = place in the ranking, one stratum per list). Ties (``groups``, 4 levels with the
same number of items each, in random places): a vectorised Breslow/Efron implementation in torch (below) and
torchsurv's Cox loss (time = level). Every implementation returns the NLL summed over the lists (torchsurv
cannot give per-list values without a loop), so forward and gradient are compared one to one.
Small shapes (B = 8–64, K = 2–16: one training step's lists) show the per-call overhead.
"""

import torch

from benchmarks.harness import Case, compile_static
from prefrank import ops, reference

# the shapes first (a run cut short by a time limit has them), then one training step's small lists
RANKING_SHAPES = [(16384, 16), (256, 16), (65536, 4), (1024, 64), (64, 16), (16, 4), (8, 2)]
TIES_SHAPES = [(16384, 16), (256, 16), (1024, 64), (64, 16), (8, 4)]
QUICK_RANKING_SHAPES = [(8, 2), (16, 4)]
QUICK_TIES_SHAPES = [(8, 4)]
TIE_LEVELS = 4


def pl_idiom(scores, ranking):
    """The torch idiom: per-list NLL of a full ranking (best first) by a reverse log-cum-sum-exp."""
    u = scores.gather(-1, ranking)
    return (torch.logcumsumexp(u.flip(-1), -1).flip(-1) - u).sum(-1)


def cox_ties_nll(scores, groups, ties, num_levels):
    """Vectorised Breslow/Efron negative Cox partial log-likelihood per list (event time = level, every item an
    event), O(B·K·levels) with no loop: per-level log-sum-exp by scatter, risk sets by a reverse
    log-cum-sum-exp over the levels. ``groups`` holds levels 0..num_levels-1 (empty levels allowed)."""
    B, _ = scores.shape
    shift = torch.full((B, num_levels), -torch.inf, dtype=scores.dtype, device=scores.device)
    shift = shift.scatter_reduce(1, groups, scores.detach(), "amax").nan_to_num(neginf=0.0)
    tie_sum = torch.zeros_like(shift).scatter_add(1, groups, torch.exp(scores - shift.gather(1, groups)))
    counts = torch.zeros_like(shift).scatter_add(1, groups, torch.ones_like(scores))
    log_tie = torch.log(tie_sum) + shift                                   # -inf for an empty level
    log_risk = torch.logcumsumexp(log_tie.flip(-1), -1).flip(-1)           # items at this level or worse
    present = counts > 0
    if ties == "breslow":
        denominators = counts * log_risk
    else:  # Efron: Σ_{r<m} log(risk − r/m · tie) = Σ_r log_risk + log1p(−r/m · tie/risk)
        r = torch.arange(int(groups.shape[1]), dtype=scores.dtype, device=scores.device)
        in_level = r < counts[..., None]                                   # (B, levels, K)
        frac = torch.where(in_level, r / counts.clamp(min=1)[..., None], 0.0)  # 0 past m: log1p(0), no NaN
        terms = torch.log1p(-frac * torch.exp(log_tie - log_risk)[..., None])
        denominators = counts * log_risk + terms.sum(-1)
    return torch.where(present, denominators, 0.0).sum(-1) - scores.sum(-1)


def torchsurv_nll(scores, time, ties):
    """torchsurv's Cox loss summed over lists: one stratum per list (torchsurv loops over the strata)."""
    from torchsurv.loss.cox import neg_partial_log_likelihood

    B, K = scores.shape
    strata = torch.arange(B, device=scores.device).repeat_interleave(K)
    event = torch.ones(B * K, dtype=torch.bool, device=scores.device)
    return neg_partial_log_likelihood(scores.reshape(-1), event, time.reshape(-1).float(),
                                      ties_method=ties, reduction="sum", strata=strata)


def _inputs(B, K, mode, device):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(B, K, generator=generator)
    order = torch.rand(B, K, generator=generator).argsort(-1)
    if mode == "ranking":
        return scores.to(device), order.to(device)
    levels = torch.arange(K) * min(TIE_LEVELS, K) // K                   # equal-sized levels ...
    return scores.to(device), levels[order].to(device)                   # ... in random places


def _maker(loss, B, K, mode, device):
    def make():
        scores, index = _inputs(B, K, mode, device)
        fn = loss()

        def forward():
            with torch.no_grad():
                return fn(scores, index)

        def forward_backward():
            x = scores.detach().requires_grad_()
            fn(x, index).backward()
            return x.grad

        return forward, forward_backward
    return make


def _impls(mode, K):
    """(impl name, factory of fn(scores, ranking_or_groups) -> summed NLL, modules needed)."""
    if mode == "ranking":
        return [
            ("prefrank", lambda: lambda s, r: ops.plackett_luce_nll(s, ranking=r).sum(), ()),
            ("reference", lambda: lambda s, r: reference.plackett_luce_nll(s, ranking=r).sum(), ()),
            ("torch idiom", lambda: lambda s, r: pl_idiom(s, r).sum(), ()),
            ("torch.compile idiom", lambda: compile_static(lambda s, r: pl_idiom(s, r).sum()), ()),
            # time = each item's place in the ranking (no ties: Breslow and Efron agree)
            ("torchsurv", lambda: lambda s, r: torchsurv_nll(s, r.argsort(-1), "breslow"), ("torchsurv",)),
        ]
    ties = mode.removeprefix("ties_")
    levels = min(TIE_LEVELS, K)

    return [
        ("prefrank", lambda: lambda s, g: ops.plackett_luce_nll(s, groups=g, ties=ties).sum(), ()),
        ("reference", lambda: lambda s, g: reference.plackett_luce_nll(s, groups=g, ties=ties).sum(), ()),
        ("torch vectorised", lambda: lambda s, g: cox_ties_nll(s, g, ties, levels).sum(), ()),
        ("torch.compile vectorised", lambda: compile_static(lambda s, g: cox_ties_nll(s, g, ties, levels).sum()),
         ()),
        ("torchsurv", lambda: lambda s, g: torchsurv_nll(s, g, ties), ("torchsurv",)),
    ]


def cases(device, quick=False):
    out = []
    plans = [("ranking", QUICK_RANKING_SHAPES if quick else RANKING_SHAPES)]
    plans += [(f"ties_{rule}", QUICK_TIES_SHAPES if quick else TIES_SHAPES) for rule in ("breslow", "efron")]
    for i in range(max(len(shapes) for _, shapes in plans)):  # i-th shape of every mode, then the next
        for mode, shapes in plans:
            if i >= len(shapes):
                continue
            B, K = shapes[i]
            op = "plackett_luce_nll" if mode == "ranking" else f"plackett_luce_nll {mode.replace('_', '=')}"
            for impl, loss, requires in _impls(mode, K):
                out.append(Case(op, f"B={B},K={K}", "float32", impl, _maker(loss, B, K, mode, device), device,
                                requires=requires))
    return out
