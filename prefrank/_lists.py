"""Per-item preference levels of the losses' (N, K) lists, computed with fixed-shape torch ops only.

Internal to :mod:`prefrank.losses`. Nothing here reads a value back to the host (no ``.item()``, ``.tolist()``,
data-dependent ``.nonzero()`` or boolean indexing), so it traces under ``torch.compile(fullgraph=True)`` and
never synchronises a CUDA stream. Malformed inputs (levels < -1, ranking entries out of range or repeated)
never index out of bounds here: they only give meaningless levels. The ``check_*`` functions reject them
with a ValueError naming the user's argument; callers run those only when
``prefrank._checks.data_checks_enabled(...)`` says so.

Conventions (DESIGN.md): ``groups[..., k]`` = preference level of item k (0 = best, equal = tie, -1 =
padding); ``ranking[..., j]`` = item at place j, best first, -1 = absent (padding); ``mask`` False = padding.
"""

from __future__ import annotations

import torch

# Sort key of an item that is not part of its list: after every level a user can write.
_PAD_KEY = torch.iinfo(torch.int64).max


def compact_levels(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per list (last axis), each valid item's rank among the distinct keys of the list's valid items.

    ``keys`` int, ``valid`` bool, same shape (..., K). Returns int64 (..., K): 0 for the smallest valid key,
    +1 per further distinct key, -1 where ``valid`` is False. Equal keys share a level (ties).
    """
    keys = torch.where(valid, keys.to(torch.int64), _PAD_KEY)
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    sorted_valid = valid.gather(-1, order)
    # a new level starts at the first valid item and wherever the key changes between two valid items
    # (the "previous item invalid" term keeps a user level equal to _PAD_KEY apart from the padding)
    changed = (sorted_keys[..., 1:] != sorted_keys[..., :-1]) | ~sorted_valid[..., :-1]
    starts = torch.cat([torch.ones_like(sorted_valid[..., :1]), changed], dim=-1) & sorted_valid
    sorted_levels = torch.where(sorted_valid, torch.cumsum(starts, dim=-1) - 1, -1)
    return torch.zeros_like(sorted_levels).scatter(-1, order, sorted_levels)


def ranking_places(ranking: torch.Tensor) -> torch.Tensor:
    """Place of every item in ``ranking`` (..., K): int64 (..., K), -1 for an item the ranking does not list.

    Entries outside [0, K) are ignored (a repeated item keeps its last place), so a malformed ranking gives
    meaningless places but never an out-of-bounds write.
    """
    K = ranking.shape[-1]
    items = ranking.to(torch.int64)
    listed = (items >= 0) & (items < K)
    slots = torch.where(listed, items, K)                       # unlisted places go to a scratch slot K
    places = torch.arange(K, device=ranking.device).expand_as(items)
    unplaced = torch.full(items.shape[:-1] + (K + 1,), -1, dtype=torch.int64, device=ranking.device)
    # amax, not a plain scatter: deterministic when an item is repeated
    placed = unplaced.scatter_reduce(-1, slots, torch.where(listed, places, -1), reduce="amax")
    return placed[..., :K]


def item_levels(shape: torch.Size, device: torch.device, *, groups: torch.Tensor | None = None,
                ranking: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Compact preference level of every item of (N, K) lists: int64 (N, K), 0 = the list's best level
    present, +1 per further level present, -1 = padding (groups -1, not in ``ranking``, or ``mask`` False).

    The order comes from ``groups``, else ``ranking`` (every listed item its own level), else the item axis
    (items already best-first).
    """
    if groups is not None:
        keys = groups.to(torch.int64)
        valid = keys >= 0
    elif ranking is not None:
        keys = ranking_places(ranking)
        valid = keys >= 0
    else:
        keys = torch.arange(shape[-1], device=device).expand(shape)
        valid = torch.ones(shape, dtype=torch.bool, device=device)
    if mask is not None:
        valid = valid & mask
    return compact_levels(keys, valid)


def first_list(bad: torch.Tensor) -> int:
    """Index along dim 0 (the flattened batch) of the first list with a True entry; for error messages of
    failing data checks only (it reads the tensor)."""
    return int(bad.reshape(bad.shape[0], -1).any(-1).nonzero()[0, 0])


def check_groups(name: str, groups: torch.Tensor) -> None:
    """ValueError naming ``name`` if a level is below -1 (a data check)."""
    groups = groups.to(torch.int64)   # compared in int64: -1 as a uint8 would be 255
    bad = groups < -1
    if bad.any():
        raise ValueError(f"{name} must hold levels >= 0, or -1 for padding; list {first_list(bad)} "
                         f"(flattened batch index) holds {int(groups[bad][0])}")


def check_ranking(name: str, ranking: torch.Tensor) -> None:
    """ValueError naming ``name`` for entries outside [-1, K), -1 before a listed item, or an item listed
    twice (a data check)."""
    K = ranking.shape[-1]
    items = ranking.to(torch.int64)
    out_of_range = (items < -1) | (items >= K)
    if out_of_range.any():
        raise ValueError(f"{name} entries must be item indices in [0, {K}) or -1 (absent item); list "
                         f"{first_list(out_of_range)} (flattened batch index) holds "
                         f"{int(items[out_of_range][0])}")
    gap = (items[..., :-1] < 0) & (items[..., 1:] >= 0)
    if gap.any():
        raise ValueError(f"{name} may hold -1 only as padding at the tail of each list (list "
                         f"{first_list(gap)}, flattened batch index)")
    counts = torch.zeros(items.shape[:-1] + (K + 1,), dtype=torch.int64, device=items.device)
    counts.scatter_add_(-1, torch.where(items >= 0, items, K), torch.ones_like(items))
    repeated = counts[..., :K] > 1
    if repeated.any():
        raise ValueError(f"{name} lists the same item twice in list {first_list(repeated)} (flattened batch "
                         f"index)")
