"""Selection primitives shared by the methods: plain tensor functions, no model code."""

from __future__ import annotations

import math

import torch


def topk_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, returned in ascending (original) order."""
    k = min(k, scores.shape[-1])
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


def on_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """tensor on `device`; from the host to a CUDA device, a copy that does not wait for the device's queue to drain.

    A blocking copy to a GPU synchronises its stream, so a small index tensor built on the host mid-prefill would
    stall the GPU until every kernel queued so far has run, and leave it idle while the host catches up. CUDA stages
    a non-blocking copy from pageable memory at once (the host tensor may be freed right after) and runs it in
    stream order. Other copies stay blocking: to the host, their values are read next; to other devices (MPS) a
    non-blocking copy of a temporary host tensor is not safe."""
    target = tensor.device if device is None else torch.device(device)
    return tensor.to(target, non_blocking=tensor.device.type == "cpu" and target.type == "cuda")


def fill_at(tensor: torch.Tensor, index: tuple, value) -> torch.Tensor:
    """tensor[index] = value, in place, for an index of tensors, without a host synchronisation: written as
    `tensor[rows, cols] = value`, torch makes the Python number a CPU tensor and copies it to a CUDA tensor's device
    with a blocking copy, which waits for every kernel queued so far (once per call: per round in a greedy loop)."""
    return tensor.index_put_(index, torch.full((), value, dtype=tensor.dtype, device=tensor.device))


def same_shape(keys: list) -> list[list[int]]:
    """The indices of equal keys, grouped (groups in order of first appearance, each in order): for a
    select_batch, which views can be stacked and selected together."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, N, D] at index [B, n]: [B, n, D] (each item's rows)."""
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))


def evenly_spaced(n: int, k: int, device=None) -> torch.Tensor:
    """k distinct indices spread evenly over range(n): the centres of k equal bins (24, 2 -> [6, 18])."""
    k = min(k, n)
    if k == n:
        return torch.arange(n, device=device)
    # Centres of k equal bins: distinct for k <= n and symmetric about the middle.
    return ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * n / k).floor().long()


def grid_lattice(height: int, width: int, k: int, device=None) -> torch.Tensor:
    """Raster indices of k cells of a height x width grid laid out as an even 2-D lattice.

    A rows x cols lattice with rows/cols close to the grid's aspect ratio and
    rows * cols >= k is placed at bin centres; when it has more points than k,
    k of them are taken evenly in raster order.
    """
    n = height * width
    k = min(k, n)
    if k == n:
        return torch.arange(n, device=device)
    rows = max(1, min(height, round(math.sqrt(k * height / width))))
    cols = min(width, math.ceil(k / rows))
    while rows * cols < k:  # only when clamping to the grid's width cut cols short
        rows += 1
    r = evenly_spaced(height, rows, device)
    c = evenly_spaced(width, cols, device)
    lattice = (r[:, None] * width + c[None, :]).flatten()
    return lattice[evenly_spaced(lattice.numel(), k, device)]


def volume_lattice(frames: int, height: int, width: int, k: int, device=None) -> torch.Tensor:
    """Raster indices (frame-major) of k cells of a frames x height x width grid laid out as an even 3-D lattice.

    The lattice keeps the grid's proportions: about (k / cells)^(1/3) of each axis's
    extent, frames evenly spaced, an even 2-D lattice in each; k of its points are then
    taken evenly in raster order. A single frame is grid_lattice.
    """
    cells = frames * height * width
    k = min(k, cells)
    if frames == 1 or k == cells:
        return grid_lattice(height, width, k, device) if frames == 1 else torch.arange(cells, device=device)
    chosen = max(1, min(frames, round(frames * (k / cells) ** (1 / 3))))
    per_frame = min(height * width, math.ceil(k / chosen))
    while chosen * per_frame < k:  # only when a frame's cells cut per_frame short
        chosen += 1
        per_frame = min(height * width, math.ceil(k / chosen))
    lattice = (evenly_spaced(frames, chosen, device)[:, None] * height * width
               + grid_lattice(height, width, per_frame, device)[None, :]).flatten()
    return lattice[evenly_spaced(lattice.numel(), k, device)]


def split_budget(sizes: list[int], k: int) -> list[int]:
    """k split over parts of the given sizes in proportion to size (largest remainders), none above its size."""
    total = sum(sizes)
    k = min(k, total)
    shares = [k * size / total for size in sizes]
    counts = [math.floor(share) for share in shares]
    for index in sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])[: k - sum(counts)]:
        counts[index] += 1
    return counts


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the half-split convention of Llama/Qwen (x: [B, H, n, d], cos/sin: [B, n, d])."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def last_query_attention(
    query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Head-averaged softmax attention of one query per sample over its keys.

    query [B, H, d], keys [B, H, n, d], key_mask [B, n] (True = may be attended).
    Returns [B, n]; masked keys get exactly zero.
    """
    logits = torch.einsum("bhd,bhnd->bhn", query.float(), keys.float()) * scaling
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def in_token_order(keep: torch.Tensor, hidden: torch.Tensor, sizes: torch.Tensor, destination: torch.Tensor):
    """A merging selection's slots put in ascending token order, for items along any leading dimensions: keep
    [..., k] (the token each slot stands at, distinct), hidden [..., k, D] and sizes [..., k] reordered alike, and
    destination [..., N] (each token's slot, -1 for none) renumbered to match. Returns the four."""
    order = keep.argsort(dim=-1)
    slot = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    destination = torch.where(destination >= 0, slot.gather(-1, destination.clamp(min=0)), destination)
    rows = order[..., None].expand(*order.shape, hidden.shape[-1])
    return keep.gather(-1, order), hidden.gather(-2, rows), sizes.gather(-1, order), destination


def merge_into_nearest(hidden: torch.Tensor, sizes: torch.Tensor, keep: torch.Tensor):
    """Merge every token not in keep into the kept token most cosine-similar to it, size-weighted.

    hidden [..., N, D], sizes [..., N], keep [..., k] indices (any leading dimensions: items merged alike). Returns
    (hidden [..., k, D], sizes [..., k], destination [..., N]): each kept token becomes the size-weighted mean of
    itself and the tokens merged into it; destination[i] is the slot in keep that token i went to (its own slot for
    a kept token). The sums are one-hot matmuls, deterministic on every device (a scatter-add is not on CUDA).
    """
    lead, (n, width), k = hidden.shape[:-2], hidden.shape[-2:], keep.shape[-1]
    hidden, sizes, keep = hidden.reshape(-1, n, width), sizes.reshape(-1, n), keep.reshape(-1, k)
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    kept_unit = gather_rows(unit, keep)
    destination = (unit @ kept_unit.transpose(1, 2)).argmax(dim=-1)  # [B, N] -> slot in keep
    destination.scatter_(1, keep, torch.arange(k, device=keep.device).expand_as(keep))
    membership = (destination[:, None, :] == torch.arange(k, device=keep.device)[None, :, None]).float()  # [B, k, N]
    weights = sizes.float()
    total = membership @ (hidden.float() * weights[..., None])
    new_sizes = (membership @ weights[..., None])[..., 0]
    return ((total / new_sizes[..., None]).to(hidden.dtype).reshape(*lead, k, width), new_sizes.reshape(*lead, k),
            destination.reshape(*lead, n))


# Distance-matrix entries a greedy max-min selection holds at once (64 MB in float32): items whose matrix fits
# compute it once and read each pick's distances off it; larger ones (videos, anyres) compute them pick by pick.
DISTANCE_MATRIX_ENTRIES = 1 << 24
# On a GPU a batch's matrices are held together up to this many entries (1 GiB in float32): how many items share a
# loop never changes a pick, and a GPU pays for every loop in launches (64 MB took two LLaVA-NeXT images a loop).
HELD_ON_GPU = 1 << 28


def held_entries(device, entries: int) -> int:
    """The matrix entries held at once on `device`: `entries`, or HELD_ON_GPU on a GPU where that is more."""
    return max(entries, HELD_ON_GPU) if torch.device(device).type == "cuda" else entries


def distance_matrix_chunks(groups: int, n: int, entries: int, device="cpu") -> tuple[bool, list[slice]]:
    """Whether items of n tokens hold their n x n distance matrix (decided by their size and `entries` alone, so
    that an item picks alike in any batch), and the slices of the batch's `groups` items taken at once so that the
    held matrices fit in held_entries(device, entries)."""
    whole = n * n <= entries
    at_once = max(1, held_entries(device, entries) // (n * n)) if whole else max(1, groups)
    return whole, [slice(start, start + at_once) for start in range(0, groups, at_once)]


def greedy_max_min(unit: torch.Tensor, score: torch.Tensor, taken: torch.Tensor, k: int, *,
                   matrix: torch.Tensor | None = None, fresh: bool = False) -> torch.Tensor:
    """[G, k] greedy max-min picks for G items of unit-norm rows unit [G, N, D]: each pick is the untaken token
    (taken [G, N]: never to pick) with the highest score [G, N]; every score then becomes the token's cosine
    distance to its nearest pick. `fresh`: the initial score only placed the first pick (it is not a distance
    to count afterwards). matrix [G, N, N]: the items' distance matrices, where held. Picks stay on the device:
    no host read per pick, and four small ops each (a taken token's score is -inf, which no minimum raises)."""
    rows = torch.arange(unit.shape[0], device=unit.device)
    score = score.masked_fill(taken, float("-inf"))
    picks = []
    for i in range(k):
        pick = score.argmax(dim=1)
        picks.append(pick)
        distance = matrix[rows, pick] if matrix is not None else 1 - (unit @ unit[rows, pick][:, :, None])[..., 0]
        if i == 0 and fresh:
            score = distance.masked_fill(score == float("-inf"), float("-inf"))
        else:
            score = torch.minimum(score, distance)
        fill_at(score, (rows, pick), float("-inf"))
    return torch.stack(picks, dim=1) if picks else torch.zeros(unit.shape[0], 0, dtype=torch.long, device=unit.device)


def farthest_point(features: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min coverage: k more indices, each the token farthest (cosine distance) from all chosen so far.

    features [N, D]; chosen [m] indices already taken (may be empty: the first pick is
    then the token farthest from the mean). Returns the k new indices in pick order.
    features [G, N, D] with chosen [G, m] are G items picked independently, in one loop: [G, k].
    """
    single = features.dim() == 2
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    unit, chosen = (unit[None], chosen[None]) if single else (unit, chosen)
    groups, n = unit.shape[:2]
    k = max(0, min(k, n - chosen.shape[1]))
    whole, chunks = distance_matrix_chunks(groups, n, DISTANCE_MATRIX_ENTRIES, unit.device)
    picks = [_farthest_points(unit[chunk], chosen[chunk], k, whole) for chunk in chunks]
    picks = torch.cat(picks) if picks else chosen.new_zeros(0, k)
    return picks[0] if single else picks


def _farthest_points(unit: torch.Tensor, chosen: torch.Tensor, k: int, whole: bool) -> torch.Tensor:
    groups, n = unit.shape[:2]
    rows = torch.arange(groups, device=unit.device)
    matrix = 1 - unit @ unit.transpose(1, 2) if whole else None
    if chosen.shape[1] and matrix is not None:
        score = matrix.gather(2, chosen[:, None, :].expand(-1, n, -1)).min(dim=2).values
    elif chosen.shape[1]:
        score = (1 - unit @ unit[rows[:, None], chosen].transpose(1, 2)).min(dim=2).values
    else:
        score = 1 - (unit @ torch.nn.functional.normalize(unit.mean(dim=1), dim=-1)[:, :, None])[..., 0]
    taken = torch.zeros(groups, n, dtype=torch.bool, device=unit.device)
    fill_at(taken, (rows[:, None], chosen), True)
    return greedy_max_min(unit, score, taken, k, matrix=matrix, fresh=not chosen.shape[1])


def _row_attention(layer, rows: torch.Tensor) -> torch.Tensor:
    """[R', H, T, T] softmax attention of the given tower rows (layer: a VisionLayer)."""
    query, key = layer.query[rows].float(), layer.key[rows].float()
    return (query @ key.transpose(-1, -2) * layer.scaling).softmax(dim=-1)


def cls_attention(layer, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[H, N]: per head, the attention the [CLS] query of each token's row pays to the token.

    The softmax runs over the whole row ([CLS] and every patch, padding tiles' included), as in the tower.
    """
    if not layer.cls:
        raise ValueError("this vision tower has no [CLS] token")
    logits = torch.einsum("rhd,rhtd->rht", layer.query[:, :, 0].float(), layer.key.float()) * layer.scaling
    attention = logits.softmax(dim=-1)  # [R, H, T]
    return attention[rows, :, columns].T


def received_attention(layer, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[N]: the attention each token receives, averaged over its row's queries and the heads
    (the substitute for [CLS] attention on towers without one)."""
    used = torch.unique(rows)
    attention = _row_attention(layer, used).mean(dim=(1, 2))  # [R', T]
    return attention[torch.searchsorted(used, rows), columns]


def row_groups(rows: torch.Tensor, columns: torch.Tensor, keep: int) -> list[tuple[torch.Tensor, int]]:
    """An item's tokens grouped by the tower row they were encoded in, with keep split over the rows.

    Returns, per row in ascending row order, (the indices of its tokens in ascending column
    order, how many of them to keep): keep is split in proportion to the rows' token counts
    (split_budget: largest remainders, earlier rows first on ties). For the methods that
    select per encoded image / anyres tile / video frame, as their authors do per tower row.
    """
    order = torch.argsort(rows * (int(columns.max()) + 1 if columns.numel() else 1) + columns)
    _, counts = torch.unique_consecutive(rows[order], return_counts=True)
    budgets = split_budget(counts.tolist(), keep)
    return list(zip(torch.split(order, counts.tolist()), budgets))


def row_layouts(views: list) -> list[list[tuple[torch.Tensor, int]] | None]:
    """Per VisionView, its tower rows as row_groups gives them (host tensors), read from the device once for all the
    views of several rows; None for a view of one row (its row is all its tokens, in column order). For selecting
    the rows of many items alike together."""
    def several(view) -> bool:
        return next(iter(view.layers.values())).query.shape[0] > 1

    multi = [view for view in views if several(view)]
    if not multi:
        return [None] * len(views)
    device = multi[0].features.device
    rows = torch.cat([view.rows.to(device) for view in multi])
    columns = torch.cat([view.columns.to(device) for view in multi])
    rows, columns = torch.stack([rows, columns]).cpu()  # the one read
    sizes = [view.features.shape[0] for view in multi]
    found = iter([row_groups(r, c, view.keep) for r, c, view in zip(rows.split(sizes), columns.split(sizes), multi)])
    return [next(found) if several(view) else None for view in views]


def layout_key(layout: list[tuple[torch.Tensor, int]] | None) -> tuple | None:
    """What items must share, beyond their shapes, to be selected row by row together: each row's token count and
    budget (None: one row)."""
    return None if layout is None else tuple((tokens.numel(), budget) for tokens, budget in layout)


def row_tokens(layouts: list, columns: torch.Tensor, keep: int) -> list[tuple[torch.Tensor, int]]:
    """For items of one row layout (row_layouts; None: one row) with columns [B, N]: per tower row, its tokens
    [B, n] (indices into each item's, in column order) and its budget."""
    if layouts[0] is None:  # one row: all the tokens, in column order
        return [(columns.argsort(dim=1), keep)]
    return [(torch.stack([layout[r][0] for layout in layouts]).to(columns.device), budget)
            for r, (_, budget) in enumerate(layouts[0])]
