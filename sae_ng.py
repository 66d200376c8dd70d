"""End-to-end Sinkhorn autoencoder with a noise generator for the ALICE Zero Degree Calorimeters.

Papers: the thesis arXiv 2407.16704 (Sec. 3.3 eq. 3.6 and 3.7, Sec. 4.4, Table 4.3, Table A.1), after Deja et
al.'s e2e Sinkhorn autoencoder (IEEE Access 9, 2021); where the thesis is silent, the authors' code
(github.com/m-wojnar/zdc, zdc/models/autoencoder/sinkhorn.py, noise_generator_mse.py). Published: W 11.34
(Sinkhorn) and 11.19 (l2, the thesis' best autoencoder) on the real neutron set with the ViT pair; 26.53 / 37.56
with its CNN. docs/fidelity/sae_ng.md lists every setting with its source.

Method (eq. 3.6 without the regularisation term, as the thesis does). An unregularised autoencoder: encoder
E(x) -> 20-d code (ReLU, >= 0), decoder D(code) -> log1p(counts) image (ReLU output: exact zeros); a noise
generator NG(z, c) maps 10-d Gaussian noise and the 9 standardised particle features to the code space. Loss =
reconstruction (squared error on log1p(counts), summed over pixels, mean over the batch) + `--beta` (20) x S,
the debiased Sinkhorn divergence between the batch's clouds {(E(x_i), c_i)} and {(NG(z_i, c_i), c_i)} (29-d:
raw codes beside the conditions). End to end: S trains the encoder as well as NG (eq. 3.6 writes
L_S(theta, psi), theta the encoder's). Sampling: z ~ N(0, I) -> NG(z, c) -> D -> expm1. `--matching l2` is
eq. 3.7: `--l2-weight` (10) x ||E(x) - NG(z, c)||^2 (summed over the code, mean over the batch), also end to end.
The same conditions stand on both sides, so the plan pairs points of equal or nearby particles: in a batch of
256 toy ZN events 10 % of the conditions have an exact duplicate and the median distance to the nearest other
one is 0.75; codes that spread less than that are paired i with i and S = mean ||E(x_i) - NG(z_i, c_i)||^2 / 2.

Sinkhorn (`sinkhorn_divergence`, as the authors' code): uniform weights, cost |x - y|^2 / 2, the potentials of
OT(P, Q), OT(P, P), OT(Q, Q) by symmetric log-domain updates (old and new potential averaged) under
eps-scaling WITHIN every call (`eps_schedule`): eps = diameter^2, then x scaling^2 per update down to blur^2
(--diameter 1e-2, --blur 1e-5, --scaling 0.95: eps 1e-4 -> 1e-10, 137 updates); then S = <a, f_PQ - f_PP> +
<b, g_QP - g_QQ>, each potential one last softmin at blur^2, differentiated through the cost only (the gradient
is the transport plan's). Known answers: 0 for identical clouds, |d|^2 / 2 for a reordered copy shifted by d.
Numerics: at eps 1e-10 the softmin is a hard minimum (C / eps ~ 1e10), exact through logsumexp; float32 keeps
the potentials to ~1e-6, so the solver runs in float32 under autocast. The thesis names neither eps nor the
schedule (these are the authors' values). Starting at eps 1e-4, the updates are hard from the start: on clouds
of spread 0.1 shifted by 0.6 the 137 updates stop short (S 0.147, exact 0.195); at spreads >= 1 they are exact.
CPU default --scaling 0.5 (12 updates, each call ~11x cheaper; on random 29-d pairs S agreed with 0.95's to 1e-4).

Stage 2 (ours, optional: `--ng-steps N`, default 0): then N steps of the noise generator alone on the frozen
encoder's codes of the training set (same matching term; `--ng-batch`, Adam at `--ng-lr`, cosine decay);
`--resume --ng-steps N` adds it to a finished run. Not yet measured on top of the end-to-end run (CPU budget).

`--arch vdvae`: the thesis' CNN pair (Sec. 4.4; vae.py's docstring) in the ViT's places: encoder 5x5 tokens of 4w,
flattened, dense to 20, ReLU; decoder dense 20 -> 6x6 tokens of 64, the CNN decoder; `--paper --arch vdvae`: w = 64,
E 451,508, D 455,585, Table A.1's CNN optimiser column.
Encoder: 3x3 convs (w, 2w, 2w channels, the last two with stride 2: ZN 44x44 -> 11x11; ZP padded to 56x32 ->
14x8), dense `--hidden` -> 20, ReLU. Decoder: dense 20 -> `--hidden` -> (2w, H/4, W/4), two nearest x2
upsamplings each followed by a 3x3 conv (w channels), a 3x3 conv to 1 channel, ReLU (straight-through gradient
with --matching l2: 'Measured, l2', and with the ViT), crop; LeakyReLU(0.1).
Noise generator as the authors' (h = --ng-hidden): z -> 2h, c -> h, concatenated -> 4h -> 4h -> 20,
LeakyReLU(0.2); ours: a straight-through gradient on its output ReLU (a plain one left dead dimensions before).

Usage:
    python sae_ng.py --train                       # ZN, CPU default (end to end, 15 min on 2 cores)
    python sae_ng.py --train --matching l2         # eq. 3.7 (mean showers, 64 % empty: 'Measured, l2' below)
    python sae_ng.py --train --detector proton --out runs/sae_ng_proton
    python sae_ng.py --train --paper               # the thesis' setting and ViT, 100 epochs: a GPU job
    python sae_ng.py --train --arch vit            # the ViT pair at the CPU default schedule
    python sae_ng.py --train --resume --ng-steps 20000   # add stage 2 to a finished run
    python sae_ng.py --sample --ckpt runs/sae_ng/ckpt.pt --n 1000 --out samples.npz
    python sae_ng.py --export sae_ng.onnx --ckpt runs/sae_ng/ckpt.pt   # the sampler as one ONNX graph
    python sae_ng.py --eval --ckpt runs/sae_ng/ckpt.pt [--plot]
    python sae_ng.py --train --smoke               # seconds: tiny data, tiny model
Logged every --val-every steps: train loss, train match (S or the l2 distance), val rec / val match (500
validation events), code_std / ng_std (mean per-dimension std of the encoder's / NG's codes: a code shrinking
to a point shows here), val_W (1000 generated samples) and rec_W (encode -> decode of the same 1000: the best
the decoder can do). --eval adds the reconstruction W (eval.json: reconstruction_W).

Measured, l2 (results/sae_ng_l2_neutron_random.json): W 32.19 +- 0.15, 15.6x the floor, 64 % empty (data: 0),
AUC 1.00 (NG ignores z: one mean shower per particle); with a plain output ReLU the decoder's output died (0 at
every pixel) and the codes collapsed to a point, hence its straight-through output. History: docs/models/sae_ng.md.

--paper: 100 epochs, batch 256 (Table 4.2); AdamW lr 3.5e-3, betas (0.64, 0.73), eps 1.5e-7, weight decay
0.068, one-cycle cosine (warm-up 32 %, div 35, final div 770; Table A.1, ViT column); beta 20 and eps
1e-2 -> 1e-5 at 0.95 (authors' code); no clipping; the thesis' ViT pair (`--arch vit`, Sec. 4.4: 8x8 patches of
the image padded to 48x48, 36 tokens of width 96, 4 pre-LayerNorm blocks of 4 heads, MLP 4x GELU, dropout 0.1;
no condition token: E(x) is unconditional): encoder = ViT encoder, flatten, dense to 20, ReLU (526,388);
decoder = dense 20 -> 36 tokens of 64, ViT decoder, transposed conv 8x8 stride 8, ReLU(. + 0.5) (511,585); NG
128 (474,132): 1,512,105 in all, layer for layer the authors' noise_generator_mse.py ("approximately one
million" per autoencoder, Sec. 4.4). ZP 56x30 is padded to 56x32 (7x4 tokens). `--paper --arch cnn`: the conv
pair, width 16, hidden 64, NG 128 (997,465). CPU default: the CNN, 4 epochs, AdamW 1e-3, default betas, no
weight decay, one-cycle 5 % / 100 / 100, gradient norm clipped at 10, --scaling 0.5, width 8, hidden 64, NG 32
(290,369); the ViT took 5.3x longer per training step on 2 cores (0.91 s vs 0.17 s at batch 256;
`tools/time_arch.py`). Deviation: `--arch cnn` is this repository's conv pair, not the thesis' VDVAE-style CNN.
Measured (ZN toy, first 2,000 test events, 5 repetitions; results/sae_ng_neutron_*.json): random split W
27.38 +- 0.07, 13.3x the floor, 54 % empty, reconstruction W 7.38 (`python sae_ng.py --train`, 14.8 min);
condition-disjoint 31.29 +- 0.03, 18.6x, 58 % empty. Only --matching l2 uses the straight-through output: it made
this run worse (32.99, results/variants/sae_ng_straight_through_neutron_*.json), though at 3x the epochs the plain
output ReLU died (every pixel 0): the default is fragile.
Measured, ViT (the CPU-default recipe; results/sae_ng*_vit_neutron_random.json): Sinkhorn W 46.24 +- 0.07, 22.4x;
l2 34.93 +- 0.02, 16.9x (in 3,064 steps the ViT autoencoder does not yet reconstruct). Plain ReLUs on its code and
output died within 25 steps (every code and pixel 0), so the ViT uses straight-through ReLUs on both.
Details and history of these runs: docs/models/sae_ng.md.
"""
import argparse
import functools
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

NAME = "sae_ng"
CODE, NOISE = 20, 10
DEFAULTS = dict(epochs=4, batch_size=256, lr=1e-3, betas=[0.9, 0.999], adam_eps=1e-8, weight_decay=0.0,
                onecycle=[0.05, 100.0, 100.0], clip=10.0, scaling=0.5, ng_hidden=32, ng_steps=0, nesterov=False)   # CPU, ZN: MINUTES
PAPER = dict(epochs=100, batch_size=256, lr=3.5e-3, betas=[0.64, 0.73], adam_eps=1.5e-7, weight_decay=0.068,
             onecycle=[0.32, 35.0, 770.0], clip=0.0, scaling=0.95, ng_hidden=128, ng_steps=0)
# sizes per backbone: (CPU default, --paper). --paper builds the thesis' ViT pair (Sec. 4.4: 4 blocks, 4 heads,
# token width 96; the decoder's input 36 tokens of 64); --paper --arch cnn the conv pair (width 16, hidden 64)
# (Table A.1 tunes the optimiser per backbone: --paper --arch cnn takes its CNN column, Adam with Nesterov momentum
# at a constant rate; --paper alone the ViT column in PAPER)
ARCH = {"cnn": (dict(width=8, hidden=64), dict(width=16, hidden=64, lr=1.4e-3, betas=[0.76, 0.88], adam_eps=6.1e-8,
                                               weight_decay=0.0, onecycle=[0.0, 1.0, 1.0], nesterov=True)),
        "vdvae": (dict(width=16, hidden=64), dict(width=64, hidden=64, lr=1.4e-3, betas=[0.76, 0.88], adam_eps=6.1e-8,
                                                  weight_decay=0.0, onecycle=[0.0, 1.0, 1.0], nesterov=True)),
        "vit": (dict(width=96, hidden=64, blocks=4), dict(width=96, hidden=64, blocks=4))}
# the thesis gives "approximately one million parameters" per model (Section 4.4); these are our counts of the
# authors' ViT autoencoder with noise generator (m-wojnar/zdc noise_generator_mse.py + architectures/vit.py)
_SRC = "our count of the authors' ViT AE + NG (m-wojnar/zdc noise_generator_mse.py, architectures/vit.py)"
PUBLISHED = {"encoder": (526_388, _SRC), "decoder": (511_585, _SRC), "noise_generator": (474_132, _SRC)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("Sinkhorn autoencoder with noise generator (unset: DEFAULTS, or PAPER with --paper)")
    g.add_argument("--arch", default=None, choices=["cnn", "vdvae", "vit"],
                   help="backbone: cnn (this repository's compact conv pair, CPU default), vdvae (the thesis' CNN pair, "
                        "VDVAE-style bottleneck blocks) or vit (the thesis' ViT pair; the default under --paper)")
    g.add_argument("--width", type=int, default=None, help="cnn: conv channels w (encoder w, 2w, 2w; decoder w); "
                   "vit: token width (96)")
    g.add_argument("--hidden", type=int, default=None, help="cnn: dense layer width of encoder and decoder; vit: "
                   "token width of the decoder's input (64)")
    g.add_argument("--blocks", type=int, default=None, help="vit: transformer blocks in encoder and decoder (4)")
    g.add_argument("--ng-hidden", type=int, default=None, help="noise generator width h (layers 2h|h, 4h, 4h)")
    g.add_argument("--matching", default="sinkhorn", choices=["sinkhorn", "l2"],
                   help="code matching term: debiased Sinkhorn divergence (eq. 3.6) or l2 ||E(x) - NG(z, c)||^2 (eq. 3.7)")
    g.add_argument("--beta", type=float, default=20.0, help="weight of the Sinkhorn divergence")
    g.add_argument("--l2-weight", type=float, default=10.0, help="weight of the l2 matching term")
    g.add_argument("--diameter", type=float, default=1e-2, help="Sinkhorn eps-scaling starts at eps = diameter^2")
    g.add_argument("--blur", type=float, default=1e-5, help="... and ends at eps = blur^2, where S is taken")
    g.add_argument("--scaling", type=float, default=None, help="eps shrinks by scaling^2 per Sinkhorn update")
    g.add_argument("--betas", type=float, nargs=2, default=None, help="AdamW betas")
    g.add_argument("--adam-eps", type=float, default=None, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    g.add_argument("--onecycle", type=float, nargs=3, default=None, metavar=("WARMUP", "DIV", "FINAL_DIV"),
                   help="one-cycle cosine LR: warm-up fraction, start at lr/DIV, end at lr/(DIV*FINAL_DIV)")
    g.add_argument("--nesterov", action="store_true", default=None,
                   help="Adam with Nesterov momentum (NAdam without its momentum schedule; thesis Table A.1, CNN)")
    g.add_argument("--clip", type=float, default=None, help="clip the gradient norm at this value (0: no clipping)")
    g.add_argument("--ng-steps", type=int, default=None, help="optional stage 2: steps of the noise generator alone "
                   "on the frozen encoder's codes (default 0)")
    g.add_argument("--ng-batch", type=int, default=None, help="stage 2 batch size; default 512 for l2, 256 for sinkhorn")
    g.add_argument("--ng-lr", type=float, default=2e-3, help="stage 2 learning rate (Adam, cosine decay to 0)")
    g.add_argument("--val-every", type=int, default=500, help="validate (losses, Wasserstein) every N steps")
    g.add_argument("--paper", action="store_true", help="the thesis' setting (PAPER; docs/fidelity/sae_ng.md)")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if not (args.beta >= 0 and args.l2_weight >= 0):
        p.error("--beta and --l2-weight must be >= 0")
    if not (0 < args.blur < args.diameter) or args.scaling is not None and not 0 < args.scaling < 1:
        p.error("need 0 < --blur < --diameter and 0 < --scaling < 1")
    if args.ng_steps is not None and args.ng_steps < 0 or not args.ng_lr > 0:
        p.error("--ng-steps must be >= 0 and --ng-lr positive")
    if (args.weight_decay or 0) < 0 or (args.clip or 0) < 0 or (args.adam_eps is not None and args.adam_eps <= 0):
        p.error("--weight-decay and --clip must be >= 0, --adam-eps positive")
    if args.betas is not None and not all(0 <= b < 1 for b in args.betas):
        p.error("--betas must lie in [0, 1)")
    if args.onecycle is not None and not (0 <= args.onecycle[0] < 1 and min(args.onecycle[1:]) >= 1):
        p.error("--onecycle: warm-up fraction in [0, 1), DIV and FINAL_DIV >= 1")
    for k in ("width", "hidden", "blocks", "ng_hidden", "ng_batch", "val_every"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive (got {getattr(args, k)})")
    args.arch = args.arch or ("vit" if args.paper else "cnn")   # explicit > --paper > CPU default
    sizes, paper_sizes = ARCH[args.arch]
    for k, v in {**DEFAULTS, **sizes, **(PAPER if args.paper else {}), **(paper_sizes if args.paper else {})}.items():
        if getattr(args, k) is None:   # precedence: flag given on the command line > --paper > CPU default
            setattr(args, k, v)
    if args.arch == "vit" and args.width % 4:
        p.error(f"--width {args.width}: the ViT's 4 attention heads need a multiple of 4")
    args.ng_batch = args.ng_batch or (512 if args.matching == "l2" else 256)
    if args.smoke:   # stage 1 is one epoch of 5 batches; stage 2 (if asked for) three steps
        args.limit, args.ng_hidden, args.batch_size = args.limit or 1500, 8, 256
        args.width, args.hidden, args.blocks = (16, 8, 1) if args.arch == "vit" else (4, 16, args.blocks)
        args.width = 8 if args.arch == "vdvae" else args.width
        args.epochs = 1
        args.ng_steps, args.ng_batch = min(args.ng_steps, 3), 64
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def conv(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, padding=1), nn.LeakyReLU(0.1))


class Encoder(nn.Module):
    """log1p image (n, 1, H, W) -> 20-d ReLU code."""

    def __init__(self, shape, width, hidden):
        super().__init__()
        self.shape = tuple(shape)
        flat = 2 * width * math.ceil(shape[0] / 4) * math.ceil(shape[1] / 4)
        self.net = nn.Sequential(conv(1, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width, 2), nn.Flatten(),
                                 nn.Linear(flat, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, CODE), nn.ReLU())

    def forward(self, x):
        H, W = self.shape
        return self.net(F.pad(x, (0, -W % 4, 0, -H % 4)))


class Decoder(nn.Module):
    """20-d code -> log1p(counts) image (n, 1, H, W) >= 0."""

    def __init__(self, shape, width, hidden, straight_through=False):
        super().__init__()
        self.shape, self.w, self.st = tuple(shape), width, straight_through
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        flat = 2 * width * self.h0 * self.w0
        self.head = nn.Sequential(nn.Linear(CODE, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, flat), nn.LeakyReLU(0.1))
        self.net = nn.Sequential(nn.Upsample(scale_factor=2), conv(2 * width, width), nn.Upsample(scale_factor=2),
                                 conv(width, width), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, code):
        """ReLU output (exact zeros); with straight_through (--matching l2) its gradient passes as if linear: a
        plain ReLU whose input turned negative everywhere stops all reconstruction gradient, and the l2 run
        collapsed that way (docstring, 'Measured, l2'). The same outputs either way; only training differs."""
        h = self.head(code).view(-1, 2 * self.w, self.h0, self.w0)
        o = self.net(h)
        o = o + (F.relu(o) - o).detach() if self.st else F.relu(o)
        return o[..., :self.shape[0], :self.shape[1]]


class STReLU(nn.Module):
    """ReLU with a straight-through gradient (the same outputs; the gradient passes as if linear), so a unit whose
    input turned negative for every event can recover. The noise generator's codes and the ViT's use it."""

    def forward(self, h):
        return h + (F.relu(h) - h).detach()


class NoiseGenerator(nn.Module):
    """(noise z, condition c) -> code, as the authors' code: z -> 2h and c -> h, concatenated, 4h, 4h, 20."""

    def __init__(self, hidden, n_cond=9):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.z = nn.Sequential(nn.Linear(NOISE, 2 * hidden), act)
        self.c = nn.Sequential(nn.Linear(n_cond, hidden), act)
        self.out = nn.Sequential(nn.Linear(3 * hidden, 4 * hidden), act, nn.Linear(4 * hidden, 4 * hidden), act,
                                 nn.Linear(4 * hidden, CODE))

    def forward(self, z, cond):
        """ReLU codes like the encoder's; straight-through gradient, so an output that is 0 everywhere can recover."""
        return STReLU()(self.out(torch.cat([self.z(z), self.c(cond)], 1)))


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


class SAE(nn.Module):
    """Autoencoder (image <-> 20-d ReLU code) and noise generator (noise, condition) -> code. --arch vit: the
    encoder is the ViT encoder (no condition token), its 36 x 96 tokens flattened, dense to 20, ReLU; the decoder
    a dense 20 -> 36 x 64 tokens and the ViT decoder (no condition token), as the authors' code."""

    def __init__(self, shape, width=8, hidden=64, ng_hidden=32, arch="cnn", blocks=4, straight_through=False):
        super().__init__()
        self.ng = NoiseGenerator(ng_hidden)
        if arch == "cnn":
            self.enc, self.dec = Encoder(shape, width, hidden), Decoder(shape, width, hidden, straight_through)
            return
        vit = arch == "vit"                 # --arch vdvae: the thesis' CNN pair in the same places
        (eh, ew), (gh, gw) = (vit_grid(shape),) * 2 if vit else conv_grids(shape)
        self.enc = nn.Sequential(ViTEncoder(shape, width, blocks) if vit else ConvEncoder(width), nn.Flatten(),
                                 nn.Linear(eh * ew * (width if vit else 4 * width), CODE),
                                 STReLU() if straight_through else nn.ReLU())
        self.dec = nn.Sequential(nn.Linear(CODE, gh * gw * hidden), nn.Unflatten(1, (gh * gw, hidden)),
                                 ViTDecoder(shape, hidden, width, blocks, offset=0.5, straight_through=straight_through)
                                 if vit else ConvDecoder(shape, hidden, width, offset=0.5, straight_through=straight_through))

    def encode(self, x):
        return self.enc(x)

    def decode(self, code):
        return self.dec(code)

    def generate_code(self, z, cond):
        return self.ng(z, cond)


def build_model(cfg):
    """The network described by a checkpoint's args."""
    return SAE(data.SHAPES[cfg["detector"] or "neutron"], cfg["width"], cfg["hidden"], cfg["ng_hidden"],
               cfg.get("arch", "cnn"), cfg.get("blocks") or 4, straight_through=cfg.get("matching") == "l2" or cfg.get("arch") == "vit")


def build_networks(cfg):
    """Every trained network by name (parameter counts: tests/test_fidelity.py against PUBLISHED)."""
    m = build_model(cfg)
    return {"encoder": m.enc, "decoder": m.dec, "noise_generator": m.ng}


# ----------------------------------------------------------------------------------------------------------
# Method: Sinkhorn divergence, loss and sampler
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def eps_schedule(diameter, blur, scaling):
    """The eps values of one Sinkhorn call, as the authors' code: diameter^2, then diameter^2 * scaling^(2k)
    (k = 0, 1, ... while above blur^2; so diameter^2 appears twice), then blur^2."""
    n = math.ceil(math.log(blur / diameter) / math.log(scaling) - 1e-9)
    return (diameter ** 2,) + tuple(diameter ** 2 * scaling ** (2 * k) for k in range(n)) + (blur ** 2,)


def sinkhorn_divergence(x, y, eps_list):
    """Debiased Sinkhorn divergence between uniform clouds x, y (n, d), cost |x - y|^2 / 2, eps-scaling through
    eps_list; the value at eps_list[-1], with the transport plan's gradient w.r.t. x and y."""
    if len(x) != len(y):
        raise ValueError(f"clouds of {len(x)} and {len(y)} points: this solver pairs equal batches")
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        # C[k] for (rows, columns) = (x, x), (x, y), (y, x), (y, y); gradient through the rows' points only
        C = torch.stack([(a[:, None] - b.detach()[None]).pow(2).sum(-1) / 2 for a, b in ((x, x), (x, y), (y, x), (y, y))])
        log_w, cols = -math.log(len(x)), [0, 2, 1, 3]   # potentials on the columns' side: f_xx, g_yx, f_xy, g_yy

        def softmin(eps, C, pot):   # pot: (4, n) potentials [f_xx, f_xy, g_yx, g_yy], all updated at once
            return -eps * torch.logsumexp((log_w + pot[cols] / eps)[:, None] - C / eps, 2)

        with torch.no_grad():
            Cd = C.detach()
            pot = -eps_list[0] * torch.logsumexp(log_w - Cd / eps_list[0], 2)
            for eps in eps_list:
                pot = (pot + softmin(eps, Cd, pot)) / 2
        f_xx, f_xy, g_yx, g_yy = softmin(eps_list[-1], C, pot)
        return (f_xy - f_xx).mean() + (g_yx - g_yy).mean()


def matching(target, fake, cond, args):
    """The code matching term: ||target - fake||^2 (l2, eq. 3.7), or the Sinkhorn divergence between the
    (code, condition) clouds (eq. 3.6)."""
    if args.matching == "l2":
        return (target - fake).pow(2).sum(1).mean()
    return sinkhorn_divergence(torch.cat([target, cond], 1), torch.cat([fake, cond], 1),
                               eps_schedule(args.diameter, args.blur, args.scaling))


def sae_loss(model, x, cond, generator, args):
    """(loss, reconstruction, matching term, codes) of a batch (stage 1: everything trains on everything)."""
    code = model.encode(x)
    rec = (model.decode(code) - x).pow(2).flatten(1).sum(1).mean()
    fake = model.generate_code(data.noise((len(x), NOISE), generator, x.device), cond)
    match = matching(code, fake, cond, args)
    return rec + (args.l2_weight if args.matching == "l2" else args.beta) * match, rec, match, (code, fake)


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
    """The sampler as one module (bench.py, --export): counts from cond (n, 9) and z (n, NOISE)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def noise_shapes(self, n):
        return {"z": (n, NOISE)}

    def forward(self, cond, z):
        return data.to_counts(self.model.decode(self.model.generate_code(z, cond)))


@torch.no_grad()
def sample(model, cond, generator=None):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9): noise -> NG -> decoder. Noise is
    drawn on the CPU from `generator` and moved to the model's device (a seed gives the same samples anywhere)."""
    return Sampler(model).run(cond, generator)


@torch.no_grad()
def reconstruct(model, x):
    """Encode -> decode of log1p images: raw counts (n, H, W)."""
    return data.to_counts(model.decode(model.encode(x)))


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def generator_fn(model, device, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate expects."""
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(model, cond.to(device), g).float()
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
        ck = check_version(data.load_checkpoint(ckpt_path, NAME), ckpt_path)
        ng_steps = max(args.ng_steps, ck["args"]["ng_steps"])   # a length like --epochs: --ng-steps N adds stage 2
        args = data.resume_args(args, {**ck, "args": {**ck["args"], "ng_steps": ng_steps}}, older=dict(arch="cnn"))
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    model = build_model(vars(args)).to(dev)
    if args.nesterov:   # optax.adam(nesterov=True): torch's NAdam with its momentum schedule off (mu_t = beta1)
        opt = torch.optim.NAdam(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps,
                                weight_decay=args.weight_decay, decoupled_weight_decay=True, momentum_decay=1e9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps,
                                weight_decay=args.weight_decay)
    opt_ng = torch.optim.Adam(model.ng.parameters(), lr=args.ng_lr)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    planned = args.epochs * steps_per_epoch               # stage 1; its LR schedule spans --epochs
    total = min(planned + args.ng_steps, args.max_steps or planned + args.ng_steps)   # both stages; one step counter
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: one_cycle(s, planned, *args.onecycle))
    sched_ng = torch.optim.lr_scheduler.LambdaLR(
        opt_ng, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(args.ng_steps, 1), 1.0))))
    scaler = torch.amp.GradScaler(enabled=args.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported())
    noise = torch.Generator(dev).manual_seed(args.seed)
    pick = torch.Generator().manual_seed(args.seed + 1)   # stage 2's random batches
    step, epoch = 0, 0
    if ck is not None:
        model.load_state_dict(ck["weights"]), opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"]), scaler.load_state_dict(ck["scaler"])
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        opt_ng.load_state_dict(ck["opt_ng"]), sched_ng.load_state_dict(ck["sched_ng"]), pick.set_state(ck["rng"]["pick"])
        step, epoch = ck["step"], ck["epoch"]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    net = data.wrap_ddp(model, dist)      # stage 1's SAE: this rank's shard of each global batch, DDP
    n_par = sum(p.numel() for p in model.parameters())
    print(f"{NAME} ({args.matching} matching, end to end): {n_par:,} parameters, {len(x_tr):,} training responses; "
          f"stage 1: {planned} steps ({steps_per_epoch} per epoch), stage 2 (noise generator alone): {args.ng_steps} "
          f"steps; {total} steps in total, device {dev}")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), weights=model.state_dict(),
                                  opt=opt.state_dict(), sched=sched.state_dict(), opt_ng=opt_ng.state_dict(),
                                  sched_ng=sched_ng.state_dict(), scaler=scaler.state_dict(), step=step, epoch=epoch,
                                  n_params=n_par, rng=dict(noise=noise.get_state(), pick=pick.get_state(),
                                                           torch=torch.get_rng_state())), ckpt_path)

    def validate(losses, matches):
        model.eval()
        with torch.no_grad():
            k = min(1000, len(x_va))
            x, c = x_va[:500].to(dev), c_va[:500].to(dev)
            _, rec, match, (code, fake) = sae_loss(model, x, c, torch.Generator(dev).manual_seed(1234), args)
            gen = sample(model, c_va[:k].to(dev), torch.Generator().manual_seed(0))
            recon = reconstruct(model, x_va[:k].to(dev))
            true = split.counts("val")[:k]
            val_w, rec_w = metrics.wasserstein(true, gen)[0], metrics.wasserstein(true, recon)[0]
        model.train()
        row = dict(stage=1 if step <= planned else 2, step=step, epoch=min(step, planned) / steps_per_epoch,
                   train_loss=float(np.mean(losses)) if losses else None,
                   train_match=float(np.mean(matches)) if matches else None, lr=opt.param_groups[0]["lr"],
                   val_rec=rec.item(), val_match=match.item(), code_std=float(code.std(0).mean()),
                   ng_std=float(fake.std(0).mean()), val_W=val_w, rec_W=rec_w, minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        print(f"stage {row['stage']} step {step:6d}  train loss {row['train_loss'] or float('nan'):.3f}  "
              f"match {row['train_match'] or float('nan'):.4f}  val rec {rec.item():.3f}  val match {match.item():.4f}  "
              f"code std {row['code_std']:.3f} (NG {row['ng_std']:.3f})  val W {val_w:.3f}  rec W {rec_w:.3f}  "
              f"{row['minutes']:.1f} min")

    def optimise(loss, optimiser, scheduler, params):
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged (lower --lr?)")
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip > 0:
            scaler.unscale_(optimiser)
            nn.utils.clip_grad_norm_(params, args.clip)
        scaler.step(optimiser), scaler.update(), scheduler.step()

    t_start = time.time()
    end1 = min(planned, total)
    while step < end1:            # stage 1: autoencoder and noise generator together, end to end
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches((x_tr, c_tr), args.batch_size, order, start=skip), total=steps_per_epoch,
                   initial=skip, desc=f"stage 1 epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke or not dist.is_main)
        losses, matches = [], []
        for x, c in bar:
            x, c = x.to(dev), c.to(dev)
            with data.autocast(dev, args.amp):
                loss, _, match, _ = sae_loss(net, x, c, noise, args)   # DDP = 1 process exactly (Sinkhorn on gathered codes)
            optimise(loss, opt, sched, model.parameters())
            step += 1
            losses.append(loss.item()), matches.append(match.item())
            bar.set_postfix(loss=f"{loss.item():.3f}", match=f"{matches[-1]:.3f}")
            if step % args.ckpt_every == 0:
                save()
            if (step % args.val_every == 0 or step >= end1) and dist.is_main:
                bar.clear()
                validate(losses, matches)
                losses, matches = [], []
            if step >= end1:
                break
        bar.close()
        if step == (epoch + 1) * steps_per_epoch:
            epoch += 1
        save()

    if step < total:              # stage 2 (optional): the noise generator alone on the frozen encoder's codes
        # (not sharded: every rank trains the small noise generator on the whole batch, identically)
        with torch.no_grad():
            codes = torch.cat([model.encode(b.to(dev)) for b in torch.split(x_tr, 4096)])
        conds, every = c_tr.to(dev), max(args.val_every, args.ng_steps // 8)
        print(f"stage 2: noise generator on {len(codes):,} cached codes, batch {args.ng_batch}, steps "
              f"{step - planned}..{total - planned} of {args.ng_steps}")
        bar = tqdm(range(step, total), desc="stage 2", leave=False, disable=args.smoke or not dist.is_main)
        losses = []
        for _ in bar:
            i = torch.randint(len(codes), (args.ng_batch,), generator=pick).to(dev)
            with data.autocast(dev, args.amp):
                fake = model.generate_code(data.noise((len(i), NOISE), noise, dev), conds[i])
                loss = matching(codes[i], fake, conds[i], args)
            optimise(loss, opt_ng, sched_ng, model.ng.parameters())
            step += 1
            losses.append(loss.item())
            bar.set_postfix(match=f"{loss.item():.3f}")
            if step % args.ckpt_every == 0 or step >= total:
                save()
            if ((step - planned) % every == 0 or step >= total) and dist.is_main:
                bar.clear()
                validate(losses, losses)
                losses = []
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, checkpoint {ckpt_path}")
    data.dist_close(dist)
    return ckpt_path


def check_version(ck, path):
    if "scaling" not in ck["args"]:
        raise data.DataError(f"{path}: written by an older sae_ng.py (encoder detached in the matching term, another "
                             "noise generator): train a new run")
    return ck


def load_model(args):
    path = args.ckpt or Path(args.out) / "ckpt.pt"
    ck = check_version(data.load_checkpoint(path, NAME, args.detector), path)
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
    idx, true, _ = metrics.test_part(split, args.max_test or None)
    rec = torch.cat([reconstruct(model, x.to(dev)).cpu() for x in torch.split(data.to_log(true), 1024)])
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    arch = f", {ck['args']['arch']}" if ck["args"].get("arch", "cnn") != "cnn" else ""
    return metrics.run_eval(generator_fn(model, dev, args.amp), split, path, args, f"{NAME} ({ck['args']['matching']}{arch})",
                            dict(reconstruction_W=rec_w, matching=ck["args"]["matching"], n_params=ck["n_params"],
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
