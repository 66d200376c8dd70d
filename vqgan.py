"""VQ-GAN with a GPT prior for the ALICE Zero Degree Calorimeters: discrete tokens, then an autoregressive model.

Paper: the master's thesis arXiv 2407.16704 (VQ-GAN: Wasserstein 4.58 on the real neutron set at 0.09 ms per
sample; the improved version with x4 downsampling and an EMA codebook of 512 x 8 with l2-normalised lookup: 2.11).

Stage 1, tokenizer. A conv encoder with x4 downsampling maps log1p(counts) (ZN 44x44) to an 8 x 11 x 11 grid
(121 tokens; ZP 56x30 is padded to 56x32 -> 14 x 8 = 112 tokens, cropped back after decoding). Every 8-d
vector is l2-normalised and replaced by the nearest l2-normalised codebook entry (512 x 8, cosine lookup); the
decoder sees it through the straight-through estimator. The codebook is not trained by gradients: it is the
ratio of two exponential moving averages (decay `--vq-decay`) over the training batches, the number of
vectors assigned to each code (Laplace-smoothed, eps 1e-5) and their sum (`ema_codebook`, a pure function).
Dead-code restart: after each update, a code whose EMA count (vectors per batch) is below `--dead-below`
is re-initialised to a random encoder output of the current batch, with count 1. Codes start with count 1,
so an unused code is restarted after about ln(1 / dead-below) / (1 - decay) steps (460 by default).
Loss = squared error of the reconstruction (summed over pixels, averaged over the batch) + 0.25 * commitment
(squared distance of the encoder output to its code, summed over the grid) + adversarial, from step
`--adv-start` on: a small patch discriminator (hinge loss) on log1p images, the generator term weighted
adaptively as in VQGAN (`--adv` times |grad L2| / |grad G| at the last decoder layer). One optimiser steps both
networks: the discriminator sees detached reconstructions and the generator term uses detached
discriminator weights. The logged stage-1 train loss includes the discriminator's hinge loss.
Logged every --val-every steps: val loss (L2 + commitment), reconstruction Wasserstein (encode -> quantise ->
decode of validation responses: the best the whole model can reach), codebook perplexity exp(entropy of the
code frequencies on the validation set) and usage (fraction of the codes used there).
Stage 2, prior. The training set is tokenised once; a causal GPT (pre-LN blocks) models the tokens in raster
order (row-major over the latent grid), conditioned through P = `--prefix` tokens: a learned projection of
the 9 standardised features to P embeddings placed before the image tokens. Loss: next-token cross entropy.
Sampling: token by token with temperature (default 1.2) and top-k (default 128; 0 = none), drawn by
inverse CDF from uniforms taken from a CPU generator up front, so the KV-cached decoder (default) and
`--no-kv-cache` (recomputes the whole sequence for every token) give the same tokens; then decode, expm1.

Usage:
    python vqgan.py --train                      # both stages, ZN, CPU default (~15-20 min on 2 cores)
    python vqgan.py --train --stage 1            # only the tokenizer (--stage 2 then reuses it)
    python vqgan.py --train --detector proton --out runs/vqgan_proton
    python vqgan.py --train --paper              # reference sizes (autoencoder ~60k, GPT 128 x 4 heads x 6 layers)
    python vqgan.py --sample --ckpt runs/vqgan/ckpt.pt --n 1000 --out samples.npz
    python vqgan.py --eval --ckpt runs/vqgan/ckpt.pt [--temperature 1.0 --top-k 0] [--plot]
    python vqgan.py --eval --ckpt runs/vqgan/ckpt.pt --sweep     # temperature x top-k, ms with/without KV cache
    python vqgan.py --train --smoke              # seconds

Deviations from the thesis: the CPU default GPT is smaller (embed 64, 4 heads, 4 layers; `--paper`: 128, 4, 6)
and both stages train for a fraction of an epoch-scale schedule (`--paper`: 30 + 50 epochs); no perceptual
(VGG) loss, which needs pretrained weights that are not available offline; the discriminator starts at a
fixed step instead of a tuned epoch.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics

NAME = "vqgan"
DEFAULTS = dict(epochs=1, epochs2=1, batch_size=128, lr=2e-3)   # CPU default: ~15-20 minutes on 2 cores for ZN
PAPER = dict(epochs=30, epochs2=50, batch_size=256, lr=1e-3, ae_width=20, embed=128, heads=4, layers=6)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("VQ-GAN")
    g.add_argument("--stage", type=int, default=None, choices=[1, 2], help="train only this stage (default: both)")
    g.add_argument("--epochs2", type=int, default=None, help="epochs of stage 2 (--epochs is stage 1)")
    g.add_argument("--ae-width", type=int, default=16, help="autoencoder channels (x1, x2 after downsampling)")
    g.add_argument("--codes", type=int, default=512, help="codebook size")
    g.add_argument("--code-dim", type=int, default=8, help="codebook vector dimension")
    g.add_argument("--vq-decay", type=float, default=0.99, help="EMA decay of the codebook statistics")
    g.add_argument("--dead-below", type=float, default=0.01, help="restart codes whose EMA count per batch falls below this")
    g.add_argument("--beta", type=float, default=0.25, help="weight of the commitment loss")
    g.add_argument("--adv", type=float, default=0.1, help="adversarial weight (times the adaptive gradient ratio); 0: off")
    g.add_argument("--adv-start", type=int, default=800, help="stage-1 step at which the discriminator switches on")
    g.add_argument("--embed", type=int, default=64, help="GPT embedding width (paper: 128)")
    g.add_argument("--heads", type=int, default=4, help="GPT attention heads (paper: 4)")
    g.add_argument("--layers", type=int, default=4, help="GPT layers (paper: 6)")
    g.add_argument("--prefix", type=int, default=4, help="number of condition prefix tokens")
    g.add_argument("--temperature", type=float, default=1.2, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=128, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--no-kv-cache", action="store_true", help="sample without the KV cache (slow; same tokens)")
    g.add_argument("--val-every", type=int, default=500, help="validate every N steps")
    g.add_argument("--sweep", action="store_true", help="--eval: temperature 1.0/1.2/1.4 x top-k none/128/64, and "
                   "ms per sample with and without the KV cache; writes sweep.json")
    g.add_argument("--paper", action="store_true", help="reference sizes and schedule")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if not args.temperature > 0 or args.top_k < 0:
        p.error(f"--temperature must be positive and --top-k >= 0 (got {args.temperature}, {args.top_k})")
    if min(args.ae_width, args.codes, args.code_dim, args.prefix) <= 0 or args.embed % args.heads or args.embed <= 0:
        p.error("--ae-width, --codes, --code-dim, --prefix must be positive; --embed a positive multiple of --heads")
    if not 0 < args.vq_decay < 1 or args.dead_below < 0 or args.beta < 0 or args.adv < 0 or args.adv_start < 0:
        p.error("--vq-decay must be in (0, 1); --dead-below, --beta, --adv, --adv-start must be >= 0")
    if args.paper:
        for k, v in PAPER.items():
            if k in ("ae_width", "embed", "heads", "layers") or getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:   # flags given on the command line win
            setattr(args, k, v)
    if args.smoke:
        args.limit, args.ae_width, args.embed, args.layers, args.batch_size = args.limit or 1500, 4, 16, 2, 32
        args.max_steps, args.adv_start, args.codes = args.max_steps or 4, min(args.adv_start, 2), min(args.codes, 64)
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 2
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
def groups(ch):
    return math.gcd(ch, 4)


def grid(shape):
    """The token grid (h, w) of an image shape: x4 downsampling of the image padded to a multiple of 4."""
    return math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)


def ema_codebook(cluster_size, embed_sum, z, idx, decay, eps=1e-5):
    """One EMA step of the codebook statistics (pure). z (N, D) encoder outputs assigned to codes idx (N,).
    Returns the new counts (K,), sums (K, D) and codebook = sums / Laplace-smoothed counts."""
    onehot = F.one_hot(idx, len(cluster_size)).to(z.dtype)
    cs = decay * cluster_size + (1 - decay) * onehot.sum(0)
    es = decay * embed_sum + (1 - decay) * onehot.t() @ z
    n = cs.sum()
    smoothed = (cs + eps) / (n + len(cs) * eps) * n
    return cs, es, es / smoothed[:, None]


class Quantizer(nn.Module):
    """l2-normalised nearest-code lookup; the codebook lives in buffers updated by EMA, not by gradients."""

    def __init__(self, codes=512, dim=8):
        super().__init__()
        book = F.normalize(torch.randn(codes, dim), dim=1)
        self.register_buffer("codebook", book)
        self.register_buffer("embed_sum", book.clone())
        self.register_buffer("cluster_size", torch.ones(codes))

    def lookup(self, z):
        """z (B, D, h, w) l2-normalised -> code indices (B, h, w) by cosine similarity."""
        return torch.einsum("bdhw,kd->bhwk", z, F.normalize(self.codebook, dim=1)).argmax(-1)

    def embed(self, idx):
        return F.normalize(self.codebook, dim=1)[idx].permute(0, 3, 1, 2)

    @torch.no_grad()
    def update(self, z, idx, decay, dead_below, generator):
        """EMA update from a batch, then restart dead codes from random encoder outputs of the batch."""
        z = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        cs, es, book = ema_codebook(self.cluster_size, self.embed_sum, z, idx.reshape(-1), decay)
        dead = (cs < dead_below).nonzero().squeeze(1)
        if len(dead):
            pick = torch.randint(len(z), (len(dead),), generator=generator, device=generator.device).to(z.device)
            cs[dead], es[dead], book[dead] = 1.0, z[pick], z[pick]
        self.cluster_size.copy_(cs), self.embed_sum.copy_(es), self.codebook.copy_(book)


class VQAE(nn.Module):
    """x4 downsampling conv autoencoder with a vector quantiser: (1, H, W) log1p image <-> (h, w) tokens."""

    def __init__(self, width=16, dim=8, codes=512):
        super().__init__()
        w1, w2 = width, 2 * width

        def block(ci, co, **kw):
            return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, **kw), nn.GroupNorm(groups(co), co), nn.SiLU())
        self.enc = nn.Sequential(block(1, w1), block(w1, w1, stride=2), block(w1, w2), block(w2, w2, stride=2),
                                 nn.Conv2d(w2, dim, 1))
        self.dec = nn.Sequential(nn.Conv2d(dim, w2, 3, padding=1), nn.SiLU(), block(w2, w2),
                                 nn.Upsample(scale_factor=2), block(w2, w1), nn.Upsample(scale_factor=2),
                                 block(w1, w1), nn.Conv2d(w1, 1, 3, padding=1))
        self.vq = Quantizer(codes, dim)

    def encode(self, x):
        H, W = x.shape[-2:]
        return F.normalize(self.enc(F.pad(x, (0, -W % 4, 0, -H % 4))), dim=1)

    def tokens(self, x):
        return self.vq.lookup(self.encode(x))

    def decode(self, zq, shape):
        return self.dec(zq)[..., :shape[0], :shape[1]]


def patch_disc(width=16):
    """Small patch discriminator: one logit per ~10x10 receptive field of the log1p image."""
    return nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 2 * width, 4, 2, 1),
                         nn.GroupNorm(groups(2 * width), 2 * width), nn.LeakyReLU(0.2), nn.Conv2d(2 * width, 1, 3, padding=1))


class Block(nn.Module):
    """Pre-LN transformer block; causal self-attention, with an optional KV cache (a dict, filled from start = 0)."""

    def __init__(self, embed, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(embed), nn.Linear(embed, 3 * embed), nn.Linear(embed, embed)
        self.ln2 = nn.LayerNorm(embed)
        self.mlp = nn.Sequential(nn.Linear(embed, 4 * embed), nn.GELU(), nn.Linear(4 * embed, embed))

    def forward(self, x, cache=None, start=0):
        B, L, E = x.shape
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        if cache is not None:          # preallocated keys and values of all positions; attend to 0 .. start + L - 1
            if start == 0:
                cache["k"], cache["v"] = (k.new_zeros(B, self.heads, cache["size"], k.shape[-1]) for _ in "kv")
            cache["k"][:, :, start:start + L], cache["v"][:, :, start:start + L] = k, v
            k, v = cache["k"][:, :, :start + L], cache["v"][:, :, :start + L]
        assert L == 1 or start == 0, "decode several positions only from the start"
        a = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, E))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Causal transformer over [P condition prefix tokens, image tokens in raster order]."""

    def __init__(self, codes, n_tokens, embed=64, heads=4, layers=4, prefix=4, n_cond=9):
        super().__init__()
        self.prefix, self.n_tokens = prefix, n_tokens
        self.cond = nn.Sequential(nn.Linear(n_cond, embed), nn.SiLU(), nn.Linear(embed, prefix * embed))
        self.tok, self.pos = nn.Embedding(codes, embed), nn.Parameter(torch.zeros(prefix + n_tokens, embed))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([Block(embed, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(embed), nn.Linear(embed, codes)

    def forward(self, cond, tokens, caches=None, start=0):
        """Logits (B, L, codes) after each input position. start = 0: the sequence is the prefix followed by
        `tokens`; start > 0 (decoding with caches): `tokens` sit at positions start, start + 1, ..."""
        h = self.tok(tokens)
        if start == 0:
            h = torch.cat([self.cond(cond).view(len(cond), self.prefix, -1), h], 1)
        h = h + self.pos[start:start + h.shape[1]]
        for i, blk in enumerate(self.blocks):
            h = blk(h, None if caches is None else caches[i], start)
        return self.head(self.ln(h))


def build_model(cfg):
    """(VQ autoencoder, patch discriminator, GPT) described by a checkpoint's args."""
    h, w = grid(data.SHAPES[cfg["detector"]])
    return (VQAE(cfg["ae_width"], cfg["code_dim"], cfg["codes"]), patch_disc(cfg["ae_width"]),
            GPT(cfg["codes"], h * w, cfg["embed"], cfg["heads"], cfg["layers"], cfg["prefix"]))


# ----------------------------------------------------------------------------------------------------------
# Method: losses and sampler
# ----------------------------------------------------------------------------------------------------------
def vq_loss(vqae, disc, x, generator, args, step, update=True):
    """Stage 1: L2 + beta * commitment (+ adaptive adversarial + discriminator hinge from args.adv_start).
    update=True also applies the EMA codebook update and dead-code restarts of this batch."""
    z = vqae.encode(x)
    idx = vqae.vq.lookup(z)
    zq = vqae.vq.embed(idx)
    rec = vqae.decode(z + (zq - z).detach(), x.shape[-2:])
    l2 = (rec - x).pow(2).flatten(1).sum(1).mean()
    loss = l2 + args.beta * (z - zq.detach()).pow(2).flatten(1).sum(1).mean()
    if update:
        vqae.vq.update(z, idx, args.vq_decay, args.dead_below, generator)
    if update and args.adv > 0 and step >= args.adv_start:
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_loss = -torch.func.functional_call(disc, frozen, (rec,)).mean()
        last = vqae.dec[-1].weight
        g_rec, g_adv = (torch.autograd.grad(t, last, retain_graph=True)[0].norm() for t in (l2, g_loss))
        weight = args.adv * (g_rec / (g_adv + 1e-4)).clamp(0, 1e4).detach()
        d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
        loss = loss + weight * g_loss + d_loss
    return loss


def gpt_loss(gpt, tokens, cond):
    """Stage 2: next-token cross entropy; the last prefix position predicts the first token."""
    logits = gpt(cond, tokens[:, :-1])[:, gpt.prefix - 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))


def pick(logits, u, temperature, top_k):
    """Token drawn by inverse CDF at uniforms u (n,) from the tempered, top-k truncated distribution."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], -float("inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).contiguous(), right=True).squeeze(1).clamp_max(len(cdf[0]) - 1)


@torch.no_grad()
def sample_tokens(gpt, cond, generator=None, temperature=1.2, top_k=128, kv_cache=True):
    """Token grids (n, n_tokens) for standardised conditions `cond` (n, 9), in raster order."""
    dev, n, T = cond.device, len(cond), gpt.n_tokens
    u = (torch.rand((n, T), device=dev) if generator is None
         else torch.rand((n, T), generator=generator, device=generator.device).to(dev))
    tokens = torch.zeros(n, 0, dtype=torch.long, device=dev)
    caches = [dict(size=gpt.prefix + T) for _ in gpt.blocks] if kv_cache else None
    for t in range(T):
        if kv_cache:
            logits = gpt(cond, tokens[:, t - 1:t] if t else tokens, caches, start=gpt.prefix + t - 1 if t else 0)
        else:
            logits = gpt(cond, tokens)
        tokens = torch.cat([tokens, pick(logits[:, -1], u[:, t], temperature, top_k)[:, None]], 1)
    return tokens


@torch.no_grad()
def sample(vqae, gpt, cond, shape, generator=None, temperature=1.2, top_k=128, kv_cache=True):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9); uniforms from a CPU generator."""
    tokens = sample_tokens(gpt, cond, generator, temperature, top_k, kv_cache)
    zq = vqae.vq.embed(tokens.view(len(cond), *grid(shape)))
    return data.to_counts(F.relu(vqae.decode(zq, shape)))


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def tokenize(vqae, x, dev, batch=2048):
    return torch.cat([vqae.tokens(b.to(dev)).flatten(1).cpu() for b in torch.split(x, batch)])


@torch.no_grad()
def reconstruct(vqae, x, shape, dev, batch=1024):
    """Raw counts of encode -> quantise -> decode, and the code perplexity and usage over all of x."""
    out, counts = [], 0
    for b in torch.split(x, batch):
        idx = vqae.tokens(b.to(dev))
        out.append(data.to_counts(F.relu(vqae.decode(vqae.vq.embed(idx), shape))).cpu())
        counts = counts + torch.bincount(idx.flatten().cpu(), minlength=len(vqae.vq.codebook))
    p = counts.double() / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return torch.cat(out).numpy(), perplexity, float((counts > 0).double().mean())


def schedule(n, epochs, args):
    """(steps per epoch, steps the LR schedule spans, steps this run trains to) for n training examples."""
    spe = math.ceil(n / args.batch_size)
    return spe, epochs * spe, min(epochs * spe, args.max_steps or epochs * spe)


def fit(stage, module, loss_fn, tensors, epochs, args, state, save, validate):
    """The training loop of one stage (both stages share it): resumable at any step."""
    dev = next(module.parameters()).device
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr, betas=(0.5, 0.9) if stage == 1 else (0.9, 0.95))
    spe, planned, total = schedule(len(tensors[0]), epochs, args)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / planned, 1.0))))
    noise = torch.Generator().manual_seed(args.seed + stage)
    st = state.setdefault(f"stage{stage}", dict(step=0))
    if "opt" in st:                                                # resume
        opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"]), noise.set_state(st["noise"])
    print(f"stage {stage}: {sum(p.numel() for p in module.parameters()):,} parameters, {spe} steps per epoch, "
          f"{total} steps in total")

    def checkpoint():
        st.update(opt=opt.state_dict(), sched=sched.state_dict(), noise=noise.get_state())
        save()

    t0, losses = time.time(), []
    while st["step"] < total:
        epoch = st["step"] // spe
        order = torch.Generator().manual_seed(args.seed * 100_003 + 1000 * stage + epoch)
        bar = tqdm(data.batches(tensors, args.batch_size, order), total=spe, initial=st["step"] - epoch * spe,
                   desc=f"stage {stage} epoch {epoch + 1}/{epochs}", leave=False, disable=args.smoke)
        for i, batch in enumerate(bar):
            if i < st["step"] - epoch * spe:
                continue
            with data.autocast(dev, args.amp):
                loss = loss_fn(*[b.to(dev) for b in batch], noise)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage {stage}: loss is {loss.item()} at step {st['step']} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step(), sched.step()
            st["step"] += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if st["step"] % args.ckpt_every == 0:
                checkpoint()
            if st["step"] % args.val_every == 0 or st["step"] >= total:
                bar.clear()
                validate(st["step"], float(np.mean(losses)), (time.time() - t0) / 60)
                losses = []
            if st["step"] >= total:
                break
        bar.close()
    checkpoint()


def train(args):
    dev = data.pick_device(args.device)
    data.seed_everything(args.seed)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    ck = None
    if ckpt_path.exists() and not (args.resume or args.stage == 2):
        raise data.DataError(f"{ckpt_path} exists: pass --resume to continue it, or --out a new folder")
    if ckpt_path.exists():
        ck = data.load_checkpoint(ckpt_path, NAME)
        stage, args = args.stage, data.resume_args(args, ck)
        args.stage = stage
    split = data.load_split(vars(args))
    shape = tuple(data.SHAPES[args.detector])
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    vqae, disc, gpt = (m.to(dev) for m in build_model(vars(args)))
    state = dict()
    if ck is not None:
        vqae.load_state_dict(ck["vqae"]), disc.load_state_dict(ck["disc"]), gpt.load_state_dict(ck["gpt"])
        state = ck["state"]
        print(f"continuing {ckpt_path}: stage 1 at step {state.get('stage1', {}).get('step', 0)}, "
              f"stage 2 at step {state.get('stage2', {}).get('step', 0)}")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), vqae=vqae.state_dict(),
                                  disc=disc.state_dict(), gpt=gpt.state_dict(), state=state,
                                  n_params=sum(p.numel() for m in (vqae, gpt) for p in m.parameters())), ckpt_path)

    def log(stage, step, loss, minutes, **extra):
        row = dict(stage=stage, step=step, train_loss=loss, minutes=minutes, **extra)
        data.log_jsonl(out / "metrics.jsonl", **row)
        print(f"stage {stage} step {step:6d}  train loss {loss:.4f}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in extra.items()) + f"  {minutes:.1f} min")

    def validate1(step, loss, minutes):
        vqae.eval()
        with torch.no_grad():
            val = np.mean([vq_loss(vqae, disc, x.to(dev), None, args, step, update=False).item()
                           for (x,) in data.batches((x_va,), 500, shuffle=False)])
            rec, perplexity, usage = reconstruct(vqae, x_va, shape, dev)
        vqae.train()
        log(1, step, loss, minutes, val_loss=float(val), rec_W=metrics.wasserstein(split.counts("val")[:2000], rec)[0],
            perplexity=perplexity, usage=usage)

    def validate2(step, loss, minutes):
        gpt.eval()
        with torch.no_grad():
            val = np.mean([gpt_loss(gpt, t.to(dev).long(), c.to(dev)).item()
                           for t, c in data.batches((t_va, c_va), 500, shuffle=False)])
            gen = sample(vqae, gpt, c_va[:1000].to(dev), shape, torch.Generator().manual_seed(0), args.temperature, args.top_k)
        gpt.train()
        log(2, step, loss, minutes, val_loss=float(val), val_W=metrics.wasserstein(split.counts("val")[:1000], gen)[0])

    target1, target2 = schedule(len(x_tr), args.epochs, args)[2], schedule(len(x_tr), args.epochs2, args)[2]
    if args.stage in (None, 1) and state.get("stage1", {}).get("step", 0) < target1:
        both = nn.ModuleList([vqae, disc])
        fit(1, both, lambda x, g: vq_loss(vqae, disc, x, g, args, state["stage1"]["step"]), (x_tr,), args.epochs,
            args, state, save, validate1)
    if args.stage in (None, 2) and state.get("stage2", {}).get("step", 0) < target2:
        if state.get("stage1", {}).get("step", 0) < target1:
            raise data.DataError(f"{ckpt_path}: stage 1 is not finished; train it first (--stage 1)")
        vqae.eval().requires_grad_(False)
        t_tr, t_va = tokenize(vqae, x_tr, dev).short(), tokenize(vqae, x_va, dev).short()
        print(f"tokens: {t_tr.shape[1]} per response, {len(torch.unique(t_tr))} distinct codes in the training set")
        fit(2, gpt, lambda t, c, g: gpt_loss(gpt, t.long(), c), (t_tr, c_tr), args.epochs2, args, state, save, validate2)
    print(f"checkpoint {ckpt_path}")
    return ckpt_path


def load_model(args):
    ck = data.load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", NAME, args.detector)
    if not ck["state"].get("stage2", {}).get("step"):
        raise data.DataError(f"{args.ckpt}: stage 2 is not trained yet (python {NAME}.py --train --resume)")
    dev = data.pick_device(args.device)
    vqae, _, gpt = build_model(ck["args"])
    vqae.load_state_dict(ck["vqae"]), gpt.load_state_dict(ck["gpt"])
    return ck, vqae.to(dev).eval(), gpt.to(dev).eval(), dev


def generator_fn(vqae, gpt, ck, device, temperature, top_k, kv_cache=True, amp=False):
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(vqae, gpt, cond.to(device), tuple(ck["data"]["shape"]), g, temperature, top_k, kv_cache).float()
    return generate


def sample_cmd(args):
    ck, vqae, gpt, dev = load_model(args)
    gen = generator_fn(vqae, gpt, ck, dev, args.temperature, args.top_k, not args.no_kv_cache, args.amp)
    data.sample_to_file(ck, gen, args)


def evaluate(args):
    ck, vqae, gpt, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    ckpt = Path(args.ckpt or Path(args.out) / "ckpt.pt")
    if args.sweep:
        res = metrics.run_sweep(lambda temperature, top_k: generator_fn(vqae, gpt, ck, dev, temperature, top_k, True, args.amp),
                                [dict(temperature=t, top_k=k) for t in (1.0, 1.2, 1.4) for k in (0, 128, 64)], split,
                                ckpt.with_name("sweep.json"), args, NAME)
        cond = metrics.test_part(split, args.max_test or None)[2]
        res["ms_per_sample_kv_cache"] = {str(kv): metrics.time_per_sample(
            generator_fn(vqae, gpt, ck, dev, args.temperature, args.top_k, kv, args.amp), cond) for kv in (True, False)}
        print("ms per sample at batch 256 (temperature {}, top-k {}): KV cache {:.3f}, no cache {:.3f}".format(
            args.temperature, args.top_k, *res["ms_per_sample_kv_cache"].values()))
        ckpt.with_name("sweep.json").write_text(json.dumps(res, indent=1))
        return res
    true = split.ds.images[split.idx["test"][:args.max_test or None]]
    rec, perplexity, usage = reconstruct(vqae, data.to_log(true), tuple(ck["data"]["shape"]), dev)
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"stage 1 (encode -> quantise -> decode of the test responses): reconstruction Wasserstein {rec_w:.3f}, "
          f"codebook perplexity {perplexity:.1f}, usage {usage:.3f}")
    default = (args.temperature, args.top_k, args.no_kv_cache) == (1.2, 128, False)
    path = ckpt.with_name("eval.json" if default else f"eval_t{args.temperature}_k{args.top_k}.json")
    gen = generator_fn(vqae, gpt, ck, dev, args.temperature, args.top_k, not args.no_kv_cache, args.amp)
    return metrics.run_eval(gen, split, path, args, f"{NAME} (t {args.temperature}, k {args.top_k})",
                            dict(temperature=args.temperature, top_k=args.top_k, reconstruction_W=rec_w,
                                 perplexity=perplexity, usage=usage, n_params=ck["n_params"]))


if __name__ == "__main__":
    args = get_args()
    try:
        if args.train:
            args.ckpt = str(train(args))
        if args.sample:
            sample_cmd(args)
        if args.eval:
            evaluate(args)
    except (data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
