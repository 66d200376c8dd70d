"""Measurements behind metrics.py's evaluation protocol 2 (issue 36), on the toy data, without any checkpoint.

1. `--before-after`: the floor's KPD under the committed (HEAD) metrics.py and under this one; the floor's W as a
   mean of the repetitions vs pooled (the publications' code); the wall time of the floor + lookup rows (what
   every --eval adds to the model's own generation) before and after, on the first N test events.
2. `--calibrate`: is the bootstrap's sd the test-set noise? K disjoint chunks of N test events: the spread across
   chunks of the floor's and the lookup's W, W / floor and lookup - floor, against the mean bootstrap sd within a
   chunk (the bootstrap sees only one chunk). W only (shower=False): the classifier is the slow part.
   With --shower: the same for the shower metrics separation, FPD and KPD (boot_shower on the floor's and the
   lookup's shower features; no classifier).

    python tools/protocol_check.py --before-after --orig /tmp/orig --json results/protocol_check_before_after.json
    python tools/protocol_check.py --calibrate --chunks 20 --json results/protocol_check_calibration_chunks.json
    python tools/protocol_check.py --calibrate --chunks 20 --across seeds --json results/protocol_check_calibration_seeds.json
    python tools/protocol_check.py --calibrate --shower --chunks 20 --across seeds --json results/protocol_check_calibration_shower.json

--orig: a folder holding the old metrics.py (`git show <commit>:metrics.py > DIR/metrics.py`).
"""
import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import metrics  # noqa: E402


def load_module(folder):
    spec = importlib.util.spec_from_file_location("metrics_orig", Path(folder) / "metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def chunk(split, k, n, across="chunks"):
    """A view of `split` whose test part is the k-th block of n test events (across="chunks": the same test
    particles' pool for every k), or the first n test events of the split with seed k (across="seeds": other
    test particles, which on the condition-disjoint split is what another test set means)."""
    if across == "seeds":
        s = data.Split(split.ds, split.mode, k)
        s.idx = dict(s.idx, test=s.idx["test"][:n])
        return s
    s = copy.copy(split)
    s.idx = dict(split.idx, test=split.idx["test"][k * n:(k + 1) * n])
    return s


def before_after(args):
    out = {}
    old = load_module(args.orig)
    for mode in args.splits:
        ds = data.load(args.detector, "toy", progress=False)
        split = data.Split(ds, mode, 0)
        res = {}
        for label, mod in (("before", old), ("after", metrics)):
            t0 = time.time()
            if label == "after":
                recs = {"floor": {}, "lookup": {}}
                fl = mod.floor(split, args.reps, args.n, record=recs["floor"])
                lk = mod.lookup(split, args.reps, args.n, record=recs["lookup"])
                idx = split.idx["test"][:args.n]
                unc = mod.uncertainty(mod.boot_rows(mod.channel_sums(ds.images[idx]), ds.cond_id[idx], recs))
            else:
                fl, lk, unc = mod.floor(split, args.reps, args.n), mod.lookup(split, args.reps, args.n), None
            res[label] = dict(seconds=time.time() - t0, floor=fl, lookup=lk, uncertainty=unc)
            print(f"{args.detector} {mode} {label}: {res[label]['seconds']:.1f} s for floor + lookup; floor KPD "
                  f"{fl['kpd'][0]:.4f} ± {fl['kpd'][1]:.4f}, W {fl['W'][0]:.3f} ± {fl['W'][1]:.3f}, AUC "
                  f"{fl['auc'][0]:.3f}; lookup KPD {lk['kpd'][0]:.4f}", flush=True)
        u = res["after"]["uncertainty"]
        print(f"  floor W: mean of {args.reps} reps {u['floor']['W']['value']:.3f} {u['floor']['W']['ci']}, pooled "
              f"{u['floor']['W_pooled']['value']:.3f} {u['floor']['W_pooled']['ci']}; lookup W/floor "
              f"{u['lookup']['W/floor']['value']:.2f} {u['lookup']['W/floor']['ci']} (pooled "
              f"{u['lookup']['W_pooled/floor']['value']:.2f} {u['lookup']['W_pooled/floor']['ci']})", flush=True)
        out[mode] = res
    return out


def calibrate(args):
    ds = data.load(args.detector, "toy", progress=False)
    out = {}
    for mode in args.splits:
        split = data.Split(ds, mode, 0)
        rows = []
        for k in range(args.chunks):
            s = chunk(split, k, args.n, args.across)
            recs = {"floor": {}, "lookup": {}}
            metrics.floor(s, args.reps, shower=False, record=recs["floor"])
            metrics.lookup(s, args.reps, shower=False, record=recs["lookup"])
            idx = s.idx["test"]
            b = metrics.boot_rows(metrics.channel_sums(ds.images[idx]), ds.cond_id[idx], recs, args.boot, seed=k)
            r = {}
            for key in ("W", "W_pooled"):
                fl, lk = b["floor"], b["lookup"]
                r[key] = dict(floor=fl["point_" + key], lookup=lk["point_" + key],
                              ratio=lk["point_" + key] / fl["point_" + key],
                              diff=lk["point_" + key] - fl["point_" + key],
                              sd_floor=float(np.std(fl[key], ddof=1)), sd_lookup=float(np.std(lk[key], ddof=1)),
                              sd_logratio=float(np.std(np.log(lk[key] / fl[key]), ddof=1)),
                              sd_diff=float(np.std(lk[key] - fl[key], ddof=1)))
            rows.append(r)
            print(f"{mode} chunk {k}: floor W {r['W']['floor']:.3f} (boot sd {r['W']['sd_floor']:.3f}), lookup/floor "
                  f"{r['W']['ratio']:.2f}, pooled floor {r['W_pooled']['floor']:.3f}", flush=True)
        summ = {}
        for key in ("W", "W_pooled"):
            col = {c: np.array([r[key][c] for r in rows]) for c in rows[0][key]}
            summ[key] = dict(
                floor_mean=float(col["floor"].mean()), floor_sd_across=float(col["floor"].std(ddof=1)),
                floor_boot_sd=float(col["sd_floor"].mean()),
                lookup_sd_across=float(col["lookup"].std(ddof=1)), lookup_boot_sd=float(col["sd_lookup"].mean()),
                ratio_mean=float(col["ratio"].mean()),
                logratio_sd_across=float(np.log(col["ratio"]).std(ddof=1)),
                logratio_boot_sd=float(col["sd_logratio"].mean()),
                diff_sd_across=float(col["diff"].std(ddof=1)), diff_boot_sd=float(col["sd_diff"].mean()))
            print(f"{mode} {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in summ[key].items()), flush=True)
        out[mode] = dict(chunks=rows, summary=summ)
    return out


def calibrate_shower(args):
    """--calibrate --shower: per test set (chunk), separation, FPD and KPD of the floor and the lookup and their
    bootstrap sds (boot_shower, the same draws for both: paired); then the spread across test sets against the
    mean bootstrap sd, for each row and for the difference lookup - floor."""
    ds = data.load(args.detector, "toy", progress=False)
    out = {}
    for mode in args.splits:
        split = data.Split(ds, mode, 0)
        rows = []
        for k in range(args.chunks):
            s = chunk(split, k, args.n, args.across)
            idx = s.idx["test"][:metrics.SHOWER_N]
            ft = metrics.shower_features(ds.images[idx])
            fl = np.stack([metrics.shower_features(data.resimulate(ds.particles[idx], ds.detector, 10_000 + r, ds.cut)[0])
                           for r in range(args.reps)])
            lk = np.stack([metrics.shower_features(ds.images[pick[:len(idx)]]) for pick in metrics.lookup_picks(s, args.reps)])
            w = np.r_[np.ones((1, len(idx))), metrics.condition_weights(ds.cond_id[idx], args.boot, seed=k)]
            bf, bl = (metrics.boot_shower(ft, f, ds.cond_id[idx], w) for f in (fl, lk))
            r = {key: dict(floor=bf[key][0], lookup=bl[key][0], diff=bl[key][0] - bf[key][0],
                           sd_floor=float(np.std(bf[key][1:], ddof=1)), sd_lookup=float(np.std(bl[key][1:], ddof=1)),
                           sd_diff=float(np.std(bl[key][1:] - bf[key][1:], ddof=1))) for key in metrics.SHOWER_BOOT}
            rows.append(r)
            print(f"{mode} chunk {k}: " + "; ".join(f"{key} floor {v['floor']:.4f} (sd {v['sd_floor']:.4f}) lookup "
                                                    f"{v['lookup']:.4f} (sd {v['sd_lookup']:.4f})" for key, v in r.items()),
                  flush=True)
        summ = {}
        for key in metrics.SHOWER_BOOT:
            col = {c: np.array([r[key][c] for r in rows]) for c in rows[0][key]}
            summ[key] = {f"{c}_mean": float(col[c].mean()) for c in ("floor", "lookup")}
            for c in ("floor", "lookup", "diff"):
                summ[key].update({f"{c}_sd_across": float(col[c].std(ddof=1)), f"{c}_boot_sd": float(col["sd_" + c].mean())})
            print(f"{mode} {key}: " + ", ".join(f"{c} {v:.4f}" for c, v in summ[key].items()), flush=True)
        out[mode] = dict(chunks=rows, summary=summ)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before-after", action="store_true")
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--shower", action="store_true", help="--calibrate: the shower metrics instead of W")
    p.add_argument("--orig", default="/tmp/orig", help="folder with the old metrics.py (for --before-after)")
    p.add_argument("--detector", default="neutron")
    p.add_argument("--splits", nargs="+", default=["random", "disjoint"])
    p.add_argument("--n", type=int, default=2000, help="test events (per chunk)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--across", default="chunks", choices=["chunks", "seeds"], help="--calibrate: test sets as "
                   "disjoint blocks of one split's test events, or as the first --n test events of --chunks split seeds")
    p.add_argument("--boot", type=int, default=metrics.N_BOOT)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = dict(command="python " + " ".join(sys.argv), detector=args.detector, n=args.n, reps=args.reps)
    if args.before_after:
        result["before_after"] = before_after(args)
    if args.calibrate:
        result.update(chunks=args.chunks, across=args.across, boot=args.boot,
                      calibration=(calibrate_shower if args.shower else calibrate)(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
