"""Conditional flow matching in pixel space for the ALICE Zero Degree Calorimeters.

Paper: M. Wojnar, "Even Faster Simulations with Flow Matching: A Study of Zero Degree Calorimeter Responses"
(arXiv 2507.18811, and its 2024 poster): Wasserstein 1.27 on the real neutron set at 0.37-0.46 ms per sample
(A100). Settings the paper leaves open: the authors' code, github.com/m-wojnar/faster_zdc (JAX).

Method. A network v(x, t, c) moves Gaussian noise into responses along straight lines: x_t = (1 - t) x0 + t x1,
x0 ~ N(0, I) (noise at t = 0), x1 = log1p(counts) (data at t = 1), target velocity x1 - x0, loss = MSE, t ~
U[0, --t-max). Sampling integrates dx/dt = v from t = 0 to 1 with Euler (NFE = steps) or the midpoint rule
(NFE = 2 steps), then applies ReLU and expm1, and (`--rounding nearest`, the CPU default) rounds to whole photons.
Sampler defaults: midpoint 4 with whole photons (CPU default), the paper's Euler 11 with continuous counts for a
model trained with --paper; explicit --steps / --solver / --rounding win. An EMA of the weights (decay
min(--ema, (1 + step) / (10 + step))) samples; --ema 0 samples the trained weights. Both networks (`--unet`) take
any number of levels (`--mults`).
- `published` (`--paper`): the paper's UNet (faster_zdc zdc/architectures/unet.py) in torch, with its
  initialisation: bias-free convolutions, per-pixel LayerNorm, SiLU; the time embedding (sinusoidal on t itself,
  then an MLP) enters every residual block, the particle features (their own MLP) only the attention token;
  attention before the blocks of the second-lowest level and in the middle. Width 4, mults 2/3/4, 2 blocks,
  2 heads: 77,372 parameters, the published count.
- `compact` (CPU default; every README row was measured with it): GroupNorm, biased convolutions, the time
  embedding (sinusoidal on 1000 t) plus a condition MLP added in every block, attention after the blocks of
  the lowest `--attn-levels` levels and in the middle; images zero-padded to a multiple of 2^(levels - 1).
  Width 4, mults 2/3/4, attention at the lowest level: 89,289 parameters.

Usage:
    python flow_matching.py --train                      # ZN, CPU default (2 epochs: 20.2 min on 2 cores, 2026-12-04)
    python flow_matching.py --train --detector proton --out runs/fm_proton
    python flow_matching.py --train --split disjoint     # test particles never seen in training
    python flow_matching.py --train --paper              # the paper: published UNet, Adam 4.4e-4, 50 epochs
    python flow_matching.py --sample --ckpt runs/flow_matching/ckpt.pt --n 1000 --out samples.npz
    python flow_matching.py --export flow_matching.onnx --ckpt runs/flow_matching/ckpt.pt [--steps 11]   # the sampler as one ONNX graph
    python flow_matching.py --eval --ckpt runs/flow_matching/ckpt.pt [--steps 11 --solver euler --rounding none] [--plot]
    python flow_matching.py --train --smoke              # seconds: tiny data, tiny model
Logged every --val-every steps: train loss (velocity MSE), val loss (same, fixed noise), the validation Wasserstein of
1000 generated samples (lower is better; compare with the floor printed by --eval).

`--paper` (every setting and its source: docs/fidelity/flow_matching.md; explicit flags beat it): the published
UNet, Adam lr 4.4e-4 (b1 0.70, b2 0.88) at a constant rate, no gradient clipping, batch 256, 50 epochs, t ~
U[0, 0.99], sampling from the trained weights (the authors' code never samples its EMA). The authors' attention
block drops the first pixel instead of the condition token, shifting the map by one pixel per block; here each
pixel keeps its own output, the conditioning the paper describes. CPU default (measured, kept): the compact
UNet, attention at the lowest level only, 1 head (1.7x faster on a CPU than two levels), AdamW lr 2e-3, 100
warm-up steps, cosine decay, gradient norm clipped to 1, batch 128, two epochs, t ~ U[0, 1), EMA 0.999.
`--t-dist logit-normal` is an option of this script, not of the paper.

Why (500-step ablation, results/flow_matching_ablation_cpu.json): sampling the trained weights or the published
UNet was clearly worse; the paper's betas, no warm-up, a constant LR and no clipping were within the seed spread.
Sampler: Euler 11 leaves a sub-photon haze that widens every shower; midpoint 4 with whole photons took a one-epoch
ZN disjoint model from 5.53x to 3.76x the floor, AUC 0.950 -> 0.783. Current default (two epochs), ZN random: 1.86x
the floor, AUC 0.691 (results/flow_matching_neutron_random.json); condition-disjoint 2.73x, AUC 0.728
(results/flow_matching_neutron_disjoint.json). Details and history: docs/models/flow_matching.md.
"""
import argparse
import copy
import math
import re
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

NAME = "flow_matching"
DEFAULTS = dict(epochs=2, batch_size=128, lr=2e-3, unet="compact", width=4, mults="2,3,4", n_res=2, attn_levels=1,
                heads=1, t_max=1.0, betas="0.9,0.999", schedule="cosine", warmup="100", grad_clip=1.0, ema=0.999)
PAPER = dict(epochs=50, batch_size=256, lr=4.4e-4, unet="published", width=4, mults="2,3,4", n_res=2, attn_levels=2,
             heads=2, t_max=0.99, betas="0.7,0.88", schedule="constant", warmup="0", grad_clip=0.0, ema=0.0)
PUBLISHED = {"unet": (77_372, "paper arXiv 2507.18811 and poster: 'a compact UNet with 77k parameters'; "
                              "faster_zdc FMUnet: 77,372")}
SAMPLER = dict(default=(4, "midpoint", "nearest"), paper=(11, "euler", "none"))   # without --steps / --solver / --rounding
OLD = dict(unet="compact", mults="2,3,4", n_res=2, heads=1, t_max=1.0, betas="0.9,0.999", schedule="cosine",
           warmup="100", grad_clip=1.0)                 # what checkpoints from before these flags were trained with


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("flow matching (defaults: CPU default / --paper)")
    g.add_argument("--unet", default=None, choices=["compact", "published"], help="network (compact / published)")
    g.add_argument("--width", type=int, default=None, help="base width; channels are width x --mults (4 / 4)")
    g.add_argument("--mults", default=None, help="channel multipliers, one resolution level each (2,3,4 / 2,3,4)")
    g.add_argument("--n-res", type=int, default=None, help="residual blocks per level (2 / 2)")
    g.add_argument("--attn-levels", type=int, default=None, help="attention at the N lowest resolutions; compact: "
                   "the blocks of N levels and always the middle; published: the middle, then N - 1 levels (1 / 2)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (1 / 2)")
    g.add_argument("--t-max", type=float, default=None, help="training t ~ U[0, t_max) (1 / 0.99)")
    g.add_argument("--betas", default=None, help="Adam(W) b1,b2 (0.9,0.999 / 0.7,0.88)")
    g.add_argument("--schedule", default=None, choices=["cosine", "constant"], help="LR after warm-up (cosine / constant)")
    g.add_argument("--warmup", default=None, help="linear LR warm-up: N steps or P%% of the steps (100 / 0)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this; 0: off (1 / 0)")
    g.add_argument("--ema", type=float, default=None, help="EMA decay of the weights used for sampling; 0: the "
                   "trained weights (0.999 / 0)")
    g.add_argument("--steps", type=int, default=None, help="integration steps for sampling (4 / 11)")
    g.add_argument("--solver", default=None, choices=["euler", "midpoint"], help="ODE solver, midpoint: 2 NFE per step "
                   "(midpoint / euler; a checkpoint trained with --paper samples with the paper's Euler 11)")
    g.add_argument("--rounding", default=None, choices=["nearest", "none"], help="generated counts to whole photons "
                   "(nearest / none: the paper's continuous counts)")
    g.add_argument("--t-dist", default="uniform", choices=["uniform", "logit-normal"], help="training time distribution")
    g.add_argument("--val-every", type=int, default=500, help="validate (loss and Wasserstein) every N steps")
    g.add_argument("--sweep", default=None, metavar="STEPS", help="--eval: quality vs speed for these comma-separated "
                   "step counts, with both solvers (e.g. 1,2,4,8,11,20); writes sweep.json")
    g.add_argument("--paper", action="store_true", help="the paper's network and training (explicit flags still win)")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps must be positive (got {args.steps})")
    try:
        args.sweep = [int(s) for s in args.sweep.split(",")] if args.sweep else None
        assert not args.sweep or min(args.sweep) > 0
    except (ValueError, AssertionError):
        p.error(f"--sweep takes positive comma-separated step counts, e.g. 1,2,4,8 (got {args.sweep!r})")
    for k, v in {**DEFAULTS, **(PAPER if args.paper else {})}.items():
        if getattr(args, k) is None:                   # precedence: explicit flag > --paper > CPU default
            setattr(args, k, v)
    if args.smoke:
        args.limit, args.width, args.max_steps, args.batch_size = args.limit or 1500, 2, args.max_steps or 6, 32
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    check_unet_args(p, args)
    args.out = args.out or f"runs/{NAME}"
    if args.train:                                     # validation samples with the run's sampler
        args.steps, args.solver, args.rounding = sampler_for(args, args.paper)
    return args


def sampler_for(args, paper):
    """(steps, solver, rounding): the explicit --steps / --solver / --rounding, else the paper's sampler (Euler 11,
    continuous counts) for a --paper model, else the CPU default's (midpoint 4: 8 network calls; counts rounded to
    whole photons); both measured against the paper's on trained CPU models (docstring)."""
    return tuple(a or d for a, d in zip((args.steps, args.solver, args.rounding), SAMPLER["paper" if paper else "default"]))


def check_unet_args(p, args):
    """Argparse errors (exit 2, no traceback) for the network and optimiser flags."""
    try:
        mults = [int(m) for m in str(args.mults).split(",")]
        assert 1 <= len(mults) <= 5 and min(mults) > 0
    except (ValueError, AssertionError):
        p.error(f"--mults takes 1 to 5 positive comma-separated integers, e.g. 2,3,4 (got {args.mults!r})")
    try:
        b1, b2 = (float(b) for b in str(args.betas).split(","))
        assert 0 <= b1 < 1 and 0 <= b2 < 1
    except (ValueError, AssertionError):
        p.error(f"--betas takes b1,b2 in [0, 1), e.g. 0.9,0.999 (got {args.betas!r})")
    if not re.fullmatch(r"\d+%?", str(args.warmup)):
        p.error(f"--warmup takes a step count or a percentage, e.g. 100 or 10% (got {args.warmup!r})")
    for bad, msg in [(args.width <= 0 or args.n_res <= 0, "--width and --n-res must be positive"),
                     (not 0 <= args.attn_levels <= len(mults), f"--attn-levels must be in 0..{len(mults)} (the levels)"),
                     (args.heads <= 0 or any(args.width * m % args.heads for m in mults),
                      f"--heads must divide every level's channels ({args.width} x {args.mults})"),
                     (not 0 < args.t_max <= 1, f"--t-max must be in (0, 1] (got {args.t_max})"),
                     (not 0 <= args.ema < 1, f"--ema must be in [0, 1) (got {args.ema})"),
                     (not args.grad_clip >= 0, f"--grad-clip must be >= 0 (got {args.grad_clip})")]:
        if bad:
            p.error(msg)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def timestep_embedding(t, dim, scale=1000.0):
    """Sinusoidal embedding of t in [0, 1], rescaled to t * scale (1000, the usual diffusion range; the
    published network uses t itself)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    a = scale * t[:, None].float() * freqs[None]
    return torch.cat([a.sin(), a.cos()], 1)


def groups(ch):
    return math.gcd(ch, 4)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.e = nn.Linear(emb, cout)
        self.n2, self.c2 = nn.GroupNorm(groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x))) + self.e(e)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class Attention(nn.Module):
    """Self-attention over the pixels plus one condition token."""

    def __init__(self, ch, emb, heads=1):
        super().__init__()
        self.norm, self.tok = nn.GroupNorm(groups(ch), ch), nn.Linear(emb, ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x, c):
        B, C, H, W = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)                       # (B, HW, C)
        kv = torch.cat([self.tok(c)[:, None], q], 1)                      # condition token first
        return x + self.attn(q, kv, kv, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """The compact UNet (CPU default): any number of levels; attention at the lowest `attn_levels` and in the middle."""

    def __init__(self, width=4, mults=(2, 3, 4), n_res=2, n_cond=9, emb=32, attn_levels=2, heads=1):
        super().__init__()
        ch = [width * m for m in mults]
        attn = [i >= len(ch) - attn_levels for i in range(len(ch))]  # attention at the lowest levels
        self.emb, self.pad = emb, 2 ** (len(ch) - 1)                 # images padded to a multiple of self.pad
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.c_mlp = nn.Sequential(nn.Linear(n_cond, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(1, ch[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch[0]], ch[0]
        for i, co in enumerate(ch):
            for _ in range(n_res):
                self.down.append(nn.ModuleList([ResBlock(c, co, emb), Attention(co, emb, heads) if attn[i] else None]))
                c = co
                skips.append(c)
            if i < len(ch) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb), Attention(c, emb, heads), ResBlock(c, c, emb)])
        for i, co in reversed(list(enumerate(ch))):
            for _ in range(n_res + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), co, emb),
                                              Attention(co, emb, heads) if attn[i] else None]))
                c = co
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(nn.GroupNorm(groups(c), c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

    def forward(self, x, t, cond):
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.pad, 0, -H % self.pad))              # cropped below
        e = self.t_mlp(timestep_embedding(t, self.emb)) + self.c_mlp(cond)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                h = layer(h)
            else:
                h = layer[0](h, e)
                h = layer[1](h, e) if layer[1] is not None else h
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, e), e), e)
        for layer in self.up:
            if isinstance(layer, nn.Upsample):
                h = layer(h)
            else:
                h = layer[0](torch.cat([h, hs.pop()], 1), e)
                h = layer[1](h, e) if layer[1] is not None else h
        return self.out(h)[..., :H, :W]


# The published network (faster_zdc zdc/architectures/unet.py and zdc/layers/conv.py), with its initialisation.
def pconv(cin, cout, k, stride=1, std=None):
    """Bias-free 'same' convolution, weights N(0, std^2) with std = 1 / (cout k^2) unless given."""
    c = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
    nn.init.normal_(c.weight, std=1 / (cout * k * k) if std is None else std)
    return c


def plin(cin, cout, std=None):
    """Bias-free dense layer, LeCun-normal weights (flax's default) unless std is given."""
    lin = nn.Linear(cin, cout, bias=False)
    nn.init.normal_(lin.weight, std=cin ** -0.5 if std is None else std)
    return lin


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel (flax's LayerNorm on NHWC), eps 1e-6."""

    def __init__(self, ch):
        super().__init__(ch, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PubResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = ChannelNorm(cin), pconv(cin, cout, 3)
        self.e = plin(emb, cout, std=0.01 / cout)                       # the published 1x1 conv on the embedding
        self.n2, self.c2 = ChannelNorm(cout), pconv(cout, cout, 3, std=1e-4 / cout)   # starts near the identity
        self.skip = pconv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x))) + F.silu(self.e(e))[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class PubAttention(nn.Module):
    """The condition embedding projected to one token after the d-channel pixels; LayerNorm, bias-free multi-head
    self-attention with `ch` query/key/value features and output back to d, residual; the token is dropped."""

    def __init__(self, d, ch, emb, heads):
        super().__init__()
        self.tok, self.norm, self.heads = plin(emb, d), nn.LayerNorm(d, eps=1e-6), heads
        self.qkv, self.out = plin(d, 3 * ch), plin(ch, d, std=0.2 / ch ** 0.5)

    def forward(self, x, c):
        B, D, H, W = x.shape
        s = torch.cat([x.flatten(2).transpose(1, 2), self.tok(c)[:, None]], 1)          # (B, HW + 1, D)
        q, k, v = self.qkv(self.norm(s)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        s = s + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return s[:, :-1].transpose(1, 2).reshape(B, D, H, W)


class PublishedUNet(nn.Module):
    """The paper's UNet, any number of levels. attn_levels = k: attention in the middle (k >= 1) and before the
    residual blocks of the k - 1 levels above the lowest; in the up path on the concatenation with the skip."""

    def __init__(self, width=4, mults=(2, 3, 4), n_res=2, heads=2, attn_levels=2, n_cond=9, cin=1):
        super().__init__()
        ch, L = [width * m for m in mults], len(mults)
        attn = [L - attn_levels <= i < L - 1 for i in range(L)]
        self.emb = ch[0]
        E = 2 * ch[0]
        self.t_mlp = nn.Sequential(plin(ch[0], E), nn.SiLU(), plin(E, E))
        self.c_mlp = nn.Sequential(plin(n_cond, E), nn.SiLU(), plin(E, E))
        self.inp = pconv(cin, width, 3)
        self.down, self.mid, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skips, c = [], width
        for i, co in enumerate(ch):
            for _ in range(n_res):
                if attn[i]:
                    self.down.append(PubAttention(c, co, E, heads))
                    skips.append(c)
                self.down.append(PubResBlock(c, co, E))
                c = co
                skips.append(c)
            if i < L - 1:
                self.down.append(pconv(c, c, 3, stride=2))
        self.mid.append(PubResBlock(c, c, E))
        for _ in range(n_res):
            self.mid.extend([PubAttention(c, c, E, heads)] if attn_levels else [])
            self.mid.append(PubResBlock(c, c, E))
        for i, co in reversed(list(enumerate(ch))):
            for _ in range(n_res):
                if attn[i]:
                    c += skips.pop()
                    self.up.append(PubAttention(c, co, E, heads))
                c += skips.pop()
                self.up.append(PubResBlock(c, co, E))
                c = co
            if i > 0:
                self.up.append(pconv(c, c, 3))                                 # after a nearest x2 upsampling
        self.out = nn.Sequential(ChannelNorm(c), nn.SiLU(), pconv(c, cin, 1))

    def forward(self, x, t, cond):
        c, e = self.c_mlp(cond), self.t_mlp(timestep_embedding(t, self.emb, scale=1.0))
        h, hs = self.inp(x), []
        for m in self.down:
            h = m(h, e) if isinstance(m, PubResBlock) else m(h, c) if isinstance(m, PubAttention) else m(h)
            if not isinstance(m, nn.Conv2d):                                   # no skip after a downsampling
                hs.append(h)
        for m in self.mid:
            h = m(h, e) if isinstance(m, PubResBlock) else m(h, c)
        for m in self.up:
            if isinstance(m, nn.Conv2d):                                       # upsample, crop to the skip's size
                h = m(F.interpolate(h, scale_factor=2, mode="nearest"))[..., :hs[-1].shape[-2], :hs[-1].shape[-1]]
            else:
                h = m(torch.cat([hs.pop(), h], 1), e if isinstance(m, PubResBlock) else c)
        return self.out(h)


def build_networks(cfg):
    """{'unet': the network} described by a checkpoint's args (missing keys: the values of older checkpoints)."""
    cfg = {**OLD, "attn_levels": 1, "width": 4, **cfg}
    kw = dict(width=cfg["width"], mults=[int(m) for m in str(cfg["mults"]).split(",")], n_res=cfg["n_res"],
              heads=cfg["heads"], attn_levels=cfg["attn_levels"])
    return {"unet": PublishedUNet(**kw) if cfg["unet"] == "published" else UNet(**kw)}


def build_model(cfg):
    return build_networks(cfg)["unet"]


# The convolution weights in channels-last (NHWC) memory format: the same arithmetic, and on this project's 2-core
# CPU 1.33x faster training steps (0.392 -> 0.295 s at batch 128) and 1.37x faster sampling (oneDNN's NHWC kernels
# suit the UNet's 8-16 channels); measured in docs/models/flow_matching.md.
CHANNELS_LAST = torch.channels_last


def weight_format(device, amp):
    """Memory format of the weights for sampling: channels-last, except under bf16 autocast (--amp) on a CPU, where
    oneDNN's bf16 convolutions are slow on NHWC weights (batch 256, midpoint 4, ms / sample: fp32 NHWC 7.0, bf16
    NHWC 8.7, bf16 contiguous 5.2; docs/onnx.md)."""
    return torch.contiguous_format if amp and torch.device(device).type == "cpu" else CHANNELS_LAST


# ----------------------------------------------------------------------------------------------------------
# Method: loss and sampler
# ----------------------------------------------------------------------------------------------------------
def sample_t(n, generator, device, t_dist="uniform", t_max=1.0):
    """Training times in [0, t_max): uniform (the paper, t_max 0.99) or a logit-normal scaled by t_max."""
    t = torch.rand(n, generator=generator, device=device)
    if t_dist == "logit-normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return t_max * t


def fm_loss(model, x1, cond, generator, t_dist="uniform", t_max=1.0):
    """Conditional flow-matching loss on a batch of log1p responses x1."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
    t = sample_t(len(x1), generator, x1.device, t_dist, t_max)
    tb = t[:, None, None, None]
    xt = (1 - tb) * x0 + tb * x1
    return F.mse_loss(model(xt, t, cond), x1 - x0)


class Sampler(data.Sampler):
    """The ODE solver as one module (bench.py, --export), unrolled for `steps`: counts from cond (n, 9) and the
    starting noise x0 (n, 1, H, W)."""

    def __init__(self, model, shape, steps=4, solver="midpoint", rounding="nearest"):
        super().__init__(steps=steps, solver=solver, rounding=rounding, nfe=steps * (2 if solver == "midpoint" else 1))
        self.model, self.shape, self.steps, self.solver, self.rounding = model, tuple(shape), steps, solver, rounding

    def noise_shapes(self, n):
        return {"x0": (n, 1) + self.shape}

    def forward(self, cond, x):
        dt = 1.0 / self.steps
        for i in range(self.steps):
            t = torch.full_like(cond[:, 0], i * dt)
            v = self.model(x, t, cond)
            if self.solver == "midpoint":
                v = self.model(x + 0.5 * dt * v, t + 0.5 * dt, cond)
            x = x + dt * v
        counts = data.to_counts(F.relu(x))
        return counts.round() if self.rounding == "nearest" else counts


@torch.no_grad()
def sample(model, cond, shape, generator=None, steps=4, solver="midpoint", rounding="nearest"):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9). Noise is drawn on the CPU from
    `generator` and moved to the model's device, so a seed gives the same samples on any device."""
    return Sampler(model, shape, steps, solver, rounding).run(cond, generator)


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def lr_factor(schedule, warmup, planned):
    """step -> LR multiplier: linear warm-up over `warmup` ("N" steps or "P%" of `planned`), then constant or a
    cosine decay to 0 at `planned`."""
    w = planned * int(warmup[:-1]) / 100 if warmup.endswith("%") else int(warmup)

    def f(s):
        ramp = min(1.0, (s + 1) / w) if w > 0 else 1.0
        return ramp * (0.5 * (1 + math.cos(math.pi * min(s / planned, 1.0))) if schedule == "cosine" else 1.0)
    return f


def ema_update(ema, model, decay, step):
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


def generator_fn(model, shape, device, steps, solver, amp=False, rounding="nearest"):
    """The (cond, generator) -> counts callable that metrics.evaluate expects."""
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(model, cond.to(device), shape, g, steps, solver, rounding).float()
    return generate


def train(args):
    dist = data.dist_init(args.device)                   # torchrun: this rank (data.py); plain python: world 1
    dev = dist.device
    data.seed_everything(args.seed)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    ck = None
    if ckpt_path.exists() and not args.resume:
        raise data.DataError(f"{ckpt_path} exists: pass --resume to continue it, or --out a new folder")
    if args.resume and ckpt_path.exists():
        ck = data.load_checkpoint(ckpt_path, NAME)
        args = data.resume_args(args, ck, older=OLD)
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    shape = data.SHAPES[args.detector]
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    model = build_model(vars(args)).to(dev, memory_format=CHANNELS_LAST)
    ema = copy.deepcopy(model).requires_grad_(False)
    betas = tuple(float(b) for b in args.betas.split(","))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=betas, weight_decay=0.0)   # = Adam
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    planned = args.epochs * steps_per_epoch               # the LR schedule spans --epochs; --max-steps stops early
    total = min(planned, args.max_steps or planned)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.schedule, args.warmup, planned))
    scaler = torch.amp.GradScaler(enabled=args.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported())
    noise = torch.Generator(dev).manual_seed(args.seed)
    step, epoch = 0, 0
    if ck is not None:
        model.load_state_dict(ck["weights"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"]), scaler.load_state_dict(ck["scaler"])
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        step, epoch = ck["step"], ck["epoch"]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    net = data.wrap_ddp(model, dist)      # the training step's UNet: this rank's shard of each global batch, DDP
    n_par = sum(p.numel() for p in model.parameters())
    print(f"{NAME}: {n_par:,} parameters, {len(x_tr):,} training responses, {steps_per_epoch} steps per epoch, "
          f"{total} steps in total, device {dev}, {dist.world} process(es)")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), weights=model.state_dict(),
                                  ema=ema.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                  scaler=scaler.state_dict(), step=step, epoch=epoch, n_params=n_par,
                                  rng=dict(noise=noise.get_state(), torch=torch.get_rng_state())), ckpt_path)

    def validate(losses):
        with torch.no_grad():
            g = torch.Generator(dev).manual_seed(1234)
            val = np.mean([fm_loss(ema, x.to(dev), c.to(dev), g, args.t_dist, args.t_max).item()
                           for x, c in data.batches((x_va, c_va), 500, shuffle=False)])
            k = min(1000, len(x_va))
            gen = sample(ema, c_va[:k].to(dev), shape, torch.Generator().manual_seed(0), args.steps, args.solver,
                         args.rounding)
            val_w = metrics.wasserstein(split.counts("val")[:k], gen)[0]
        row = dict(step=step, epoch=step / steps_per_epoch, train_loss=float(np.mean(losses)) if losses else None,
                   val_loss=float(val), val_W=val_w, minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        print(f"step {step:6d}  epoch {row['epoch']:.2f}  train loss {row['train_loss'] or float('nan'):.4f}  "
              f"val loss {val:.4f}  val W ({k} samples) {val_w:.3f}  {row['minutes']:.1f} min")

    t_start = time.time()
    while step < total:
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches((x_tr, c_tr), args.batch_size, order, start=skip), total=steps_per_epoch,
                   initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke or not dist.is_main)
        losses = []
        for x, c in bar:
            x, c = x.to(dev), c.to(dev)
            with data.autocast(dev, args.amp):
                loss = fm_loss(net, x, c, noise, args.t_dist, args.t_max)   # DDP equals one process exactly
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt), scaler.update(), sched.step()
            ema_update(ema, model, args.ema, step)
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.ckpt_every == 0:
                save()
            if (step % args.val_every == 0 or step >= total) and dist.is_main:
                bar.clear()
                validate(losses)
                losses = []
            if step >= total:
                break
        bar.close()
        if step == (epoch + 1) * steps_per_epoch:
            epoch += 1
        save()
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, checkpoint {ckpt_path}")
    data.dist_close(dist)
    return ckpt_path


def load_model(args):
    ck = data.load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", NAME, args.detector)
    dev = data.pick_device(args.device)
    model = build_model(ck["args"]).to(dev, memory_format=weight_format(dev, args.amp))
    model.load_state_dict(ck["ema"])
    args.steps, args.solver, args.rounding = sampler_for(args, ck["args"].get("paper", False))
    return ck, model.eval(), dev


def sample_cmd(args):
    ck, model, dev = load_model(args)
    data.sample_to_file(ck, generator_fn(model, ck["data"]["shape"], dev, args.steps, args.solver, args.amp, args.rounding), args)


def export_cmd(args):
    ck, model, dev = load_model(args)
    data.export_onnx(Sampler(model, ck["data"]["shape"], args.steps, args.solver, args.rounding), ck, args.export, NAME)


NO_FLAGS = argparse.Namespace(steps=None, solver=None, rounding=None)


def evaluate(args):
    ck, model, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    if args.sweep:
        return metrics.run_sweep(lambda solver, steps: generator_fn(model, ck["data"]["shape"], dev, steps, solver, args.amp,
                                                                    args.rounding),
                                 [dict(solver=s, steps=n) for s in ("euler", "midpoint") for n in args.sweep], split,
                                 Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("sweep.json"), args, NAME)
    gen = generator_fn(model, ck["data"]["shape"], dev, args.steps, args.solver, args.amp, args.rounding)
    mine = (args.steps, args.solver, args.rounding)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name(
        "eval.json" if mine == sampler_for(NO_FLAGS, ck["args"].get("paper", False))
        else f"eval_{args.solver}{args.steps}{'' if args.rounding == 'nearest' else '_unrounded'}.json")
    whole = ", whole photons" if args.rounding == "nearest" else ""
    return metrics.run_eval(gen, split, path, args, f"{NAME} ({args.solver} {args.steps}{whole})",
                            dict(steps=args.steps, solver=args.solver, rounding=args.rounding, n_params=ck["n_params"],
                                 train_steps=ck["step"]))


if __name__ == "__main__":
    args = get_args()
    try:
        if args.train:
            args.ckpt = str(train(args))
        if args.sample:
            sample_cmd(args)
        if args.eval:
            evaluate(args)
        if args.export:
            export_cmd(args)
    except (data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
