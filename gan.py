"""Conditional GAN with a postprocessing scale for the ALICE Zero Degree Calorimeters.

Papers: the master's thesis arXiv 2407.16704 and the neutron ZDC VAE/GAN paper arXiv 2306.13606: a conditional
GAN with a fitted postprocessing scalar reaches Wasserstein 5.70 on the real neutron set (0.023 ms per sample).

Method. A generator G(z, c) maps noise z ~ N(0, I_10) and the 9 standardised particle features c to a
log1p(counts) image (ReLU output, so exact zeros are possible); a discriminator D(x, c) returns a logit.
Non-saturating BCE: D minimises BCE(D(x, c), 1) + BCE(D(G(z, c'), c'), 0) and G minimises BCE(D(G(z, c'), c'), 1),
where the fakes are conditioned on c', a shuffled copy of the batch's conditions (so D cannot pair a fake with
the real image of the same row). One D step, then one G step, per batch; two separate optimisers. --paper:
the thesis' Table A.4 (D: Adam lr 1.4e-5, betas .97/.96, eps 3.7e-5; G: Adam with Nesterov momentum (NAdam) lr
1e-4, betas .76/.54, eps 1.8e-2; no weight decay; each with the one-cycle cosine schedule of the authors' code:
from lr/div up to lr over the first 43 % (G: 34 %) of the steps, then down to lr/(div * final div), div 41 and
1700 (G: 260 and 9500)), batch 256, 100 epochs (Table 4.2). The CPU default: constant learning rates.
Generator: dense 19 -> 256 -> (2w, H/4, W/4), two nearest x2 upsamplings each followed by a 3x3 conv (2w, w
channels), a 3x3 conv to 1 channel, ReLU, cropped to H x W (ZP 56x30 is generated at 56x32). Discriminator:
two 3x3 convs (w, 2w channels) each with 2x2 max pooling, flatten, concatenate c, dense 128 -> 64 -> logit.
Both use BatchNorm, dropout (--dropout) and LeakyReLU(0.1) as in the thesis; G samples in eval mode. The CPU
default drops BatchNorm from D (`--d-norm none`): D sees the real batch and the fake batch separately, and a
conv followed by BatchNorm over a batch of fakes is blind to their overall brightness (scaling the input
scales the batch mean and std alike), so with it D never penalised faint images (photon sums ~7x too small).
--paper keeps the thesis' BatchNorm.

Postprocessing. After training, a scalar s in [0.9, 1.1] is fitted on --pp-samples training events so that
the channel-sum Wasserstein of s * (generated raw counts) against the true counts is minimal, by golden-section
search (`fit_scale`; W1 between a fixed and a scaled sample is convex in s, so the search finds the minimum).
s is stored in the checkpoint and multiplies the raw counts at sampling (the published code fits on raw counts
but applies it in log space; here both are raw counts). `--no-postprocess` sets s = 1 (writes eval_nopp.json).

Usage:
    python gan.py --train                            # ZN, CPU default (5.5-6.6 min alone, 2 cores)
    python gan.py --train --detector proton --out runs/gan_proton
    python gan.py --train --paper                    # the thesis setting, ViT (G 0.92M, D 1.42M), 100 epochs: a GPU job
    python gan.py --train --paper --arch cnn         # the same with the conv GAN (G 0.89M, D 1.41M)
    python gan.py --sample --ckpt runs/gan/ckpt.pt --n 1000 --out samples.npz
    python gan.py --export gan.onnx --ckpt runs/gan/ckpt.pt   # the sampler as one ONNX graph
    python gan.py --eval --ckpt runs/gan/ckpt.pt [--no-postprocess] [--plot]
    python gan.py --train --smoke                    # seconds: tiny data, tiny model
Explicit flags beat --paper, which beats the CPU default. --width is the generator's width (as in the other
scripts; --g-width, its old name, still works, and checkpoints that stored g_width load and resume).
Logged every --val-every steps (means since the previous row): d_loss, g_loss (= train_loss), d_real and
d_fake (mean sigmoid(D) on real and fake images: ~0.5 both at equilibrium; d_real -> 1 and d_fake -> 0 means
D is winning), and the validation Wasserstein of 1000 generated samples (without postprocessing). The
generator of the lowest validation W is kept in the checkpoint beside the last one, with its own fitted scale:
adversarial training drifts (`python metrics.py --curve runs/gan`); --sample/--eval/--export use the best one
unless --weights last.

Backbones (`--arch`): vit, the thesis' final GAN (Section 4.9, built from its ViT pair; the default under
--paper), as the authors' code: G = dense (z, c) -> 36 tokens of 128, the ViT decoder (projection, learned
positional embedding, the condition as first token, 4 pre-LayerNorm blocks of 4 heads, MLP 4x GELU, dropout 0.1,
transposed conv 8x8 stride 8, ReLU(. + 0.5), crop of the 48x48 frame; ZP: 56x32, 7x4 tokens), 915,841
parameters; D = the ViT encoder of width 128 with the condition token, a dense 128 per token, flatten, dense 128
-> 64 -> logit (GELU), 1,422,337. --dropout and --d-norm act on the CNN only. vdvae: the same layout on the
thesis' CNN pair (Sec. 4.4, VDVAE-style bottleneck blocks, BatchNorm; vae.py's docstring describes it): G = dense
(z, c) -> 6x6 tokens of w, the CNN decoder with the condition at every token; D = the CNN encoder with the
condition at every token, the ViT D's head; `--paper --arch vdvae`: w = 64, G 455,585, D 775,585 (the thesis
reports its GAN only on the ViT). cnn: the conv GAN below (CPU default; the ViT pair took 6x longer per D + G
step on 2 cores: 1.28 s vs 0.21 s at batch 128, tools/time_arch.py).
Deviations from the paper (docs/fidelity/gan.md): `--arch cnn` is the conditional conv GAN of the authors' earlier
code, whose generator starts from a 13x13 dense layer with "valid" convs (5.6M parameters); here the start is
H/4 x W/4 with padded convs, so one network serves both detectors, and widths are chosen to land near the reference
sizes with --paper (ZN: G 0.89M, D 1.41M). torch's NAdam (Dozat's momentum schedule) stands in for optax's
Nesterov Adam. The CPU default keeps G (0.89M) but has a narrower D (--d-width 8, 0.26M) without BatchNorm, no
dropout (25 % of the CPU time), one epoch instead of 100, batch 128, and faster Adam settings at a constant rate
(lr 2e-4 for both, betas .5/.9, eps 1e-8): with the published ones D did not move in 400 CPU steps. --paper
restores the published settings.
Measured (ZN, `--eval --max-test 2000`, results/gan_neutron_*.json): random split 9.4x the floor, AUC 0.93;
condition-disjoint 14.2x (lookup 9.4x), AUC 0.94. Details and history: docs/models/gan.md.
"""
import argparse
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

NAME = "gan"
NOISE = 10
# CPU default: ~9 min on 2 cores (ZN). The published optimiser settings (PAPER) barely move D in a CPU budget.
# Keys without a flag (Adam eps, Nesterov, schedule) are fixed per setting; every other key is a flag that beats
# both dicts when given. Schedule: (warm-up fraction, initial div, final div) of the one-cycle cosine, or None.
DEFAULTS = dict(epochs=1, batch_size=128, lr=2e-4, d_lr=2e-4, g_betas=[0.5, 0.9], d_betas=[0.5, 0.9], dropout=0.0, d_norm="none", g_eps=1e-8, d_eps=1e-8, g_nesterov=False, g_sched=None,
                d_sched=None)
# thesis Table 4.2 (100 epochs, batch 256) and Table A.4 (both optimisers)
PAPER = dict(epochs=100, batch_size=256, lr=1e-4, d_lr=1.4e-5, g_betas=[0.76, 0.54], d_betas=[0.97, 0.96], dropout=0.2, d_norm="batch", g_eps=1.8e-2, d_eps=3.7e-5, g_nesterov=True,
             g_sched=[0.34, 260.0, 9500.0], d_sched=[0.43, 41.0, 1700.0])
# sizes per backbone: (CPU default, --paper). --paper builds the thesis' ViT GAN (Sec. 4.9: ~1M-parameter ViT
# models; token width 128 in G and D in the authors' code); --paper --arch cnn the conv GAN (G 0.89M, D 1.41M)
ARCH = {"cnn": (dict(width=14, d_width=8), dict(width=14, d_width=44)),
        "vdvae": (dict(width=16, d_width=16), dict(width=64, d_width=64)),     # the thesis' CNN pair, 64 / 128 / 256
        "vit": (dict(width=128, d_width=128, blocks=4), dict(width=128, d_width=128, blocks=4))}
_SRC = "our count of the authors' ViT GAN (m-wojnar/zdc gan.py + architectures/vit.py; thesis Sec. 4.9: ~1M)"
PUBLISHED = {"generator": (915_841, _SRC), "discriminator": (1_422_337, _SRC)}   # MODELS.md: G ~0.9M, D ~1.4M


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("GAN (--lr is the generator's learning rate)")
    g.add_argument("--arch", default=None, choices=["cnn", "vdvae", "vit"],
                   help="backbone: cnn (this repository's compact conv pair, CPU default), vdvae (the thesis' CNN pair, "
                        "VDVAE-style bottleneck blocks) or vit (the thesis' ViT pair; the default under --paper)")
    g.add_argument("--width", "--g-width", dest="width", type=int, default=None,
                   help="cnn: generator channels w (dense to 2w, convs 2w, w), 14 (--g-width: its old name); vit: "
                        "generator token width (128)")
    g.add_argument("--d-width", type=int, default=None, help="cnn: discriminator conv channels w (convs w, 2w), CPU 8, "
                   "paper size 44; vit: discriminator token width (128)")
    g.add_argument("--blocks", type=int, default=None, help="vit: transformer blocks in G and D (4)")
    g.add_argument("--d-lr", type=float, default=None, help="discriminator learning rate (CPU 2e-4; published 1.4e-5)")
    g.add_argument("--g-betas", type=float, nargs=2, default=None, help="generator Adam betas (CPU .5 .9; published .76 .54)")
    g.add_argument("--d-betas", type=float, nargs=2, default=None, help="discriminator Adam betas (CPU .5 .9; published .97 .96)")
    g.add_argument("--dropout", type=float, default=None, help="dropout in G and D (thesis and --paper: 0.2; CPU default 0, 25 %% faster)")
    g.add_argument("--d-norm", choices=["batch", "none"], default=None,
                   help="BatchNorm in D (thesis, --paper) or none (CPU default): see the docstring")
    g.add_argument("--val-every", type=int, default=250, help="validate (losses, D outputs, Wasserstein; keep the best G) every N steps")
    g.add_argument("--pp-samples", type=int, default=20000, help="training events used to fit the postprocessing scale")
    g.add_argument("--no-postprocess", action="store_true", help="--sample/--eval: ignore the fitted scale (s = 1)")
    g.add_argument("--weights", choices=["best", "last"], default="best", help="--sample/--eval/--export: the "
                   "generator of the best validation W (with its own scale) or the last one")
    g.add_argument("--paper", action="store_true", help="the published setting (explicit flags still win)")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if args.d_lr is not None and not args.d_lr > 0 or not all(0 <= b < 1 for b in (args.g_betas or []) + (args.d_betas or [])):
        p.error("--d-lr must be positive and Adam betas in [0, 1)")
    if args.dropout is not None and not 0 <= args.dropout < 1 or args.pp_samples <= 0 or args.val_every <= 0:
        p.error("--dropout must be in [0, 1), --pp-samples and --val-every positive")
    for k in ("width", "d_width", "blocks"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive (got {getattr(args, k)})")
    args.arch = args.arch or ("vit" if args.paper else "cnn")   # explicit > --paper > CPU default
    sizes, paper_sizes = ARCH[args.arch]
    for k, v in {**DEFAULTS, **sizes, **(PAPER if args.paper else {}), **(paper_sizes if args.paper else {})}.items():
        if getattr(args, k, None) is None:   # flags given on the command line win
            setattr(args, k, v)
    if args.arch == "vit" and (args.width % 4 or args.d_width % 4):
        p.error(f"--width {args.width}, --d-width {args.d_width}: the ViT's 4 attention heads need multiples of 4")
    if args.smoke:
        args.limit, args.batch_size = args.limit or 1500, 32
        args.width, args.d_width, args.blocks = (16, 16, 1) if args.arch == "vit" else (4, 4, args.blocks)
        args.max_steps, args.pp_samples = args.max_steps or 6, min(args.pp_samples, 300)
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def act(n, dropout, dim=2, norm=True):
    """BatchNorm (unless norm=False), dropout, LeakyReLU(0.1): the thesis' block tail."""
    bn = (nn.BatchNorm2d(n) if dim == 2 else nn.BatchNorm1d(n)) if norm else nn.Identity()
    return [bn, nn.Dropout(dropout), nn.LeakyReLU(0.1)]


# The thesis' ViT pair (Sec. 4.4; --arch vit), written out in the same words in vae.py, sae_ng.py, gan.py, vqgan.py
PATCH = 8


def vit_grid(shape):
    """Token grid of an image padded to a multiple of 8: ZN 44x44 -> 48x48 -> 6x6 (36 tokens);
    ZP 56x30 -> 56x32
    -> 7x4 (28 tokens)."""
    return math.ceil(shape[0] / PATCH), math.ceil(shape[1] / PATCH)


class TokenAttention(nn.Module):
    """Multi-head self-attention (n, T, dim) -> (n, T, dim): nn.MultiheadAttention's parameters, names and
    initialisation, written out so that an ONNX export keeps the batch size dynamic (the module's own
    traced path
    fixes it, and its fused inference kernel has no ONNX op)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.out_proj = heads, nn.Linear(dim, dim)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        nn.init.xavier_uniform_(self.in_proj_weight), nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        T, d = x.shape[1:]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(-1, T, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, T, d))


class ViTBlock(nn.Module):
    """Pre-LayerNorm transformer block: 4-head self-attention, then an MLP 4x wide with GELU and dropout."""

    def __init__(self, dim, heads=4, dropout=0.1):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViTEncoder(nn.Module):
    """log1p image (n, 1, H, W) [and condition (n, c)] -> tokens (n, T, dim): zero-pad (centred) to a
    multiple of
    8, cut 8x8 patches, project them linearly and add a learned positional embedding; the condition, projected
    linearly, is prepended as the first token; transformer blocks; the condition token dropped; LayerNorm."""

    def __init__(self, shape, dim, blocks=4, n_cond=0, heads=4, dropout=0.1):
        super().__init__()
        self.shape, self.grid = tuple(shape), vit_grid(shape)
        self.patch = nn.Linear(PATCH * PATCH, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(self.grid[0] * self.grid[1], dim))
        self.cond = nn.Linear(n_cond, dim) if n_cond else None
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, dropout) for _ in range(blocks)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, cond=None):
        (H, W), (gh, gw) = self.shape, self.grid
        ph, pw = gh * PATCH - H, gw * PATCH - W
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = x.reshape(-1, gh, PATCH, gw, PATCH).transpose(2, 3)          # batch: -1 (a dynamic ONNX batch)
        x = x.reshape(-1, gh * gw, PATCH * PATCH)
        h = self.patch(x) + self.pos
        if self.cond is not None:
            h = torch.cat([self.cond(cond)[:, None], h], 1)
        h = self.blocks(h)
        return self.ln(h[:, 1:] if self.cond is not None else h)


class ViTDecoder(nn.Module):
    """Tokens (n, T, d_in) [and condition (n, c)] -> log1p image (n, 1, H, W) >= 0: linear projection, learned
    positional embedding, the condition token prepended, transformer blocks, the condition token dropped, a
    transposed convolution (kernel = stride = 8) to one channel, ReLU(. + offset) (exact zeros; its gradient
    passes as if linear with straight_through: the same outputs), centre crop."""

    def __init__(self, shape, d_in, dim, blocks=4, n_cond=0, offset=0.0, heads=4, dropout=0.1,
                 straight_through=False):
        super().__init__()
        self.shape, self.grid, self.offset, self.st = tuple(shape), vit_grid(shape), offset, straight_through
        self.proj = nn.Linear(d_in, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(self.grid[0] * self.grid[1], dim))
        self.cond = nn.Linear(n_cond, dim) if n_cond else None
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, dropout) for _ in range(blocks)])
        self.unpatch = nn.ConvTranspose2d(dim, 1, PATCH, PATCH)

    def forward(self, z, cond=None):
        (H, W), (gh, gw) = self.shape, self.grid
        h = self.proj(z) + self.pos
        if self.cond is not None:
            h = torch.cat([self.cond(cond)[:, None], h], 1)
        h = self.blocks(h)
        h = h[:, 1:] if self.cond is not None else h
        img = self.unpatch(h.transpose(1, 2).unflatten(2, (gh, gw))) + self.offset
        img = img + (F.relu(img) - img).detach() if self.st else F.relu(img)   # straight-through
        top, left = (gh * PATCH - H) // 2, (gw * PATCH - W) // 2
        return img[..., top:top + H, left:left + W]


class Generator(nn.Module):
    def __init__(self, shape, width, dropout, n_cond=9):
        super().__init__()
        self.shape, self.w = tuple(shape), width
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, 256), *act(256, dropout, 1),
                                   nn.Linear(256, 2 * width * self.h0 * self.w0), *act(2 * width * self.h0 * self.w0, dropout, 1))
        self.conv = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                                  *act(2 * width, dropout), nn.Upsample(scale_factor=2),
                                  nn.Conv2d(2 * width, width, 3, padding=1), *act(width, dropout),
                                  nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, z, cond):
        h = self.dense(torch.cat([z, cond], 1)).view(-1, 2 * self.w, self.h0, self.w0)
        return F.relu(self.conv(h))[..., :self.shape[0], :self.shape[1]]        # log1p(counts) >= 0


class Discriminator(nn.Module):
    def __init__(self, shape, width, dropout, norm, n_cond=9):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), *act(width, dropout, 2, norm), nn.MaxPool2d(2),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), *act(2 * width, dropout, 2, norm),
                                  nn.MaxPool2d(2), nn.Flatten())
        flat = 2 * width * (shape[0] // 4) * (shape[1] // 4)
        self.head = nn.Sequential(nn.Linear(flat + n_cond, 128), *act(128, dropout, 1, norm),
                                  nn.Linear(128, 64), *act(64, dropout, 1, norm), nn.Linear(64, 1))

    def forward(self, x, cond):
        return self.head(torch.cat([self.conv(x), cond], 1))[:, 0]


# The thesis' CNN pair (Sec. 4.4; --arch vdvae), written out in the same words in vae.py, sae_ng.py, gan.py
class BottleneckBlock(nn.Module):
    """VDVAE-style residual block: GELU, 1x1 conv to c/4, GELU, 3x3, GELU, 3x3, GELU, 1x1 back to c; plus its
    input."""

    def __init__(self, c):
        super().__init__()
        q = max(c // 4, 1)
        self.net = nn.Sequential(nn.GELU(), nn.Conv2d(c, q, 1), nn.GELU(), nn.Conv2d(q, q, 3, padding=1),
                                 nn.GELU(),
                                 nn.Conv2d(q, q, 3, padding=1), nn.GELU(), nn.Conv2d(q, c, 1))

    def forward(self, x):
        return x + self.net(x)


def conv_grids(shape):
    """Token grids of the CNN pair: the encoder's (three 2x2 average poolings, floored: ZN 44 -> 22 -> 11
    -> 5, 25 tokens; ZP 7x3) and the decoder's (the image and a 2-pixel border for its unpadded 5x5 conv,
    / 8: ZN 6x6)."""
    return (shape[0] // 8, shape[1] // 8), (math.ceil((shape[0] + 4) / 8), math.ceil((shape[1] + 4) / 8))


class ConvEncoder(nn.Module):
    """log1p image (n, 1, H, W) [and condition (n, c)] -> tokens (n, T, 4w [+ c]): three stages of (1x1 conv
    to w, 2w, 4w channels, two bottleneck blocks, BatchNorm, 2x2 average pooling; w = 64 in the thesis),
    LeakyReLU(0.1),
    the condition concatenated to every token."""

    def __init__(self, width=64, n_cond=0):
        super().__init__()
        layers, ci = [], 1
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(ci, c, 1), BottleneckBlock(c), BottleneckBlock(c), nn.BatchNorm2d(c),
                       nn.AvgPool2d(2)]
            ci = c
        self.net, self.n_cond = nn.Sequential(*layers), n_cond

    def forward(self, x, cond=None):
        h = F.leaky_relu(self.net(x).flatten(2).transpose(1, 2), 0.1)
        return torch.cat([h, cond[:, None].expand(-1, h.shape[1], -1)], 2) if self.n_cond else h


class ConvDecoder(nn.Module):
    """Tokens (n, T, d_in) [and condition (n, c)] -> log1p image (n, 1, H, W) >= 0: the condition
    concatenated to every token, dense to 4w, the tokens as the decoder grid of conv_grids, three stages of
    (1x1 conv to 4w, 2w, w
    channels, nearest x2 upsampling, two bottleneck blocks, BatchNorm), an unpadded 5x5 conv to one channel,
    ReLU(. + offset) (exact zeros; straight-through gradient with straight_through), centre crop (ZN:
    none)."""

    def __init__(self, shape, d_in, width=64, n_cond=0, offset=0.0, straight_through=False):
        super().__init__()
        self.shape, self.grid, self.n_cond = tuple(shape), conv_grids(shape)[1], n_cond
        self.offset, self.st = offset, straight_through
        self.proj = nn.Linear(d_in + n_cond, 4 * width)
        layers, ci = [], 4 * width
        for c in (4 * width, 2 * width, width):
            layers += [nn.Conv2d(ci, c, 1), nn.Upsample(scale_factor=2), BottleneckBlock(c),
                       BottleneckBlock(c),
                       nn.BatchNorm2d(c)]
            ci = c
        self.net = nn.Sequential(*layers, nn.Conv2d(ci, 1, 5))

    def forward(self, z, cond=None):
        (H, W), (gh, gw) = self.shape, self.grid
        if self.n_cond:
            z = torch.cat([z, cond[:, None].expand(-1, z.shape[1], -1)], 2)
        img = self.net(self.proj(z).transpose(1, 2).unflatten(2, (gh, gw))) + self.offset
        img = img + (F.relu(img) - img).detach() if self.st else F.relu(img)   # straight-through
        top, left = (img.shape[-2] - H) // 2, (img.shape[-1] - W) // 2
        return img[..., top:top + H, left:left + W]


class ViTGenerator(nn.Module):
    """--arch vit, as the authors' code: dense (z, c) -> 36 tokens of `width`, the ViT decoder with the condition
    token (dropout 0.1 in its blocks, as the thesis' ViT; --dropout is the CNN's)."""

    def __init__(self, shape, width, blocks, n_cond=9):
        super().__init__()
        T = vit_grid(shape)[0] * vit_grid(shape)[1]
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, T * width), nn.Unflatten(1, (T, width)))
        self.dec = ViTDecoder(shape, width, width, blocks, n_cond, offset=0.5)

    def forward(self, z, cond):
        return self.dec(self.dense(torch.cat([z, cond], 1)), cond)


class ViTDiscriminator(nn.Module):
    """--arch vit, as the authors' code: the ViT encoder with the condition token, a dense 128 per token, flatten,
    dense 128 -> 64 -> logit with GELU (the per-token dense is as wide as the tokens: 128)."""

    def __init__(self, shape, width, blocks, n_cond=9):
        super().__init__()
        T = vit_grid(shape)[0] * vit_grid(shape)[1]
        self.enc = ViTEncoder(shape, width, blocks, n_cond)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Flatten(), nn.Linear(T * width, 128), nn.GELU(approximate="tanh"),
                                  nn.Linear(128, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 1))

    def forward(self, x, cond):
        return self.head(self.enc(x, cond))[:, 0]


class ConvGenerator(nn.Module):
    """--arch vdvae, the ViT GAN's layout on the thesis' CNN pair: dense (z, c) -> the decoder grid's tokens of
    `width`, the CNN decoder with the condition at every token."""

    def __init__(self, shape, width, n_cond=9):
        super().__init__()
        T = conv_grids(shape)[1][0] * conv_grids(shape)[1][1]
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, T * width), nn.Unflatten(1, (T, width)))
        self.dec = ConvDecoder(shape, width, width, n_cond, offset=0.5)

    def forward(self, z, cond):
        return self.dec(self.dense(torch.cat([z, cond], 1)), cond)


class ConvDiscriminator(nn.Module):
    """--arch vdvae: the CNN encoder with the condition at every token, then the ViT discriminator's head."""

    def __init__(self, shape, width, n_cond=9):
        super().__init__()
        T, d = conv_grids(shape)[0][0] * conv_grids(shape)[0][1], 4 * width + n_cond
        self.enc = ConvEncoder(width, n_cond)
        self.head = nn.Sequential(nn.Linear(d, 128), nn.Flatten(), nn.Linear(T * 128, 128), nn.GELU(approximate="tanh"),
                                  nn.Linear(128, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 1))

    def forward(self, x, cond):
        return self.head(self.enc(x, cond))[:, 0]


def build_model(cfg):
    """The generator described by a checkpoint's args (the network that samples); checkpoints from before
    --width call its width g_width, from before --arch are the CNN."""
    if cfg.get("arch", "cnn") == "vit":
        return ViTGenerator(data.SHAPES[cfg["detector"]], cfg["width"], cfg["blocks"])
    if cfg.get("arch") == "vdvae":
        return ConvGenerator(data.SHAPES[cfg["detector"]], cfg["width"])
    return Generator(data.SHAPES[cfg["detector"]], cfg["width"] if "width" in cfg else cfg["g_width"], cfg["dropout"])


def build_discriminator(cfg):
    if cfg.get("arch", "cnn") == "vit":
        return ViTDiscriminator(data.SHAPES[cfg["detector"]], cfg["d_width"], cfg["blocks"])
    if cfg.get("arch") == "vdvae":
        return ConvDiscriminator(data.SHAPES[cfg["detector"]], cfg["d_width"])
    return Discriminator(data.SHAPES[cfg["detector"]], cfg["d_width"], cfg["dropout"], cfg.get("d_norm", "batch") == "batch")


def build_networks(cfg):
    return dict(generator=build_model(cfg), discriminator=build_discriminator(cfg))


def one_cycle(step, total, warmup, div, final_div):
    """LR multiplier of the thesis' schedule (optax.cosine_onecycle_schedule, = torch OneCycleLR 'cos'): cosine
    from 1/div up to 1 over the first `warmup` fraction of `total` steps, then down to 1/(div * final_div)."""
    w = max(1, round(warmup * total))
    a, b, f = (1 / div, 1.0, step / w) if step < w else (1.0, 1 / (div * final_div), (step - w) / max(1, total - w))
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))


def optimizer(net, lr, betas, eps, nesterov, sched, total):
    """Adam (NAdam where the thesis used Nesterov momentum), no weight decay (Table A.4), and its schedule:
    the one-cycle cosine `sched` = (warm-up fraction, div, final div) over `total` steps, or constant."""
    opt = (torch.optim.NAdam if nesterov else torch.optim.Adam)(net.parameters(), lr=lr, betas=tuple(betas), eps=eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: one_cycle(s, total, *sched)) if sched else (lambda s: 1.0))


# ----------------------------------------------------------------------------------------------------------
# Method: losses, sampler, postprocessing fit
# ----------------------------------------------------------------------------------------------------------
def gan_losses(gen, disc, opt_g, opt_d, x, cond, generator, scaler, amp):
    """One D step and one G step on a batch; returns (d_loss, g_loss, mean D(real), mean D(fake))."""
    dev = x.device
    fake_cond = cond[torch.randperm(len(cond), generator=generator, device=generator.device).to(dev)]
    z = data.noise((len(x), NOISE), generator, dev)
    bce = F.binary_cross_entropy_with_logits
    with data.autocast(dev, amp):
        fake = gen(z, fake_cond)
        real_logit, fake_logit = disc(x, cond), disc(fake.detach(), fake_cond)
        d_loss = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit))
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(d_loss).backward()
    scaler.step(opt_d)
    with data.autocast(dev, amp):
        g_logit = disc(fake, fake_cond)
        g_loss = bce(g_logit, torch.ones_like(g_logit))                    # non-saturating
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_loss).backward()
    scaler.step(opt_g)
    scaler.update()
    return d_loss.item(), g_loss.item(), torch.sigmoid(real_logit).mean().item(), torch.sigmoid(fake_logit).mean().item()


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): counts from cond (n, 9) and z (n, NOISE), times `scale`."""

    def __init__(self, gen, scale=1.0):
        super().__init__(scale=scale)
        self.gen, self.scale = gen, scale

    def noise_shapes(self, n):
        return {"z": (n, NOISE)}

    def forward(self, cond, z):
        return self.scale * data.to_counts(self.gen(z, cond))


@torch.no_grad()
def sample(gen, cond, generator=None, scale=1.0):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9), times the postprocessing scale.
    Noise is drawn on the CPU from `generator` and moved to the device (a seed gives the same samples anywhere)."""
    return Sampler(gen, scale).run(cond, generator)


def fit_scale(gen_counts, true_counts, lo=0.9, hi=1.1, tol=1e-4):
    """The s in [lo, hi] minimising the channel-sum Wasserstein of s * gen_counts against true_counts, by
    golden-section search (W1(a, s b) is convex in s). Channel sums are linear, so they are computed once."""
    st, sg = metrics.channel_sums(true_counts), metrics.channel_sums(gen_counts)

    def w(s):
        return metrics.wasserstein_1d(st, s * sg).mean()
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    wc, wd = w(c), w(d)
    while b - a > tol:
        if wc <= wd:
            b, d, wd = d, c, wc
            c = b - r * (b - a)
            wc = w(c)
        else:
            a, c, wc = c, d, wd
            d = a + r * (b - a)
            wd = w(d)
    return float((a + b) / 2)


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def generator_fn(gen, device, scale=1.0, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate expects."""
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(gen, cond.to(device), g, scale).float()
    return generate


def postprocess_fit(gen, split, n, dev, seed):
    """Fit the postprocessing scale on the first n training events (their own conditions)."""
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    cond, true = split.cond("train")[:n], split.counts("train")[:n]
    out = torch.cat([sample(gen, c.to(dev), g).cpu() for c in torch.split(cond, 1024)])
    gen.train()
    s = fit_scale(out.numpy(), true)
    before, after = metrics.wasserstein(true, out)[0], metrics.wasserstein(true, s * out)[0]
    print(f"postprocessing scale {s:.4f} (train W on {len(true)} events: {before:.3f} -> {after:.3f})")
    return s


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
        # before --d-norm, D had BatchNorm; before --width, the generator's width was g_width
        args = data.resume_args(args, ck, older=dict(d_norm="batch", width=ck["args"].get("g_width"), arch="cnn"))
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    x_tr, c_tr = split.x("train"), split.cond("train")
    c_va = split.cond("val")[:1000]
    gen, disc = (m.to(dev) for m in build_networks(vars(args)).values())
    steps_per_epoch = max(len(x_tr) // args.batch_size, 1)   # the last incomplete batch is dropped (BatchNorm)
    planned = args.epochs * steps_per_epoch               # the schedules span this; --max-steps stops early
    total = min(planned, args.max_steps or planned)
    opt_g, sched_g = optimizer(gen, args.lr, args.g_betas, args.g_eps, args.g_nesterov, args.g_sched, planned)
    opt_d, sched_d = optimizer(disc, args.d_lr, args.d_betas, args.d_eps, False, args.d_sched, planned)
    scaler = torch.amp.GradScaler(enabled=args.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported())
    noise = torch.Generator(dev).manual_seed(args.seed)
    step, epoch, scale, best = 0, 0, 1.0, None          # best: the best-by-validation generator (data.track_best)
    if ck is not None:
        gen.load_state_dict(ck["weights"]), disc.load_state_dict(ck["disc"])
        opt_g.load_state_dict(ck["opt_g"]), opt_d.load_state_dict(ck["opt_d"]), scaler.load_state_dict(ck["scaler"])
        if "sched_g" in ck:
            sched_g.load_state_dict(ck["sched_g"]), sched_d.load_state_dict(ck["sched_d"])
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        step, epoch, scale, best = ck["step"], ck["epoch"], ck["scale"], ck.get("best")
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    gen_t, disc_t = data.wrap_ddp(gen, dist), data.wrap_ddp(disc, dist)   # training step: this rank's shard, DDP
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (gen, disc))
    print(f"{NAME}: G {n_g:,} + D {n_d:,} parameters, {len(x_tr):,} training responses, {steps_per_epoch} steps "
          f"per epoch, {total} steps in total, device {dev}, {dist.world} process(es)")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), weights=gen.state_dict(),
                                  disc=disc.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                                  sched_g=sched_g.state_dict(), sched_d=sched_d.state_dict(),
                                  scaler=scaler.state_dict(), step=step, epoch=epoch, n_params=n_g, scale=scale, best=best,
                                  rng=dict(noise=noise.get_state(), torch=torch.get_rng_state())), ckpt_path)

    def validate(logs):
        nonlocal best
        gen.eval()
        gen_counts = sample(gen, c_va.to(dev), torch.Generator().manual_seed(0))
        gen.train()
        val_w = metrics.wasserstein(split.counts("val")[:len(c_va)], gen_counts)[0]
        best = data.track_best(best, step, val_w, gen, val_W=val_w)
        m = np.mean(logs, 0) if logs else [None] * 4
        row = dict(step=step, epoch=step / steps_per_epoch, train_loss=m[1], d_loss=m[0], g_loss=m[1], d_real=m[2],
                   d_fake=m[3], val_W=val_w, minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        if logs:
            print(f"step {step:6d}  epoch {row['epoch']:.2f}  D loss {m[0]:.3f}  G loss {m[1]:.3f}  D(real) {m[2]:.3f}  "
                  f"D(fake) {m[3]:.3f}  val W ({len(c_va)} samples) {val_w:.3f}  {row['minutes']:.1f} min")

    t_start = time.time()
    gen.train(), disc.train()
    while step < total:
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches((x_tr, c_tr), args.batch_size, order), total=steps_per_epoch, initial=skip,
                   desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke or not dist.is_main)
        logs = []
        for i, (x, c) in enumerate(bar):
            if i >= steps_per_epoch:
                break
            if i < skip:
                continue
            d_loss, g_loss, d_real, d_fake = gan_losses(gen_t, disc_t, opt_g, opt_d, x.to(dev), c.to(dev), noise,
                                                        scaler, args.amp)   # DDP equals one process exactly
            if not math.isfinite(d_loss + g_loss):
                raise FloatingPointError(f"losses D {d_loss}, G {g_loss} at step {step}: training diverged")
            sched_g.step(), sched_d.step()
            step += 1
            logs.append((d_loss, g_loss, d_real, d_fake))
            bar.set_postfix(D=f"{d_loss:.3f}", G=f"{g_loss:.3f}")
            if step % args.ckpt_every == 0:
                save()
            if (step % args.val_every == 0 or step >= total) and dist.is_main:
                bar.clear()
                validate(logs)
                logs = []
            if step >= total:
                break
        bar.close()
        if step == (epoch + 1) * steps_per_epoch:
            epoch += 1
        save()
    if dist.is_main:
        scale = postprocess_fit(gen, split, args.pp_samples, dev, args.seed)
        if best is not None and "scale" not in best:           # the best generator gets its own scale
            if best["step"] == step:
                best["scale"] = scale
            else:
                other = build_model(vars(args)).to(dev)
                other.load_state_dict(best["weights"])
                best["scale"] = postprocess_fit(other, split, args.pp_samples, dev, args.seed)
            print(f"best validation at step {best['step']}: val W {best['val_W']:.3f} (--sample/--eval/--export use "
                  f"it; --weights last for step {step})")
    save()
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, checkpoint {ckpt_path}")
    data.dist_close(dist)
    return ckpt_path


def load_model(args):
    ck = data.load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", NAME, args.detector)
    dev = data.pick_device(args.device)
    gen = build_model(ck["args"]).to(dev)
    weights, ck["weights_used"] = data.pick_weights(ck, args.weights)
    gen.load_state_dict(weights)
    best = ck.get("best") if weights is not ck["weights"] else None
    ck["scale_used"] = 1.0 if args.no_postprocess else best.get("scale", 1.0) if best else ck["scale"]
    print(f"{NAME}: generator weights: {ck['weights_used']}, postprocessing scale {ck['scale_used']:.4f}")
    return ck, gen.eval(), dev


def sample_cmd(args):
    ck, gen, dev = load_model(args)
    data.sample_to_file(ck, generator_fn(gen, dev, ck["scale_used"], args.amp), args)


def export_cmd(args):
    ck, gen, dev = load_model(args)
    data.export_onnx(Sampler(gen, ck["scale_used"]), ck, args.export, NAME)


def evaluate(args):
    ck, gen, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    scale = ck["scale_used"]
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval_nopp.json" if args.no_postprocess else "eval.json")
    return metrics.run_eval(generator_fn(gen, dev, scale, args.amp), split, path, args,
                            f"{NAME} ({'no pp' if args.no_postprocess else f'pp {scale:.3f}'})",
                            dict(scale=scale, postprocess=not args.no_postprocess, n_params=ck["n_params"],
                                 train_steps=ck["step"], weights=ck["weights_used"]))


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
