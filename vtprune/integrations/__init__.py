"""vtprune inside other evaluation harnesses.

`lmms_eval`: `lmms-eval --model vtprune --model_args pretrained=PATH,method=clse,budget=64 --tasks pope`, with
the `vtprune[lmms]` extra installed. lmms-eval finds the model through the entry point in pyproject.toml, which
names `lmms_eval_manifest` below; the model class itself (vtprune.integrations.lmms_eval) loads only when a
run asks for `--model vtprune`.
"""

LMMS_EVAL_MODEL = "vtprune"


def lmms_eval_manifest():
    """lmms-eval's registration record for `--model vtprune` (its `lmms_eval.models` entry-point group)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path="vtprune.integrations.lmms_eval.Vtprune")
