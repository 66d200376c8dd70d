"""Conditional flow matching in pixel space for the ALICE Zero Degree Calorimeters (the flagship script).

Paper: M. Wojnar, "Even Faster Simulations with Flow Matching: A Study of Zero Degree Calorimeter Responses"
(arXiv 2507.18811): Wasserstein 1.27 on the real neutron set at 0.37-0.46 ms per sample (A100). Settings the
paper leaves open come from the authors' code, github.com/m-wojnar/faster_zdc (JAX).

Method. A network v(x, t, c) carries Gaussian noise to responses along straight lines:
    x_t = (1 - t) x0 + t x1,   x0 ~ N(0, I) at t = 0,   x1 = log1p(counts) at t = 1,
    loss = || v(x_t, t, c) - (x1 - x0) ||^2,   t ~ U[0, t_max).
Sampling integrates dx/dt = v(x, t, c) from t = 0 to 1 (Euler: one network call per step; midpoint: two), then
counts = expm1(relu(x)), rounded to whole photons by default. An EMA of the weights samples.
CPU default: a compact UNet (GroupNorm, the condition added to the time embedding), midpoint 4, whole photons.
--paper: the published UNet (Appendix A, 77,372 parameters), Adam 4.4e-4, 50 epochs, Euler 11, continuous
counts.

Usage:
    python flow_matching.py --train                      # ZN, CPU default: two epochs, ~45 min on 2 cores
    python flow_matching.py --train --split disjoint     # test particles never seen in training
    python flow_matching.py --train --paper              # the publication's network and training
    python flow_matching.py --eval --ckpt runs/flow_matching/ckpt.pt --max-test 2000 --plot
    python flow_matching.py --sample --ckpt runs/flow_matching/ckpt.pt --n 1000 --out samples.npz
    python flow_matching.py --export fm.onnx --ckpt runs/flow_matching/ckpt.pt   # the sampler as ONNX

Every setting beside its source, and the deviations from the paper: docs/fidelity/flow_matching.md.
Runs, sweeps, ablations and their history: docs/models/flow_matching.md.
"""
import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics

# ----------------------------------------------------------------------------------------------------------
# Configuration. Precedence: an explicit flag or --set > --smoke > --paper > CPU default
# ----------------------------------------------------------------------------------------------------------
NAME = "flow_matching"
DEFAULTS = dict(epochs=2, batch_size=128, lr=2e-3, unet="compact", width=4, mults=[2, 3, 4], n_res=2,
                attn_levels=1, heads=1, t_max=1.0, betas=[0.9, 0.999], schedule="cosine", warmup="100",
                grad_clip=1.0, ema=0.999, val_every=500)
PAPER = dict(epochs=50, batch_size=256, lr=4.4e-4, unet="published", attn_levels=2, heads=2, t_max=0.99,
             betas=[0.7, 0.88], schedule="constant", warmup="0", grad_clip=0.0, ema=0.0,
             protocol="pooled", max_test=0)     # --eval: faster_zdc train.py, 5 pooled runs of the test split
SMOKE = dict(limit=1500, width=2, max_steps=6, batch_size=32, max_test=200, reps=2, ckpt_every=3)
PUBLISHED = {"unet": (77_372, "arXiv 2507.18811, poster: 'a compact UNet with 77k parameters'; code: 77,372")}
DEVIATIONS = ("float32 (the code's convs run in bfloat16: --amp)", "dense layers: untruncated LeCun init",
              "the attention drops the condition token (the code: the first pixel, a one-pixel shift)")
SAMPLER = dict(default=(4, "midpoint", "nearest"), paper=(11, "euler", "none"))   # (steps, solver, rounding)


# ----------------------------------------------------------------------------------------------------------
# The default network: a compact UNet
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
    """The compact UNet (CPU default): any number of levels; attention at the lowest `attn_levels` levels and
    in the middle."""

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
                block = ResBlock(c, co, emb)                     # (created first: the initialisation order)
                self.down.append(nn.ModuleList([block, Attention(co, emb, heads) if attn[i] else None]))
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


def build_networks(cfg):
    """{'unet': the network} described by a run's settings (or a checkpoint's)."""
    kw = dict(width=cfg["width"], mults=cfg["mults"], n_res=cfg["n_res"], heads=cfg["heads"],
              attn_levels=cfg["attn_levels"])
    return {"unet": PublishedUNet(**kw) if cfg["unet"] == "published" else UNet(**kw)}


def build_model(cfg):
    return build_networks(cfg)["unet"]


# ----------------------------------------------------------------------------------------------------------
# The method: loss and sampler
# ----------------------------------------------------------------------------------------------------------
def fm_loss(model, x1, cond, generator, t_max=1.0):
    """Conditional flow-matching loss on a batch of log1p responses x1."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
    t = t_max * torch.rand(len(x1), generator=generator, device=x1.device)
    tb = t[:, None, None, None]
    xt = (1 - tb) * x0 + tb * x1
    return F.mse_loss(model(xt, t, cond), x1 - x0)


class Sampler(data.Sampler):
    """The ODE solver as one module (bench.py, --export), unrolled for `steps`: counts from cond (n, 9) and
    the starting noise x0 (n, 1, H, W)."""

    def __init__(self, model, shape, steps=4, solver="midpoint", rounding="nearest"):
        nfe = steps * (2 if solver == "midpoint" else 1)                 # network calls per sample
        super().__init__(steps=steps, solver=solver, rounding=rounding, nfe=nfe)
        self.model, self.shape = model, tuple(shape)
        self.steps, self.solver, self.rounding = steps, solver, rounding

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


def ema_update(ema, model, decay, step):
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


def lr_factor(schedule, warmup, planned):
    """step -> LR multiplier: linear warm-up over `warmup` ("N" steps or "P%" of `planned`), then constant or
    a cosine decay to 0 at `planned`."""
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


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args):
    run = data.Run(args, NAME)                  # resume, data, checkpoints, logging, DDP: data.py Part II
    args, split, dev = run.args, run.split, run.device
    shape = data.SHAPES[args.detector]
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    model = build_model(vars(args)).to(dev, memory_format=torch.channels_last)   # NHWC: faster on CPUs too
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=args.betas, weight_decay=0.0)   # = Adam
    planned = run.plan(len(x_tr), args.batch_size, sum(p.numel() for p in model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.schedule, args.warmup, planned))
    scaler = data.grad_scaler(args.amp, dev)
    noise = torch.Generator(dev).manual_seed(args.seed)
    run.keep(weights=model, ema=ema, opt=opt, sched=sched, scaler=scaler, noise=noise)   # in every checkpoint
    net = run.wrap(model)                       # under torchrun: DDP, and still one process's loss exactly

    def validate():                             # the EMA network on validation events (rank 0)
        g = torch.Generator(dev).manual_seed(1234)
        with torch.no_grad():
            val = np.mean([fm_loss(ema, x.to(dev), c.to(dev), g, args.t_max).item()
                           for x, c in data.batches((x_va, c_va), 500, shuffle=False)])
        k = min(1000, len(x_va))
        gen = sample(ema, c_va[:k].to(dev), shape, torch.Generator().manual_seed(0), args.steps, args.solver,
                     args.rounding)
        return dict(val_loss=float(val), val_W=metrics.wasserstein(split.counts("val")[:k], gen)[0])
    run.validate = validate

    for x, c in run.batches((x_tr, c_tr)):
        with data.autocast(dev, args.amp):
            loss = fm_loss(net, x, c, noise, args.t_max)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema_update(ema, model, args.ema, run.step)
        run.step_done(train_loss=loss)
    return run.finish()


# ==========================================================================================================
# Appendix A. The published UNet (faster_zdc zdc/architectures/unet.py and zdc/layers/conv.py), with its
# initialisation; --paper builds it (--set unet=published alone, on the CPU default's training).
# ==========================================================================================================
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


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel (flax's LayerNorm on NHWC), eps 1e-6, as one mean/variance
    reduction over the channel dimension: no permutes, and on a GPU one fused reduction where nn.LayerNorm
    runs a thread block per pixel. Computed in fp32, returned in the input's dtype (bf16 under autocast)."""

    def __init__(self, ch, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(ch)), eps
        self.bias = nn.Parameter(torch.zeros(ch))

    def forward(self, x):
        xf = x.float()
        d = xf - xf.mean(1, keepdim=True)
        y = d * torch.rsqrt(d.pow(2).mean(1, keepdim=True) + self.eps)
        return (y * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


class PubResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = ChannelNorm(cin), pconv(cin, cout, 3)
        self.e = plin(emb, cout, std=0.01 / cout)             # the published 1x1 conv on the embedding
        self.n2 = ChannelNorm(cout)
        self.c2 = pconv(cout, cout, 3, std=1e-4 / cout)         # the block starts near the identity
        self.skip = pconv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x))) + F.silu(self.e(e))[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class PubAttention(nn.Module):
    """The condition embedding projected to one token after the d-channel pixels; LayerNorm, bias-free
    multi-head self-attention with `ch` query/key/value features and output back to d, residual; the token
    is dropped."""

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
    """The paper's UNet, any number of levels. attn_levels = k: attention in the middle (k >= 1) and before
    the residual blocks of the k - 1 levels above the lowest; in the up path on the concatenation with the
    skip."""

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
            if isinstance(m, nn.Conv2d):                               # upsample, crop to the skip's size
                h = m(F.interpolate(h, scale_factor=2, mode="nearest"))
                h = h[..., :hs[-1].shape[-2], :hs[-1].shape[-1]]
            else:
                h = m(torch.cat([hs.pop(), h], 1), e if isinstance(m, PubResBlock) else c)
        return self.out(h)


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("flow matching")
    g.add_argument("--steps", type=int, help="integration steps for sampling (CPU default 4, --paper 11)")
    g.add_argument("--solver", choices=["euler", "midpoint"], help="ODE solver; midpoint: 2 calls per step")
    g.add_argument("--rounding", choices=["nearest", "none"], help="whole photons, or continuous (paper)")
    g.add_argument("--sweep", type=data.positive_ints, metavar="STEPS",
                   help="--eval: quality against speed at these step counts, both solvers (e.g. 1,2,4,8)")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    mults, betas, steps = args.mults, args.betas, args.steps
    for bad, msg in [(steps is not None and steps <= 0, f"--steps must be positive (got {steps})"),
                     (not 1 <= len(mults) <= 5 or min(mults) <= 0, f"mults: 1-5 positive integers {mults}"),
                     (len(betas) != 2 or not all(0 <= b < 1 for b in betas), "betas takes b1,b2 in [0, 1)"),
                     (not args.warmup.rstrip("%").isdigit(), f"warmup takes N steps or P% ({args.warmup!r})"),
                     (args.width <= 0 or args.n_res <= 0, "width and n_res must be positive"),
                     (not 0 <= args.attn_levels <= len(mults), f"attn_levels must be in 0..{len(mults)}"),
                     (args.heads <= 0 or any(args.width * m % args.heads for m in mults),
                      f"heads must divide every level's channels ({args.width} x {mults})"),
                     (not 0 < args.t_max <= 1, f"t_max must be in (0, 1] (got {args.t_max})"),
                     (not 0 <= args.ema < 1, f"ema must be in [0, 1) (got {args.ema})"),
                     (not args.grad_clip >= 0, f"grad_clip must be >= 0 (got {args.grad_clip})")]:
        if bad:
            p.error(msg)
    if args.train:                              # validation samples with the run's sampler
        args.steps, args.solver, args.rounding = sampler_for(args, args.paper)
    return args


def sampler_for(args, paper):
    """(steps, solver, rounding): the explicit --steps / --solver / --rounding, else the sampler of the
    checkpoint's setting: the paper's Euler 11 with continuous counts for a --paper model, else midpoint 4
    with whole photons."""
    default = SAMPLER["paper" if paper else "default"]
    return tuple(a or d for a, d in zip((args.steps, args.solver, args.rounding), default))


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's EMA weights. Weights channels-last, except under bf16 autocast on a CPU,
    where oneDNN's bf16 convolutions are slower on NHWC weights (docs/onnx.md)."""
    fmt = torch.contiguous_format if args.amp and device.type == "cpu" else torch.channels_last
    model = build_model(ck["args"]).to(device, memory_format=fmt)
    model.load_state_dict(ck["ema"])
    args.steps, args.solver, args.rounding = sampler_for(args, ck["args"]["paper"])
    return Sampler(model, ck["data"]["shape"], args.steps, args.solver, args.rounding)


def evaluate(args, ck, sampler, device):
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt")
    if args.sweep:
        def make(solver, steps):
            other = Sampler(sampler.model, sampler.shape, steps, solver, args.rounding)
            return data.generator(other, device, args.amp)
        runs = [dict(solver=s, steps=n) for s in ("euler", "midpoint") for n in args.sweep]
        return metrics.run_sweep(make, runs, split, path.with_name("sweep.json"), args, NAME)
    mine = (args.steps, args.solver, args.rounding)
    unrounded = "" if args.rounding == "nearest" else "_unrounded"
    default = mine == SAMPLER["paper" if ck["args"]["paper"] else "default"]
    path = path.with_name("eval.json" if default else f"eval_{args.solver}{args.steps}{unrounded}.json")
    whole = ", whole photons" if args.rounding == "nearest" else ""
    return metrics.run_eval(data.generator(sampler, device, args.amp), split, path, args,
                            f"{NAME} ({args.solver} {args.steps}{whole})",
                            dict(steps=args.steps, solver=args.solver, rounding=args.rounding,
                                 n_params=ck["n_params"], train_steps=ck["step"]))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
