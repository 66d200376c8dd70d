"""VQ-GAN with a GPT prior for the ALICE Zero Degree Calorimeters: discrete tokens, then an autoregressive model.

Papers: the improved VQ-GAN of the flow-matching paper arXiv 2507.18811 and its poster (x4 downsampling, 121
tokens, EMA codebook 512 x 8 with l2-normalised lookup, W 2.11 on the real neutron set), a follow-up of the
thesis arXiv 2407.16704 (Sections 3.5, 4.10: VQ-GAN + transformer, W 4.58); the authors' code
m-wojnar/faster_zdc fills in what the papers leave open. docs/fidelity/vqgan.md checks it line by line.

Stage 1, tokenizer (59,924 parameters at --ae-width 4, as published). Encoder: 3x3 conv to w channels, three
levels of 2 residual blocks (LayerNorm over channels, SiLU, bias-free 3x3 conv, twice) with 2w, 3w, 4w
channels and a stride-2 conv between levels, then residual block / 2-head self-attention / residual block,
LayerNorm, SiLU, 1x1 conv to the 8-d code space; the decoder mirrors it (nearest x2 upsampling + conv) and ends
with a 1x1 conv to 1 channel. ZN 44x44 -> 8 x 11 x 11 (121 tokens); ZP 56x30 is padded to 56x32 (112 tokens)
and cropped back after decoding. Every 8-d vector is l2-normalised and replaced by the nearest l2-normalised
codebook entry (cosine lookup), passed to the decoder by the straight-through estimator. The codebook is the
ratio of two exponential moving averages (decay `--vq-decay`): of the number of vectors assigned to each code
(Laplace-smoothed, eps 1e-5) and of their sum (`ema_codebook`). Dead-code restart (not in the reference; off
under --paper): a code whose EMA count per batch falls below `--dead-below` is set to a random encoder output
of the batch, with count 1. Loss, balanced as in the reference by `GradNorm` (identity; its backward rescales
the gradient reaching the reconstructed image to a fixed norm): L2 (mean squared error, image gradient of norm
0.1) + 0.25 * commitment (mean squared distance of the encoder output to its code) - mean D(reconstruction)
(image gradient of norm `--adv`, D's weights detached). The patch discriminator D (hinge loss; last layer
zero-initialised, so it starts neutral) is a separate optimisation problem: its own Adam without weight decay
(as published), its own gradient clipping (`--clip`; none under --paper, as published), the same batches.
Logged every --val-every steps: train loss (L2 + 0.25 commitment - mean D(rec) + D's hinge loss), val loss (L2
+ commitment), reconstruction Wasserstein (encode -> quantise -> decode of validation responses: the best the
whole model can reach), codebook perplexity exp(entropy of the code frequencies) and usage (fraction used).
Stage 2, prior. The training set is tokenised once; a causal GPT (pre-LN, bias-free, GELU MLP of width
`--mlp` with dropout `--dropout`, output layer tied to the token embedding) models the tokens in raster order
after P = `--prefix` condition tokens (a learned projection of the 9 standardised features). Loss: next-token
cross entropy. Sampling: token by token with temperature (1.2) and top-k (128; 0 = none), by inverse CDF from
uniforms drawn up front from a CPU generator, so the KV-cached decoder and `--no-kv-cache` give the same
tokens; then decode, ReLU, expm1. Both stages use the reference's one-cycle cosine schedule: from lr/25 up to
lr over the first 20 % (stage 2: 33 %) of the steps, then down to lr/25,000.

--arch vit: the thesis' VQ models (Sec. 4.10; Table 4.5, 1M: 4 blocks, 4 heads, token width 96, embedding 256;
codebook 256: VQ-VAE W 9.61, VQ-GAN 4.58) as the authors' vq_vae.py: the ViT encoder (image padded to 48x48, 8x8
patches, 36 tokens; ZP 56x32, 28), a dense to the 256-d code space, the quantiser above (l2-normalised, EMA
codebook), a dense 256 -> 256, the ViT decoder (transposed conv 8x8 stride 8, ReLU(. + 0.5)); 1,029,505
parameters; the GPT then models 36 tokens. Differences: the thesis' VQ-VAE learns its codebook by gradient with
a 32-d lookup projection (here: EMA, cosine lookup in 256-d, as the thesis' VQ-GAN's EMA update); `--adv 0`
drops the adversarial term for the VQ-VAE row. --paper stays the flow-matching paper's tokenizer above.

Usage:
    python vqgan.py --train --arch vit           # the thesis' ViT VQ-GAN (36 tokens, codebook 256 x 256)
    python vqgan.py --train                      # both stages, ZN, CPU default (stage 1 ~0.9 s per step on 2 shared
                                                 # cores: ~23 min per epoch)
    python vqgan.py --train --stage 1            # only the tokenizer (--stage 2 then reuses it)
    python vqgan.py --train --detector proton --out runs/vqgan_proton
    python vqgan.py --train --paper              # the published setting (50 + 50 epochs: a GPU job)
    python vqgan.py --sample --ckpt runs/vqgan/ckpt.pt --n 1000 --out samples.npz
    python vqgan.py --export vqgan.onnx --ckpt runs/vqgan/ckpt.pt   # the sampler as one ONNX graph
    python vqgan.py --eval --ckpt runs/vqgan/ckpt.pt [--temperature 1.0 --top-k 0] [--plot]
    python vqgan.py --eval --ckpt runs/vqgan/ckpt.pt --sweep     # temperature x top-k, ms with/without KV cache
    python vqgan.py --train --smoke              # seconds
Explicit flags beat --paper, which beats the CPU default.

Deviations (reasons in docs/fidelity/vqgan.md): no perceptual (LPIPS) term and no pretrained VGG16
discriminator (no pretrained weights offline): D is a small patch discriminator trained from scratch; the
reference tokenises the particle features with a separate VQ-VAE (2 tokens), here a learned projection to
--prefix embeddings (--paper: 2) trains with the GPT; the decoder's output ReLU acts when decoding to counts,
not in training (it dies on the mostly empty ZP images: latent_fm.py). The CPU default: 1 + 1 epochs, batch
128, larger learning rates (2e-3 for all three networks) with Adam betas (0.5, 0.9; GPT 0.9, 0.95), clipping at
1.0 per network, the adversarial gradient equal to the L2's (0.1, published 1.0), dead-code restarts, and a
smaller GPT (embed 64, 4 layers, 4 prefix tokens, no dropout).

Measured (2026-12-04, CPU default, ZN): random split W 21.72 +- 0.43, 10.5x the floor, AUC 0.996
(results/vqgan_neutron_random.json); condition-disjoint W 17.22 +- 0.29, 10.2x (results/vqgan_neutron_disjoint.json).
Details and history: docs/models/vqgan.md.
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
MULTS, AE_HEADS, REC_NORM = (2, 3, 4), 2, 0.1       # tokenizer levels and attention heads; L2 gradient norm
# CPU default (ZN, 2 cores): see the docstring. Keys without a flag (betas, eps, weight decay, warm-up) are
# fixed per setting; every other key is a flag that beats both dicts when given.
DEFAULTS = dict(epochs=1, epochs2=1, batch_size=128, lr=2e-3, d_lr=2e-3, lr2=2e-3, ae_width=4, d_width=16,
                embed=64, heads=4, layers=4, mlp=256, dropout=0.0, prefix=4, adv=0.1, adv_start=0, dead_below=0.01,
                clip=1.0, betas=[0.5, 0.9], d_betas=[0.5, 0.9], betas2=[0.9, 0.95], eps2=1e-8, wd2=0.01,
                warmup=0.2, warmup2=0.33)
# faster_zdc: vq_gan.py (optimisers, loss weights), gpt.py (GPT, its AdamW), utils/nn.py (one-cycle schedule,
# 50 epochs, batch 256), architectures/conv.py (tokenizer)
PAPER = dict(epochs=50, epochs2=50, batch_size=256, lr=2.2e-4, d_lr=1.3e-6, lr2=5.2e-3, ae_width=4, d_width=16,
             embed=128, heads=4, layers=6, mlp=256, dropout=0.1, prefix=2, adv=1.0, adv_start=0, dead_below=0.0,
             clip=0.0, betas=[0.67, 0.9], d_betas=[0.6, 0.55], betas2=[0.87, 0.998], eps2=1e-5, wd2=0.14,
             warmup=0.2, warmup2=0.33)
# --arch vit: the thesis' VQ tokenizer at its 1M size (Table 4.5: 4 blocks, 4 heads, token width 96, embedding
# 256; Sec. 4.10: codebook 256); explicit flags beat it
ARCH = {"cnn": dict(codes=512, code_dim=8), "vit": dict(codes=256, code_dim=256, ae_width=96, blocks=4)}
PUBLISHED = {"tokenizer": (59_924, "arXiv 2507.18811 improved VQ-GAN; faster_zdc vq_gan.py VQVAE (channels 4, "
                                   "multipliers 2/3/4, 2 res blocks, 2 heads, 8-d codes)")}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("VQ-GAN (--lr: the tokenizer's peak learning rate; --epochs: stage 1)")
    g.add_argument("--stage", type=int, default=None, choices=[1, 2], help="train only this stage (default: both)")
    g.add_argument("--epochs2", type=int, default=None, help="epochs of stage 2 (CPU 1, paper 50)")
    g.add_argument("--lr2", type=float, default=None, help="GPT peak learning rate (CPU 2e-3, paper 5.2e-3)")
    g.add_argument("--d-lr", type=float, default=None, help="discriminator peak learning rate (CPU 2e-3, paper 1.3e-6)")
    g.add_argument("--arch", default="cnn", choices=["cnn", "vit"],
                   help="tokenizer: cnn (the flow-matching paper's, also under --paper) or vit (the thesis' VQ models: "
                        "ViT pair, 36 tokens, codebook 256 x 256)")
    g.add_argument("--ae-width", type=int, default=None, help="cnn: tokenizer base channels w (levels 2w, 3w, 4w), "
                   "paper 4; vit: token width (96)")
    g.add_argument("--blocks", type=int, default=None, help="vit: transformer blocks in the tokenizer's encoder and "
                   "decoder (4)")
    g.add_argument("--d-width", type=int, default=None, help="patch discriminator channels (w, 2w); 16")
    g.add_argument("--codes", type=int, default=None, help="codebook size (cnn 512, vit 256)")
    g.add_argument("--code-dim", type=int, default=None, help="codebook vector dimension (cnn 8, vit 256)")
    g.add_argument("--vq-decay", type=float, default=0.99, help="EMA decay of the codebook statistics")
    g.add_argument("--dead-below", type=float, default=None, help="restart codes whose EMA count per batch falls below "
                   "this (CPU 0.01; paper 0: no restarts)")
    g.add_argument("--beta", type=float, default=0.25, help="weight of the commitment loss")
    g.add_argument("--adv", type=float, default=None, help="norm of the adversarial gradient at the reconstruction "
                   "(the L2's is 0.1); 0: off (CPU 0.1, paper 1.0)")
    g.add_argument("--adv-start", type=int, default=None, help="stage-1 step at which the adversarial terms start (0)")
    g.add_argument("--clip", type=float, default=None, help="clip each network's gradient norm to this; 0: no "
                   "clipping (CPU 1.0, paper 0)")
    g.add_argument("--embed", type=int, default=None, help="GPT embedding width (CPU 64, paper 128)")
    g.add_argument("--heads", type=int, default=None, help="GPT attention heads (4)")
    g.add_argument("--layers", type=int, default=None, help="GPT layers (CPU 4, paper 6)")
    g.add_argument("--mlp", type=int, default=None, help="GPT MLP width (256)")
    g.add_argument("--dropout", type=float, default=None, help="GPT MLP dropout (CPU 0, paper 0.1)")
    g.add_argument("--prefix", type=int, default=None, help="number of condition prefix tokens (CPU 4, paper 2)")
    g.add_argument("--temperature", type=float, default=1.2, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=128, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--no-kv-cache", action="store_true", help="sample without the KV cache (slow; same tokens)")
    g.add_argument("--val-every", type=int, default=500, help="validate every N steps")
    g.add_argument("--sweep", action="store_true", help="--eval: temperature 1.0/1.2/1.4 x top-k none/128/64, and "
                   "ms per sample with and without the KV cache; writes sweep.json")
    g.add_argument("--paper", action="store_true", help="the published setting (explicit flags still win)")
    args = p.parse_args(argv)
    data.check_args(p, args)
    for k, v in {**DEFAULTS, **(PAPER if args.paper else {}), **ARCH[args.arch]}.items():
        if getattr(args, k, None) is None:   # flags given on the command line win
            setattr(args, k, v)
    if args.arch == "vit" and (args.ae_width % 4 or args.blocks <= 0):
        p.error(f"--ae-width {args.ae_width}: the ViT's 4 attention heads need a multiple of 4; --blocks positive")
    if not args.temperature > 0 or args.top_k < 0:
        p.error(f"--temperature must be positive and --top-k >= 0 (got {args.temperature}, {args.top_k})")
    if min(args.ae_width, args.d_width, args.codes, args.code_dim, args.prefix, args.mlp, args.layers, args.heads,
           args.embed) <= 0 or args.embed % args.heads:
        p.error("--ae-width, --d-width, --codes, --code-dim, --prefix, --mlp, --layers, --heads must be positive; "
                "--embed a positive multiple of --heads")
    if not (0 < args.vq_decay < 1 and 0 <= args.dropout < 1) or min(args.dead_below, args.beta, args.adv,
                                                                      args.adv_start, args.clip) < 0:
        p.error("--vq-decay must be in (0, 1), --dropout in [0, 1); --dead-below, --beta, --adv, --adv-start, "
                "--clip must be >= 0")
    if not min(args.lr2, args.d_lr) > 0:
        p.error(f"--lr2 and --d-lr must be positive (got {args.lr2}, {args.d_lr})")
    if args.smoke:
        args.limit, args.ae_width, args.d_width, args.embed, args.layers = args.limit or 1500, 2, 4, 16, 2
        if args.arch == "vit":
            args.ae_width, args.blocks, args.code_dim = 16, 1, min(args.code_dim, 16)
        args.mlp, args.batch_size, args.codes = 32, 32, min(args.codes, 64)
        args.max_steps, args.max_test, args.reps, args.ckpt_every = args.max_steps or 4, min(args.max_test or 200, 200), min(args.reps, 2), 2
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
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


def grid(shape, arch="cnn"):
    """The token grid (h, w) of an image shape: x4 downsampling of the image padded to a multiple of 4; --arch vit:
    8x8 patches of the image padded to a multiple of 8 (ZN 6x6, ZP 7x4)."""
    return vit_grid(shape) if arch == "vit" else (math.ceil(shape[0] / 4), math.ceil(shape[1] / 4))


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


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of every pixel (the reference's LayerNorm on channels-last images)."""

    def __init__(self, ch):
        super().__init__(ch, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv(ci, co, k=3, stride=1):
    return nn.Conv2d(ci, co, k, stride, padding=k // 2, bias=False)


class ResBlock(nn.Module):
    def __init__(self, ci, co):
        super().__init__()
        self.body = nn.Sequential(ChannelNorm(ci), nn.SiLU(), conv(ci, co), ChannelNorm(co), nn.SiLU(), conv(co, co))
        self.skip = conv(ci, co, 1) if ci != co else nn.Identity()
        nn.init.normal_(self.body[-1].weight, std=1e-4 / co)        # as the reference: starts near the identity

    def forward(self, x):
        return self.skip(x) + self.body(x)


class SelfAttention(nn.Module):
    """Bias-free multi-head self-attention over the pixels, with a pre-norm and a residual connection."""

    def __init__(self, ch, heads=AE_HEADS):
        super().__init__()
        self.norm, self.attn = ChannelNorm(ch), nn.MultiheadAttention(ch, heads, bias=False, batch_first=True)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(h, h, h, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)


class VQAE(nn.Module):
    """The reference tokenizer: residual conv encoder/decoder (x4 downsampling, attention in the middle) and a
    vector quantiser: (1, H, W) log1p image <-> (h, w) tokens."""

    def __init__(self, width=4, dim=8, codes=512):
        super().__init__()
        enc, c = [conv(1, width)], width
        for i, m in enumerate(MULTS):
            enc += [ResBlock(c, width * m), ResBlock(width * m, width * m)]
            c = width * m
            enc += [conv(c, c, stride=2)] if i < len(MULTS) - 1 else []
        middle = [ResBlock(c, c), SelfAttention(c), ResBlock(c, c)]
        self.enc = nn.Sequential(*enc, *middle, ChannelNorm(c), nn.SiLU(), conv(c, dim, 1))
        dec = [conv(dim, c), ResBlock(c, c), SelfAttention(c), ResBlock(c, c)]
        for i, m in enumerate(MULTS[::-1]):
            dec += [ResBlock(c, width * m), ResBlock(width * m, width * m)]
            c = width * m
            dec += [nn.Upsample(scale_factor=2), conv(c, c)] if i > 0 else []
        self.dec = nn.Sequential(*dec, ChannelNorm(c), nn.SiLU(), conv(c, 1, 1))
        self.vq = Quantizer(codes, dim)

    def encode(self, x):
        H, W = x.shape[-2:]
        return F.normalize(self.enc(F.pad(x, (0, -W % 4, 0, -H % 4))), dim=1)

    def tokens(self, x):
        return self.vq.lookup(self.encode(x))

    def decode(self, zq, shape):
        return self.dec(zq)[..., :shape[0], :shape[1]]

    def token_grid(self, shape):
        return grid(shape)


class ViTVQAE(nn.Module):
    """--arch vit, the thesis' VQ tokenizer (as the authors' vq_vae.py): the ViT encoder (no condition token), a
    dense to the `dim`-d code space per token, l2-normalised and quantised as VQAE's; a dense, then the ViT
    decoder: (1, H, W) log1p image <-> a 6x6 grid of tokens (ZP: 7x4)."""

    def __init__(self, shape, width=96, blocks=4, dim=256, codes=256):
        super().__init__()
        self.grid = vit_grid(shape)
        self.enc = nn.Sequential(ViTEncoder(shape, width, blocks), nn.Linear(width, dim))
        self.post = nn.Linear(dim, dim)
        self.dec = ViTDecoder(shape, dim, width, blocks, offset=0.5)
        self.vq = Quantizer(codes, dim)

    def encode(self, x):
        z = F.normalize(self.enc(x), dim=-1)                                     # (B, T, D)
        return z.transpose(1, 2).reshape(len(x), -1, *self.grid)                 # (B, D, h, w) as VQAE's

    def tokens(self, x):
        return self.vq.lookup(self.encode(x))

    def decode(self, zq, shape):
        return self.dec(self.post(zq.flatten(2).transpose(1, 2)))

    def token_grid(self, shape):
        return self.grid


def patch_disc(width=16):
    """Small patch discriminator: one logit per ~10x10 receptive field of the log1p image; the last layer starts
    at zero (as the reference's discriminator heads), so D and its gradient start neutral."""
    d = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 2 * width, 4, 2, 1),
                      nn.GroupNorm(math.gcd(2 * width, 4), 2 * width), nn.LeakyReLU(0.2), nn.Conv2d(2 * width, 1, 3, padding=1))
    nn.init.zeros_(d[-1].weight), nn.init.zeros_(d[-1].bias)
    return d


class Block(nn.Module):
    """Pre-LN transformer block, bias-free; causal self-attention with an optional KV cache (a dict, filled
    from start = 0); dropout in the MLP."""

    def __init__(self, embed, heads, mlp, dropout):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv = nn.LayerNorm(embed, bias=False), nn.Linear(embed, 3 * embed, bias=False)
        self.proj, self.ln2 = nn.Linear(embed, embed, bias=False), nn.LayerNorm(embed, bias=False)
        self.mlp = nn.Sequential(nn.Linear(embed, mlp, bias=False), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(mlp, embed, bias=False), nn.Dropout(dropout))

    def forward(self, x, cache=None, start=0):
        B, L, E = x.shape
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        if cache is not None:          # preallocated keys and values of all positions; attend to 0 .. start + L - 1
            if start == 0:
                cache["k"], cache["v"] = (k.new_zeros(B, self.heads, cache["size"], k.shape[-1]) for _ in "kv")
            cache["k"][:, :, start:start + L], cache["v"][:, :, start:start + L] = k, v
            k, v = cache["k"][:, :, :start + L], cache["v"][:, :, :start + L]
        assert L == 1 or start == 0, "decode several positions only from the start"
        a = F.scaled_dot_product_attention(q, k, v, is_causal=bool(L > 1))   # bool: L is a tensor when traced
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, E))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Causal transformer over [P condition prefix tokens, image tokens in raster order]; the output layer is
    the token embedding (tied weights)."""

    def __init__(self, codes, n_tokens, embed=64, heads=4, layers=4, prefix=4, mlp=256, dropout=0.0, n_cond=9):
        super().__init__()
        self.prefix, self.n_tokens = prefix, n_tokens
        self.cond = nn.Sequential(nn.Linear(n_cond, embed), nn.SiLU(), nn.Linear(embed, prefix * embed))
        self.tok, self.pos = nn.Embedding(codes, embed), nn.Parameter(torch.zeros(prefix + n_tokens, embed))
        nn.init.normal_(self.pos, std=0.02), nn.init.normal_(self.tok.weight, std=embed ** -0.5)   # as flax's Embed
        self.blocks = nn.ModuleList([Block(embed, heads, mlp, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(embed, bias=False)

    def forward(self, cond, tokens, caches=None, start=0):
        """Logits (B, L, codes) after each input position. start = 0: the sequence is the prefix followed by
        `tokens`; start > 0 (decoding with caches): `tokens` sit at positions start, start + 1, ..."""
        h = self.tok(tokens)
        if start == 0:
            h = torch.cat([self.cond(cond).view(cond.shape[0], self.prefix, -1), h], 1)
        h = h + self.pos[start:start + h.shape[1]]
        for i, blk in enumerate(self.blocks):
            h = blk(h, None if caches is None else caches[i], start)
        return F.linear(self.ln(h), self.tok.weight)


def build_networks(cfg):
    """Every trained network described by a checkpoint's args, by name."""
    shape, arch = data.SHAPES[cfg["detector"]], cfg.get("arch", "cnn")
    h, w = grid(shape, arch)
    tokenizer = (ViTVQAE(shape, cfg["ae_width"], cfg["blocks"], cfg["code_dim"], cfg["codes"]) if arch == "vit"
                 else VQAE(cfg["ae_width"], cfg["code_dim"], cfg["codes"]))
    return dict(tokenizer=tokenizer, discriminator=patch_disc(cfg["d_width"]),
                gpt=GPT(cfg["codes"], h * w, cfg["embed"], cfg["heads"], cfg["layers"], cfg["prefix"], cfg["mlp"],
                        cfg["dropout"]))


def build_model(cfg):
    """(tokenizer, discriminator, GPT): the tuple bench.py unpacks."""
    return tuple(build_networks(cfg).values())


# ----------------------------------------------------------------------------------------------------------
# Method: losses and sampler
# ----------------------------------------------------------------------------------------------------------
class GradNorm(torch.autograd.Function):
    """Identity; its backward rescales the incoming gradient to norm `weight` (the reference's grad_norm)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.weight * g / (g.norm() + 1e-8), None


def vq_loss(vqae, disc, x, generator, args, step, update=True):
    """Stage 1: L2 (image gradient of norm 0.1) + beta * commitment, and from args.adv_start on (update=True)
    the adversarial term (image gradient of norm args.adv, D's weights detached) + D's hinge loss (on the
    detached reconstruction: D's gradient comes from it alone). update=True also applies the EMA codebook
    update and dead-code restarts of this batch."""
    z = vqae.encode(x)
    idx = vqae.vq.lookup(z)
    zq = vqae.vq.embed(idx)
    rec = vqae.decode(z + (zq - z).detach(), x.shape[-2:])
    loss = (GradNorm.apply(rec, REC_NORM) - x).pow(2).mean() + args.beta * (z - zq.detach()).pow(2).mean()
    if update:
        vqae.vq.update(z, idx, args.vq_decay, args.dead_below, generator)
    if update and args.adv > 0 and step >= args.adv_start:
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_loss = -torch.func.functional_call(disc, frozen, (GradNorm.apply(rec, args.adv),)).mean()
        d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
        loss = loss + g_loss + d_loss
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
    cdf = logits.softmax(-1).cumsum(-1)      # the inverse CDF: how many CDF values lie <= u (searchsorted, right)
    return (cdf <= (u * cdf[:, -1]).unsqueeze(1)).sum(1).clamp_max(cdf.shape[1] - 1)


def tokens_from(gpt, cond, u, temperature=1.2, top_k=128, kv_cache=True):
    """Token grids (n, n_tokens) for standardised conditions `cond` (n, 9) and uniforms u (n, n_tokens), in raster
    order."""
    tokens = cond.new_zeros((cond.shape[0], 0), dtype=torch.long)
    caches = [dict(size=gpt.prefix + gpt.n_tokens) for _ in gpt.blocks] if kv_cache else None
    for t in range(gpt.n_tokens):
        if kv_cache:
            logits = gpt(cond, tokens[:, t - 1:t] if t else tokens, caches, start=gpt.prefix + t - 1 if t else 0)
        else:
            logits = gpt(cond, tokens)
        tokens = torch.cat([tokens, pick(logits[:, -1], u[:, t], temperature, top_k)[:, None]], 1)
    return tokens


@torch.no_grad()
def sample_tokens(gpt, cond, generator=None, temperature=1.2, top_k=128, kv_cache=True):
    """Token grids (n, n_tokens) for standardised conditions `cond` (n, 9), uniforms from a CPU generator."""
    u = data.noise((len(cond), gpt.n_tokens), generator, cond.device, uniform=True)
    return tokens_from(gpt, cond, u, temperature, top_k, kv_cache)


class Sampler(data.Sampler):
    """The whole autoregressive sampler as one module (bench.py, --export): counts from cond (n, 9) and the
    uniforms u (n, n_tokens) that pick each token by inverse CDF. The export traces the loop unrolled (n_tokens
    GPT steps with their KV cache, then the decoder): one graph, weights shared, no step network to drive."""
    uniform = ("u",)

    def __init__(self, vqae, gpt, shape, temperature=1.2, top_k=128, kv_cache=True):
        super().__init__(steps=gpt.n_tokens, temperature=temperature, top_k=top_k)
        self.vqae, self.gpt, self.shape, self.kw = vqae, gpt, tuple(shape), dict(temperature=temperature, top_k=top_k,
                                                                              kv_cache=kv_cache)

    def noise_shapes(self, n):
        return {"u": (n, self.gpt.n_tokens)}

    def forward(self, cond, u):
        tokens = tokens_from(self.gpt, cond, u, **self.kw)
        zq = self.vqae.vq.embed(tokens.view(-1, *self.vqae.token_grid(self.shape)))
        return data.to_counts(F.relu(self.vqae.decode(zq, self.shape)))


@torch.no_grad()
def sample(vqae, gpt, cond, shape, generator=None, temperature=1.2, top_k=128, kv_cache=True):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9); uniforms from a CPU generator."""
    return Sampler(vqae, gpt, shape, temperature, top_k, kv_cache).run(cond, generator)


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


def one_cycle(step, total, warmup, div=25.0, final_div=1000.0):
    """LR multiplier of the reference's schedule (optax.cosine_onecycle_schedule, = torch OneCycleLR 'cos'):
    cosine from 1/div up to 1 over the first `warmup` fraction of `total` steps, then cosine down to
    1/(div * final_div)."""
    w = max(1, round(warmup * total))
    a, b, f = (1 / div, 1.0, step / w) if step < w else (1.0, 1 / (div * final_div), (step - w) / max(1, total - w))
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))


def optimizers(stage, nets, args):
    """[(network, its optimiser)]: stage 1 the tokenizer and D (Adam, no weight decay, as published), stage 2
    the GPT (AdamW). Each network is a separate optimisation problem with its own clipping."""
    if stage == 1:
        return [(nets["tokenizer"], torch.optim.Adam(nets["tokenizer"].parameters(), args.lr, betas=tuple(args.betas))),
                (nets["discriminator"], torch.optim.Adam(nets["discriminator"].parameters(), args.d_lr,
                                                         betas=tuple(args.d_betas)))]
    return [(nets["gpt"], torch.optim.AdamW(nets["gpt"].parameters(), args.lr2, betas=tuple(args.betas2),
                                            eps=args.eps2, weight_decay=args.wd2))]


def clip_and_step(opts, clip):
    """Clip each network's gradient on its own (clip > 0), then step its optimiser: a huge discriminator
    gradient must not shrink the tokenizer's update, nor the other way round."""
    for net, opt in opts:
        if clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()


def fit(stage, nets, loss_fn, tensors, epochs, args, state, save, validate):
    """The training loop of one stage (both stages share it): resumable at any step."""
    dev = next(nets["tokenizer"].parameters()).device
    opts = optimizers(stage, nets, args)
    spe, planned, total = schedule(len(tensors[0]), epochs, args)
    warmup = args.warmup if stage == 1 else args.warmup2
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: one_cycle(s, planned, warmup)) for _, o in opts]
    noise = torch.Generator().manual_seed(args.seed + stage)
    st = state.setdefault(f"stage{stage}", dict(step=0))
    if "opt" in st:                                                # resume
        for (_, o), s, so, ss in zip(opts, scheds, st["opt"], st["sched"]):
            o.load_state_dict(so), s.load_state_dict(ss)
        noise.set_state(st["noise"]), torch.set_rng_state(st["rng"])
    print(f"stage {stage}: " + " + ".join(f"{sum(p.numel() for p in net.parameters()):,}" for net, _ in opts) +
          f" parameters ({'tokenizer + discriminator' if stage == 1 else 'GPT'}), {spe} steps per epoch, {total} steps")

    def checkpoint():
        st.update(opt=[o.state_dict() for _, o in opts], sched=[s.state_dict() for s in scheds],
                  noise=noise.get_state(), rng=torch.get_rng_state())
        save()

    t0, losses = time.time(), []
    while st["step"] < total:
        epoch = st["step"] // spe
        order = torch.Generator().manual_seed(args.seed * 100_003 + 1000 * stage + epoch)
        bar = tqdm(data.batches(tensors, args.batch_size, order), total=spe, initial=st["step"] - epoch * spe,
                   desc=f"stage {stage} epoch {epoch + 1}/{epochs}", leave=False, disable=args.smoke or not data.main_process())
        for i, batch in enumerate(bar):
            if i < st["step"] - epoch * spe:
                continue
            with data.autocast(dev, args.amp):
                loss = loss_fn(*[b.to(dev) for b in batch], noise)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage {stage}: loss is {loss.item()} at step {st['step']} (lower --lr?)")
            for _, o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_step(opts, args.clip)
            for s in scheds:
                s.step()
            st["step"] += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if st["step"] % args.ckpt_every == 0:
                checkpoint()
            if (st["step"] % args.val_every == 0 or st["step"] >= total) and data.main_process():
                bar.clear()
                validate(st["step"], float(np.mean(losses)), (time.time() - t0) / 60)
                losses = []
            if st["step"] >= total:
                break
        bar.close()
    checkpoint()


def train(args):
    dist = data.dist_init(args.device)                   # torchrun: this rank (data.py); plain python: world 1
    dev = dist.device
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
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    shape = tuple(data.SHAPES[args.detector])
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    nets = {k: m.to(dev) for k, m in build_networks(vars(args)).items()}
    vqae, disc, gpt = nets.values()
    vqae_t, disc_t, gpt_t = (data.wrap_ddp(m, dist) for m in (vqae, disc, gpt))   # training steps: shard, DDP
    state = dict()
    if ck is not None:
        load_weights(nets, ck, ckpt_path)
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
        # DDP equals one process exactly: losses and the EMA codebook update see the gathered global batch
        fit(1, nets, lambda x, g: vq_loss(vqae_t, disc_t, x, g, args, state["stage1"]["step"]), (x_tr,), args.epochs,
            args, state, save, validate1)
    if args.stage in (None, 2) and state.get("stage2", {}).get("step", 0) < target2:
        if state.get("stage1", {}).get("step", 0) < target1:
            raise data.DataError(f"{ckpt_path}: stage 1 is not finished; train it first (--stage 1)")
        vqae.eval().requires_grad_(False)
        t_tr, t_va = tokenize(vqae, x_tr, dev).short(), tokenize(vqae, x_va, dev).short()
        print(f"tokens: {t_tr.shape[1]} per response, {len(torch.unique(t_tr))} distinct codes in the training set")
        fit(2, nets, lambda t, c, g: gpt_loss(gpt_t, t.long(), c), (t_tr, c_tr), args.epochs2, args, state, save, validate2)
    print(f"checkpoint {ckpt_path}")
    data.dist_close(dist)
    return ckpt_path


def load_weights(nets, ck, path):
    try:
        for name, key in (("tokenizer", "vqae"), ("discriminator", "disc"), ("gpt", "gpt")):
            nets[name].load_state_dict(ck[key])
    except RuntimeError:
        raise data.DataError(f"{path}: written by an older vqgan.py whose networks differ (before the published "
                             "tokenizer): train a new one") from None


def load_model(args):
    path = args.ckpt or Path(args.out) / "ckpt.pt"
    ck = data.load_checkpoint(path, NAME, args.detector)
    if not ck["state"].get("stage2", {}).get("step"):
        raise data.DataError(f"{path}: stage 2 is not trained yet (python {NAME}.py --train --resume)")
    dev = data.pick_device(args.device)
    nets = build_networks(ck["args"])
    load_weights(nets, ck, path)
    return ck, nets["tokenizer"].to(dev).eval(), nets["gpt"].to(dev).eval(), dev


def generator_fn(vqae, gpt, ck, device, temperature, top_k, kv_cache=True, amp=False):
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(vqae, gpt, cond.to(device), tuple(ck["data"]["shape"]), g, temperature, top_k, kv_cache).float()
    return generate


def sample_cmd(args):
    ck, vqae, gpt, dev = load_model(args)
    gen = generator_fn(vqae, gpt, ck, dev, args.temperature, args.top_k, not args.no_kv_cache, args.amp)
    data.sample_to_file(ck, gen, args)


def export_cmd(args):
    ck, vqae, gpt, dev = load_model(args)
    data.export_onnx(Sampler(vqae, gpt, ck["data"]["shape"], args.temperature, args.top_k), ck, args.export, NAME)


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
        if args.export:
            export_cmd(args)
    except (data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
