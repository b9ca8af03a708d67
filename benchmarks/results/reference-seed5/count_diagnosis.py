"""Why CLSE fails on count questions: is it CLSE's score, or how few tokens its last stage keeps?

Run: python benchmarks/results/reference-seed5/count_diagnosis.py  (about a minute on 2 cores)
60 count questions of seed 5, budget 192; output in count_diagnosis.txt beside this file.
"""

import torch

import vtprune
from vtprune.eval.runner import answered_right
from vtprune.synth import generate
from vtprune.synth.reference import load_reference, prompt

model, processor = load_reference()
samples = [s for s in generate(5, 600) if s.qclass == "count"][:60]


def accuracy(method, budget, **options):
    with torch.no_grad(), vtprune.apply(model, method, budget, **options) as pruner:
        hits = sum(answered_right(model, processor, samples, prompt, batch_size=20))
    return hits / len(samples), pruner.last_stats.visual_tokens_per_layer[0]


for name, method, budget, options in [
    ("clse, the authors' keep counts", "clse", 192, {}),
    ("clse, 192 kept at the last stage", "clse", 192, {"keep": (330, 210, 192)}),
    ("clse, 330 kept at every stage", "clse", 192, {"keep": (330, 330, 330)}),
    ("fastv, 62 kept before layer 4", "fastv", 62, {"layer": 4}),
    ("random, 62 kept at the LLM input", "random", 62, {}),
]:
    hit_rate, tokens = accuracy(method, budget, **options)
    print(f"{name:36s} count accuracy {100 * hit_rate:5.1f}%  visual tokens per layer {tokens}")
