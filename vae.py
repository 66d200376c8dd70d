"""Conditional variational autoencoder for the ALICE Zero Degree Calorimeters.

Publication: the master's thesis arXiv 2407.16704 (Sec. 3.1 loss, 4.3 training, 4.4 networks, Table 4.3: VAE
W 11.52 CNN / 11.90 ViT on the real neutron set; Appendix A optimiser), with what its text leaves open from the
authors' code (github.com/m-wojnar/zdc: variational.py, utils/losses.py, architectures/conv.py). Settings,
sources and deviations line by line: docs/fidelity/vae.md.

Method. An encoder q(z | x, c) maps a log1p(counts) image x and the 9 standardised particle features c to the
mean and log-variance of a 10-d Gaussian; a decoder maps (z, c) to the image. Loss (thesis eq. 3.1-3.3, the
reference's kl_weight 0.7) = ||D(z, c) - x||^2 summed over pixels + 0.7 x KL(q(z | x, c) || N(0, I)) summed over
the 10 dimensions, both averaged over the batch. Sampling: z ~ N(0, I), decode with the condition, expm1.
Encoder: 3x3 convs (w, 2w, 2w channels, the last two with stride 2: ZN 44x44 -> 11x11; ZP 56x30 is padded to
56x32 -> 14x8), flatten, concatenate c, dense `--hidden` -> (mu, logvar). Decoder: dense (z, c) -> `--hidden`
-> (2w, H/4, W/4), two nearest x2 upsamplings each followed by a 3x3 conv (w channels), a 3x3 conv to 1
channel, ReLU(. + 0.5) as the reference (exact zeros possible; without the +0.5 a run died at the start: every
output 0, KL 0). LeakyReLU(0.1); no normalisation layers. Optimiser (Table A.1, CNN column): Adam with Nesterov
momentum, lr 1.4e-3, betas 0.76 / 0.88, eps 6.1e-8, no weight decay, constant rate, no clipping.
Options kept from the condition-use study below: `--cond every` (an MLP embedding of c joins each decoder
dense layer), `--enc-cond shared|image` (the encoder sees that embedding, or the decoder's picture D(0, c) as a
second input channel), `--kl-anneal N` (KL weight 70 -> 0.7 over N steps), `--reduction mean` (the old
default: averages the error over the 1,936 pixels, so the KL weighs ~1,355x more and the posterior collapses).
Backbones (`--arch`): cnn, the convolutions above (CPU default); vit, the thesis' ViT pair (Sec. 4.4; the
default under --paper): the image zero-padded to 48x48 (ZP 56x30 to 56x32), 8x8 patches (36 tokens; ZP 28),
linear projection to width 96 + learned positional embedding, the condition projected linearly and prepended as
the first token, 4 pre-LayerNorm blocks (4 heads, MLP 4x with GELU, dropout 0.1), the condition token dropped,
LayerNorm; then a dense 96 -> 64 per token, flatten, dense -> (mu, logvar). Decoder: dense (z, c) -> 36 tokens
of 64, projection to 96 + positional embedding + the condition token, 4 blocks, a transposed convolution
(kernel = stride = 8) to one channel, ReLU(. + 0.5), crop. 1,020,757 parameters (the authors' variational.py with
architectures/vit.py: 1,020,217; ours also gives the decoder the condition token, as the thesis' text says, and
has one 20-output layer for (mu, logvar) where theirs has a ReLU and two 10-output heads).
vdvae, the thesis' CNN pair (Sec. 4.4; the authors' architectures/conv.py), in the same token layout: three
stages of (1x1 conv to w, 2w, 4w channels, two VDVAE-style bottleneck blocks (GELU, 1x1 to a quarter width, two
3x3, 1x1 back, residual), BatchNorm, 2x2 average pooling): ZN 44x44 -> 5x5 tokens of 4w, LeakyReLU(0.1), the
condition joined to every token. Decoder: the condition joined to each of the 6x6 tokens, dense to 4w, three
stages of (1x1 conv, nearest x2 upsampling, two blocks, BatchNorm) to 48x48, an unpadded 5x5 conv to 44x44,
ReLU(. + 0.5). `--paper --arch vdvae`: w = 64 (64 / 128 / 256 channels, 828,117 parameters); CPU w = 16.
Variants (`--variant`, Table 4.3's rows): embedding, a learned 16-d embedding of the particle type (the PDG id,
10th column of the particles file; 22 classes: the toy's 21 types and "other") joined to the condition wherever
the VAE reads it (a clear error when the data has 9 columns); supervised, the supervised autoencoder (thesis eq.
3.5): E(x) predicts the 9 features (no condition in the encoder), loss = reconstruction + --beta x ||E(x) - c||^2
summed over the features (no KL), generation decodes the particle's own features: deterministic, one response
per particle (the thesis' equation has no noise; the authors' supervised.py feeds 36 x 4 Gaussian tokens to the
decoder, which this does not).

Usage:
    python vae.py --train                        # ZN, CPU default (2 epochs, ~8 min on 2 cores), runs/vae
    python vae.py --train --detector proton --out runs/vae_proton
    python vae.py --train --paper                # thesis batch 256, 100 epochs, the ViT (1.02M parameters)
    python vae.py --train --arch vit             # the ViT at the CPU default schedule
    python vae.py --train --variant embedding    # or supervised: Table 4.3's other rows (either --arch)
    python vae.py --sample --ckpt runs/vae/ckpt.pt --n 1000 --out samples.npz
    python vae.py --export vae.onnx --ckpt runs/vae/ckpt.pt   # the sampler as one ONNX graph
    python vae.py --eval --ckpt runs/vae/ckpt.pt [--plot]
    python vae.py --train --smoke                # seconds: tiny data, tiny model
Logged every --val-every steps: train loss (reconstruction + kl x KL), train KL, val loss / val rec / val KL
(posterior means; KL near 0 = posterior collapse), val_active (latent dimensions whose mean KL exceeds 0.01
nats), val_W (Wasserstein of 1000 generated samples) and rec_W (encode -> decode of the same 1000 responses:
the best the decoder can do). --eval also stores reconstruction_W in eval.json.

Deviations: `--arch cnn` is this repository's conv pair, not the thesis' CNN (that is `--arch vdvae`); `--paper
--arch cnn` builds it at the same size class (width 16, hidden 128, 1.02M). The optimiser follows the backbone:
Table A.1's CNN column for `--arch cnn` and `vdvae` (NAdam, constant rate), its ViT
column for `--arch vit` (AdamW lr 3.5e-3, betas 0.64 / 0.73, eps 1.5e-7, weight decay 0.068, one-cycle cosine:
initial div 35, final div 770, warm-up 32 % of --epochs' steps). CPU default: the CNN, width 8, hidden 64 (0.26M), batch 128, 2 epochs instead of
256 and 100; the ViT took 4.2x longer per training step on 2 cores (0.41 s vs 0.10 s at batch 128; 0.43 vs 0.19
ms per sample at batch 256; `OMP_NUM_THREADS=2 python tools/time_arch.py`), so it stays the --paper backbone.

Measured (ZN, `--eval --max-test 2000`): random split 21.9x the floor, condition-disjoint 23.9x (lookup 9.4x), 39-43 %
empty responses: prior samples fall between the codes the decoder was trained on (results/vae_neutron_*.json);
3x the budget 21.2x. Details and history (the condition-use study, the runs): docs/models/vae.md.
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

NAME = "vae"
LATENT = 10
# Optimiser of the thesis' CNN autoencoders (Table A.1; the reference code's conv.py has the same numbers):
# Adam with Nesterov momentum (optax.adam(nesterov=True), Dozat's NAdam), no weight decay, constant rate.
BETAS, EPS = (0.76, 0.88), 6.1e-8
# ...and of its ViT autoencoders (Table A.1, ViT column): AdamW, lr 3.5e-3, one-cycle cosine schedule (initial div
# 35, final div 770, warm-up 32 % of the steps), used whenever --arch vit
VIT_OPT = dict(betas=(0.64, 0.73), eps=1.5e-7, weight_decay=0.068)
VIT_CYCLE = dict(warmup=0.32, div=35.0, final_div=770.0)
DEFAULTS = dict(epochs=2, batch_size=128, lr=1.4e-3)   # CPU default: ~8 minutes on 2 cores (ZN, CNN)
PAPER = dict(epochs=100, batch_size=256, lr=1.4e-3)    # Table 4.2 and A.1
# sizes per backbone: (CPU default, --paper). --paper builds the thesis' ViT (Sec. 4.4: 4 blocks, 4 heads, token
# width 96, per-token dense 64); --paper --arch cnn the conv pair at the same size class (width 16, hidden 128)
ARCH = {"cnn": (dict(width=8, hidden=64), dict(width=16, hidden=128)),
        "vdvae": (dict(width=16, hidden=64), dict(width=64, hidden=64)),     # the thesis' CNN: 64 / 128 / 256 channels
        "vit": (dict(width=96, hidden=64, blocks=4, lr=3.5e-3), dict(width=96, hidden=64, blocks=4, lr=3.5e-3))}
TYPE_DIM = 16    # --variant embedding: width of the learned particle-type embedding (the authors' embedding.py)
PUBLISHED = {"vae": (1_020_217, "thesis Sec. 4.4 'approximately one million'; 1,020,217 is our count of the "
                                "authors' ViT VAE (m-wojnar/zdc variational.py + architectures/vit.py)")}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("VAE")
    g.add_argument("--arch", default=None, choices=["cnn", "vdvae", "vit"],
                   help="backbone: cnn (this repository's compact conv pair, CPU default), vdvae (the thesis' CNN pair, "
                        "VDVAE-style bottleneck blocks) or vit (the thesis' ViT pair; the default under --paper)")
    g.add_argument("--variant", default="vae", choices=["vae", "embedding", "supervised"],
                   help="vae; embedding (VAE + a learned embedding of the particle type, the PDG id of the 10th "
                        "particles column, joined to the condition); supervised (autoencoder whose latent is the "
                        "predicted particle features, thesis eq. 3.5; deterministic)")
    g.add_argument("--width", type=int, default=None, help="cnn: conv channels w (encoder w, 2w, 2w; decoder w), CPU 8, "
                   "paper 16; vdvae: stage channels w, 2w, 4w, CPU 16, paper 64; vit: token width (96)")
    g.add_argument("--hidden", type=int, default=None, help="cnn: dense layer width, CPU 64, paper 128; vit: the "
                   "per-token width at the latent (64)")
    g.add_argument("--blocks", type=int, default=None, help="vit: transformer blocks in encoder and decoder (4)")
    g.add_argument("--beta", type=float, default=200.0, help="--variant supervised: weight of ||E(x) - c||^2 summed over "
                   "the 9 features (the authors' weight 1 on means is 1936 / 9 = 215 on sums)")
    g.add_argument("--kl", type=float, default=0.7, help="weight of the KL term (published: 0.7)")
    g.add_argument("--reduction", default="sum", choices=["sum", "mean"],
                   help="reconstruction error over pixels: sum (published, default) or mean (deviation: the "
                        "posterior collapses)")
    g.add_argument("--cond", default="input", choices=["input", "every"],
                   help="how the decoder sees the condition: input (concatenated once with z, as the reference code; "
                        "default) or every (an MLP embedding of it joins each of its dense layers)")
    g.add_argument("--enc-cond", default="dense", choices=["dense", "shared", "image"],
                   help="how the encoder sees the condition: dense (concatenated at its dense layer), shared (the "
                        "decoder's condition embedding at each of its dense layers; needs --cond every) or image "
                        "(also the decoder's picture of the condition alone, D(0, c), as a second input channel)")
    g.add_argument("--kl-anneal", type=int, default=0,
                   help="steps over which the KL weight falls geometrically from 100 x --kl to --kl (0: constant)")
    g.add_argument("--val-every", type=int, default=500, help="validate (losses, KL, Wasserstein) every N steps")
    g.add_argument("--paper", action="store_true", help="published batch, epochs, optimiser and ~1M size")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if args.enc_cond == "shared" and args.cond != "every":
        p.error("--enc-cond shared uses the decoder's condition embedding: it needs --cond every")
    if not args.kl >= 0 or args.val_every <= 0 or args.kl_anneal < 0:
        p.error("--kl and --kl-anneal must be >= 0 and --val-every positive")
    for k in ("width", "hidden", "blocks"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k} must be positive (got {getattr(args, k)})")
    args.arch = args.arch or ("vit" if args.paper else "cnn")   # explicit > --paper > CPU default
    if (args.arch != "cnn" or args.variant != "vae") and (args.cond, args.enc_cond) != ("input", "dense"):
        p.error("--cond every and --enc-cond are options of the CNN VAE (--arch cnn --variant vae)")
    if not args.beta >= 0:
        p.error("--beta must be >= 0")
    sizes, paper_sizes = ARCH[args.arch]
    for k, v in {**DEFAULTS, **sizes, **(PAPER if args.paper else {}), **(paper_sizes if args.paper else {})}.items():
        if getattr(args, k) is None:   # flags given on the command line win
            setattr(args, k, v)
    if args.arch == "vit" and args.width % 4:
        p.error(f"--width {args.width}: the ViT's 4 attention heads need a multiple of 4")
    if args.smoke:
        args.limit, args.batch_size = args.limit or 1500, 32
        args.width, args.hidden, args.blocks = (16, 8, 1) if args.arch == "vit" else (4, 16, args.blocks)
        args.width = 8 if args.arch == "vdvae" else args.width
        args.max_steps = args.max_steps or 6
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def conv(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, padding=1), nn.LeakyReLU(0.1))


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


class VAE(nn.Module):
    """Encoder q(z | x, c) and decoder D(z, c) on either backbone. variant "embedding": c is joined by a learned
    embedding of the particle type (cond carries the type index as a 10th column); "supervised": the latent is
    the predicted features E(x) (9-d, no condition in the encoder, no noise) and the decoder reads only it."""

    def __init__(self, shape, width=8, hidden=64, n_cond=9, latent=LATENT, cond="input", enc_cond="dense", offset=0.5,
                 arch="cnn", variant="vae", blocks=4):
        super().__init__()
        self.shape, self.w, self.cond, self.enc_cond, self.offset = tuple(shape), width, cond, enc_cond, offset
        self.arch, self.supervised = arch, variant == "supervised"
        self.latent = 0 if self.supervised else latent                    # the noise a sample draws
        self.type_embed = nn.Embedding(len(data.PARTICLES) + 1, TYPE_DIM) if variant == "embedding" else None
        c_dim = n_cond + (TYPE_DIM if variant == "embedding" else 0)
        enc_c, enc_out = (0, n_cond) if self.supervised else (c_dim, 2 * latent)
        if arch in ("vit", "vdvae"):      # tokens: the encoder's, a dense per token, flattened; the decoder's
            vit = arch == "vit"
            (eh, ew), (gh, gw) = (vit_grid(shape),) * 2 if vit else conv_grids(shape)
            self.enc = ViTEncoder(shape, width, blocks, enc_c) if vit else ConvEncoder(width, enc_c)
            d_tok = width if vit else 4 * width + enc_c
            self.enc_head = nn.Sequential(nn.Linear(d_tok, hidden), nn.Flatten(), nn.Linear(eh * ew * hidden, enc_out))
            self.dec_head = nn.Sequential(nn.Linear(self.latent + c_dim, gh * gw * hidden),
                                          nn.Unflatten(1, (gh * gw, hidden)))
            self.dec = (ViTDecoder(shape, hidden, width, blocks, c_dim, offset) if vit
                        else ConvDecoder(shape, hidden, width, c_dim, offset))
            return
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        flat = 2 * width * self.h0 * self.w0
        e = hidden if cond == "every" else 0       # width of the condition embedding joining each decoder dense layer
        ce = e if enc_cond == "shared" else 0      # the same embedding at each encoder dense layer
        self.enc = nn.Sequential(conv(1 + (enc_cond == "image"), width), conv(width, 2 * width, 2),
                                 conv(2 * width, 2 * width, 2), nn.Flatten())
        self.enc_head = nn.Sequential(nn.Linear(flat + (ce or enc_c), hidden), nn.LeakyReLU(0.1),
                                      nn.Linear(hidden + ce, enc_out))
        if e:
            self.embed = nn.Sequential(nn.Linear(n_cond, e), nn.LeakyReLU(0.1), nn.Linear(e, e), nn.LeakyReLU(0.1))
        self.dec_head = nn.Sequential(nn.Linear(self.latent + (e or c_dim), hidden), nn.LeakyReLU(0.1),
                                      nn.Linear(hidden + e, flat), nn.LeakyReLU(0.1))
        self.dec = nn.Sequential(nn.Upsample(scale_factor=2), conv(2 * width, width), nn.Upsample(scale_factor=2),
                                 conv(width, width), nn.Conv2d(width, 1, 3, padding=1))

    def condition(self, cond):
        """The condition the networks read: the 9 features, joined by the type embedding (--variant embedding)."""
        if self.type_embed is None:
            return cond
        return torch.cat([cond[:, :9], self.type_embed(cond[:, 9].long())], 1)

    def encode(self, x, cond):
        """(mu, logvar), each (n, latent), of q(z | x, c); the supervised autoencoder: (E(x) (n, 9), None)."""
        H, W = self.shape
        c = self.condition(cond)
        if self.arch in ("vit", "vdvae"):
            out = self.enc_head(self.enc(x, None if self.supervised else c))
        else:
            if self.enc_cond == "image":        # what the decoder draws from the condition alone, as a fixed input
                with torch.no_grad():
                    x = torch.cat([x, self.decode(torch.zeros(len(x), self.latent, device=x.device), cond)], 1)
            h = self.enc(F.pad(x, (0, -W % 4, 0, -H % 4)))
            if self.enc_cond == "shared":
                e = self.embed(c)
                h = self.enc_head[1](self.enc_head[0](torch.cat([h, e], 1)))
                out = self.enc_head[2](torch.cat([h, e], 1))
            else:
                out = self.enc_head(h if self.supervised else torch.cat([h, c], 1))
        if self.supervised:
            return out, None
        mu, logvar = out.chunk(2, 1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z, cond):
        """log1p(counts) images (n, 1, H, W) >= 0."""
        c = self.condition(cond)
        if self.arch in ("vit", "vdvae"):
            return self.dec(self.dec_head(torch.cat([z, c], 1)), c)
        if self.cond == "every":
            e = self.embed(c)
            h = self.dec_head[1](self.dec_head[0](torch.cat([z, e], 1)))
            h = self.dec_head[3](self.dec_head[2](torch.cat([h, e], 1)))
        else:
            h = self.dec_head(torch.cat([z, c], 1))
        h = h.view(-1, 2 * self.w, self.h0, self.w0)
        return F.relu(self.dec(h) + self.offset)[..., :self.shape[0], :self.shape[1]]   # +0.5 as the reference

    def code(self, mu, cond):
        """The decoder's (z, c) for a posterior mean: the supervised autoencoder decodes its predicted features."""
        return (mu[:, :0], mu) if self.supervised else (mu, cond)


def build_model(cfg):
    """The network described by a checkpoint's args (checkpoints from before --cond: input conditioning, no
    output offset; from before --arch: the CNN VAE)."""
    return VAE(data.SHAPES[cfg["detector"]], cfg["width"], cfg["hidden"], cond=cfg.get("cond", "input"),
               enc_cond=cfg.get("enc_cond", "dense"), offset=0.5 if "cond" in cfg else 0.0,
               arch=cfg.get("arch", "cnn"), variant=cfg.get("variant", "vae"), blocks=cfg.get("blocks") or 4)


def build_networks(cfg):
    """Every trained network by name: the VAE is one module (encoder and decoder)."""
    return {"vae": build_model(cfg)}


# ----------------------------------------------------------------------------------------------------------
# Method: loss and sampler
# ----------------------------------------------------------------------------------------------------------
def vae_loss(model, x, cond, generator, kl_weight, reduction="sum"):
    """(loss, reconstruction, KL per latent dimension (latent,)) of a batch: the squared error summed over pixels
    (thesis eq. 3.3; reduction="mean" averages it instead), the KL to N(0, I) summed over latent dimensions, both
    averaged over the batch. generator=None: z = posterior mean. The supervised autoencoder (eq. 3.5): the
    reconstruction D(E(x)) + kl_weight (there: --beta) x ||E(x) - c||^2, its third output per feature (9,)."""
    mu, logvar = model.encode(x, cond)
    if model.supervised:
        z, reg = model.code(mu, cond), (mu - cond).pow(2).mean(0)
    else:
        z = mu if generator is None else mu + data.noise(mu.shape, generator, x.device) * (0.5 * logvar).exp()
        z, reg = (z, cond), 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)
    err = (model.decode(*z) - x).pow(2).flatten(1)
    rec = (err.mean(1) if reduction == "mean" else err.sum(1)).mean()
    return rec + kl_weight * reg.sum(), rec, reg


def one_cycle(step, total, warmup, div, final_div):
    """LR factor of the cosine one-cycle schedule (optax.cosine_onecycle_schedule, torch's OneCycleLR): cosine
    from 1/div up to 1 over the first `warmup` fraction of `total` steps, then cosine down to 1/(div*final_div)."""
    w = warmup * total
    if step < w:
        t, start, end = step / w, 1 / div, 1.0
    else:
        t, start, end = min((step - w) / max(total - w, 1), 1.0), 1.0, 1 / (div * final_div)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): counts from cond (n, 9) and z (n, LATENT)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def noise_shapes(self, n):
        return {"z": (n, self.model.latent)}            # the supervised autoencoder: (n, 0), D(c) is deterministic

    def cond_columns(self):                             # --variant embedding: the type index is a 10th column
        return 9 + (self.model.type_embed is not None)

    def example_cond(self, n, generator):
        cond = torch.randn(n, 9, generator=generator)
        if self.model.type_embed is None:
            return cond
        types = torch.randint(0, self.model.type_embed.num_embeddings, (n, 1), generator=generator)
        return torch.cat([cond, types.float()], 1)

    def forward(self, cond, z):
        return data.to_counts(self.model.decode(z, cond))


@torch.no_grad()
def sample(model, cond, generator=None):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9; --variant embedding: n, 10 with the
    type index last). Noise is drawn on the CPU from `generator` and moved to the model's device, so a seed gives
    the same samples on any device. The supervised autoencoder draws no noise: D(c) is deterministic."""
    return Sampler(model).run(cond, generator)


@torch.no_grad()
def reconstruct(model, x, cond):
    """Encode -> decode (posterior mean) of log1p images: raw counts (n, H, W)."""
    return data.to_counts(model.decode(*model.code(model.encode(x, cond)[0], cond)))


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def generator_fn(model, device, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate expects."""
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(model, cond.to(device), g).float()
    generate.typed = model.type_embed is not None      # metrics / data pass the particle type as a 10th column
    return generate


def kl_weight(args, step=None):
    """The KL weight at a step: --kl, or with --kl-anneal N falling geometrically from 100 x --kl to --kl (step
    None: the final weight); the supervised autoencoder's --beta."""
    if getattr(args, "variant", "vae") == "supervised":
        return args.beta
    return args.kl * 100 ** max(0.0, 1 - step / args.kl_anneal) if args.kl_anneal and step is not None else args.kl


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
        args = data.resume_args(args, ck, older=dict(arch="cnn"))
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    typed = args.variant == "embedding"                                   # the type index as a 10th column
    x_tr, c_tr = split.x("train"), split.cond("train", typed)
    x_va, c_va = split.x("val")[:2000], split.cond("val", typed)[:2000]
    model = build_model(vars(args)).to(dev)
    # Adam with Nesterov momentum: torch's NAdam with its momentum schedule switched off (momentum_decay -> inf
    # keeps mu_t = beta1) is optax.adam(nesterov=True) of the reference code, step for step (a test checks it)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    planned = args.epochs * steps_per_epoch               # --max-steps stops early; the ViT's schedule spans --epochs
    if args.arch == "vit":                                # Table A.1's ViT column
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, **VIT_OPT)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: one_cycle(s, planned, **VIT_CYCLE))
    else:
        opt = torch.optim.NAdam(model.parameters(), lr=args.lr, betas=BETAS, eps=EPS, momentum_decay=1e9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)                 # constant rate
    total = min(planned, args.max_steps or planned)
    scaler = torch.amp.GradScaler(enabled=args.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported())
    noise = torch.Generator(dev).manual_seed(args.seed)
    step, epoch = 0, 0
    if ck is not None:
        model.load_state_dict(ck["weights"]), opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        if "sched" in ck:                                 # checkpoints from before the ViT column: no schedule
            sched.load_state_dict(ck["sched"])
        elif args.arch == "vit":
            raise data.DataError(f"{ckpt_path}: a ViT checkpoint from before the ViT optimiser (Table A.1) was wired "
                                 "in; it cannot resume with the one-cycle schedule: start a new --out")
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        step, epoch = ck["step"], ck["epoch"]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    net = data.wrap_ddp(model, dist)      # the training step's VAE: this rank's shard of each global batch, DDP
    n_par = sum(p.numel() for p in model.parameters())
    print(f"{NAME}: {n_par:,} parameters, {len(x_tr):,} training responses, {steps_per_epoch} steps per epoch, "
          f"{total} steps in total, device {dev}")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), weights=model.state_dict(),
                                  opt=opt.state_dict(), sched=sched.state_dict(), scaler=scaler.state_dict(),
                                  step=step, epoch=epoch, n_params=n_par,
                                  rng=dict(noise=noise.get_state(), torch=torch.get_rng_state())), ckpt_path)

    def validate(losses, kls):
        model.eval()
        with torch.no_grad():
            parts = [vae_loss(model, x.to(dev), c.to(dev), None, kl_weight(args), args.reduction)
                     for x, c in data.batches((x_va, c_va), 500, shuffle=False)]
            val, rec = (float(np.mean([p[i].item() for p in parts])) for i in (0, 1))
            kl_dim = torch.stack([p[2] for p in parts]).mean(0)
            k = min(1000, len(x_va))
            gen = sample(model, c_va[:k].to(dev), torch.Generator().manual_seed(0))
            recon = reconstruct(model, x_va[:k].to(dev), c_va[:k].to(dev))
            true = split.counts("val")[:k]
            val_w, rec_w = metrics.wasserstein(true, gen)[0], metrics.wasserstein(true, recon)[0]
        model.train()
        row = dict(step=step, epoch=step / steps_per_epoch, train_loss=float(np.mean(losses)) if losses else None,
                   train_kl=float(np.mean(kls)) if kls else None, val_loss=val, val_rec=rec, val_kl=float(kl_dim.sum()),
                   val_active=int((kl_dim > 0.01).sum()), val_W=val_w, rec_W=rec_w, minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        # the supervised autoencoder's second term is the feature regression ||E(x) - c||^2 (logged under *_kl)
        reg, active = ("feat", "") if model.supervised else ("KL", f", {row['val_active']}/{LATENT} active")
        print(f"step {step:6d}  epoch {row['epoch']:.2f}  train loss {row['train_loss'] or float('nan'):.4f}  "
              f"{reg} {row['train_kl'] or float('nan'):.4f}  val loss {val:.4f} (rec {rec:.4f}, {reg} {row['val_kl']:.4f}"
              f"{active})  val W {val_w:.3f}  rec W {rec_w:.3f}  {row['minutes']:.1f} min")

    t_start = time.time()
    while step < total:
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches((x_tr, c_tr), args.batch_size, order, start=skip), total=steps_per_epoch,
                   initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke or not dist.is_main)
        losses, kls = [], []
        for x, c in bar:
            x, c = x.to(dev), c.to(dev)
            with data.autocast(dev, args.amp):
                loss, _, kl = vae_loss(net, x, c, noise, kl_weight(args, step), args.reduction)   # DDP = 1 process exactly
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt), scaler.update(), sched.step()
            step += 1
            losses.append(loss.item()), kls.append(kl.sum().item())
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kls[-1]:.3f}")
            if step % args.ckpt_every == 0:
                save()
            if (step % args.val_every == 0 or step >= total) and dist.is_main:
                bar.clear()
                validate(losses, kls)
                losses, kls = [], []
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
    model = build_model(ck["args"]).to(dev)
    model.load_state_dict(ck["weights"])
    return ck, model.eval(), dev


def sample_cmd(args):
    ck, model, dev = load_model(args)
    data.sample_to_file(ck, generator_fn(model, dev, args.amp), args)


def export_cmd(args):
    ck, model, dev = load_model(args)
    data.export_onnx(Sampler(model), ck, args.export, NAME)


def evaluate(args):
    ck, model, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    idx, true, cond = metrics.test_part(split, args.max_test or None, typed=ck["args"].get("variant") == "embedding")
    rec = torch.cat([reconstruct(model, x.to(dev), c.to(dev)).cpu()        # encode -> decode the test responses
                     for x, c in zip(torch.split(data.to_log(true), 1024), torch.split(cond, 1024))])
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    kind = [k for k in (ck["args"].get("variant", "vae"), ck["args"].get("arch") or "cnn") if k not in ("vae", "cnn")]
    name = f"{NAME} ({', '.join(kind)})" if kind else NAME      # the Table 4.3 rows keep their names in RESULTS.md
    return metrics.run_eval(generator_fn(model, dev, args.amp), split, path, args, name,
                            dict(reconstruction_W=rec_w, n_params=ck["n_params"], train_steps=ck["step"]))


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
