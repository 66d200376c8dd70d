"""Conditional DDPM with DDIM sampling for the ALICE Zero Degree Calorimeters.

Thesis: M. Wojnar, "Generative fast simulation of the ALICE ZDC" (arXiv 2407.16704): its best diffusion model
reaches Wasserstein 3.15 on the real neutron set with 50 DDIM steps and eta 0.7 (5.36 ms per sample, A100).
Settings the thesis leaves open come from the authors' code, github.com/m-wojnar/zdc (diffusers).

Method. x0 = log1p(counts) is noised over T = 1000 steps (betas linear 1e-4 .. 2e-2, abar_t = prod(1 - beta)):
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   loss = || eps(x_t, t, c) - eps ||^2,   t ~ U{0, ..., 999}.
Sampling is DDIM (Song et al. 2021) on --steps timesteps from 999 down (abar = 1 after the last), with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)):   eta 0 deterministic, 1 DDPM;
each step clips the predicted x0 and recomputes eps from it; the last step's x0 gives counts = expm1(x0).
1000 steps with eta 1 is the ancestral DDPM sampler (a test). Both presets sample with DDIM 50, eta 0.7.
CPU default: flow_matching.py's compact UNet (89,289 parameters, the condition added to every block) with a
fixed input skip on its eps (eps_output), x0 clipped to [0, the data's largest value], steps 999 .. 0 evenly,
an EMA of the weights sampling; one epoch. --paper: the thesis' diffusers UNet (Appendix A, 4,255,585
parameters, the condition read by cross-attention), plain eps, x0 clipped to [-7, 7], diffusers' trailing
steps (999, 979, ..., 19), no EMA; AdamW 2.8e-5, 100 epochs.

Usage:
    python ddpm.py --train                      # ZN, CPU default: one epoch, ~15-20 min on 2 cores
    python ddpm.py --train --paper              # the thesis' network (Appendix A), training, sampler
    python ddpm.py --eval --ckpt runs/ddpm/ckpt.pt --max-test 2000 --plot [--steps 25 --eta 0]
    python ddpm.py --eval --ckpt runs/ddpm/ckpt.pt --sweep --max-test 500 --reps 2 --plot   # steps x eta grid
    python ddpm.py --sample --ckpt runs/ddpm/ckpt.pt --n 1000 --out samples.npz
    python ddpm.py --export ddpm.onnx --ckpt runs/ddpm/ckpt.pt --steps 50 --eta 0.7   # the sampler as ONNX

Every setting beside its source, and the deviations from the thesis: docs/fidelity/ddpm.md.
Runs, sweeps, ablations and their history: docs/models/ddpm.md.
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
NAME = "ddpm"
DEFAULTS = dict(epochs=1, batch_size=128, lr=2e-3, unet="compact", width=4, mults=[2, 3, 4], n_res=2,
                attn_levels=1, heads=1, eps_skip=True, x0_clip=0.0, spacing="linspace", betas=[0.9, 0.999],
                adam_eps=1e-8, weight_decay=0.0, schedule="cosine", warmup="100", grad_clip=1.0, ema=0.999,
                val_every=1000)
PAPER = dict(epochs=100, batch_size=256, lr=2.8e-5, unet="published", width=16, mults=[1, 2, 4, 8],
             attn_levels=2, heads=4, eps_skip=False, x0_clip=7.0, spacing="trailing", betas=[0.87, 0.82],
             adam_eps=2.5e-5, weight_decay=5.5e-4, warmup="10%", ema=0.0,
             protocol="pooled", max_test=0)            # evaluated as the authors' code: docs/fidelity/ddpm.md
SMOKE = dict(limit=1500, width=2, max_steps=6, batch_size=32, max_test=200, reps=2, ckpt_every=3, heads=1,
             steps=2)
PUBLISHED = {"unet": (4_255_585, "m-wojnar/zdc diffusion.py's UNet2DConditionModel (diffusers 0.27.2 counts "
                                 "it); thesis Sec. 4.11: 'a DDPM model with four million parameters'")}
DEVIATIONS = ("DDIM step counts not dividing 1000 step to the next listed t (diffusers: t - 1000 // steps)",)
T = 1000                                        # diffusion steps of training
X_MAX = math.log1p(2 ** 16 - 1)                 # log1p of the largest uint16 count (train() sets the data's)


# ----------------------------------------------------------------------------------------------------------
# The default network: flow_matching.py's compact UNet, predicting eps
# ----------------------------------------------------------------------------------------------------------
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the integer diffusion step t in 0..T-1 (used as is, no rescaling)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    a = t[:, None].float() * freqs[None]
    return torch.cat([a.sin(), a.cos()], 1)


def groups(ch, g=4):
    return math.gcd(ch, g)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, g=4):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups(cin, g), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.e = nn.Linear(emb, cout)
        self.n2, self.c2 = nn.GroupNorm(groups(cout, g), cout), nn.Conv2d(cout, cout, 3, padding=1)
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


def schedule_buffers(net, eps_skip):
    """The schedule, data range and scale as buffers of an eps network (the EMA averages parameters only)."""
    betas = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)                  # the linear schedule
    net.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())   # the whole schedule
    net.register_buffer("x_max", torch.tensor(X_MAX))             # the largest log1p count in training
    net.register_buffer("x_std", torch.tensor(0.5))               # and its pixel std (train() sets both)
    net.eps_skip = eps_skip


def eps_output(net, x, t, out):
    """eps = the last layer's `out` (eps_skip False: eq. 3.30), or with a fixed input skip, s the data's pixel
    std: eps = sqrt(1 - abar) / v x_t + sqrt(abar / v) s out, v = abar s^2 + 1 - abar. Near t = 999 eps ~ x_t,
    where a plain eps network's error is multiplied by 1 / sqrt(abar) ~ 160 in x0 (saturated samples)."""
    if not net.eps_skip:
        return out
    a = net.alphas_cumprod[t][:, None, None, None]
    var = a * net.x_std ** 2 + 1 - a
    return (1 - a).sqrt() / var * x + (a / var).sqrt() * net.x_std * out


class UNet(nn.Module):
    """eps(x_t, t, cond), any number of levels, attention at the lowest `attn_levels` levels and in the
    middle; the condition is added to the time embedding of every block."""

    def __init__(self, width=4, mults=(2, 3, 4), n_res=2, n_cond=9, attn_levels=1, heads=1, eps_skip=True):
        super().__init__()
        ch = [width * m for m in mults]
        attn = [i >= len(ch) - attn_levels for i in range(len(ch))]  # attention at the lowest levels
        self.emb = emb = max(32, 8 * width)
        self.pad = 2 ** (len(ch) - 1)                                # images padded to a multiple of this
        schedule_buffers(self, eps_skip)
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.c_mlp = nn.Sequential(nn.Linear(n_cond, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(1, ch[0], 3, padding=1)
        c = self.build_u(ch, n_res, attn, lambda ci, co: ResBlock(ci, co, emb),
                         lambda co: Attention(co, emb, heads), lambda c: nn.Identity())   # upsampling only
        self.out = nn.Sequential(nn.GroupNorm(groups(c), c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

    def build_u(self, ch, n_res, attn, block, attention, after_up):
        """The U: per level n_res blocks (each followed by an attention where attn[i]) and a stride-2
        convolution down; block, attention, block in the middle; per level n_res + 1 blocks on the skips and
        a nearest upsampling (then `after_up`) up. Returns the last channel count."""
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch[0]], ch[0]
        for i, co in enumerate(ch):
            for _ in range(n_res):
                self.down.append(nn.ModuleList([block(c, co), attention(co) if attn[i] else None]))
                c = co
                skips.append(c)
            if i < len(ch) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([block(c, c), attention(c), block(c, c)])
        for i, co in reversed(list(enumerate(ch))):
            for _ in range(n_res + 1):
                self.up.append(nn.ModuleList([block(c + skips.pop(), co),
                                              attention(co) if attn[i] else None]))
                c = co
            if i > 0:
                self.up.append(after_up(c))
        return c

    def embed(self, t, cond):
        """(what every ResBlock adds, what the attention reads): both the time + the condition embedding."""
        e = self.t_mlp(timestep_embedding(t, self.emb)) + self.c_mlp(cond)
        return e, e

    def forward(self, x, t, cond):
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.pad, 0, -H % self.pad))              # cropped below
        e, c = self.embed(t, cond)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                h = layer(h)
            else:
                h = layer[0](h, e)
                h = layer[1](h, c) if layer[1] is not None else h
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, e), c), e)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](torch.cat([h, hs.pop()], 1), e)
                h = layer[1](h, c) if layer[1] is not None else h
            else:                                                     # upsample to the next skip's size
                h = layer(F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest"))
        return eps_output(self, x[..., :H, :W], t, self.out(h)[..., :H, :W])


def build_networks(cfg):
    """{'unet': the eps network} described by a run's settings (or a checkpoint's): the compact UNet, or the
    thesis' (unet="published", Appendix A). It carries how its samplers clip x0 and space the DDIM steps."""
    kw = dict(width=cfg["width"], mults=cfg["mults"], n_res=cfg["n_res"], attn_levels=cfg["attn_levels"],
              heads=cfg["heads"], eps_skip=cfg["eps_skip"])
    net = PublishedUNet(**kw) if cfg["unet"] == "published" else UNet(**kw)
    net.x0_clip, net.spacing = cfg["x0_clip"], cfg["spacing"]
    return {"unet": net}


def build_model(cfg):
    return build_networks(cfg)["unet"]


# ----------------------------------------------------------------------------------------------------------
# The method: loss and sampler
# ----------------------------------------------------------------------------------------------------------
def ddpm_loss(model, x0, cond, generator):
    """Noise-prediction MSE on a batch of log1p responses x0, t uniform over 0..T-1."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, T, (len(x0),), generator=generator, device=x0.device)
    ab = model.alphas_cumprod[t][:, None, None, None]
    return F.mse_loss(model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, cond), eps)


def ddim_timesteps(steps, spacing="linspace"):
    """`steps` distinct integer timesteps from T-1 down: spread evenly to 0 included ("linspace"), or
    diffusers' "trailing" spacing, round(T - i T / steps) - 1 (999, 979, ..., 19 for 50 steps)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T} (got {steps})")
    if spacing == "trailing":
        return [round(T - i * T / steps) - 1 for i in range(steps)]
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def predict_x0(model, x, t, cond, clip):
    """The model's eps at integer step t and the x0 it implies; with clip, x0 is clipped to the data range
    [0, x_max] (model.x0_clip 0) or to [-c, c] (c = x0_clip: the authors' 7) and eps recomputed from it, so
    that x_t = sqrt(abar) x0 + sqrt(1 - abar) eps still holds (Ho et al.'s clip_denoised)."""
    a = model.alphas_cumprod[t]
    eps = model(x, torch.full_like(cond[:, 0], t, dtype=torch.long), cond)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    if clip:
        c = model.x0_clip
        x0 = x0.clamp(-c, c) if c > 0 else torch.minimum(x0.clamp_min(0), model.x_max)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return x0, eps


def to_counts(model, x):
    """Counts from a sampler's last x: clipped to [0, x_max] (x0_clip 0), or at 0 only (the authors' ReLU)."""
    x = x.clamp_min(0)
    return data.to_counts(x if model.x0_clip > 0 else torch.minimum(x, model.x_max))


class Sampler(data.Sampler):
    """DDIM as one module (bench.py, --export), unrolled for `steps`: counts from cond (n, 9), x_T
    (n, 1, H, W) and, for eta > 0, the fresh noise of every step but the last, step_noise
    (n, steps - 1, H, W). The schedule is indexed with python ints, so the loop has no host syncs (a CUDA
    graph can capture it)."""

    def __init__(self, model, shape, steps=50, eta=0.7, clip=True):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (got {eta})")
        super().__init__(steps=steps, eta=eta, clip=clip, x0_clip=model.x0_clip, spacing=model.spacing)
        self.model, self.shape, self.ts = model, tuple(shape), ddim_timesteps(steps, model.spacing)
        self.eta, self.clip = eta, clip
        self.k = steps - 1 if eta > 0 else 0                 # fresh-noise draws

    def noise_shapes(self, n):
        return {"x_T": (n, 1) + self.shape, **({"step_noise": (n, self.k) + self.shape} if self.k else {})}

    def draw(self, n, generator=None, device="cpu"):
        """x_T, then one (n, 1, H, W) draw per step except the last: the order of the ancestral sampler."""
        d = [data.noise((n, 1) + self.shape, generator, device) for _ in range(1 + self.k)]
        return {"x_T": d[0], **({"step_noise": torch.cat(d[1:], 1)} if self.k else {})}

    def forward(self, cond, x, step_noise=None):
        m, ts = self.model, self.ts
        for i, t in enumerate(ts):
            a = m.alphas_cumprod[t]
            a_prev = m.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a)   # abar_{-1} = 1
            x0, eps = predict_x0(m, x, t, cond, self.clip)
            sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if self.k and i + 1 < len(ts):
                x = x + sigma * step_noise[:, i:i + 1]
        return to_counts(m, x)


@torch.no_grad()
def sample(model, cond, shape, generator=None, steps=50, eta=0.7, clip=True):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9) by DDIM. Noise is drawn on the
    CPU from `generator` and moved to the model's device, so a seed gives the same samples on any device:
    first x_T, then (for eta > 0) one draw per step except the last, the order of the ancestral sampler."""
    return Sampler(model, shape, steps, eta, clip).run(cond, generator)


@torch.no_grad()
def ddpm_ancestral(model, cond, shape, generator=None, clip=True):
    """Reference: the ancestral DDPM sampler of Ho et al. 2020 over all T steps, x_{t-1} = posterior mean of
    q(x_{t-1} | x_t, x0) + sqrt(beta_tilde_t) z. It equals sample(..., steps=T, eta=1) for the same generator
    (the same algebra written differently; a test checks it)."""
    dev, abar = cond.device, model.alphas_cumprod
    x = data.noise((len(cond), 1) + tuple(shape), generator, dev)
    for t in range(T - 1, -1, -1):
        x0, _ = predict_x0(model, x, t, cond, clip)
        a_prev = abar[t - 1] if t > 0 else torch.ones_like(abar[0])
        beta = 1 - abar[t] / a_prev                                     # beta_t, from the stored schedule
        x = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - abar[t])
        if t > 0:
            x = x + ((1 - a_prev) / (1 - abar[t]) * beta).sqrt() * data.noise(x.shape, generator, dev)
    return to_counts(model, x)


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
        for pe, pm in zip(ema.parameters(), model.parameters()):       # parameters only: not the buffers
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
    model.x_max.fill_(x_tr.max())               # the data range: x0 is clipped to it
    model.x_std.fill_(x_tr.std())               # the data scale: the eps network's input skip
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else model   # ema 0: the weights sample
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=args.betas, eps=args.adam_eps,
                            weight_decay=args.weight_decay)
    planned = run.plan(len(x_tr), args.batch_size, sum(p.numel() for p in model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.schedule, args.warmup, planned))
    scaler = data.grad_scaler(args.amp, dev)
    noise = torch.Generator(dev).manual_seed(args.seed)
    run.keep(weights=model, ema=ema, opt=opt, sched=sched, scaler=scaler, noise=noise)   # in every checkpoint
    net = run.wrap(model)                       # under torchrun: DDP, and still one process's loss exactly

    def validate():                             # the sampling network on validation events (rank 0)
        g = torch.Generator(dev).manual_seed(1234)
        with torch.no_grad():
            val = np.mean([ddpm_loss(ema, x.to(dev), c.to(dev), g).item()
                           for x, c in data.batches((x_va, c_va), 500, shuffle=False)])
        k = min(500, len(x_va))                 # 25k network evaluations at 50 steps
        gen = sample(ema, c_va[:k].to(dev), shape, torch.Generator().manual_seed(0), args.steps, args.eta)
        return dict(val_loss=float(val), val_W=metrics.wasserstein(split.counts("val")[:k], gen)[0])
    run.validate = validate

    for x, c in run.batches((x_tr, c_tr)):
        with data.autocast(dev, args.amp):
            loss = ddpm_loss(net, x, c, noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not model:
            ema_update(ema, model, args.ema, run.step)
        run.step_done(train_loss=loss)
    return run.finish()


# ==========================================================================================================
# Appendix A. The thesis' network: diffusers' UNet2DConditionModel as m-wojnar/zdc diffusion.py configures it
# (4,255,585 parameters at 16/32/64/128 channels; the same outputs for the same weights); --paper builds it.
# ==========================================================================================================
class XAttention(nn.Module):
    """diffusers' Attention: bias-free query, key, value (from `ctx` features if given), output with bias."""

    def __init__(self, ch, heads, ctx=None):
        super().__init__()
        self.q, self.kv = nn.Linear(ch, ch, bias=False), nn.Linear(ctx or ch, 2 * ch, bias=False)
        self.o, self.heads = nn.Linear(ch, ch), heads

    def forward(self, x, c):
        qkv = (self.q(x), *self.kv(c).chunk(2, -1))
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in qkv)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Transformer(nn.Module):
    """diffusers' Transformer2DModel (one BasicTransformerBlock): on the pixels as tokens, pre-LayerNorm
    residual self-attention, cross-attention to the condition and a GEGLU feed-forward, between 1x1 convs."""

    def __init__(self, ch, ctx, heads, g):
        super().__init__()
        self.norm, self.proj_in = nn.GroupNorm(groups(ch, g), ch, eps=1e-6), nn.Conv2d(ch, ch, 1)
        self.n1, self.attn1 = nn.LayerNorm(ch), XAttention(ch, heads)
        self.n2, self.attn2 = nn.LayerNorm(ch), XAttention(ch, heads, ctx)
        self.n3, self.ff1, self.ff2 = nn.LayerNorm(ch), nn.Linear(ch, 8 * ch), nn.Linear(4 * ch, ch)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, c):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)                # (B, HW, C)
        y = self.n1(h)
        h = h + self.attn1(y, y)
        h = h + self.attn2(self.n2(h), c)                                         # the condition's way in
        a, gate = self.ff1(self.n3(h)).chunk(2, -1)
        h = h + self.ff2(a * F.gelu(gate))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class PublishedUNet(UNet):
    """The thesis' eps network in UNet's forward, unpadded: ResBlocks with 8-group GroupNorm, a Transformer
    after each on the levels from the attn_levels-th lowest to the one above the lowest (--paper: 64
    channels) and in the middle, a convolution after each upsampling. The condition: one token of 32."""

    def __init__(self, width=16, mults=(1, 2, 4, 8), n_res=2, attn_levels=2, heads=4, eps_skip=False,
                 n_cond=9, ctx=32, g=8):
        super(UNet, self).__init__()                                # nn.Module's: its own blocks
        ch, L = [width * m for m in mults], len(mults)
        attn = [L - attn_levels <= i < L - 1 for i in range(L)]
        self.emb, E, self.pad = ch[0], 4 * ch[0], 1
        schedule_buffers(self, eps_skip)
        self.t_mlp = nn.Sequential(nn.Linear(ch[0], E), nn.SiLU(), nn.Linear(E, E))
        self.ctx, self.inp = nn.Linear(n_cond, ctx), nn.Conv2d(1, ch[0], 3, padding=1)
        c = self.build_u(ch, n_res, attn, lambda ci, co: ResBlock(ci, co, E, g),
                         lambda co: Transformer(co, ctx, heads, g), lambda c: nn.Conv2d(c, c, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(groups(c, g), c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

    def embed(self, t, cond):
        """The time embedding (sinusoids, cosines first, an MLP, the SiLU of diffusers' ResBlocks) and the
        condition token."""
        e = self.t_mlp(timestep_embedding(t, self.emb).roll(self.emb // 2, 1))
        return F.silu(e), self.ctx(cond)[:, None]


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("DDIM sampling")
    g.add_argument("--steps", type=int, default=50,
                   help=f"DDIM steps, 1..{T} (default 50; {T} with --eta 1: the ancestral DDPM sampler)")
    g.add_argument("--eta", type=float, default=0.7,
                   help="DDIM noise scale in [0, 1] (default 0.7; 0: deterministic, 1: DDPM's variance)")
    g.add_argument("--sweep", type=data.positive_ints, nargs="?", const=[5, 10, 25, 50, 100], metavar="STEPS",
                   help="--eval: quality against speed at these step counts (default 5,10,25,50,100), "
                   "each with eta 0, 0.7 and 1; writes sweep.json (sweep.png with --plot)")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    mults, betas = args.mults, args.betas
    for bad, msg in [(not 1 <= args.steps <= T, f"--steps must be between 1 and {T} (got {args.steps})"),
                     (not 0.0 <= args.eta <= 1.0, f"--eta must be in [0, 1] (got {args.eta})"),
                     (args.sweep and max(args.sweep) > T, f"--sweep takes step counts between 1 and {T}"),
                     (not 1 <= len(mults) <= 5 or min(mults) <= 0, f"mults: 1-5 positive integers {mults}"),
                     (len(betas) != 2 or not all(0 <= b < 1 for b in betas), "betas takes b1,b2 in [0, 1)"),
                     (not args.warmup.rstrip("%").isdigit(), f"warmup takes N steps or P% ({args.warmup!r})"),
                     (args.width <= 0 or args.n_res <= 0, "width and n_res must be positive"),
                     (not 0 <= args.attn_levels <= len(mults), f"attn_levels must be in 0..{len(mults)}"),
                     (args.unet not in ("compact", "published"), f"unet: compact or published ({args.unet})"),
                     (args.spacing not in ("linspace", "trailing"), "spacing takes linspace or trailing"),
                     (not args.x0_clip >= 0, f"x0_clip must be >= 0, 0: the data range (got {args.x0_clip})"),
                     (args.heads <= 0 or any(args.width * m % args.heads for m in mults),
                      f"heads must divide every level's channels ({args.width} x {mults})"),
                     (not args.adam_eps > 0, f"adam_eps must be > 0 (got {args.adam_eps})"),
                     (not args.weight_decay >= 0, f"weight_decay must be >= 0 (got {args.weight_decay})"),
                     (not 0 <= args.ema < 1, f"ema must be in [0, 1) (got {args.ema})"),
                     (not args.grad_clip >= 0, f"grad_clip must be >= 0 (got {args.grad_clip})")]:
        if bad:
            p.error(msg)
    return args


def load_sampler(ck, args, device):
    """The DDIM Sampler (--steps, --eta) of a checkpoint's EMA weights (its weights with ema 0), channels-last
    as trained."""
    model = build_model(ck["args"]).to(device, memory_format=torch.channels_last)
    model.load_state_dict(ck["ema"])
    return Sampler(model, ck["data"]["shape"], args.steps, args.eta)


def evaluate(args, ck, sampler, device):
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt")
    if args.sweep:
        def make(eta, steps):
            return data.generator(Sampler(sampler.model, sampler.shape, steps, eta), device, args.amp)
        runs = [dict(eta=e, steps=n) for e in (0.0, 0.7, 1.0) for n in args.sweep]
        result = metrics.run_sweep(make, runs, split, path.with_name("sweep.json"), args, NAME,
                                   cost_keys=["steps"])              # eta costs nothing: timed once
        if args.plot:
            metrics.plot_sweep(result, path.with_name("sweep.png"), x="steps", group="eta",
                               xlabel="DDIM steps")
            print(f"plot: {path.with_name('sweep.png')}")
        return result
    default = (args.steps, args.eta) == (50, 0.7)
    path = path.with_name("eval.json" if default else f"eval_steps{args.steps}_eta{args.eta:g}.json")
    return metrics.run_eval(data.generator(sampler, device, args.amp), split, path, args,
                            f"{NAME} (DDIM {args.steps}, eta {args.eta:g})",
                            dict(steps=args.steps, eta=args.eta, n_params=ck["n_params"],
                                 train_steps=ck["step"]))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
