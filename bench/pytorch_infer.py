"""The reference's inference timed in PyTorch, for side-by-side ratios with `taming bench`.

- `first-stage CONFIG --size S`: VQModel encode (encoder, quant_conv, quantize) and decode
  (post_quant_conv, decoder) of one image, random weights; JSON lines like `taming bench first-stage`.
- `sample CONFIG --cond-tokens C --tokens T --batch B`: the reference's cached sampler
  (`mingpt.sample_with_past`, as `scripts/sample_fast.py` runs it, top-k 100) on the config's GPT with
  random weights; with `--no-cache` the uncached loop of `Net2NetTransformer.sample` instead.

Needs `pip install torch taming-transformers-rom1504 pyyaml` (not part of the project's build).
usage: python3 bench/pytorch_infer.py {first-stage,sample} CONFIG.yaml [options]
"""
import argparse, json, time

import torch
import torch.nn.functional as F
import yaml

ap = argparse.ArgumentParser()
ap.add_argument("what", choices=["first-stage", "sample"])
ap.add_argument("config")
ap.add_argument("--size", type=int, default=256)
ap.add_argument("--cond-tokens", type=int, default=1)
ap.add_argument("--tokens", type=int, default=256)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--no-cache", action="store_true")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = yaml.safe_load(open(a.config))["model"]["params"]

if a.what == "first-stage":
    from taming.modules.diffusionmodules.model import Encoder, Decoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    fs = cfg.get("first_stage_config", {}).get("params", cfg)
    dd = fs["ddconfig"]
    enc, dec = Encoder(**dd).eval(), Decoder(**dd).eval()
    q = VectorQuantizer2(fs["n_embed"], fs["embed_dim"], beta=0.25)
    qc = torch.nn.Conv2d(dd["z_channels"], fs["embed_dim"], 1)
    pqc = torch.nn.Conv2d(fs["embed_dim"], dd["z_channels"], 1)
    x = torch.rand(1, dd["in_channels"], a.size, a.size) * 2 - 1
    with torch.no_grad():
        for op in ["encode", "decode"]:
            best = float("inf")
            for _ in range(a.repeats + 1):
                t0 = time.perf_counter()
                if op == "encode":
                    z, _, _ = q(qc(enc(x)))
                else:
                    dec(pqc(z))
                best = min(best, time.perf_counter() - t0)
            print(json.dumps({"bench": "first-stage", "impl": "pytorch", "torch": torch.__version__, "op": op,
                              "size": a.size, "batch": 1, "seconds": best, "threads": a.threads}))
else:
    import sys, types

    def top_k_top_p_filtering(logits, top_k=0, top_p=1.0):
        # what the reference imports from `transformers` (removed there since): top-k only here
        v, _ = torch.topk(logits, top_k)
        return logits.masked_fill(logits < v[:, [-1]], -float("inf"))

    sys.modules["transformers"] = types.SimpleNamespace(top_k_top_p_filtering=top_k_top_p_filtering)
    from taming.modules.transformer.mingpt import GPT, sample_with_past

    g = cfg["transformer_config"]["params"]
    gpt = GPT(**g).eval()
    c = torch.arange(a.batch * a.cond_tokens).reshape(a.batch, a.cond_tokens) % g["vocab_size"]
    t0 = time.perf_counter()
    with torch.no_grad():
        if a.no_cache:
            x = c
            for _ in range(a.tokens):
                logits, _ = gpt(x)
                logits = logits[:, -1, :]
                v, _ = torch.topk(logits, 100)
                logits[logits < v[:, [-1]]] = -float("inf")
                x = torch.cat((x, torch.multinomial(F.softmax(logits, -1), 1)), 1)
        else:
            sample_with_past(c, gpt, steps=a.tokens, top_k=100, top_p=1.0)
    secs = time.perf_counter() - t0
    print(json.dumps({"bench": "sample", "impl": "pytorch", "torch": torch.__version__, "cache": not a.no_cache,
                      "cond_tokens": a.cond_tokens, "tokens": a.tokens, "batch": a.batch, "seconds": secs,
                      "seconds_per_image": secs / a.batch, "threads": a.threads}))
