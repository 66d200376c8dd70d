"""The size of each generator-loss term of sdigan_proton.py: the norm of its gradient w.r.t. G's parameters,
weighted as in training (lambda * term), on training batches of 128 (G, D, regressor in training mode, the SDI
pair in one paired pass, as train() does). Both f_div scalings and both intensity forms are measured at the
same weights, whatever the run used.

    python results/ablation_sdigan/grad_norms.py --settings="--paper --set width=16"   # fresh networks: step 0
    python results/ablation_sdigan/grad_norms.py --ckpt runs/x/ckpt.pt                  # a run's last weights
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data                                     # noqa: E402
import sdigan_proton as sdi                     # noqa: E402


def grad_norm(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def term_norms(nets, split, cfg, batches=4, seed=0):
    """{term: mean over `batches` batches of |d(lambda * term)/d theta_G|}; the terms at the run's settings plus
    the alternatives (sdi_dataset / sdi_minmax, int_eq4 / int_code), and the batch's raw sizes."""
    gen, disc, aux = (nets[k].train() for k in ("generator", "discriminator", "regressor"))
    params = list(gen.parameters())
    counts = split.counts("train")
    cid = split.ds.cond_id[split.idx["train"]]
    div = {n: torch.as_tensor(sdi.diversity_target(counts, cid, n)) for n in ("dataset", "minmax")}
    photons = torch.as_tensor(counts.reshape(len(counts), -1).sum(1, dtype=np.float64), dtype=torch.float32)
    coords = torch.as_tensor(sdi.brightest(counts))
    x_all, c_all = split.x("train"), split.cond("train")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batches):
        i = torch.randperm(len(c_all), generator=g)[:128]
        c = c_all[i]
        z1, z2 = torch.randn(128, sdi.NOISE, generator=g), torch.randn(128, sdi.NOISE, generator=g)
        fake, fake2 = gen(torch.cat([z1, z2]), torch.cat([c, c]), paired=True).chunk(2)
        adv = sdi.adversarial_loss(disc(fake, c), True)
        r = dict(adv=grad_norm(adv, params))
        for n in ("dataset", "minmax"):
            r[f"sdi_{n}"] = grad_norm(cfg["lambda_div"] * sdi.sdi_term(fake, fake2, z1, z2, div[n][i])[0], params)
        for form in ("eq4", "code"):
            r[f"int_{form}"] = grad_norm(cfg["lambda_int"] * sdi.intensity_term(fake, photons[i], form), params)
        r["aux"] = grad_norm(cfg["lambda_aux"] * sdi.aux_term(aux(fake), coords[i]), params)
        r["fake_log1p_batch_total"] = float(fake.detach().sum())
        r["fake_photon_sum_mean"] = float(torch.expm1(fake.clamp(max=12)).flatten(1).sum(1).mean())
        r["real_photon_sum_mean"] = float(photons[i].mean())
        r["d_img_mean"] = float((fake - fake2).abs().flatten(1).sum(1).mean())
        rows.append(r)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a run's checkpoint (its G, D and regressor weights)")
    p.add_argument("--settings", default="", help="sdigan_proton.py settings of fresh networks (no --ckpt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON here")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    if a.ckpt:
        ck = torch.load(a.ckpt, weights_only=True)
        cfg = ck["args"]
        nets = sdi.build_networks(cfg)
        for name, key in (("generator", "weights"), ("discriminator", "disc"), ("regressor", "aux")):
            nets[name].load_state_dict(ck[key])
        split, what = data.split_from_checkpoint(ck, progress=False), f"{a.ckpt} (step {ck['step']})"
    else:
        cfg = vars(sdi.get_args(["--train", *shlex.split(a.settings)]))
        nets = sdi.build_networks(cfg)
        split, what = data.load_split(cfg, progress=False), f"fresh networks, settings {a.settings!r} (step 0)"
    out = dict(what=what, lambdas=[cfg["lambda_div"], cfg["lambda_int"], cfg["lambda_aux"]],
               widths=[cfg["width"], cfg["d_width"], cfg["aux_width"]], norms=term_norms(nets, split, cfg, seed=a.seed))
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
