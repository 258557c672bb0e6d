"""The reference's training step timed in PyTorch, for side-by-side ratios with `taming bench train`.

Runs what PyTorch Lightning runs per batch for the reference's models, with the reference package
(`pip install taming-transformers-rom1504 omegaconf einops` plus torch/torchvision):
- a first-stage config: VQModel forward + VQLPIPSWithDiscriminator generator loss (adaptive weight
  via autograd.grad) + backward + Adam, then a second forward + discriminator loss + backward +
  Adam, with `global_step = disc_start` (discriminator active); random weights (LPIPS/VGG too);
- a transformer config: mingpt GPT forward over block_size-1 tokens, cross-entropy, backward, AdamW.
Prints one JSON line per run in the format of `taming bench train`.

usage: python3 bench/pytorch_train_step.py CONFIG.yaml [--batch B] [--size S] [--steps N] [--threads T]
"""
import argparse, json, sys, time, types

import torch
import torch.nn.functional as F

# mingpt imports a helper that `transformers` has since removed; training does not call it
sys.modules.setdefault("transformers", types.SimpleNamespace(top_k_top_p_filtering=None))
import torchvision
import yaml

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--size", type=int, default=64)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

# no network: LPIPS with random VGG16 weights (the weights do not change the cost)
_vgg = torchvision.models.vgg16
import taming.modules.losses.lpips as lp  # noqa: E402
lp.models.vgg16 = lambda pretrained=False, **k: _vgg(weights=None)
lp.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None

cfg = yaml.safe_load(open(a.config))["model"]
params = cfg["params"]
target = cfg["target"]


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


if target.endswith("VQModel"):
    from taming.modules.diffusionmodules.model import Encoder, Decoder
    from taming.modules.vqvae.quantize import VectorQuantizer2
    from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

    class VQ(torch.nn.Module):
        def __init__(s):
            super().__init__()
            dd = params["ddconfig"]
            s.encoder, s.decoder = Encoder(**dd), Decoder(**dd)
            s.quantize = VectorQuantizer2(params["n_embed"], params["embed_dim"], beta=0.25)
            s.quant_conv = torch.nn.Conv2d(dd["z_channels"], params["embed_dim"], 1)
            s.post_quant_conv = torch.nn.Conv2d(params["embed_dim"], dd["z_channels"], 1)
            s.loss = VQLPIPSWithDiscriminator(**params["lossconfig"]["params"])

        def forward(s, x):
            q, ql, _ = s.quantize(s.quant_conv(s.encoder(x)))
            return s.decoder(s.post_quant_conv(q)), ql

    m = VQ().train()
    ae = [p for n, p in m.named_parameters() if not n.startswith("loss.")]
    opt_ae = torch.optim.Adam(ae, lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(m.loss.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    step = params["lossconfig"]["params"]["disc_start"]
    c = params["ddconfig"]["in_channels"]
    times = []
    for i in range(a.warmup + a.steps):
        x = torch.rand(a.batch, c, a.size, a.size) * 2 - 1
        t0 = time.perf_counter()
        xrec, q = m(x)
        loss, _ = m.loss(q, x, xrec, 0, step, last_layer=m.decoder.conv_out.weight, split="train")
        opt_ae.zero_grad(); loss.backward(); opt_ae.step()
        xrec, q = m(x)
        dloss, _ = m.loss(q, x, xrec, 1, step, last_layer=m.decoder.conv_out.weight, split="train")
        opt_d.zero_grad(); dloss.backward(); opt_d.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    s = median(times)
    print(json.dumps({"bench": "train_vqgan", "impl": "pytorch", "torch": torch.__version__, "batch": a.batch,
                      "size": a.size, "threads": a.threads, "disc_active": True, "s_per_step": s,
                      "images_per_s": a.batch / s}))
else:
    from taming.modules.transformer.mingpt import GPT
    g = params["transformer_config"]["params"]
    gpt = GPT(**g).train()
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    t = g["block_size"]
    times = []
    for i in range(a.warmup + a.steps):
        idx = torch.randint(g["vocab_size"], (a.batch, t))
        t0 = time.perf_counter()
        logits, _ = gpt(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    s = median(times)
    print(json.dumps({"bench": "train_transformer", "impl": "pytorch", "torch": torch.__version__, "batch": a.batch,
                      "tokens_per_sequence": t - 1, "threads": a.threads, "s_per_step": s,
                      "tokens_per_s": a.batch * (t - 1) / s}))
