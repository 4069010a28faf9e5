"""Sorting-network schedules (odd-even transposition and bitonic) for any n ≥ 1, as compact tables.

A network is a sequence of layers; in every layer each wire ``w`` is either paired with a partner wire
``p ≠ w`` (one comparator) or passes through (``p == w``). The tables hold ``partner[layer, w]`` and
``receives_min[layer, w]``. The relaxed comparator on wires ``lo < hi`` computes ``α = f(x_hi − x_lo)`` (the
soft "already in order" indicator) and, when ``lo`` receives the minimum::

    x_lo ← α·x_lo + (1−α)·x_hi        x_hi ← (1−α)·x_lo + α·x_hi

(α and 1−α trade places when the comparator sends the minimum to ``hi``, as in bitonic's descending
sub-blocks). Seen from one wire: ``x_w ← own·x_w + other·x_p`` with ``(own, other) = (α, 1−α)``, swapped for
such a "flipped" comparator, and P's columns mix the same way. This is diffsort's arithmetic operation for
operation, so results agree to the last bits, not just to rounding.

The schedules are identical to the ``diffsort`` package's ``odd_even_network`` / ``bitonic_network``
(tested comparator by comparator), including its treatment of n that is not a power of two in the bitonic
network: it runs on the next power of two N with the N − n extra wires placed at the TOP (indices below
N − n) and dropped; a comparator touching one dropped wire becomes a pass-through for the other wire.
diffsort's pass-through comparators (0.5/0.5 "identity maps") are exact identities and appear here as
``partner == w``.

The relaxations f (:func:`relaxed_alpha`) are diffsort's formulas with steepness s (z = s·d)::

    logistic      σ(z)                        gaussian   Φ(z) = ½ + ½·erf(z/√2)
    logistic_phi  σ(s·d/(|d|+ε)^λ), ε = 1e-10 reciprocal ½(z/(2+|z|) + 1)
    cauchy        atan(z)/π + ½               optimal    z+½ on |z| ≤ ¼, 1 − 1/(16z) above, −1/(16z) below

This module is the Python source of the schedule, the layer count, the relaxations and the mixing rule
(:func:`mix_weights`); each other language writes them once: C++ in ``csrc/sortnet_math.h``
(``partner``, ``num_layers``, ``alpha``, ``mix_weights``), Triton in ``triton_kernels/sortnet.py``
(``_partner``, ``_layers``, ``_alpha``, ``_mix_weights``). The kernels compute each wire's partner on the fly
(a few integer ops, no table loads), which also lets one launch sort lists of different lengths. Tests check
the three against each other and against diffsort. Network and relaxation codes: ``prefrank._options``.
"""

import functools

import numpy as np
import torch

from prefrank._options import Network, Relaxation, names

NETWORKS = names(Network)
RELAXATIONS = names(Relaxation)


def _check(network, n):
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")


def _bitonic_blocks(n):
    """Number of bitonic blocks K = ceil(log2 n) (0 for n = 1): the network runs on 2**K wires."""
    return (n - 1).bit_length()


def num_layers(network, n):
    """Layer count: n for odd-even transposition, K(K+1)/2 with K = ceil(log2 n) for bitonic.

    ``n`` may be a ``torch.SymInt`` (the fake kernels under ``torch.compile(dynamic=True)``): odd-even stays
    symbolic, bitonic specialises on n.
    """
    _check(network, n)
    if network == "odd_even":
        return n
    k = _bitonic_blocks(int(n))
    return k * (k + 1) // 2


def relaxed_alpha(d, relaxation, steepness, art_lambda):
    """Comparator weight α = f(d) of the tensor d = x_hi − x_lo, exactly as the diffsort package computes it."""
    if relaxation == "logistic":
        return torch.sigmoid(d * steepness)
    if relaxation == "logistic_phi":
        return torch.sigmoid(d * steepness / (d.abs() + 1e-10).pow(art_lambda))
    if relaxation == "gaussian":
        return 0.5 + 0.5 * torch.erf(d / (1 / steepness) / 2.0**0.5)
    z = d * steepness
    if relaxation == "reciprocal":
        return 0.5 * (z / (2 + z.abs()) + 1)
    if relaxation == "cauchy":
        return 1 / torch.pi * torch.atan(z) + 0.5
    if relaxation != "optimal":
        raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
    outside = (z > 0.25).to(z.dtype) - (z < -0.25).to(z.dtype)
    return z.clamp(-0.25, 0.25) + 0.5 + outside * (0.25 - 1 / 16 / (z.abs() + 1e-10))


def mix_weights(alpha, flipped, through):
    """(own, other) of every wire, ``x_w ← own·x_w + other·x_partner``: (α, 1−α), swapped where the comparator
    is ``flipped`` (sends the minimum to the higher wire), exactly (1, 0) on ``through`` (pass-through) wires."""
    own = torch.where(flipped, 1 - alpha, alpha)
    other = torch.where(flipped, alpha, 1 - alpha)
    return (torch.where(through, torch.ones_like(own), own), torch.where(through, torch.zeros_like(other), other))


def partner_of(network, n, layer, w):
    """(partner wire, receives_min) of wire ``w`` in ``layer``: the scalar rule the kernels evaluate."""
    if network == "odd_even":
        # even layers pair (0,1),(2,3),…; odd layers pair (1,2),(3,4),…; an unpaired wire passes through
        shifted = layer % 2
        if w < shifted:
            return w, True
        p = ((w - shifted) ^ 1) + shifted
        if p >= n:
            return w, True
        return p, w < p
    k = _bitonic_blocks(n)
    offset = (1 << k) - n  # dropped wires occupy padded indices [0, offset)
    block = 0
    while (block + 1) * (block + 2) // 2 <= layer:
        block += 1
    step = layer - block * (block + 1) // 2
    q = w + offset
    pq = q ^ (1 << (block - step))
    if pq < offset:
        return w, True
    # the lower padded index gets the minimum unless this sub-block sorts the other way
    descending = (q >> (block + 1)) & 1
    return pq - offset, (q < pq) != bool(descending)


@functools.lru_cache(maxsize=256)
def _tables(network, n):
    layers = num_layers(network, n)
    partner = np.empty((layers, n), dtype=np.int32)
    receives_min = np.empty((layers, n), dtype=bool)
    for layer in range(layers):
        for w in range(n):
            partner[layer, w], receives_min[layer, w] = partner_of(network, n, layer, w)
    partner.setflags(write=False)
    receives_min.setflags(write=False)
    return partner, receives_min


def tables(network, n):
    """(partner, receives_min): read-only int32 / bool numpy arrays of shape (layers, n), cached."""
    _check(network, n)
    return _tables(network, n)


@functools.lru_cache(maxsize=256)
def _torch_tables(network, n, device):
    partner, receives_min = _tables(network, n)
    return (torch.from_numpy(partner.astype(np.int64)).to(device),
            torch.from_numpy(receives_min.copy()).to(device))


def torch_tables(network, n, device="cpu"):
    """(partner int64, receives_min bool) torch tensors (layers, n) on ``device``, cached."""
    _check(network, n)
    return _torch_tables(network, n, torch.device(device))


def comparators(network, n):
    """Per layer, the list of real comparators ``(u, v)`` (u receives the minimum), pass-throughs omitted."""
    partner, receives_min = tables(network, n)
    return [[(w, int(p)) if receives_min[layer, w] else (int(p), w)
             for w, p in enumerate(partner[layer]) if w < p]
            for layer in range(partner.shape[0])]
