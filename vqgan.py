"""VQ-GAN with a GPT prior for the ALICE Zero Degree Calorimeters: discrete tokens, then autoregression.

Papers: the improved VQ-GAN of the flow-matching paper arXiv 2507.18811 and its poster (x4 downsampling, 121
tokens, EMA codebook 512 x 8, W 2.11 on the real neutron set), a follow-up of the thesis arXiv 2407.16704
(Sec. 3.5, 4.10: VQ-GAN + transformer, W 4.58); the authors' code m-wojnar/faster_zdc fills in the rest.

Method. Stage 1, the tokenizer: an encoder maps x = log1p(counts) to a grid of vectors z, each l2-normalised
and replaced by its nearest l2-normalised codebook entry q (cosine lookup, straight-through gradient); a
decoder rebuilds x_rec; the codebook is an exponential moving average of the vectors assigned to each code.
    loss_1 = |x_rec - x|^2 + 0.25 |z - sg(q)|^2 - mean D(x_rec),   D: a patch discriminator (hinge loss),
the image gradients of the L2 and adversarial terms rescaled to fixed norms (0.1 and `adv`). Stage 2, the
prior: a causal GPT over [P condition tokens (projected features), the image tokens in raster order],
    loss_2 = -sum_i log p(token_i | token_<i, c).
Sampling: token by token (temperature 1.2, top-k 128; by inverse CDF from uniforms drawn up front; KV cache),
then decode, counts = expm1(relu(x)). Both stages: one-cycle cosine learning rates.
CPU default: 1 + 1 epochs, larger learning rates, dead-code restarts, a smaller GPT. --paper: the published
tokenizer (59,924 parameters) and GPT, 50 + 50 epochs. --arch vit: the thesis' ViT tokenizer (Appendix A).

Usage:
    python vqgan.py --train                      # both stages, ZN, CPU default (~0.9 s per stage-1 step)
    python vqgan.py --train --stage 1            # only the tokenizer (--stage 2 then continues its run)
    python vqgan.py --train --paper              # the published setting (50 + 50 epochs: a GPU job)
    python vqgan.py --train --arch vit           # the thesis' ViT VQ-GAN (36 tokens, codebook 256 x 256)
    python vqgan.py --eval --ckpt runs/vqgan/ckpt.pt --max-test 2000 --plot   # --sweep: temperature x top-k
    python vqgan.py --sample --ckpt runs/vqgan/ckpt.pt --n 1000 --out samples.npz

Every setting beside its source, and the deviations from the paper: docs/fidelity/vqgan.md.
Runs, sweeps, ablations and their history: docs/models/vqgan.md.
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
NAME = "vqgan"
# --lr, --epochs: the tokenizer's (stage 1); d_lr: the discriminator's; lr2, epochs2 ...: the GPT's (stage 2)
DEFAULTS = dict(epochs=1, epochs2=1, batch_size=128, lr=2e-3, d_lr=2e-3, lr2=2e-3, ae_width=4, blocks=4,
                d_width=16, codes=512, code_dim=8, vq_decay=0.99, dead_below=0.01, beta=0.25, adv=0.1,
                clip=1.0, embed=64, heads=4, layers=4, mlp=256, dropout=0.0, prefix=4, betas=[0.5, 0.9],
                d_betas=[0.5, 0.9], betas2=[0.9, 0.95], eps2=1e-8, wd2=0.01, warmup=0.2, warmup2=0.33)
# faster_zdc vq_gan.py, gpt.py, utils/nn.py, utils/train.py (--eval), architectures/conv.py: docs/fidelity
PAPER = dict(epochs=50, epochs2=50, batch_size=256, lr=2.2e-4, d_lr=1.3e-6, lr2=5.2e-3, embed=128, layers=6,
             dropout=0.1, prefix=2, adv=1.0, dead_below=0.0, clip=0.0, betas=[0.67, 0.9], d_betas=[0.6, 0.55],
             betas2=[0.87, 0.998], eps2=1e-5, wd2=0.14, protocol="pooled", max_test=0)
SMOKE = dict(limit=1500, ae_width=2, d_width=4, embed=16, layers=2, mlp=32, batch_size=32, codes=64,
             max_steps=4, max_test=200, reps=2, ckpt_every=2)
PUBLISHED = {"tokenizer": (59_924, "arXiv 2507.18811 VQ-GAN; faster_zdc vq_gan.py VQVAE, width 4, 8-d codes")}
DEVIATIONS = ("no LPIPS perceptual term (it needs ImageNet VGG16 weights and LPIPS's trained heads)",
              "D: a patch conv net from scratch, not the pretrained VGG16 (its lr 1.3e-6 was tuned for that)",
              "GPT condition: 2 learned prefix embeddings, not the 2 tokens of the authors' condition VQ-VAE",
              "decoder output ReLU only when decoding to counts", "EMA codebook counts start at 1, not 0",
              "float32 (the code's layers run in bfloat16: --amp)",
              "init: torch's defaults but for the residual blocks' last conv (the code: N(0, 1/(c k^2)))")
# --arch vit: the thesis' VQ tokenizer at its 1M size (Table 4.5: 4 blocks, 4 heads, token width 96;
# Sec. 4.10: codebook 256), over the presets (--set still wins)
VIT = dict(codes=256, code_dim=256, ae_width=96, blocks=4)
VIT_SMOKE = dict(codes=64, code_dim=16, ae_width=16, blocks=1)
MULTS = (2, 3, 4)           # the tokenizer's levels: channels 2w, 3w, 4w
AE_HEADS = 2                # attention heads in the tokenizer's middle
REC_NORM = 0.1              # the norm of the L2 term's gradient at the reconstruction (the reference's)


# ----------------------------------------------------------------------------------------------------------
# The default network: a residual conv tokenizer, a patch discriminator, a GPT
# ----------------------------------------------------------------------------------------------------------
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
        self.body = nn.Sequential(ChannelNorm(ci), nn.SiLU(), conv(ci, co), ChannelNorm(co), nn.SiLU(),
                                  conv(co, co))
        self.skip = conv(ci, co, 1) if ci != co else nn.Identity()
        nn.init.normal_(self.body[-1].weight, std=1e-4 / co)    # as the reference: starts near the identity

    def forward(self, x):
        return self.skip(x) + self.body(x)


class SelfAttention(nn.Module):
    """Bias-free multi-head self-attention over the pixels, with a pre-norm and a residual connection."""

    def __init__(self, ch, heads=AE_HEADS):
        super().__init__()
        self.norm = ChannelNorm(ch)
        self.attn = nn.MultiheadAttention(ch, heads, bias=False, batch_first=True)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(h, h, h, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)


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
        """EMA update from a batch, then dead-code restarts (not in the reference; off under --paper): a code
        whose EMA count falls below `dead_below` becomes a random encoder output of the batch (count 1)."""
        z = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        cs, es, book = ema_codebook(self.cluster_size, self.embed_sum, z, idx.reshape(-1), decay)
        dead = (cs < dead_below).nonzero().squeeze(1)
        if len(dead):
            rows = torch.randint(len(z), (len(dead),), generator=generator, device=generator.device)
            rows = rows.to(z.device)
            cs[dead] = 1.0
            es[dead] = z[rows]
            book[dead] = z[rows]
        self.cluster_size.copy_(cs)
        self.embed_sum.copy_(es)
        self.codebook.copy_(book)


class VQAE(nn.Module):
    """The reference tokenizer: residual conv encoder/decoder (x4 downsampling, attention in the middle) and a
    vector quantiser: (1, H, W) log1p image <-> (h, w) tokens (ZN 44x44: 11x11; ZP 56x30, padded to 56x32:
    14x8)."""

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


def patch_disc(width=16):
    """Small patch discriminator: one logit per ~10x10 receptive field of the log1p image; the last layer
    starts at zero (as the reference's discriminator heads), so D and its gradient start neutral."""
    d = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 2 * width, 4, 2, 1),
                      nn.GroupNorm(math.gcd(2 * width, 4), 2 * width), nn.LeakyReLU(0.2),
                      nn.Conv2d(2 * width, 1, 3, padding=1))
    nn.init.zeros_(d[-1].weight)
    nn.init.zeros_(d[-1].bias)
    return d


class Block(nn.Module):
    """Pre-LN transformer block, bias-free; causal self-attention with an optional KV cache (a dict, filled
    from start = 0); dropout in the MLP."""

    def __init__(self, embed, heads, mlp, dropout):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(embed, bias=False)
        self.qkv = nn.Linear(embed, 3 * embed, bias=False)
        self.proj = nn.Linear(embed, embed, bias=False)
        self.ln2 = nn.LayerNorm(embed, bias=False)
        self.mlp = nn.Sequential(nn.Linear(embed, mlp, bias=False), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(mlp, embed, bias=False), nn.Dropout(dropout))

    def forward(self, x, cache=None, start=0):
        B, L, E = x.shape
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        if cache is not None:        # keys, values of all positions preallocated; attend to 0 .. start+L-1
            if start == 0:
                cache["k"] = k.new_zeros(B, self.heads, cache["size"], k.shape[-1])
                cache["v"] = v.new_zeros(B, self.heads, cache["size"], v.shape[-1])
            cache["k"][:, :, start:start + L] = k
            cache["v"][:, :, start:start + L] = v
            k, v = cache["k"][:, :, :start + L], cache["v"][:, :, :start + L]
        assert L == 1 or start == 0, "decode several positions only from the start"
        a = F.scaled_dot_product_attention(q, k, v, is_causal=bool(L > 1))   # bool: L is a tensor when traced
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, E))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Causal transformer over [P condition prefix tokens, image tokens in raster order]; the output layer is
    the token embedding (tied weights)."""

    def __init__(self, codes, n_tokens, embed=64, heads=4, layers=4, prefix=4, mlp=256, dropout=0.0,
                 n_cond=9):
        super().__init__()
        self.prefix, self.n_tokens = prefix, n_tokens
        self.cond = nn.Sequential(nn.Linear(n_cond, embed), nn.SiLU(), nn.Linear(embed, prefix * embed))
        self.tok = nn.Embedding(codes, embed)
        self.pos = nn.Parameter(torch.zeros(prefix + n_tokens, embed))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.tok.weight, std=embed ** -0.5)                # as flax's Embed
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


def grid(shape, arch="cnn"):
    """The token grid (h, w) of an image shape: x4 downsampling of the image padded to a multiple of 4;
    --arch vit: 8x8 patches of the image padded to a multiple of 8 (ZN 6x6, ZP 7x4)."""
    return vit_grid(shape) if arch == "vit" else (math.ceil(shape[0] / 4), math.ceil(shape[1] / 4))


def build_networks(cfg):
    """{'tokenizer', 'discriminator', 'gpt'} described by a run's settings (or a checkpoint's), built in this
    order (the initialisation draws from the global RNG)."""
    shape, arch = data.SHAPES[cfg["detector"]], cfg.get("arch", "cnn")
    h, w = grid(shape, arch)
    if arch == "vit":
        tokenizer = ViTVQAE(shape, cfg["ae_width"], cfg["blocks"], cfg["code_dim"], cfg["codes"])
    else:
        tokenizer = VQAE(cfg["ae_width"], cfg["code_dim"], cfg["codes"])
    return dict(tokenizer=tokenizer, discriminator=patch_disc(cfg["d_width"]),
                gpt=GPT(cfg["codes"], h * w, cfg["embed"], cfg["heads"], cfg["layers"], cfg["prefix"],
                        cfg["mlp"], cfg["dropout"]))


def build_model(cfg):
    """(tokenizer, discriminator, GPT): the tuple bench.py unpacks."""
    return tuple(build_networks(cfg).values())


# ----------------------------------------------------------------------------------------------------------
# The method: losses and sampler
# ----------------------------------------------------------------------------------------------------------
def vq_loss(vqae, disc, x, generator, args, update=True):
    """Stage 1: L2 (image gradient of norm 0.1) + beta * commitment, and (update=True, adv > 0) the
    adversarial term (image gradient of norm adv, D's weights detached) + D's hinge loss (on the detached
    reconstruction: D's gradient comes from it alone). update=True also applies the EMA codebook update
    and the dead-code restarts of this batch."""
    z = vqae.encode(x)
    idx = vqae.vq.lookup(z)
    zq = vqae.vq.embed(idx)
    rec = vqae.decode(z + (zq - z).detach(), x.shape[-2:])              # straight through the quantiser
    loss = (GradNorm.apply(rec, REC_NORM) - x).pow(2).mean() + args.beta * (z - zq.detach()).pow(2).mean()
    if update:
        vqae.vq.update(z, idx, args.vq_decay, args.dead_below, generator)
    if update and args.adv > 0:
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        g_loss = -torch.func.functional_call(disc, frozen, (GradNorm.apply(rec, args.adv),)).mean()
        d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
        loss = loss + g_loss + d_loss
    return loss


class GradNorm(torch.autograd.Function):
    """Identity; its backward rescales the incoming gradient to norm `weight` (the reference's grad_norm): the
    loss terms are balanced by the size of their gradients at the image, not by weights."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.weight * g / (g.norm() + 1e-8), None


def ema_codebook(cluster_size, embed_sum, z, idx, decay, eps=1e-5):
    """One EMA step of the codebook statistics (pure). z (N, D) encoder outputs assigned to codes idx (N,).
    Returns the new counts (K,), sums (K, D) and codebook = sums / Laplace-smoothed counts."""
    onehot = F.one_hot(idx, len(cluster_size)).to(z.dtype)
    cs = decay * cluster_size + (1 - decay) * onehot.sum(0)
    es = decay * embed_sum + (1 - decay) * onehot.t() @ z
    n = cs.sum()
    smoothed = (cs + eps) / (n + len(cs) * eps) * n
    return cs, es, es / smoothed[:, None]


def gpt_loss(gpt, tokens, cond):
    """Stage 2: next-token cross entropy; the last prefix position predicts the first token."""
    logits = gpt(cond, tokens[:, :-1])[:, gpt.prefix - 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))


def pick(logits, u, temperature, top_k):
    """Token drawn by inverse CDF at uniforms u (n,) from the tempered, top-k truncated distribution."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], -float("inf"))
    cdf = logits.softmax(-1).cumsum(-1)    # inverse CDF: how many CDF values lie <= u (searchsorted, right)
    return (cdf <= (u * cdf[:, -1]).unsqueeze(1)).sum(1).clamp_max(cdf.shape[1] - 1)


def tokens_from(gpt, cond, u, temperature=1.2, top_k=128, kv_cache=True):
    """Token grids (n, n_tokens) for standardised conditions `cond` (n, 9) and uniforms u (n, n_tokens), in
    raster order. kv_cache=False recomputes every position at every step (the cache is tested against it)."""
    tokens = cond.new_zeros((cond.shape[0], 0), dtype=torch.long)
    caches = [dict(size=gpt.prefix + gpt.n_tokens) for _ in gpt.blocks] if kv_cache else None
    for t in range(gpt.n_tokens):
        if kv_cache:
            start = gpt.prefix + t - 1 if t else 0
            logits = gpt(cond, tokens[:, t - 1:t] if t else tokens, caches, start=start)
        else:
            logits = gpt(cond, tokens)
        tokens = torch.cat([tokens, pick(logits[:, -1], u[:, t], temperature, top_k)[:, None]], 1)
    return tokens


class Sampler(data.Sampler):
    """The whole autoregressive sampler as one module (bench.py, --export): counts from cond (n, 9) and the
    uniforms u (n, n_tokens) that pick each token by inverse CDF. The export traces the loop unrolled
    (n_tokens GPT steps with their KV cache, then the decoder): one graph, weights shared."""
    uniform = ("u",)

    def __init__(self, vqae, gpt, shape, temperature=1.2, top_k=128):
        super().__init__(steps=gpt.n_tokens, temperature=temperature, top_k=top_k)
        self.vqae = vqae
        self.gpt = gpt
        self.shape = tuple(shape)
        self.temperature, self.top_k = temperature, top_k

    def noise_shapes(self, n):
        return {"u": (n, self.gpt.n_tokens)}

    def forward(self, cond, u):
        tokens = tokens_from(self.gpt, cond, u, self.temperature, self.top_k)
        zq = self.vqae.vq.embed(tokens.view(-1, *self.vqae.token_grid(self.shape)))
        return data.to_counts(F.relu(self.vqae.decode(zq, self.shape)))


@torch.no_grad()
def sample(vqae, gpt, cond, shape, generator=None, temperature=1.2, top_k=128):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9), uniforms from `generator`."""
    return Sampler(vqae, gpt, shape, temperature, top_k).run(cond, generator)


# ----------------------------------------------------------------------------------------------------------
# Training
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


def one_cycle(step, total, warmup, div=25.0, final_div=1000.0):
    """LR multiplier of the reference's schedule (optax.cosine_onecycle_schedule, = torch OneCycleLR 'cos'):
    cosine from 1/div up to 1 over the first `warmup` fraction of `total` steps, then cosine down to
    1/(div * final_div)."""
    w = max(1, round(warmup * total))
    if step < w:
        a, b, f = 1 / div, 1.0, step / w
    else:
        a, b, f = 1.0, 1 / (div * final_div), (step - w) / max(1, total - w)
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))


def clip_and_step(opts, clip):
    """Clip each network's gradient on its own (clip > 0), then step its optimiser: a huge discriminator
    gradient must not shrink the tokenizer's update, nor the other way round."""
    for net, opt in opts:
        if clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()


def train(args):
    run = data.Run(args, NAME, resume=args.stage == 2)   # --stage 2 continues the checkpoint of --stage 1
    args, split, dev = run.args, run.split, run.device
    shape = data.SHAPES[args.detector]
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    nets = build_networks(vars(args))
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    vqae, disc, gpt = (m.to(dev) for m in nets.values())
    n_params = count["tokenizer"] + count["gpt"]

    # Stage 1: the tokenizer and the discriminator, two optimisation problems (Adam, no weight decay)
    opt1 = torch.optim.Adam(vqae.parameters(), args.lr, betas=args.betas)
    d_opt1 = torch.optim.Adam(disc.parameters(), args.d_lr, betas=args.d_betas)
    planned = run.plan(len(x_tr), args.batch_size, n_params, stage=1, epochs=args.epochs,
                       about=f"{count['tokenizer']:,} + {count['discriminator']:,} parameters (tokenizer, D)")
    sched1 = torch.optim.lr_scheduler.LambdaLR(opt1, lambda s: one_cycle(s, planned, args.warmup))
    d_sched1 = torch.optim.lr_scheduler.LambdaLR(d_opt1, lambda s: one_cycle(s, planned, args.warmup))
    noise1 = torch.Generator().manual_seed(args.seed + 1)                  # dead-code restarts
    run.keep(vqae=vqae, disc=disc, gpt=gpt, opt1=opt1, d_opt1=d_opt1, sched1=sched1, d_sched1=d_sched1,
             noise1=noise1)
    vqae_t, disc_t, gpt_t = run.wrap(vqae), run.wrap(disc), run.wrap(gpt)   # torchrun: DDP, global batch

    def validate1():                            # val loss, reconstruction W, codebook use (rank 0)
        vqae.eval()
        with torch.no_grad():
            val = np.mean([vq_loss(vqae, disc, x.to(dev), None, args, update=False).item()
                           for (x,) in data.batches((x_va,), 500, shuffle=False)])
            rec, perplexity, usage = reconstruct(vqae, x_va, shape, dev)
        vqae.train()
        return dict(val_loss=float(val), rec_W=metrics.wasserstein(split.counts("val")[:2000], rec)[0],
                    perplexity=perplexity, usage=usage)
    run.validate = validate1

    if args.stage == 2 and run.step < run.total:
        raise data.DataError(f"{run.path}: stage 1 is not finished; train it first (--stage 1)")
    for (x,) in run.batches((x_tr,)):           # under DDP the codebook update sees the gathered global batch
        with data.autocast(dev, args.amp):
            loss = vq_loss(vqae_t, disc_t, x, noise1, args)
        opt1.zero_grad(set_to_none=True)
        d_opt1.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step([(vqae, opt1), (disc, d_opt1)], args.clip)
        sched1.step()
        d_sched1.step()
        run.step_done(train_loss=loss)
    if args.stage == 1:
        return run.finish()

    # Stage 2: the GPT prior on the frozen tokenizer's tokens (AdamW)
    vqae.eval().requires_grad_(False)
    t_tr, t_va = tokenize(vqae, x_tr, dev).short(), tokenize(vqae, x_va, dev).short()
    data.log(f"tokens: {t_tr.shape[1]} per response, {len(torch.unique(t_tr))} distinct codes in training")
    opt2 = torch.optim.AdamW(gpt.parameters(), args.lr2, betas=args.betas2, eps=args.eps2,
                             weight_decay=args.wd2)
    planned2 = run.plan(len(t_tr), args.batch_size, n_params, stage=2, epochs=args.epochs2,
                        about=f"{count['gpt']:,} parameters (GPT)")
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: one_cycle(s, planned2, args.warmup2))
    run.keep(opt2=opt2, sched2=sched2)

    def validate2():                            # val loss, W of 1000 samples (rank 0)
        gpt.eval()
        with torch.no_grad():
            val = np.mean([gpt_loss(gpt, t.to(dev).long(), c.to(dev)).item()
                           for t, c in data.batches((t_va, c_va), 500, shuffle=False)])
            gen = sample(vqae, gpt, c_va[:1000].to(dev), shape, torch.Generator().manual_seed(0),
                         args.temperature, args.top_k)
        gpt.train()
        return dict(val_loss=float(val), val_W=metrics.wasserstein(split.counts("val")[:1000], gen)[0])
    run.validate = validate2

    for t, c in run.batches((t_tr, c_tr)):
        with data.autocast(dev, args.amp):
            loss = gpt_loss(gpt_t, t.long(), c)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step([(gpt, opt2)], args.clip)
        sched2.step()
        run.step_done(train_loss=loss)
    return run.finish()


# ==========================================================================================================
# Appendix A. The thesis' ViT tokenizer (--arch vit; Sec. 4.4, 4.10, as the authors' vq_vae.py). The ViT pair
# is written out in the same words in vae.py, sae_ng.py, gan.py, vqgan.py (tests/test_vit.py)
# ==========================================================================================================
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



class ViTVQAE(nn.Module):
    """--arch vit, the thesis' VQ tokenizer (as the authors' vq_vae.py): the ViT encoder (no condition
    token), a dense to the `dim`-d code space per token, l2-normalised and quantised as VQAE's; a dense, then
    the ViT decoder: (1, H, W) log1p image <-> a 6x6 grid of tokens (ZP: 7x4). 1,029,505 parameters at the
    thesis' size (its VQ-VAE less the learned codebook and 32-d lookup projection: EMA, cosine lookup)."""

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


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("VQ-GAN")
    g.add_argument("--arch", default="cnn", choices=["cnn", "vit"],
                   help="tokenizer: cnn (the flow-matching paper's, also under --paper) or vit (the thesis')")
    g.add_argument("--stage", type=int, choices=[1, 2], help="train only this stage (default: both)")
    g.add_argument("--temperature", type=float, default=1.2, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=128, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--sweep", action="store_true", help="--eval: W and ms per sample at temperature "
                   "1.0/1.2/1.4 x top-k none/128/64; writes sweep.json")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    if args.arch == "vit":                      # the ViT's sizes over the presets; what --set gives wins
        given = {item.partition("=")[0].replace("-", "_") for item in args.set}
        vit = {**VIT, **(VIT_SMOKE if args.smoke else {})}
        vars(args).update({k: v for k, v in vit.items() if k not in given})
    positive = "ae_width d_width codes code_dim prefix mlp layers heads embed blocks lr2 d_lr".split()
    for bad, msg in [(not min(getattr(args, k) for k in positive) > 0,
                      f"{', '.join(positive)} must be positive"),
                     (args.embed % args.heads > 0,
                      f"embed {args.embed} must be a multiple of heads {args.heads}"),
                     (args.arch == "vit" and args.ae_width % 4 > 0,
                      f"ae_width {args.ae_width}: the ViT's 4 attention heads need a multiple of 4"),
                     (not args.temperature > 0 or args.top_k < 0, "--temperature must be positive and "
                      f"--top-k >= 0 (got {args.temperature}, {args.top_k})"),
                     (not (0 < args.vq_decay < 1 and 0 <= args.dropout < 1), "vq_decay must be in (0, 1), "
                      f"dropout in [0, 1) (got {args.vq_decay}, {args.dropout})"),
                     (min(args.dead_below, args.beta, args.adv, args.clip) < 0,
                      "dead_below, beta, adv, clip must be >= 0")]:
        if bad:
            p.error(msg)
    return args


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint: its tokenizer and GPT, at --temperature and --top-k."""
    if not ck["steps"].get("2"):
        path = args.ckpt or Path(args.out) / "ckpt.pt"
        raise data.DataError(f"{path}: stage 2 is not trained yet (python {NAME}.py --train --resume)")
    nets = build_networks(ck["args"])
    nets["tokenizer"].load_state_dict(ck["vqae"])
    nets["gpt"].load_state_dict(ck["gpt"])
    vqae, gpt = nets["tokenizer"].to(device), nets["gpt"].to(device)
    return Sampler(vqae, gpt, ck["data"]["shape"], args.temperature, args.top_k)


def evaluate(args, ck, sampler, device):
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt")
    vqae, shape = sampler.vqae, sampler.shape

    if args.sweep:
        def make(temperature, top_k):
            return data.generator(Sampler(vqae, sampler.gpt, shape, temperature, top_k), device, args.amp)
        runs = [dict(temperature=t, top_k=k) for t in (1.0, 1.2, 1.4) for k in (0, 128, 64)]
        return metrics.run_sweep(make, runs, split, path.with_name("sweep.json"), args, NAME)
    true = split.ds.images[split.idx["test"][:args.max_test or None]]
    rec, perplexity, usage = reconstruct(vqae, data.to_log(true), shape, device)
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"stage 1 (encode -> quantise -> decode of the test responses): reconstruction Wasserstein "
          f"{rec_w:.3f}, codebook perplexity {perplexity:.1f}, usage {usage:.3f}")
    default = (args.temperature, args.top_k) == (1.2, 128)
    path = path.with_name("eval.json" if default else f"eval_t{args.temperature}_k{args.top_k}.json")
    return metrics.run_eval(data.generator(sampler, device, args.amp), split, path, args,
                            f"{NAME} (t {args.temperature}, k {args.top_k})",
                            dict(temperature=args.temperature, top_k=args.top_k, reconstruction_W=rec_w,
                                 perplexity=perplexity, usage=usage, n_params=ck["n_params"]))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
