"""A short, readable tour of prefrank's ops: inputs, outputs, and timing against the reference.

    python -m prefrank.showcase
"""

import time

import torch

from prefrank import ops, reference


def _median_ms(fn, runs=7):
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def plackett_luce_tour():
    print("== plackett_luce_nll: how likely is an observed ranking under Plackett-Luce? ==")
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0]], requires_grad=True)
    groups = torch.tensor([[0, 0, 1, 2]])           # two tied best answers, then one, then the worst
    print(f"scores            {scores.detach().tolist()}")
    print(f"groups            {groups.tolist()}   (0 = most preferred, equal = tied, -1 = padding)")
    for ties in ("breslow", "efron"):
        nll = ops.plackett_luce_nll(scores, groups=groups, ties=ties)
        print(f"NLL ({ties:7s})    {nll.item():.6f}   reference "
              f"{reference.plackett_luce_nll(scores.detach(), groups=groups, ties=ties).item():.6f}")
    ops.plackett_luce_nll(scores, groups=groups, ties="efron").sum().backward()
    print(f"d NLL / d scores  {[round(g, 4) for g in scores.grad[0].tolist()]}   (negative = push up)")
    ranking = torch.tensor([[3, 0, 1, 2]])
    print(f"ranking {ranking.tolist()} top_k=1: NLL "
          f"{ops.plackett_luce_nll(scores.detach(), ranking=ranking, top_k=1).item():.6f} "
          "(only the winner is scored; the rest stay in the denominator)")

    B, K = 16384, 16
    x = torch.randn(B, K)
    g = torch.randint(0, 4, (B, K))

    def run(fn):
        def step():
            s = x.detach().requires_grad_()
            fn(s, groups=g, ties="efron").sum().backward()
        return step

    ours, ref = _median_ms(run(ops.plackett_luce_nll)), _median_ms(run(reference.plackett_luce_nll))
    print(f"fwd+bwd B={B} K={K} groups/efron on {torch.get_num_threads()} CPU threads: prefrank {ours:.1f} ms, "
          f"reference {ref:.1f} ms -> {ref / ours:.1f}x faster\n")


def main():
    torch.manual_seed(0)
    plackett_luce_tour()


if __name__ == "__main__":
    main()
