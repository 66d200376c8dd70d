"""End-to-end Sinkhorn autoencoder with a noise generator for the ALICE Zero Degree Calorimeters.

Papers: the master's thesis arXiv 2407.16704 and the neutron ZDC VAE/GAN paper (arXiv 2306.13606), after the
end-to-end Sinkhorn autoencoder of Deja et al.: an autoencoder with a noise generator reaches Wasserstein 11.19
on the real neutron set (its l2 variant, the thesis' best autoencoder) at 0.015 ms per sample.

Method. An unregularised autoencoder: encoder E(x) -> 20-d code (ReLU, so codes are >= 0), decoder D(code) ->
log1p(counts) image (ReLU output: exact zeros). A noise generator NG(z, c) maps 10-d Gaussian noise z and the 9
standardised particle features c to the code space (also ReLU). The condition reaches the image only through
the code. Loss = reconstruction (squared error on log1p(counts), summed over pixels, averaged over the batch)
+ `--beta` (20) x S_eps(P, Q), the debiased Sinkhorn divergence between the batch's point clouds
P = {(E(x_i), c_i)} and Q = {(NG(z_i, c_i), c_i)} (29-d points; the same conditions on both sides, so the
transport plan pairs codes of similar particles). Sampling: z ~ N(0, I) -> NG(z, c) -> D -> expm1.
`--matching l2` replaces the Sinkhorn term by `--l2-weight` (10) x ||E(x) - NG(z, c)||^2 (summed over the code,
averaged over the batch): simpler and the thesis' best variant, but it trains NG towards the conditional mean of
the code, so it tends to ignore the noise (diversity comes only from what the mean code cannot explain).
The encoder's code is detached in the matching term by default: the autoencoder learns from the reconstruction
alone and NG chases its codes. `--end-to-end` lets the matching term shape the code too (the paper's end-to-end
training), but with the scale-free divergence below that killed the code (all 20 ReLU outputs 0 after 250
steps, beta x S ~6000 at the start), and without the scaling the code shrank until only its mean was matched.

Two stages. Stage 1 (`--epochs`) trains the autoencoder and the noise generator together, as above. Stage 2
(`--ng-steps` steps, batch `--ng-batch`, Adam at `--ng-lr` with cosine decay) trains the noise generator alone on
the frozen encoder's codes of the training set, encoded once (the same matching term, eps = --eps-end). Why:
after one epoch the autoencoder is good (decoding the mean code of each training particle gave median photon sums
of 51-53, the encoder's own codes 54-55, 2-14 % empty) but the noise generator was far from it (squared distance to that
mean code 59-71, the within-particle spread 6-17), so 79-86 % of the samples were empty and W was 49-52. It is a
small MLP on 20-d codes, so stage 2 costs milliseconds per step: 40,000 l2 steps at batch 512 took W on 1,000
validation responses from 50 to 15. One step counter runs through both stages (--max-steps and --resume see one
run); a checkpoint written before stage 2 existed resumes into it.

Sinkhorn (written out below, `sinkhorn_divergence`): uniform weights, cost C(x, y) = |x - y|^2 (squared
Euclidean, no 1/2), OT_eps(P, Q) = min_pi <pi, C> + eps KL(pi | P x Q), solved by log-domain Sinkhorn
iterations on the dual potentials (f, g) without gradients, then evaluated as the dual objective
<a, f> + <b, g> - eps <a x b, exp((f + g - C) / eps) - 1> at those potentials, whose gradient with respect to
the points is exactly that of OT_eps (envelope theorem). S_eps = OT_eps(P, Q) - (OT_eps(P, P) + OT_eps(Q, Q)) / 2:
0 for identical clouds, |d|^2 for a cloud and its copy shifted by d (any eps, at convergence). Both codes are
divided by the per-dimension std of the batch's encoder codes (detached) before the divergence, so the cost
and eps are measured in units of the code's spread, beside the 9 standardised conditions: the autoencoder can
rescale its code freely, and without this the codes (std ~0.1) looked like one point at eps >= 0.5, only their
mean was matched and the noise generator's codes came out 2-4x too narrow (seen: val W 52 against rec W 18
after 500 steps). eps is annealed geometrically from `--eps-start` (10: only means and spreads matter) to
`--eps-end` (0.5: the finer structure) over the planned training steps; validation uses --eps-end.

Encoder: 3x3 convs (w, 2w, 2w channels, the last two with stride 2: ZN 44x44 -> 11x11; ZP 56x30 is padded to
56x32 -> 14x8), flatten, dense `--hidden` -> 20, ReLU. Decoder: dense 20 -> `--hidden` -> (2w, H/4, W/4), two
nearest x2 upsamplings each followed by a 3x3 conv (w channels), a 3x3 conv to 1 channel, ReLU, crop. Noise
generator: MLP 19 -> `--ng-hidden` -> `--ng-hidden` -> 20, ReLU with a straight-through gradient (a plain ReLU
output died: NG dimensions stuck at 0 while the encoder used them, W 55 against rec W 11). LeakyReLU(0.1)
activations.

Usage:
    python sae_ng.py --train                       # ZN, CPU default (18 min on 2 cores, 15 of them stage 2)
    python sae_ng.py --train --matching l2         # the simpler l2 variant (stage 2 takes ~1 min)
    python sae_ng.py --train --detector proton --out runs/sae_ng_proton
    python sae_ng.py --train --paper               # reference size (~1.5M parameters on ZN), 100 epochs
    python sae_ng.py --sample --ckpt runs/sae_ng/ckpt.pt --n 1000 --out samples.npz
    python sae_ng.py --eval --ckpt runs/sae_ng/ckpt.pt [--plot]
    python sae_ng.py --train --smoke               # seconds: tiny data, tiny model
Logged every --val-every steps (stage 2: every max(--val-every, --ng-steps / 8)), with the stage: train loss
(total), train match (the Sinkhorn divergence, or the l2 distance), eps, val rec / val match (validation batch of
500, eps = --eps-end), code_std (mean per-dimension std of the encoder codes: a code collapsing to a point shows
here), val_W (Wasserstein of 1000 generated samples) and rec_W (encode -> decode of the same 1000 responses: the
best the decoder can do). --eval prints the reconstruction W beside the generation table and stores it in
eval.json as reconstruction_W.

Deviations from the paper: the published networks are Keras models whose exact layers are not reproduced; the
size is matched instead (--paper: width 16, hidden 160, noise generator 256: 1.48M parameters on ZN). The CPU
default is smaller (width 8, hidden 64, noise generator 128: 0.27M) and trains one epoch instead of 100.
Stage 2 is ours: in the paper's 100 end-to-end epochs the noise generator gets 100 times the batches it gets here.
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

NAME = "sae_ng"
CODE, NOISE = 20, 10
DEFAULTS = dict(epochs=1, batch_size=128, lr=1e-3, width=8, hidden=64, ng_hidden=128, ng_steps=20_000)   # CPU, ZN: 18 min
PAPER = dict(epochs=100, batch_size=128, lr=1e-3, width=16, hidden=160, ng_hidden=256, ng_steps=100_000)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("Sinkhorn autoencoder with noise generator")
    g.add_argument("--width", type=int, default=None, help="conv channels w (encoder w, 2w, 2w; decoder w); CPU 8, paper 16")
    g.add_argument("--hidden", type=int, default=None, help="dense layer width of encoder and decoder; CPU 64, paper 160")
    g.add_argument("--ng-hidden", type=int, default=None, help="noise generator hidden width; CPU 128, paper 256")
    g.add_argument("--matching", default="sinkhorn", choices=["sinkhorn", "l2"],
                   help="code matching term: debiased Sinkhorn divergence (default) or l2 ||E(x) - NG(z, c)||^2")
    g.add_argument("--beta", type=float, default=20.0, help="weight of the Sinkhorn divergence")
    g.add_argument("--l2-weight", type=float, default=10.0, help="weight of the l2 matching term (--matching l2)")
    g.add_argument("--eps-start", type=float, default=10.0, help="Sinkhorn entropic epsilon at the start of training")
    g.add_argument("--eps-end", type=float, default=0.5, help="Sinkhorn epsilon at the end (annealed geometrically)")
    g.add_argument("--sinkhorn-iters", type=int, default=50, help="log-domain Sinkhorn iterations per divergence")
    g.add_argument("--end-to-end", action="store_true", help="let the matching term train the encoder too (default: "
                   "the encoder's code is detached there)")
    g.add_argument("--ng-steps", type=int, default=None, help="stage 2: steps of the noise generator alone on the frozen "
                   "encoder's codes; CPU 20000, paper 100000 (0: no stage 2)")
    g.add_argument("--ng-batch", type=int, default=None, help="stage 2 batch size; default 512 for l2, 128 for sinkhorn "
                   "(its cost grows with the square of the batch)")
    g.add_argument("--ng-lr", type=float, default=2e-3, help="stage 2 learning rate (Adam, cosine decay to 0)")
    g.add_argument("--val-every", type=int, default=500, help="validate (losses, Wasserstein) every N steps")
    g.add_argument("--paper", action="store_true", help="reference size and schedule")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if not (args.beta >= 0 and args.l2_weight >= 0 and args.eps_start > 0 and args.eps_end > 0):
        p.error("--beta and --l2-weight must be >= 0, --eps-start and --eps-end positive")
    if args.ng_steps is not None and args.ng_steps < 0 or not args.ng_lr > 0:
        p.error("--ng-steps must be >= 0 and --ng-lr positive")
    for k in ("width", "hidden", "ng_hidden", "ng_batch", "sinkhorn_iters", "val_every"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive (got {getattr(args, k)})")
    for k, v in {**DEFAULTS, **(PAPER if args.paper else {})}.items():
        if getattr(args, k) is None:   # flags given on the command line win
            setattr(args, k, v)
    args.ng_batch = args.ng_batch or (512 if args.matching == "l2" else 128)
    if args.smoke:   # stage 1 is one epoch of 4 batches, stage 2 three steps
        args.limit, args.width, args.hidden, args.ng_hidden, args.batch_size = args.limit or 1500, 4, 16, 16, 256
        args.ng_steps, args.ng_batch = 3, 64
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def conv(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, padding=1), nn.LeakyReLU(0.1))


class SAE(nn.Module):
    """Autoencoder (image <-> 20-d ReLU code) and noise generator (noise, condition) -> code."""

    def __init__(self, shape, width=8, hidden=64, ng_hidden=128, n_cond=9):
        super().__init__()
        self.shape, self.w = tuple(shape), width
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        flat = 2 * width * self.h0 * self.w0
        self.enc = nn.Sequential(conv(1, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width, 2), nn.Flatten(),
                                 nn.Linear(flat, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, CODE), nn.ReLU())
        self.dec_head = nn.Sequential(nn.Linear(CODE, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, flat), nn.LeakyReLU(0.1))
        self.dec = nn.Sequential(nn.Upsample(scale_factor=2), conv(2 * width, width), nn.Upsample(scale_factor=2),
                                 conv(width, width), nn.Conv2d(width, 1, 3, padding=1))
        self.ng = nn.Sequential(nn.Linear(NOISE + n_cond, ng_hidden), nn.LeakyReLU(0.1), nn.Linear(ng_hidden, ng_hidden),
                                nn.LeakyReLU(0.1), nn.Linear(ng_hidden, CODE))

    def encode(self, x):
        H, W = self.shape
        return self.enc(F.pad(x, (0, -W % 4, 0, -H % 4)))

    def decode(self, code):
        """log1p(counts) images (n, 1, H, W) >= 0."""
        h = self.dec_head(code).view(-1, 2 * self.w, self.h0, self.w0)
        return F.relu(self.dec(h))[..., :self.shape[0], :self.shape[1]]

    def generate_code(self, z, cond):
        """ReLU codes like the encoder's; straight-through gradient, so an output that is 0 everywhere can recover."""
        h = self.ng(torch.cat([z, cond], 1))
        return h + (F.relu(h) - h).detach()


def build_model(cfg):
    """The network described by a checkpoint's args."""
    return SAE(data.SHAPES[cfg["detector"]], cfg["width"], cfg["hidden"], cfg["ng_hidden"])


# ----------------------------------------------------------------------------------------------------------
# Method: Sinkhorn divergence, loss and sampler
# ----------------------------------------------------------------------------------------------------------
def entropic_ot(x, y, eps, iters):
    """OT_eps between uniform clouds x (n, d) and y (m, d), cost |x - y|^2. Potentials by log-domain Sinkhorn
    (no gradient), then the dual objective at them: its gradient w.r.t. x and y is the transport plan's."""
    C = (x[:, None] - y[None]).pow(2).sum(-1)
    log_a, log_b = -math.log(len(x)), -math.log(len(y))
    with torch.no_grad():
        Cd = C.detach()
        f, g = torch.zeros(len(x), device=x.device), torch.zeros(len(y), device=x.device)
        for _ in range(iters):
            f = -eps * torch.logsumexp(log_b + (g[None] - Cd) / eps, 1)
            g = -eps * torch.logsumexp(log_a + (f[:, None] - Cd) / eps, 0)
    plan = torch.exp(log_a + log_b + (f[:, None] + g[None] - C) / eps)
    return f.mean() + g.mean() - eps * (plan.sum() - 1)


def sinkhorn_divergence(x, y, eps, iters=50):
    """Debiased Sinkhorn divergence S_eps(x, y) = OT(x, y) - (OT(x, x) + OT(y, y)) / 2, >= 0, 0 iff x = y."""
    return entropic_ot(x, y, eps, iters) - 0.5 * (entropic_ot(x, x, eps, iters) + entropic_ot(y, y, eps, iters))


def matching(target, fake, cond, args, eps):
    """The code matching term: ||target - fake||^2 (l2), or the Sinkhorn divergence between the (code, condition)
    clouds with the codes in units of the target codes' batch spread."""
    if args.matching == "l2":
        return (target - fake).pow(2).sum(1).mean()
    scale = target.detach().std(0).clamp_min(1e-3)
    return sinkhorn_divergence(torch.cat([target / scale, cond], 1), torch.cat([fake / scale, cond], 1), eps,
                               args.sinkhorn_iters)


def sae_loss(model, x, cond, generator, args, eps):
    """(loss, reconstruction, matching term) of a batch (stage 1)."""
    code = model.encode(x)
    rec = (model.decode(code) - x).pow(2).flatten(1).sum(1).mean()
    fake = model.generate_code(data.noise((len(x), NOISE), generator, x.device), cond)
    match = matching(code if args.end_to_end else code.detach(), fake, cond, args, eps)
    return rec + (args.l2_weight if args.matching == "l2" else args.beta) * match, rec, match


def annealed_eps(args, step, planned):
    """Geometric schedule from --eps-start to --eps-end over the planned steps."""
    return args.eps_start * (args.eps_end / args.eps_start) ** min(step / max(planned - 1, 1), 1.0)


@torch.no_grad()
def sample(model, cond, generator=None):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9): noise -> NG -> decoder. Noise is
    drawn on the CPU from `generator` and moved to the model's device (a seed gives the same samples anywhere)."""
    z = data.noise((len(cond), NOISE), generator, cond.device)
    return data.to_counts(model.decode(model.generate_code(z, cond)))


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
    dev = data.pick_device(args.device)
    data.seed_everything(args.seed)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    ck = None
    if ckpt_path.exists() and not args.resume:
        raise data.DataError(f"{ckpt_path} exists: pass --resume to continue it, or --out a new folder")
    if args.resume and ckpt_path.exists():
        ck = data.load_checkpoint(ckpt_path, NAME)
        args = data.resume_args(args, ck)
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    split = data.load_split(vars(args))
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    model = build_model(vars(args)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    opt_ng = torch.optim.Adam(model.ng.parameters(), lr=args.ng_lr)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    planned = args.epochs * steps_per_epoch               # stage 1; the LR and eps schedules span --epochs
    total = min(planned + args.ng_steps, args.max_steps or planned + args.ng_steps)   # both stages; one step counter
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / planned, 1.0))))
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
        if "opt_ng" in ck:        # checkpoints from before stage 2 existed start it fresh
            opt_ng.load_state_dict(ck["opt_ng"]), sched_ng.load_state_dict(ck["sched_ng"]), pick.set_state(ck["rng"]["pick"])
        step, epoch = ck["step"], ck["epoch"]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    n_par = sum(p.numel() for p in model.parameters())
    print(f"{NAME} ({args.matching} matching): {n_par:,} parameters, {len(x_tr):,} training responses; stage 1 "
          f"(autoencoder + noise generator): {planned} steps ({steps_per_epoch} per epoch), stage 2 (noise generator "
          f"alone): {args.ng_steps} steps; {total} steps in total, device {dev}")

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
            _, rec, match = sae_loss(model, x, c, torch.Generator(dev).manual_seed(1234), args, args.eps_end)
            code_std = float(model.encode(x).std(0).mean())
            gen = sample(model, c_va[:k].to(dev), torch.Generator().manual_seed(0))
            recon = reconstruct(model, x_va[:k].to(dev))
            true = split.counts("val")[:k]
            val_w, rec_w = metrics.wasserstein(true, gen)[0], metrics.wasserstein(true, recon)[0]
        model.train()
        row = dict(stage=1 if step <= planned else 2, step=step, epoch=min(step, planned) / steps_per_epoch,
                   train_loss=float(np.mean(losses)) if losses else None,
                   train_match=float(np.mean(matches)) if matches else None, eps=annealed_eps(args, step, planned),
                   val_rec=rec.item(), val_match=match.item(), code_std=code_std, val_W=val_w, rec_W=rec_w,
                   minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        print(f"stage {row['stage']} step {step:6d}  train loss {row['train_loss'] or float('nan'):.3f}  "
              f"match {row['train_match'] or float('nan'):.4f} (eps {row['eps']:.2f})  val rec {rec.item():.3f}  "
              f"val match {match.item():.4f}  code std {code_std:.3f}  val W {val_w:.3f}  rec W {rec_w:.3f}  "
              f"{row['minutes']:.1f} min")

    def optimise(loss, optimiser, scheduler, params):
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged (lower --lr?)")
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimiser)
        nn.utils.clip_grad_norm_(params, 10.0)
        scaler.step(optimiser), scaler.update(), scheduler.step()

    t_start = time.time()
    end1 = min(planned, total)
    while step < end1:            # stage 1: autoencoder and noise generator together
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches((x_tr, c_tr), args.batch_size, order, start=skip), total=steps_per_epoch,
                   initial=skip, desc=f"stage 1 epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke)
        losses, matches = [], []
        for x, c in bar:
            x, c = x.to(dev), c.to(dev)
            with data.autocast(dev, args.amp):
                loss, _, match = sae_loss(model, x, c, noise, args, annealed_eps(args, step, planned))
            optimise(loss, opt, sched, model.parameters())
            step += 1
            losses.append(loss.item()), matches.append(match.item())
            bar.set_postfix(loss=f"{loss.item():.3f}", match=f"{matches[-1]:.3f}")
            if step % args.ckpt_every == 0:
                save()
            if step % args.val_every == 0 or step >= end1:
                bar.clear()
                validate(losses, matches)
                losses, matches = [], []
            if step >= end1:
                break
        bar.close()
        if step == (epoch + 1) * steps_per_epoch:
            epoch += 1
        save()

    if step < total:              # stage 2: the noise generator alone on the frozen encoder's codes
        with torch.no_grad():
            codes = torch.cat([model.encode(b.to(dev)) for b in torch.split(x_tr, 4096)])
        conds, every = c_tr.to(dev), max(args.val_every, args.ng_steps // 8)
        print(f"stage 2: noise generator on {len(codes):,} cached codes, batch {args.ng_batch}, steps "
              f"{step - planned}..{total - planned} of {args.ng_steps}")
        bar = tqdm(range(step, total), desc="stage 2", leave=False, disable=args.smoke)
        losses = []
        for _ in bar:
            i = torch.randint(len(codes), (args.ng_batch,), generator=pick).to(dev)
            with data.autocast(dev, args.amp):
                fake = model.generate_code(data.noise((len(i), NOISE), noise, dev), conds[i])
                loss = matching(codes[i], fake, conds[i], args, args.eps_end)
            optimise(loss, opt_ng, sched_ng, model.ng.parameters())
            step += 1
            losses.append(loss.item())
            bar.set_postfix(match=f"{loss.item():.3f}")
            if step % args.ckpt_every == 0 or step >= total:
                save()
            if (step - planned) % every == 0 or step >= total:
                bar.clear()
                validate(losses, losses)
                losses = []
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, checkpoint {ckpt_path}")
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


def evaluate(args):
    ck, model, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    idx, true, _ = metrics.test_part(split, args.max_test or None)
    rec = torch.cat([reconstruct(model, x.to(dev)).cpu() for x in torch.split(data.to_log(true), 1024)])
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    return metrics.run_eval(generator_fn(model, dev, args.amp), split, path, args, f"{NAME} ({ck['args']['matching']})",
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
    except (data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
