"""Conditional variational autoencoder for the ALICE Zero Degree Calorimeters.

Publication: the master's thesis arXiv 2407.16704 (Sec. 3.1 loss, 4.3 training, 4.4 networks, Table 4.3:
VAE W 11.52 CNN / 11.90 ViT on the real neutron set; Table A.1 optimisers). Settings its text leaves open come
from the authors' code, github.com/m-wojnar/zdc (variational.py, utils/losses.py, architectures/*.py).

Method. An encoder q(z | x, c) maps a response x = log1p(counts) and the 9 standardised particle features c to
the mean and log-variance of a 10-d Gaussian; a decoder D(z, c) maps a latent and the condition to a response:
    z = mu + sigma * eps,   loss = sum over pixels (D(z, c) - x)^2 + 0.7 KL(q(z | x, c) || N(0, I)),
both terms averaged over the batch (thesis eq. 3.1-3.3, the reference's kl_weight 0.7). Sampling: z ~ N(0, I),
counts = expm1(D(z, c)); D ends in ReLU(. + 0.5), as the reference, so exact zeros are possible.
CPU default: a compact conv pair (258,349 parameters), NAdam (Table A.1, CNN column), batch 128, 2 epochs.
--paper: the thesis' ViT pair (Appendix A, 1.02M), AdamW on a one-cycle cosine (Table A.1, ViT column), batch
256, 100 epochs. --arch vdvae: the thesis' CNN pair (Appendix A). Table 4.3's other rows: --variant embedding
(a learned particle-type embedding joins c) and --variant supervised (E(x) predicts c, eq. 3.5; no noise).

Usage:
    python vae.py --train                        # ZN, CPU default (2 epochs, ~8 min on 2 cores), runs/vae
    python vae.py --train --paper                # the thesis' ViT, batch 256, 100 epochs (1.02M parameters)
    python vae.py --train --arch vdvae --variant embedding   # Table 4.3: --arch cnn|vdvae|vit, any --variant
    python vae.py --eval --ckpt runs/vae/ckpt.pt --max-test 2000 --plot
    python vae.py --sample --ckpt runs/vae/ckpt.pt --n 1000 --out samples.npz
    python vae.py --export vae.onnx --ckpt runs/vae/ckpt.pt   # the sampler as one ONNX graph

Every setting beside its source, and the deviations from the thesis: docs/fidelity/vae.md.
Runs, studies (the condition-use study, the Table 4.3 rows) and their history: docs/models/vae.md.
"""
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
NAME = "vae"
LATENT = 10         # latent dimensions (thesis Sec. 4.4)
TYPE_DIM = 16       # --variant embedding: the learned particle-type embedding's width (authors' embedding.py)
# Each backbone's sizes and learning rate: (CPU default, --paper, --smoke), laid over the presets below
# (explicit settings still win). cnn: this repository's conv pair, at --paper in the ViT's size class
# (1.02M); vdvae: the thesis' CNN (64 / 128 / 256 channels at --paper); vit: the thesis' ViT (width 96).
ARCH = {"cnn": (dict(width=8, hidden=64, lr=1.4e-3), dict(width=16, hidden=128), dict(width=4, hidden=16)),
        "vdvae": (dict(width=16, hidden=64, lr=1.4e-3), dict(width=64), dict(width=8, hidden=16)),
        "vit": (dict(width=96, hidden=64, blocks=4, lr=3.5e-3), {}, dict(width=16, hidden=8, blocks=1))}
DEFAULTS = dict(arch="cnn", variant="vae", epochs=2, batch_size=128, **ARCH["cnn"][0], blocks=4, kl=0.7,
                beta=200.0, val_every=500)
PAPER = dict(arch="vit", epochs=100, batch_size=256,        # Table 4.2 (the ViT's sizes and lr: ARCH)
             protocol="pooled", max_test=0)                 # --eval: the whole test split, 5 generations pooled
VARIANTS = ["vae", "embedding", "supervised"]                # Table 4.3's rows (--variant)
SMOKE = dict(limit=1500, max_steps=6, batch_size=32, max_test=200, reps=2, ckpt_every=3)
PUBLISHED = {"vae": (1_020_217, "thesis Sec. 4.4 'approximately one million'; 1,020,217 is our count of the "
                                "authors' ViT VAE (m-wojnar/zdc variational.py + architectures/vit.py)")}
DEVIATIONS = ("ViT: the decoder also gets the condition token (thesis text), one (mu, logvar) layer: +540",
              "--variant supervised: decodes D(c) as eq. 3.5; the code feeds 36 x 4 Gaussian tokens too")
# The optimisers of Table A.1. CNN column (cnn, vdvae; the reference's conv.py has the same numbers): Adam
# with Nesterov momentum (optax.adam(nesterov=True), Dozat's NAdam), no weight decay, constant rate. ViT
# column: AdamW on a one-cycle cosine schedule (initial div 35, final div 770, warm-up 32 % of the steps).
BETAS = (0.76, 0.88)
EPS = 6.1e-8
VIT_OPT = dict(betas=(0.64, 0.73), eps=1.5e-7, weight_decay=0.068)
VIT_CYCLE = dict(warmup=0.32, div=35.0, final_div=770.0)


# ----------------------------------------------------------------------------------------------------------
# The default network: a compact conv encoder and decoder (--arch cnn)
# ----------------------------------------------------------------------------------------------------------
def conv(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, padding=1), nn.LeakyReLU(0.1))


class VAE(nn.Module):
    """Encoder q(z | x, c) and decoder D(z, c). The CPU default (cnn): 3x3 convs (w, 2w, 2w channels, the last
    two with stride 2: ZN 44x44 -> 11x11; ZP 56x30 padded to 56x32 -> 14x8), flatten, c joined, dense `hidden`
    -> (mu, logvar); decoder: dense (z, c) -> `hidden` -> (2w, H/4, W/4), two nearest x2 upsamplings each
    followed by a 3x3 conv (w channels), a 3x3 conv to 1 channel, ReLU(. + 0.5); LeakyReLU(0.1), no
    normalisation. vit / vdvae: the thesis' token backbones (Appendix A) with a dense per token and a flatten
    at the latent. variant "embedding": c is joined by a learned embedding of the particle type (cond carries
    the type index as a 10th column); "supervised": the latent is the predicted features E(x) (9-d, no
    condition in the encoder, no noise) and the decoder reads only it."""

    def __init__(self, shape, width=8, hidden=64, n_cond=9, latent=LATENT, arch="cnn", variant="vae",
                 blocks=4):
        super().__init__()
        self.shape = tuple(shape)
        self.w = width
        self.arch = arch
        self.supervised = variant == "supervised"
        self.latent = 0 if self.supervised else latent                    # the noise a sample draws
        self.type_embed = nn.Embedding(len(data.PARTICLES) + 1, TYPE_DIM) if variant == "embedding" else None
        c_dim = n_cond + (TYPE_DIM if variant == "embedding" else 0)
        enc_c, enc_out = (0, n_cond) if self.supervised else (c_dim, 2 * latent)
        if arch in ("vit", "vdvae"):      # tokens: the encoder's, a dense per token, flattened; the decoder's
            vit = arch == "vit"
            (eh, ew), (gh, gw) = (vit_grid(shape),) * 2 if vit else conv_grids(shape)
            self.enc = ViTEncoder(shape, width, blocks, enc_c) if vit else ConvEncoder(width, enc_c)
            d_tok = width if vit else 4 * width + enc_c
            self.enc_head = nn.Sequential(nn.Linear(d_tok, hidden), nn.Flatten(),
                                          nn.Linear(eh * ew * hidden, enc_out))
            self.dec_head = nn.Sequential(nn.Linear(self.latent + c_dim, gh * gw * hidden),
                                          nn.Unflatten(1, (gh * gw, hidden)))
            self.dec = (ViTDecoder(shape, hidden, width, blocks, c_dim, offset=0.5) if vit
                        else ConvDecoder(shape, hidden, width, c_dim, offset=0.5))
            return
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        flat = 2 * width * self.h0 * self.w0
        self.enc = nn.Sequential(conv(1, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width, 2),
                                 nn.Flatten())
        self.enc_head = nn.Sequential(nn.Linear(flat + enc_c, hidden), nn.LeakyReLU(0.1),
                                      nn.Linear(hidden, enc_out))
        self.dec_head = nn.Sequential(nn.Linear(self.latent + c_dim, hidden), nn.LeakyReLU(0.1),
                                      nn.Linear(hidden, flat), nn.LeakyReLU(0.1))
        self.dec = nn.Sequential(nn.Upsample(scale_factor=2), conv(2 * width, width),
                                 nn.Upsample(scale_factor=2), conv(width, width),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def condition(self, cond):
        """The condition the networks read: the 9 features, and the type embedding (--variant embedding)."""
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
            h = self.enc(F.pad(x, (0, -W % 4, 0, -H % 4)))
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
        h = self.dec_head(torch.cat([z, c], 1)).view(-1, 2 * self.w, self.h0, self.w0)
        return F.relu(self.dec(h) + 0.5)[..., :self.shape[0], :self.shape[1]]   # + 0.5 as the reference

    def code(self, mu, cond):
        """The decoder's (z, c) for a posterior mean (the supervised autoencoder: its predicted features)."""
        return (mu[:, :0], mu) if self.supervised else (mu, cond)


def build_networks(cfg):
    """{'vae': the network (encoder and decoder in one module)} of a run's (or a checkpoint's) settings."""
    return {"vae": build_model(cfg)}


def build_model(cfg):
    return VAE(data.SHAPES[cfg["detector"]], cfg["width"], cfg["hidden"], arch=cfg["arch"],
               variant=cfg["variant"], blocks=cfg["blocks"])


# ----------------------------------------------------------------------------------------------------------
# The method: loss and sampler
# ----------------------------------------------------------------------------------------------------------
def vae_loss(model, x, cond, generator, kl_weight):
    """(loss, reconstruction, KL per latent dimension (latent,)) of a batch: the squared error summed over
    pixels (thesis eq. 3.3), the KL to N(0, I) summed over latent dimensions, both averaged over the batch.
    generator=None: z = posterior mean. The supervised autoencoder (eq. 3.5): the reconstruction D(E(x)) +
    kl_weight (there: beta) x ||E(x) - c||^2, its third output per feature (9,)."""
    mu, logvar = model.encode(x, cond)
    if model.supervised:
        reg = (mu - cond).pow(2).mean(0)
        out = model.decode(*model.code(mu, cond))
    else:
        z = mu if generator is None else mu + data.noise(mu.shape, generator, x.device) * (0.5 * logvar).exp()
        reg = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)
        out = model.decode(z, cond)
    rec = (out - x).pow(2).flatten(1).sum(1).mean()
    return rec + kl_weight * reg.sum(), rec, reg


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): counts from cond (n, 9) and z (n, LATENT)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def noise_shapes(self, n):
        return {"z": (n, self.model.latent)}        # supervised autoencoder: (n, 0); D(c) is deterministic

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
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9; --variant embedding: n, 10 with
    the type index last). Noise is drawn on the CPU from `generator` and moved to the model's device, so a
    seed gives the same samples on any device. The supervised autoencoder draws none: D(c) is deterministic."""
    return Sampler(model).run(cond, generator)


@torch.no_grad()
def reconstruct(model, x, cond):
    """Encode -> decode (posterior mean) of log1p images: raw counts (n, H, W)."""
    return data.to_counts(model.decode(*model.code(model.encode(x, cond)[0], cond)))


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def one_cycle(step, total, warmup, div, final_div):
    """LR factor of the cosine one-cycle schedule (optax.cosine_onecycle_schedule, torch's OneCycleLR): cosine
    from 1/div up to 1 over the first `warmup` fraction of `total` steps, then down to 1/(div*final_div)."""
    w = warmup * total
    if step < w:
        t, start, end = step / w, 1 / div, 1.0
    else:
        t, start, end = min((step - w) / max(total - w, 1), 1.0), 1.0, 1 / (div * final_div)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def train(args):
    run = data.Run(args, NAME)                  # resume, data, checkpoints, logging, DDP: data.py Part II
    args, split, dev = run.args, run.split, run.device
    typed = args.variant == "embedding"         # the particle type index as a 10th condition column
    x_tr, c_tr = split.x("train"), split.cond("train", typed)
    x_va, c_va = split.x("val")[:2000], split.cond("val", typed)[:2000]
    model = build_model(vars(args)).to(dev)
    planned = run.plan(len(x_tr), args.batch_size, sum(p.numel() for p in model.parameters()))
    if args.arch == "vit":                      # Table A.1's ViT column; the schedule spans --epochs
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, **VIT_OPT)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: one_cycle(s, planned, **VIT_CYCLE))
    else:                                       # NAdam without its momentum schedule (momentum_decay -> inf
        # keeps mu_t = beta1) is the reference's optax.adam(nesterov=True), step for step (a test checks it)
        opt = torch.optim.NAdam(model.parameters(), lr=args.lr, betas=BETAS, eps=EPS, momentum_decay=1e9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)                 # constant rate
    scaler = data.grad_scaler(args.amp, dev)
    noise = torch.Generator(dev).manual_seed(args.seed)
    run.keep(weights=model, opt=opt, sched=sched, scaler=scaler, noise=noise)   # in every checkpoint
    net = run.wrap(model)                       # under torchrun: DDP, and still one process's loss exactly
    weight = args.beta if args.variant == "supervised" else args.kl    # supervised: weight of ||E(x) - c||^2

    def validate():
        """Posterior-mean losses of validation events: val_loss, val_rec, val_kl (KL near 0: posterior
        collapse; the supervised autoencoder logs its feature regression ||E(x) - c||^2 as *_kl), val_active
        (latent dimensions whose mean KL exceeds 0.01 nats); val_W (Wasserstein of 1000 generated samples) and
        rec_W (encode -> decode of the same 1000 responses: the best the decoder can do)."""
        model.eval()
        with torch.no_grad():
            parts = [vae_loss(model, x.to(dev), c.to(dev), None, weight)
                     for x, c in data.batches((x_va, c_va), 500, shuffle=False)]
            kl_dim = torch.stack([p[2] for p in parts]).mean(0)
            k = min(1000, len(x_va))
            gen = sample(model, c_va[:k].to(dev), torch.Generator().manual_seed(0))
            recon = reconstruct(model, x_va[:k].to(dev), c_va[:k].to(dev))
            true = split.counts("val")[:k]
        model.train()
        return dict(val_loss=float(np.mean([p[0].item() for p in parts])),
                    val_rec=float(np.mean([p[1].item() for p in parts])), val_kl=float(kl_dim.sum()),
                    val_active=int((kl_dim > 0.01).sum()), val_W=metrics.wasserstein(true, gen)[0],
                    rec_W=metrics.wasserstein(true, recon)[0])
    run.validate = validate

    for x, c in run.batches((x_tr, c_tr)):
        with data.autocast(dev, args.amp):
            loss, _, reg = vae_loss(net, x, c, noise, weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        run.step_done(train_loss=loss, train_kl=reg.sum())
    return run.finish()


# ==========================================================================================================
# Appendix A. The thesis' backbones (Sec. 4.4; the authors' architectures/vit.py and conv.py), which the
# default run does not build: --arch vit (the --paper default) and --arch vdvae
# ==========================================================================================================
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


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("VAE")
    g.add_argument("--arch", choices=list(ARCH), help="backbone: cnn (this repository's conv pair, CPU "
                   "default), vdvae (the thesis' CNN pair) or vit (the thesis' ViT pair, --paper)")
    g.add_argument("--variant", choices=VARIANTS, help="Table 4.3's rows: vae; embedding (+ a learned "
                   "embedding of the particle type, the PDG id of the 10th particles column); supervised "
                   "(the latent is the predicted features)")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    if args.arch not in ARCH or args.variant not in VARIANTS:
        p.error(f"arch is one of {', '.join(ARCH)}, variant one of {', '.join(VARIANTS)}")
    cpu, paper, smoke = ARCH[args.arch]
    for k, v in {**cpu, **(paper if args.paper else {}), **(smoke if args.smoke else {})}.items():
        if not given(argv, k):                  # the backbone's sizes over the presets; explicit settings win
            setattr(args, k, v)
    for bad, msg in [(min(args.width, args.hidden, args.blocks) <= 0, "width, hidden, blocks: positive"),
                     (args.arch == "vit" and args.width % 4,
                      f"width {args.width}: the ViT's 4 attention heads need a multiple of 4"),
                     (not args.kl >= 0, f"kl must be >= 0 (got {args.kl})"),
                     (not args.beta >= 0, f"beta must be >= 0 (got {args.beta})")]:
        if bad:
            p.error(msg)
    return args


def given(argv, key):
    """Whether the command line sets `key` itself: --key VALUE, --key=VALUE or --set key=VALUE."""
    flag = "--" + key.replace("_", "-")
    words = sys.argv[1:] if argv is None else [str(w) for w in argv]
    return any(w == flag or w.startswith((flag + "=", key + "=", f"--set={key}=")) for w in words)


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's weights."""
    model = build_model(ck["args"]).to(device)
    model.load_state_dict(ck["weights"])
    return Sampler(model)


def evaluate(args, ck, sampler, device):
    """The evaluation protocol (metrics.run_eval), and beside it the reconstruction Wasserstein of the test
    responses (encode -> decode): the best the decoder can do."""
    split = data.split_from_checkpoint(ck)
    typed = ck["args"]["variant"] == "embedding"
    idx, true, cond = metrics.test_part(split, args.max_test or None, typed=typed)
    rec = torch.cat([reconstruct(sampler.model, x.to(device), c.to(device)).cpu()
                     for x, c in zip(torch.split(data.to_log(true), 1024), torch.split(cond, 1024))])
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    kind = [k for k in (ck["args"]["variant"], ck["args"]["arch"]) if k not in ("vae", "cnn")]
    name = f"{NAME} ({', '.join(kind)})" if kind else NAME      # Table 4.3's rows: their names in RESULTS.md
    return metrics.run_eval(data.generator(sampler, device, args.amp), split, path, args, name,
                            dict(reconstruction_W=rec_w, n_params=ck["n_params"], train_steps=ck["step"]))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
