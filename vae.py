"""Conditional variational autoencoder for the ALICE Zero Degree Calorimeters.

Papers: the neutron ZDC VAE/GAN paper (arXiv 2306.13606) and the master's thesis arXiv 2407.16704: a
conditional VAE reaches Wasserstein ~11.5 on the real neutron set at 0.015 ms per sample; the fast, simple
baseline every later model is compared with.

Method. An encoder q(z | x, c) maps a log1p(counts) image x and the 9 standardised particle features c to the
mean and log-variance of a 10-d Gaussian; a decoder maps (z, c) to the image, with a ReLU on the output so
exact zeros are possible. Loss = MSE + `--kl` (0.7) x KL(q(z | x, c) || N(0, I)): the MSE on log1p(counts) is
the mean over pixels (`--reduction mean`, what "MSE" means in Keras and torch) and the KL is summed over the 10
latent dimensions, both averaged over the batch. Sampling: z ~ N(0, I), decode with the condition, expm1.
Encoder: 3x3 convs (w, 2w, 2w channels, the last two with stride 2: ZN 44x44 -> 11x11; ZP 56x30 is padded to
56x32 -> 14x8), flatten, concatenate c, dense `--hidden` -> (mu, logvar). Decoder: dense (z, c) -> `--hidden`
-> (2w, H/4, W/4), two nearest x2 upsamplings each followed by a 3x3 conv (w channels), a 3x3 conv to 1
channel, ReLU, crop. LeakyReLU(0.1) activations; no normalisation layers (samples do not depend on the batch).

Usage:
    python vae.py --train                        # ZN, CPU default (~7 min on 2 cores), runs/vae
    python vae.py --train --detector proton --out runs/vae_proton
    python vae.py --train --paper                # reference size (~1.0M parameters on ZN), 100 epochs
    python vae.py --sample --ckpt runs/vae/ckpt.pt --n 1000 --out samples.npz
    python vae.py --eval --ckpt runs/vae/ckpt.pt [--plot]
    python vae.py --train --smoke                # seconds: tiny data, tiny model
Logged every --val-every steps: train loss (reconstruction + kl x KL), train KL, val loss / val rec / val KL
(posterior means of the same quantities; a KL near 0 is posterior collapse: the decoder ignores z and every
sample of a condition is the same blurred average), val_active (latent dimensions whose mean KL exceeds 0.01
nats), val_W (Wasserstein of 1000 generated samples) and rec_W (encode -> decode of the same 1000 responses:
the best the decoder can do; generation can only be worse). --eval prints the reconstruction W beside the
generation table and stores it in eval.json as reconstruction_W.

Deviations from the paper: the published network is a Keras model whose exact layers are not reproduced; the
size is matched instead (--paper: width 16, hidden 128, 1.03M parameters on ZN). The CPU default is smaller
(width 8, hidden 64, 0.26M) and trains 3 epochs instead of 100.

The two regimes, measured on ZN (toy, CPU default size, 800-1500 steps; floor ~2-3). The loss does not say how
the MSE is reduced, and that decides everything. With the per-pixel mean (default; the reconstruction term is
~0.03 against a KL of nats) 0.7 x KL wins and the posterior collapses: KL ~0, 0/10 dimensions active. The
decoder then has to read the condition and draws the blurred conditional mean at the right place: test W 25.6
(500 events, floor 3.4), but no per-condition diversity. With `--reduction sum` (squared error summed over pixels,
the Keras VAE example's convention) the latent is informative (KL ~10 nats, 10/10 active) and reconstructions
are good (rec W 9), but the encoder hands the decoder the shower position through z, the decoder ignores the
condition, and prior samples are faint blurs at random places: test W 50. Posterior collapse is therefore the
expected state of the default run, not a bug; the log shows which regime a run is in.
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
DEFAULTS = dict(epochs=3, batch_size=128, lr=1e-3, width=8, hidden=64)   # CPU default: ~7 minutes on 2 cores for ZN
PAPER = dict(epochs=100, batch_size=128, lr=1e-3, width=16, hidden=128)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("VAE")
    g.add_argument("--width", type=int, default=None, help="conv channels w (encoder w, 2w, 2w; decoder w); CPU 8, paper 16")
    g.add_argument("--hidden", type=int, default=None, help="dense layer width of encoder and decoder; CPU 64, paper 128")
    g.add_argument("--kl", type=float, default=0.7, help="weight of the KL term (published: 0.7)")
    g.add_argument("--reduction", default="mean", choices=["mean", "sum"],
                   help="reconstruction MSE over pixels: mean (default; posterior collapses) or sum (informative z)")
    g.add_argument("--val-every", type=int, default=500, help="validate (losses, KL, Wasserstein) every N steps")
    g.add_argument("--paper", action="store_true", help="reference size and schedule")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if not args.kl >= 0 or args.val_every <= 0:
        p.error("--kl must be >= 0 and --val-every positive")
    for k in ("width", "hidden"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k} must be positive (got {getattr(args, k)})")
    for k, v in {**DEFAULTS, **(PAPER if args.paper else {})}.items():
        if getattr(args, k) is None:   # flags given on the command line win
            setattr(args, k, v)
    if args.smoke:
        args.limit, args.width, args.hidden, args.batch_size = args.limit or 1500, 4, 16, 32
        args.max_steps = args.max_steps or 6
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def conv(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, padding=1), nn.LeakyReLU(0.1))


class VAE(nn.Module):
    def __init__(self, shape, width=8, hidden=64, n_cond=9, latent=LATENT):
        super().__init__()
        self.shape, self.w = tuple(shape), width
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        flat = 2 * width * self.h0 * self.w0
        self.enc = nn.Sequential(conv(1, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width, 2), nn.Flatten())
        self.enc_head = nn.Sequential(nn.Linear(flat + n_cond, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, 2 * latent))
        self.dec_head = nn.Sequential(nn.Linear(latent + n_cond, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, flat),
                                      nn.LeakyReLU(0.1))
        self.dec = nn.Sequential(nn.Upsample(scale_factor=2), conv(2 * width, width), nn.Upsample(scale_factor=2),
                                 conv(width, width), nn.Conv2d(width, 1, 3, padding=1))

    def encode(self, x, cond):
        """(mu, logvar), each (n, latent), of q(z | x, c)."""
        H, W = self.shape
        h = self.enc(F.pad(x, (0, -W % 4, 0, -H % 4)))
        mu, logvar = self.enc_head(torch.cat([h, cond], 1)).chunk(2, 1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z, cond):
        """log1p(counts) images (n, 1, H, W) >= 0."""
        h = self.dec_head(torch.cat([z, cond], 1)).view(-1, 2 * self.w, self.h0, self.w0)
        return F.relu(self.dec(h))[..., :self.shape[0], :self.shape[1]]


def build_model(cfg):
    """The network described by a checkpoint's args."""
    return VAE(data.SHAPES[cfg["detector"]], cfg["width"], cfg["hidden"])


# ----------------------------------------------------------------------------------------------------------
# Method: loss and sampler
# ----------------------------------------------------------------------------------------------------------
def vae_loss(model, x, cond, generator, kl_weight, reduction="mean"):
    """(loss, reconstruction, KL per latent dimension (latent,)) of a batch; reconstruction averaged (or summed)
    over pixels, KL summed over latent dimensions, both averaged over the batch. generator=None: z = posterior mean."""
    mu, logvar = model.encode(x, cond)
    z = mu if generator is None else mu + data.noise(mu.shape, generator, x.device) * (0.5 * logvar).exp()
    err = (model.decode(z, cond) - x).pow(2).flatten(1)
    rec = (err.mean(1) if reduction == "mean" else err.sum(1)).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)
    return rec + kl_weight * kl.sum(), rec, kl


@torch.no_grad()
def sample(model, cond, generator=None):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9). Noise is drawn on the CPU from
    `generator` and moved to the model's device, so a seed gives the same samples on any device."""
    z = data.noise((len(cond), LATENT), generator, cond.device)
    return data.to_counts(model.decode(z, cond))


@torch.no_grad()
def reconstruct(model, x, cond):
    """Encode -> decode (posterior mean) of log1p images: raw counts (n, H, W)."""
    return data.to_counts(model.decode(model.encode(x, cond)[0], cond))


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
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    planned = args.epochs * steps_per_epoch               # the LR schedule spans --epochs; --max-steps stops early
    total = min(planned, args.max_steps or planned)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / planned, 1.0))))
    scaler = torch.amp.GradScaler(enabled=args.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported())
    noise = torch.Generator(dev).manual_seed(args.seed)
    step, epoch = 0, 0
    if ck is not None:
        model.load_state_dict(ck["weights"]), opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"]), scaler.load_state_dict(ck["scaler"])
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        step, epoch = ck["step"], ck["epoch"]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
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
            parts = [vae_loss(model, x.to(dev), c.to(dev), None, args.kl, args.reduction)
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
        print(f"step {step:6d}  epoch {row['epoch']:.2f}  train loss {row['train_loss'] or float('nan'):.4f}  "
              f"KL {row['train_kl'] or float('nan'):.4f}  val loss {val:.4f} (rec {rec:.4f}, KL {row['val_kl']:.4f}, "
              f"{row['val_active']}/{LATENT} active)  val W {val_w:.3f}  rec W {rec_w:.3f}  {row['minutes']:.1f} min")

    t_start = time.time()
    while step < total:
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches((x_tr, c_tr), args.batch_size, order, start=skip), total=steps_per_epoch,
                   initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke)
        losses, kls = [], []
        for x, c in bar:
            x, c = x.to(dev), c.to(dev)
            with data.autocast(dev, args.amp):
                loss, _, kl = vae_loss(model, x, c, noise, args.kl, args.reduction)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt), scaler.update(), sched.step()
            step += 1
            losses.append(loss.item()), kls.append(kl.sum().item())
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kls[-1]:.3f}")
            if step % args.ckpt_every == 0:
                save()
            if step % args.val_every == 0 or step >= total:
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
    idx, true, cond = metrics.test_part(split, args.max_test or None)
    rec = torch.cat([reconstruct(model, x.to(dev), c.to(dev)).cpu()        # encode -> decode the test responses
                     for x, c in zip(torch.split(data.to_log(true), 1024), torch.split(cond, 1024))])
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    return metrics.run_eval(generator_fn(model, dev, args.amp), split, path, args, NAME,
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
    except (data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
