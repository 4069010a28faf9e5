"""Triton kernels of the relaxed sorting networks: the CUDA kernels of the ``prefrank::sortnet_*`` custom ops
(prefrank/sortnet.py), and their CPU kernels under ``impl="triton"`` with ``TRITON_INTERPRET=1``. The C++ CPU
kernels (csrc/sortnet_cpu.cpp) run the same algorithm; the launchers at the bottom take the same arguments and
return the same tensors as those (``torch.ops.prefrank_C.sortnet_*``).

Schedule and relaxations: see ``prefrank/networks.py`` (the Python source of both) and
``csrc/sortnet_math.h``. Every wire w of a layer has a partner p (p == w: passes through); the comparator on
lo = min(w, p), hi = max(w, p) computes α = f(x_hi − x_lo) and each of its wires updates as
``x_w ← own·x_w + other·x_p`` with (own, other) = (α, 1−α), swapped for a "flipped" comparator (minimum sent
to hi). P's columns mix the same way. The partners are computed on the fly (integer ops), so lists of
different lengths m ≤ n share one launch (rank losses). Option codes come from ``prefrank._options``; the
relaxation and the loss target are ``tl.constexpr`` (one compiled specialisation each), the network is a
run-time int (two integer formulas per layer).

Kernels and their cost per list of n items, L layers:
  ``_values_forward_kernel``  one program per list, x in registers, O(L·n): writes the values and α per
                              wire (both wires of a comparator hold its α; 0 for a pass-through).
  ``_rows_forward_kernel``    grid (lists, n / BLOCK_R): BLOCK_R rows of P in registers, started at the
                              identity; per layer one gather of the partner column and a 2-term mix per
                              entry: O(L·n) per row, O(L·n²) per list, never a dense n×n matmul. Writes P, or
                              — fused rank losses — reduces each final row to its loss term, never writing P.
  ``_rows_backward_kernel``   same grid: re-runs its rows forward storing a checkpoint every CK = ⌈√L⌉
                              layers, seeds the adjoint rows Ḡ (from ∂L/∂P or from the loss), then walks the
                              layers backwards; the rows entering layer l are recomputed from the nearest
                              checkpoint (< CK layers). With Q, Ḡ the rows before/after layer l it adds
                              ∂L/∂α_c = ±Σ_rows (Ḡ[w] − Ḡ[p])·(Q[w] − Q[p]) to dalpha and pulls Ḡ back,
                              Ḡ[w] ← own·Ḡ[w] + other·Ḡ[p] (the 2×2 mix is symmetric).
  ``_values_backward_kernel`` one program per list: replays the values forward from x with the saved α,
                              storing each layer's input in a scratch xs, then with g = ∂L/∂values, for
                              l = L−1..0: ∂L/∂α = ±(g_w − g_p)(x_w − x_p) + dalpha, ∂L/∂d = ∂L/∂α·f'(d),
                              d = x_hi − x_lo, g_w ← own·g_w + other·g_p ∓ ∂L/∂d (− on lo, + on hi).

Memory: saved for backward are x and α, (lists, L, n): L·n values per list (4·L·n bytes in fp32), never L
copies of P. The backward's other buffers are dalpha and xs (lists, L, n) each and the checkpoints,
(⌈L/CK⌉ − 1)·n² values per list (≈ √L copies of P, freed when the backward returns); the price is at most
CK − 1 recomputed layers per layer. Limit: n ≤ MAX_N = 512 (one list's wires in one register tile).
"""

import math

import torch
import triton
import triton.language as tl

from prefrank import _checks, networks
from prefrank._options import Network, Relaxation, Target

MAX_N = 512

# option codes as compile-time constants (prefrank/_options.py is their one source)
_ODD_EVEN = tl.constexpr(int(Network.odd_even))
_LOGISTIC = tl.constexpr(int(Relaxation.logistic))
_LOGISTIC_PHI = tl.constexpr(int(Relaxation.logistic_phi))
_GAUSSIAN = tl.constexpr(int(Relaxation.gaussian))
_RECIPROCAL = tl.constexpr(int(Relaxation.reciprocal))
_CAUCHY = tl.constexpr(int(Relaxation.cauchy))
_OPTIMAL = tl.constexpr(int(Relaxation.optimal))
_BLOCK = tl.constexpr(int(Target.block))
_PERMUTATION = tl.constexpr(int(Target.permutation))
# TARGET of the row kernels when they write / take ∂L/∂ P itself (soft_sort) instead of a loss
WRITE_P = -1
_WRITE_P = tl.constexpr(WRITE_P)


@triton.jit
def _atan(x):
    """arctan by Cephes' rational approximation (fp64-accurate; libdevice is missing in the interpreter)."""
    ax = tl.abs(x)
    big = ax > 2.414213562373095
    mid = (ax > 0.66) & (ax <= 2.414213562373095)
    t = tl.where(big, -1.0 / tl.where(big, ax, 1.0), tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
    z = t * t
    p = (((-8.750608600031904122785e-1 * z - 1.615753718733365076637e1) * z - 7.500855792314704667340e1) * z
         - 1.228866684490136173410e2) * z - 6.485021904942025371773e1
    q = ((((z + 2.485846490142306297962e1) * z + 1.650270098316988542046e2) * z
          + 4.328810604912902668951e2) * z + 4.853903996359136964868e2) * z + 1.945506571482613964425e2
    r = t * (z * p / q) + t
    # each constant meets r inside its branch: a where() of two literals would be fp32 even for fp64 inputs
    y = tl.where(big, 1.5707963267948966 + r, tl.where(mid, 0.7853981633974483 + r, r))
    return tl.where(x < 0, -y, y)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _alpha(d, s, lam, RELAXATION: tl.constexpr):
    """α = f(d), d = x_hi − x_lo, of the compile-time RELAXATION (same formulas as sortnet_math.h / diffsort)."""
    z = d * s
    if RELAXATION == _LOGISTIC:
        a = _sigmoid(z)
    elif RELAXATION == _LOGISTIC_PHI:
        a = _sigmoid(d * s / tl.exp(lam * tl.log(tl.abs(d) + 1e-10)))
    elif RELAXATION == _GAUSSIAN:
        a = 0.5 + 0.5 * tl.erf(d / (1.0 / s) / 1.4142135623730951)
    elif RELAXATION == _RECIPROCAL:
        a = 0.5 * (z / (2.0 + tl.abs(z)) + 1.0)
    elif RELAXATION == _CAUCHY:
        # atan in fp64, rounded once: what torch's fp32 atan (diffsort) returns nearly always; O(n) per layer
        a = 1.0 / 3.141592653589793 * _atan(z.to(tl.float64)).to(z.dtype) + 0.5
    else:
        tl.static_assert(RELAXATION == _OPTIMAL)
        outside = tl.where(z > 0.25, 1.0, 0.0) - tl.where(z < -0.25, 1.0, 0.0)
        a = tl.minimum(tl.maximum(z, -0.25), 0.25) + 0.5 + outside * (0.25 - 0.0625 / (tl.abs(z) + 1e-10))
    return a


@triton.jit
def _slope(d, s, lam, RELAXATION: tl.constexpr):
    """dα/dd of :func:`_alpha` (see the table in sortnet_math.h)."""
    z = d * s
    if RELAXATION == _LOGISTIC:
        a = _sigmoid(z)
        slope = s * a * (1.0 - a)
    elif RELAXATION == _LOGISTIC_PHI:
        r = tl.abs(d) + 1e-10
        scale = s / tl.exp(lam * tl.log(r))
        a = _sigmoid(d * scale)
        slope = a * (1.0 - a) * scale * (1.0 - lam * tl.abs(d) / r)
    elif RELAXATION == _GAUSSIAN:
        slope = s / 2.5066282746310002 * tl.exp(-0.5 * z * z)
    elif RELAXATION == _RECIPROCAL:
        t = 2.0 + tl.abs(z)
        slope = s / (t * t)
    elif RELAXATION == _CAUCHY:
        slope = s / (3.141592653589793 * (1.0 + z * z))
    else:
        tl.static_assert(RELAXATION == _OPTIMAL)
        u = tl.abs(z) + 1e-10
        slope = tl.where(tl.abs(z) <= 0.25, s, s / (16.0 * u * u))
    return slope


@triton.jit
def _layers(network, m):
    """(layer count, bitonic block count K = ⌈log₂ m⌉) of the network on m ≤ 1024 wires."""
    k = m * 0
    for i in tl.static_range(11):
        k += tl.where((1 << i) < m, 1, 0)
    return tl.where(network == _ODD_EVEN, m, k * (k + 1) // 2), k


@triton.jit
def _partner(network, m, k, layer, w):
    """(partner, flipped) of the wires w in ``layer`` (prefrank.networks.partner_of, vectorised)."""
    # odd-even transposition: even layers pair (0,1),(2,3)…, odd layers (1,2),(3,4)…
    shifted = layer & 1
    p_odd_even = ((w - shifted) ^ 1) + shifted
    p_odd_even = tl.where((w < shifted) | (p_odd_even >= m), w, p_odd_even)
    # bitonic on 2^k wires, the top 2^k − m dropped
    block = layer * 0
    for i in tl.static_range(1, 11):
        block += tl.where(i * (i + 1) // 2 <= layer, 1, 0)
    distance = tl.maximum(block - (layer - block * (block + 1) // 2), 0)
    offset = (1 << k) - m
    q = w + offset
    pq = q ^ (1 << distance)
    p_bitonic = tl.where(pq < offset, w, pq - offset)
    odd_even = network == _ODD_EVEN
    p = tl.where(w < m, tl.where(odd_even, p_odd_even, p_bitonic), w)
    flipped = (network != _ODD_EVEN) & (((q >> (block + 1)) & 1) != 0) & (p != w)
    return p, flipped


@triton.jit
def _mix_weights(alpha, p, w, flipped):
    """(own, other) weights of every wire: (α, 1−α), swapped when flipped, (1, 0) for a pass-through."""
    through = p == w
    own = tl.where(through, 1.0, tl.where(flipped, 1.0 - alpha, alpha))
    other = tl.where(through, 0.0, tl.where(flipped, alpha, 1.0 - alpha))
    return own, other


@triton.jit
def _list_size(sizes_ptr, b, n, HAS_SIZES: tl.constexpr):
    if HAS_SIZES:
        m = tl.load(sizes_ptr + b).to(tl.int32)
    else:
        m = n
    return m


@triton.jit
def _values_forward_kernel(x_ptr, sizes_ptr, values_ptr, alpha_ptr, n, max_layers, network, s, lam,
                           RELAXATION: tl.constexpr, HAS_SIZES: tl.constexpr, BLOCK_N: tl.constexpr):
    """One list per program: soft-sorted values and α per wire (zeros past the list's own layers)."""
    b = tl.program_id(0).to(tl.int64)
    w = tl.arange(0, BLOCK_N)
    m = _list_size(sizes_ptr, b, n, HAS_SIZES)
    x = tl.load(x_ptr + b * n + w, mask=w < m, other=0.0)
    num_layers, k = _layers(network, m)
    for layer in range(0, num_layers):
        p, flipped = _partner(network, m, k, layer, w)
        xp = tl.gather(x, p, 0)
        alpha = _alpha(tl.where(p > w, xp - x, x - xp), s, lam, RELAXATION)
        own, other = _mix_weights(alpha, p, w, flipped)
        tl.store(alpha_ptr + (b * max_layers + layer) * n + w, tl.where(p == w, 0.0, alpha), mask=w < n)
        x = own * x + other * xp
    tl.store(values_ptr + b * n + w, x, mask=w < n)


@triton.jit
def _rows_layer(Q, alpha_ptr, b, layer, n, max_layers, network, m, k, w, BLOCK_R: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Push the row block Q (rows × wires) through one layer."""
    p, flipped = _partner(network, m, k, layer, w)
    alpha = tl.load(alpha_ptr + (b * max_layers + layer) * n + w, mask=w < n, other=0.0)
    own, other = _mix_weights(alpha, p, w, flipped)
    Qp = tl.gather(Q, tl.broadcast_to(p[None, :], (BLOCK_R, BLOCK_N)), 1)
    return own[None, :] * Q + other[None, :] * Qp


@triton.jit
def _loss_rows(Q, rows, w, m, lo_ptr, hi_ptr, b, n, TARGET: tl.constexpr):
    """Per-row loss terms of the final rows Q and, scaled later, their ∂/∂Q.

    block: −log(mass)/m with mass = Σ_{w∈[lo,hi)} Q[w] (clamped at the smallest normal);
    permutation: Σ_w −max(log(q ? p : 1−p), −100)/m², p = clamp(Q, 0, 1) (torch's binary_cross_entropy).
    """
    row_ok = rows < m
    lo = tl.load(lo_ptr + b * n + rows, mask=row_ok, other=0)
    mf = m.to(Q.dtype)
    if TARGET == _BLOCK:
        hi = tl.load(hi_ptr + b * n + rows, mask=row_ok, other=0)
        inside = (w[None, :] >= lo[:, None]) & (w[None, :] < hi[:, None])
        mass = tl.sum(tl.where(inside, Q, 0.0), axis=1)
        tiny = 1.1754943508222875e-38
        term = -tl.log(tl.maximum(mass, tiny)) / mf
        dQ = tl.where(inside & (mass[:, None] >= tiny), -1.0 / (mf * mass[:, None]), 0.0)
    else:
        tl.static_assert(TARGET == _PERMUTATION)
        one = w[None, :] == lo[:, None]
        p = tl.minimum(tl.maximum(Q, 0.0), 1.0)
        lg = tl.maximum(tl.log(tl.where(one, p, 1.0 - p)), -100.0)  # one log per entry: no spill at n = 512
        valid = (w[None, :] < m) & row_ok[:, None]
        term = -tl.sum(tl.where(valid, lg, 0.0), axis=1) / (mf * mf)
        dQ = (p - tl.where(one, 1.0, 0.0)) / tl.maximum(p * (1.0 - p), 1e-12) / (mf * mf)
        dQ = tl.where(valid & (Q >= 0.0) & (Q <= 1.0), dQ, 0.0)
    return tl.where(row_ok, term, 0.0), dQ


@triton.jit
def _rows_forward_kernel(alpha_ptr, sizes_ptr, perm_ptr, lo_ptr, hi_ptr, row_loss_ptr, n, max_layers, network,
                         HAS_SIZES: tl.constexpr, TARGET: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """Rows [BLOCK_R·j, BLOCK_R·(j+1)) of P for list b: TARGET WRITE_P writes them, a loss target its terms."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_N)
    m = _list_size(sizes_ptr, b, n, HAS_SIZES)
    num_layers, k = _layers(network, m)
    Q = tl.where(rows[:, None] == w[None, :], 1.0, 0.0).to(alpha_ptr.dtype.element_ty)
    for layer in range(0, num_layers):
        Q = _rows_layer(Q, alpha_ptr, b, layer, n, max_layers, network, m, k, w, BLOCK_R, BLOCK_N)
    if TARGET == _WRITE_P:
        offsets = (b * n + rows[:, None]) * n + w[None, :]
        tl.store(perm_ptr + offsets, Q, mask=(rows[:, None] < n) & (w[None, :] < n))
    else:
        term, _ = _loss_rows(Q, rows, w, m, lo_ptr, hi_ptr, b, n, TARGET)
        tl.store(row_loss_ptr + b * n + rows, term, mask=rows < n)


@triton.jit
def _rows_backward_kernel(alpha_ptr, sizes_ptr, grad_perm_ptr, grad_loss_ptr, lo_ptr, hi_ptr, ckpt_ptr,
                          dalpha_ptr, n, max_layers, num_ckpt, ckpt_every, network, HAS_SIZES: tl.constexpr,
                          TARGET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """∂L/∂α of one row block (added to dalpha at both wires of each comparator), see the module docstring."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_N)
    m = _list_size(sizes_ptr, b, n, HAS_SIZES)
    num_layers, k = _layers(network, m)
    tile = (rows[:, None] < n) & (w[None, :] < n)
    ckpt_rows = ((b * num_ckpt) * n + rows[:, None]) * n + w[None, :]
    identity = tl.where(rows[:, None] == w[None, :], 1.0, 0.0).to(alpha_ptr.dtype.element_ty)
    Q = identity
    for layer in range(0, num_layers):
        if (layer % ckpt_every == 0) & (layer > 0):
            tl.store(ckpt_ptr + ckpt_rows + (layer // ckpt_every - 1) * n * n, Q, mask=tile)
        Q = _rows_layer(Q, alpha_ptr, b, layer, n, max_layers, network, m, k, w, BLOCK_R, BLOCK_N)
    if TARGET == _WRITE_P:
        G = tl.load(grad_perm_ptr + (b * n + rows[:, None]) * n + w[None, :], mask=tile, other=0.0)
    else:
        _, dQ = _loss_rows(Q, rows, w, m, lo_ptr, hi_ptr, b, n, TARGET)
        G = dQ * tl.load(grad_loss_ptr + b)
    for t in range(0, num_layers):
        layer = num_layers - 1 - t
        j = layer // ckpt_every
        Q = identity
        if j > 0:
            Q = tl.load(ckpt_ptr + ckpt_rows + (j - 1) * n * n, mask=tile, other=0.0)
        for replay in range(j * ckpt_every, layer):
            Q = _rows_layer(Q, alpha_ptr, b, replay, n, max_layers, network, m, k, w, BLOCK_R, BLOCK_N)
        p, flipped = _partner(network, m, k, layer, w)
        alpha = tl.load(alpha_ptr + (b * max_layers + layer) * n + w, mask=w < n, other=0.0)
        own, other = _mix_weights(alpha, p, w, flipped)
        index = tl.broadcast_to(p[None, :], (BLOCK_R, BLOCK_N))
        Qp = tl.gather(Q, index, 1)
        Gp = tl.gather(G, index, 1)
        d_alpha = tl.sum((G - Gp) * (Q - Qp), axis=0)
        d_alpha = tl.where(flipped, -d_alpha, d_alpha)
        tl.atomic_add(dalpha_ptr + (b * max_layers + layer) * n + w, d_alpha, mask=(w < n) & (p != w))
        G = own[None, :] * G + other[None, :] * Gp


@triton.jit
def _values_backward_kernel(grad_values_ptr, x_ptr, alpha_ptr, dalpha_ptr, sizes_ptr, xs_ptr, grad_x_ptr, n,
                            max_layers, network, s, lam, RELAXATION: tl.constexpr, HAS_GRAD_VALUES: tl.constexpr,
                            HAS_DALPHA: tl.constexpr, HAS_SIZES: tl.constexpr, BLOCK_N: tl.constexpr):
    """∂L/∂x of one list from ∂L/∂values and the P part's dalpha, see the module docstring."""
    b = tl.program_id(0).to(tl.int64)
    w = tl.arange(0, BLOCK_N)
    m = _list_size(sizes_ptr, b, n, HAS_SIZES)
    num_layers, k = _layers(network, m)
    x = tl.load(x_ptr + b * n + w, mask=w < m, other=0.0)
    for layer in range(0, num_layers):  # the layers' inputs, mixed with the saved α (exactly the forward's)
        row = (b * max_layers + layer) * n
        p, flipped = _partner(network, m, k, layer, w)
        own, other = _mix_weights(tl.load(alpha_ptr + row + w, mask=w < n, other=0.0), p, w, flipped)
        tl.store(xs_ptr + row + w, x, mask=w < n)
        x = own * x + other * tl.gather(x, p, 0)
    tl.debug_barrier()  # xs is read back below by whichever threads hold the partner wires
    if HAS_GRAD_VALUES:
        g = tl.load(grad_values_ptr + b * n + w, mask=w < m, other=0.0).to(alpha_ptr.dtype.element_ty)
    else:
        g = tl.zeros((BLOCK_N,), dtype=alpha_ptr.dtype.element_ty)
    for t in range(0, num_layers):
        layer = num_layers - 1 - t
        row = (b * max_layers + layer) * n
        p, flipped = _partner(network, m, k, layer, w)
        x = tl.load(xs_ptr + row + w, mask=w < n, other=0.0)
        alpha = tl.load(alpha_ptr + row + w, mask=w < n, other=0.0)
        xp = tl.gather(x, p, 0)
        gp = tl.gather(g, p, 0)
        d_alpha = (g - gp) * (x - xp)
        d_alpha = tl.where(flipped, -d_alpha, d_alpha)
        if HAS_DALPHA:
            d_alpha += tl.load(dalpha_ptr + row + w, mask=w < n, other=0.0)
        d_d = d_alpha * _slope(tl.where(p > w, xp - x, x - xp), s, lam, RELAXATION)
        own, other = _mix_weights(alpha, p, w, flipped)
        g = tl.where(p == w, g, own * g + other * gp + tl.where(p > w, -d_d, d_d))
    tl.store(grad_x_ptr + b * n + w, g, mask=w < n)


# ------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------

def launch_config(n):
    """(BLOCK_N, rows per forward program, rows per backward program, num_warps) for lists of n ≤ MAX_N.

    Row tiles of ≤ 4096 (forward) / 2048 (backward, two live tiles) entries up to n = 128, half that above
    (a quarter for the forward at n = 256: 2048 spilled 8 bytes on sm_90 with Triton 3.6, the GPU machine's,
    though not with 3.8), 8 warps from BLOCK_N = 512: no register spills on sm_80/sm_90 with either
    (tests/test_sortnet_aot.py).
    """
    block_n = max(16, triton.next_power_of_2(n))
    forward_tile, backward_tile = (4096, 2048) if block_n <= 128 else (1024 if block_n == 256 else 2048, 1024)
    rows = lambda tile: max(1, min(block_n, tile // block_n))  # noqa: E731
    return block_n, rows(forward_tile), rows(backward_tile), 4 if block_n <= 256 else 8


def _forward_values(x, sizes, network, relaxation, s, lam):
    B, n = x.shape
    block_n, _, _, num_warps = launch_config(n)
    values = _checks.new_output((B, n), dtype=x.dtype, device=x.device)
    # zeros: the layers past a shorter list's own network are never written
    alpha = torch.zeros((B, networks.num_layers(Network(network).name, n), n), dtype=x.dtype, device=x.device)
    if B > 0:
        _values_forward_kernel[(B,)](x, sizes if sizes is not None else x, values, alpha, n, alpha.shape[1],
                                     network, s, lam, RELAXATION=relaxation, HAS_SIZES=sizes is not None,
                                     BLOCK_N=block_n, num_warps=num_warps)
    return values, alpha


def _forward_rows(alpha, sizes, lo, hi, n, network, target):
    B = alpha.shape[0]
    block_n, block_r, _, num_warps = launch_config(n)
    perm = _checks.new_output((B, n, n) if target == WRITE_P else (0,), dtype=alpha.dtype, device=alpha.device)
    row_loss = torch.zeros((B, n) if target != WRITE_P else (0,), dtype=alpha.dtype, device=alpha.device)
    if B > 0:
        dummy = alpha
        _rows_forward_kernel[(B, triton.cdiv(n, block_r))](
            alpha, sizes if sizes is not None else dummy, perm, lo if lo is not None else dummy,
            hi if hi is not None else dummy, row_loss, n, alpha.shape[1], network, HAS_SIZES=sizes is not None,
            TARGET=target, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps)
    return perm if target == WRITE_P else row_loss


def _backward_rows(alpha, sizes, grad_perm, grad_loss, lo, hi, n, network, target):
    B, L = alpha.shape[0], alpha.shape[1]
    block_n, _, block_r, num_warps = launch_config(n)
    ckpt_every = max(1, math.isqrt(max(L - 1, 0)) + 1)  # ⌈√L⌉ for L ≥ 1
    num_ckpt = max(0, -(-L // ckpt_every) - 1)
    ckpt = torch.empty((B, num_ckpt, n, n) if num_ckpt else (1,), dtype=alpha.dtype, device=alpha.device)
    dalpha = torch.zeros_like(alpha)  # accumulated by atomics
    if B > 0:
        dummy = alpha
        _rows_backward_kernel[(B, triton.cdiv(n, block_r))](
            alpha, sizes if sizes is not None else dummy, grad_perm if grad_perm is not None else dummy,
            grad_loss if grad_loss is not None else dummy, lo if lo is not None else dummy,
            hi if hi is not None else dummy, ckpt, dalpha, n, L, num_ckpt, ckpt_every, network,
            HAS_SIZES=sizes is not None, TARGET=target, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps)
    return dalpha


def _backward_values(grad_values, x, alpha, dalpha, sizes, network, relaxation, s, lam):
    B, L, n = alpha.shape
    block_n, _, _, num_warps = launch_config(n)
    grad_x = _checks.new_output((B, n), dtype=x.dtype, device=x.device)
    xs = torch.empty_like(alpha)  # scratch: every layer's input, replayed from x and α
    if B > 0:
        _values_backward_kernel[(B,)](
            grad_values if grad_values is not None else x, x, alpha, dalpha if dalpha is not None else alpha,
            sizes if sizes is not None else x, xs, grad_x, n, L, network, s, lam, RELAXATION=relaxation,
            HAS_GRAD_VALUES=grad_values is not None, HAS_DALPHA=dalpha is not None, HAS_SIZES=sizes is not None,
            BLOCK_N=block_n, num_warps=num_warps)
    return grad_x


# The four launchers below take and return what torch.ops.prefrank_C.sortnet_* do (csrc/sortnet_cpu.cpp):
# prefrank/sortnet.py's custom ops call either. Inputs are (lists, n) fp32/fp64 scores, n ≤ MAX_N.

def sortnet_forward(x, network, relaxation, steepness, art_lambda, with_perm):
    """(values, P or an empty tensor, α) of the ascending relaxed sort of each row of x."""
    x = x.contiguous()
    values, alpha = _forward_values(x, None, network, relaxation, steepness, art_lambda)
    perm = _forward_rows(alpha, None, None, None, x.shape[1], network, WRITE_P) if with_perm else x.new_empty(0)
    return values, perm, alpha


def sortnet_backward(grad_values, grad_perm, x, alpha, network, relaxation, steepness, art_lambda):
    """∂L/∂x from ∂L/∂values and ∂L/∂P (None or empty: P was not used)."""
    x, alpha = x.contiguous(), alpha.contiguous()
    dalpha = None
    if grad_perm is not None and grad_perm.numel() > 0:
        grad_perm = grad_perm.to(alpha.dtype).expand(x.shape + x.shape[-1:]).contiguous()
        dalpha = _backward_rows(alpha, None, grad_perm, None, None, None, x.shape[1], network, WRITE_P)
    grad_values = grad_values.to(alpha.dtype).expand(x.shape).contiguous()
    return _backward_values(grad_values, x, alpha, dalpha, None, network, relaxation, steepness, art_lambda)


def sortnet_loss_forward(y, sizes, lo, hi, target, network, relaxation, steepness, art_lambda):
    """(per-list loss, α) of the compacted lists y (the first sizes[b] entries of row b are its items)."""
    y, sizes, lo, hi = y.contiguous(), sizes.contiguous(), lo.contiguous(), hi.contiguous()
    _, alpha = _forward_values(y, sizes, network, relaxation, steepness, art_lambda)
    row_loss = _forward_rows(alpha, sizes, lo, hi, y.shape[1], network, target)
    return row_loss.sum(-1), alpha


def sortnet_loss_backward(grad_loss, y, sizes, lo, hi, alpha, target, network, relaxation, steepness,
                          art_lambda):
    """∂(Σ_b grad_loss[b]·loss[b])/∂y."""
    y, sizes, lo, hi, alpha = y.contiguous(), sizes.contiguous(), lo.contiguous(), hi.contiguous(), alpha.contiguous()
    grad_loss = grad_loss.to(alpha.dtype).expand(y.shape[:1]).contiguous()
    dalpha = _backward_rows(alpha, sizes, None, grad_loss, lo, hi, y.shape[1], network, target)
    return _backward_values(None, y, alpha, dalpha, sizes, network, relaxation, steepness, art_lambda)
