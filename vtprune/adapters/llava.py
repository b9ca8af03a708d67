"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP grid of (image_size / patch)^2 tokens per image."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, EncodedPlace, VisualItem, single_row, whole_images


class LlavaAdapter(Adapter):
    family = "llava"
    feature_strategy = "default"
    model_classes = ("LlavaForConditionalGeneration",)
    one_row_per_image = True

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = (side, side)
        self.image_token_id = config.image_token_id

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,)

    def visual_items(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[VisualItem]]:
        return [whole_images(row, self.image_token_id, *self.grid) for row in input_ids]

    def vision_encoders(self):
        return [("image", self.model.model.vision_tower.encoder.layers)]

    def known_place(self, item: VisualItem, device) -> EncodedPlace:
        return single_row(item.length, device)

    # -------------------------------------------------------- vision-layer fusion
    def vision_state_hooks(self, store: dict) -> list:
        """Hooks that keep every vision hidden state of the last encoded images in store["states"]
        (index 0 the encoder's input, i the output of encoder layer i-1, as `hidden_states`)."""
        own = self.model.config.vision_feature_layer
        if not isinstance(own, int):
            raise ValueError(f"clasp's vision-layer fusion mixes single vision layers, but this model's projector "
                             f"reads layers {own} side by side; pass fusion=False")
        encoder = self.model.model.vision_tower.encoder

        def start(module, args, kwargs):
            store["states"] = [args[0] if args else kwargs["inputs_embeds"]]

        def layer_done(module, args, output):
            store["states"].append(output[0] if isinstance(output, tuple) else output)

        layer_done.vtprune_reads_output = True  # (compile_prefill may run the layers around it as one graph)
        handles = [encoder.register_forward_pre_hook(start, with_kwargs=True)]
        handles += [layer.register_forward_hook(layer_done) for layer in encoder.layers]
        return handles

    def mixed_features(self, states: list[torch.Tensor], weights: list[dict[int, float] | None]) -> torch.Tensor:
        """Per image, the weighted sum of vision hidden states (CLS dropped) the projector should get."""
        own = self.model.config.vision_feature_layer
        images = []
        for i, mix in enumerate(weights):
            mix = mix or {own: 1.0}
            if any(not -len(states) <= layer < len(states) for layer in mix):
                raise ValueError(f"clasp's calibration mixes vision hidden states {sorted(mix)}, but this tower has "
                                 f"{len(states)} (0..{len(states) - 1}); calibrate on this model")
            images.append(sum(weight * states[layer][i, 1:] for layer, weight in mix.items()))
        return torch.stack(images)

    def projector_fusion_hook(self, store: dict, current_weights):
        """A pre-hook on the projector replacing its input with the per-image mixes current_weights() names."""

        def hook(module, args):
            weights = current_weights()
            if not weights or not any(weights) or store.get("mixed"):
                return None
            if len(weights) != args[0].shape[0]:
                raise NotImplementedError(
                    f"clasp's vision-layer fusion got {len(weights)} weights for {args[0].shape[0]} images "
                    "(generate() with num_beams or num_return_sequences > 1?); pass fusion=False"
                )
            return (self.mixed_features(store["states"], weights).to(args[0].dtype),)

        return self.model.model.multi_modal_projector.register_forward_pre_hook(hook)

    def remix_encoded_images(self, kwargs: dict, store: dict, weights: list[dict[int, float] | None]) -> None:
        """generate() may encode the images before the first forward: project them again with the mixes."""
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None or not any(weights):
            return
        if len(weights) != store["states"][0].shape[0]:
            raise NotImplementedError(
                "clasp's vision-layer fusion does not support generate() expanding the images "
                "(num_beams or num_return_sequences > 1); pass fusion=False"
            )
        store["mixed"] = True  # the projector's own fusion hook must not mix a second time
        try:
            projected = self.model.model.multi_modal_projector(self.mixed_features(store["states"], weights))
        finally:
            store["mixed"] = False
        encoded.pooler_output = list(projected.to(encoded.pooler_output[0].dtype))
