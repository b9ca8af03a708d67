"""Sanity check: can the reference recipe learn ONE fixed question over varied images (text alone cannot answer it)?

Run: python benchmarks/reference_training/sanity_fixed_question.py fp32 1e-3
Trains a fresh reference model on "what color are most of the objects ?" only (8 answers,
chance 0.125), 240 steps of 32, and prints held-out accuracy every 40 steps.
"""
import sys, time, torch, numpy as np
from vtprune.synth.generator import make_sample
from vtprune.synth.reference import build_model, build_processor, build_tokenizer, pixel_values
from vtprune.synth.train import answer_accuracy, encode_training, next_token_loss, patch_labels, DenseHead
torch.manual_seed(0)
use_bf16 = sys.argv[1] == "bf16"; lr = float(sys.argv[2])
tok = build_tokenizer(); processor = build_processor(tok); model = build_model(tok)
head = DenseHead(96)
feats = {}
model.model.vision_tower.encoder.register_forward_hook(lambda m, a, o: feats.__setitem__("x", o.last_hidden_state))
opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr)
def samples(seed, start, n):
    out, i = [], start
    while len(out) < n:
        s = make_sample(seed, i, "general"); i += 1
        if s.meta.get("template") == "gen_color" or "most of the objects" in s.question:
            out.append(s)
    return out, i
val, _ = samples(9, 0, 64)
cursor = 0; began = time.time()
for step in range(1, 241):
    batch, cursor = samples(0, cursor, 32)
    rows = encode_training(tok, [(s.question, s.answer, None, ()) for s in batch])
    ids, mask, at = rows["input_ids"], rows["attention_mask"], rows["answer_targets"]
    dense = torch.from_numpy(np.stack([patch_labels(s.meta) for s in batch]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values([s.image for s in batch])).logits
        loss = next_token_loss(logits, at) + 0.5 * head.loss(feats["x"][:, 1:].float(), dense)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 40 == 0:
        acc = answer_accuracy(model, processor, val)["overall"]
        print(step, round(loss.item(), 3), "val acc", acc, round(time.time() - began), flush=True)
