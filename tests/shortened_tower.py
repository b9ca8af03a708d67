"""A CLIP tower run as the in-block merging methods' authors run it: the sequence shortened at each merging
block, between its attention and its MLP. The independent side of test_tome and test_ficoco_v."""

import numpy as np
import torch


def shortened_tower(tower, pixels, schedule: dict[int, int], merge, proportional: bool, feature_layer: int = -2):
    """Per row of pixels: (features [k, D] of the surviving patches at the feature layer, the original column of
    each, and the column each original patch ended in).

    merge(x [n, D], query [H, n, d], key [H, n, d], scaling, size [n], columns [n], r) -> (x', size', groups, order)
    in numpy: groups[i] the output token old token i went into, order[j] the old token output token j continues in.
    """
    layers = tower.encoder.layers
    last = len(layers) + feature_layer
    h = tower.pre_layrnorm(tower.embeddings(pixels))
    rows, tokens, _ = h.shape
    out = []
    for row in range(rows):
        x = h[row : row + 1]
        size = np.ones(tokens)
        columns = np.arange(tokens)
        members = [[c] for c in range(tokens)]  # the original columns each token stands for
        for index in range(last + 1):
            layer = layers[index]
            attention = layer.self_attn
            normed = layer.layer_norm1(x)
            bias = torch.tensor(np.log(size), dtype=x.dtype)[None, None, None, :] if proportional else None
            x = x + attention(normed, attention_mask=bias)[0]
            if schedule.get(index):
                heads = attention.num_heads
                query = attention.q_proj(normed)[0].reshape(x.shape[1], heads, -1).transpose(0, 1)
                key = attention.k_proj(normed)[0].reshape(x.shape[1], heads, -1).transpose(0, 1)
                merged, size, groups, order = merge(x[0].double().numpy(), query.double().numpy(),
                                                    key.double().numpy(), attention.scale, size, columns,
                                                    schedule[index])
                x = torch.tensor(merged, dtype=x.dtype)[None]
                new_members = [[] for _ in order]
                for old, slot in enumerate(groups):
                    new_members[slot] += members[old]
                members, columns = new_members, columns[order]
            x = x + layer.mlp(layer.layer_norm2(x))
        ended_in = np.empty(tokens, dtype=int)
        for slot, group in enumerate(members):
            ended_in[group] = columns[slot]
        out.append((x[0, 1:], columns[1:], ended_in[1:]))
    return out


def assert_pruner_matches(model, reference_model, method: str, keep: int, schedule, merge, proportional: bool):
    """vtprune's kept tokens, their features at the projector's input and where each dropped patch went equal
    shortened_tower's on the same images (two prompts, three images)."""
    import vtprune
    from vtprune.adapters import adapter_for
    from vtprune.tiny import SampleLayout, tiny_inputs

    inputs = tiny_inputs(model, [SampleLayout(images=2), SampleLayout(images=1, text_before=4)])
    pixels = inputs.get("pixel_values", inputs.get("pixel_values_images"))
    tower_of = lambda m: getattr(m.model, "image_tower", None) or m.model.vision_tower  # noqa: E731
    reference = shortened_tower(tower_of(reference_model), pixels, schedule, merge, proportional)
    seen = {}
    with torch.no_grad(), vtprune.apply(model, method, keep) as pruner:
        hook = model.model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: seen.setdefault("features", args[0]))
        model(**inputs)
        hook.remove()
        decision = pruner.last_decision
    per_sample = adapter_for(model).visual_items(inputs["input_ids"], inputs)
    items = [(b, item) for b, sample in enumerate(per_sample) for item in sample]
    offset = 1 if model.config.vision_feature_select_strategy == "default" else 0  # [CLS] dropped before projecting
    for row, (b, item) in enumerate(items):
        features, columns, ended_in = reference[row]
        positions = item.positions()
        kept = decision.kept[0][b][torch.isin(decision.kept[0][b], positions)]
        assert sorted((torch.searchsorted(positions, kept) + 1).tolist()) == sorted(columns.tolist())
        torch.testing.assert_close(seen["features"][row, torch.tensor(columns) - offset], features, rtol=1e-4, atol=1e-4)
        sources, targets = decision.moved[0][b]
        mine = torch.isin(sources, positions)
        moved = dict(zip((torch.searchsorted(positions, sources[mine]) + 1).tolist(),
                         (torch.searchsorted(positions, targets[mine]) + 1).tolist()))
        for patch, column in enumerate(ended_in, start=1):
            # a patch merged into [CLS] leaves the LLM without a destination among the image's tokens
            assert moved.get(patch, patch if column == patch else 0) == column, (row, patch)
