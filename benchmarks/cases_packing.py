"""Benchmark cases of shared-prompt packing (prefrank.packing): one preference step's model work, packed vs
unpacked.

A Llama-shaped policy (hidden 512, 4 layers, 8 heads, MLP 1376, V = 32000, sdpa) and a frozen copy as the
reference. One prompt of 576 + 32 tokens (the LLaVA-1.5 image + question shape; text tokens here, so the
ratio is the decoder's alone) with K ∈ {2, 4, 8, 16} responses of 32 tokens:

- "unpacked": K rows ``[prompt, response_k]`` of 640 tokens (equal lengths: no padding, sdpa's causal
  kernel, the fastest baseline), log-probs through the fused ``linear_sequence_logprobs``;
- "prefrank" (packed): one row ``prompt | response_0 | … | response_{K-1}`` (607 + 33·K tokens) with the
  packed 4-D mask, log-probs through ``PackedPrompts.linear_sequence_logprobs``.

"forward" = the no-grad reference forward; "forward+backward" = the policy forward+backward plus that
reference forward (what a trainer step spends in the model). ``benchmarks/run.py`` picks the cases up.

Paired measurement (the machine may be shared: packed and unpacked alternate, A B B A …, and the ratio is
taken pair by pair, then the median) with peak memory in fresh processes and the FLOP-model ceiling::

    python -m benchmarks.cases_packing [--ks 2,4,8,16] [--pairs 5] [--no-memory] [--threads N]
"""

import argparse
import copy
import statistics
import time

import torch

from benchmarks.harness import Case
from prefrank import ops
from prefrank.packing import pack_shared_prompt

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 512, 4, 8, 1376, 32000
PROMPT_TOKENS = 576 + 32
RESPONSE_TOKENS = 32
KS = (2, 4, 8, 16)
IGNORE_INDEX = -100


def build_models(dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=2048, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = LlamaForCausalLM(config).to(dtype=dtype, device=device).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy, reference


def tokens(K):
    generator = torch.Generator().manual_seed(K)
    prompt = torch.randint(1, VOCAB, (PROMPT_TOKENS,), generator=generator).tolist()
    responses = [torch.randint(1, VOCAB, (RESPONSE_TOKENS,), generator=generator).tolist() for _ in range(K)]
    return prompt, responses


def scorer(K, packed, dtype, device):
    """score(model) -> (K,) summed response log-probs, for the packed or the unpacked layout."""
    prompt, responses = tokens(K)
    if packed:
        packing = pack_shared_prompt([prompt], [responses], pad_token_id=0).to(device)
        inputs = packing.model_inputs(use_cache=False, mask_dtype=dtype)

        def score(model):
            hidden = model.model(**inputs).last_hidden_state
            return packing.linear_sequence_logprobs(hidden, model.lm_head.weight)[0]

        return score
    input_ids = torch.tensor([prompt + r for r in responses], device=device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, PROMPT_TOKENS - 1:-1] = input_ids[:, PROMPT_TOKENS:]

    def score(model):
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return ops.linear_sequence_logprobs(hidden, model.lm_head.weight, labels)

    return score


def _make(K, packed, dtype, device):
    def make():
        policy, reference = build_models(dtype, device)
        score = scorer(K, packed, dtype, device)

        def forward():
            with torch.no_grad():
                return score(reference)

        def forward_backward():
            policy.zero_grad(set_to_none=True)
            reference_logps = forward()
            (score(policy) - reference_logps).sum().backward()
            return [p.grad for p in policy.parameters()]

        return forward, forward_backward

    return make


def _shape(K):
    return f"prompt={PROMPT_TOKENS},response={RESPONSE_TOKENS},K={K},H={HIDDEN},L={LAYERS},V={VOCAB}"


OP = "policy fwd+bwd + reference fwd"


def cases(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dname = str(dtype).removeprefix("torch.")
    return [Case(OP, _shape(K), dname, "prefrank" if packed else "unpacked", _make(K, packed, dtype, device), device)
            for K in KS for packed in (True, False)]


def model_flops(K, packed):
    """FLOPs of one step's model work (policy fwd + bwd ≈ 3 forwards, reference fwd = 1): the decoder body
    per token, attention per visible (query, key) pair, the lm-head per scored token (fused path: forward,
    backward recomputes the chunk and forms two gradients = 4 matmuls for the policy, 1 for the reference).
    The ratio unpacked / packed is the speed-up ceiling of packing at this shape."""
    body = 2 * LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)  # per token, forward
    pair = 2 * 2 * HIDDEN * LAYERS  # QKᵀ and AV per visible (query, key) pair, forward
    head = 2 * HIDDEN * VOCAB  # per scored token, one matmul
    scored = K * RESPONSE_TOKENS
    if packed:
        token_count = PROMPT_TOKENS - 1 + K * (RESPONSE_TOKENS + 1)
        shared = PROMPT_TOKENS - 1
        own = RESPONSE_TOKENS + 1
        pairs = shared * (shared + 1) // 2 + K * (own * shared + own * (own + 1) // 2)
    else:
        row = PROMPT_TOKENS + RESPONSE_TOKENS
        token_count = K * row
        pairs = K * row * (row + 1) // 2
    return (body * token_count + pair * pairs) * (3 + 1) + head * scored * (4 + 1)


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(K, pairs, dtype, device):
    """Median step times and the median of per-pair ratios (unpacked / packed), alternating the order."""
    _, packed_step = _make(K, True, dtype, device)()
    _, unpacked_step = _make(K, False, dtype, device)()
    packed_step(), unpacked_step()  # warm-up
    times = {"packed": [], "unpacked": []}
    for i in range(pairs):
        order = (("packed", packed_step), ("unpacked", unpacked_step))
        for name, step in order if i % 2 == 0 else order[::-1]:
            times[name].append(_time(step))
    ratios = [u / p for u, p in zip(times["unpacked"], times["packed"])]
    return statistics.median(times["packed"]), statistics.median(times["unpacked"]), statistics.median(ratios), \
        (min(ratios), max(ratios))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a loaded machine 1 avoids straggling threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    all_cases = cases(args.device)
    print("| K | packed s | unpacked s | speed-up (pair median, min–max) | FLOP ceiling | tokens/s packed | "
          "tokens/s unpacked | peak MiB packed | peak MiB unpacked | peak ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for K in (int(k) for k in args.ks.split(",")):
        if args.device == "cuda":
            import triton.testing

            # do_bench synchronises; the CUDA timing is not shared with other processes' load
            steps = [_make(K, packed, dtype, args.device)()[1] for packed in (True, False)]
            packed_s, unpacked_s = (triton.testing.do_bench(s, return_mode="median") / 1e3 for s in steps)
            ratio, spread = unpacked_s / packed_s, (unpacked_s / packed_s,) * 2
        else:
            packed_s, unpacked_s, ratio, spread = paired(K, args.pairs, dtype, args.device)
        ceiling = model_flops(K, False) / model_flops(K, True)
        peaks = ["—", "—", "—"]
        if not args.no_memory:
            from benchmarks.run import measure_peak

            index = {c.impl: i for i, c in enumerate(all_cases) if c.shape == _shape(K)}
            packed_mib, unpacked_mib = (measure_peak("cases_packing", index[impl], args.device)[0] / 2**20
                                        for impl in ("prefrank", "unpacked"))
            peaks = [f"{packed_mib:.0f}", f"{unpacked_mib:.0f}", f"{unpacked_mib / packed_mib:.2f}×"]
        scored = K * RESPONSE_TOKENS
        print(f"| {K} | {packed_s:.3f} | {unpacked_s:.3f} | {ratio:.2f}× ({spread[0]:.2f}–{spread[1]:.2f}) | "
              f"{ceiling:.2f}× | {scored / packed_s:.0f} | {scored / unpacked_s:.0f} | {' | '.join(peaks)} |",
              flush=True)


if __name__ == "__main__":
    main()
