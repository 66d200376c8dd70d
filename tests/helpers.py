"""Running the model scripts as a user would: through their command line, in a subprocess."""
import json
import subprocess
import sys

import numpy as np
import torch

from conftest import ROOT


def cli(script, *args, ok=True, timeout=600):
    out = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    if ok:
        assert out.returncode == 0, f"{script} {' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    else:
        assert out.returncode != 0, f"{script} {' '.join(map(str, args))} should have failed"
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


def check_samples(path, shape, n):
    with np.load(path) as f:
        resp, part = f["responses"], f["particles"]
    assert resp.shape == (n,) + shape and part.shape == (n, 10)
    assert np.isfinite(resp).all() and (resp >= 0).all()
    return resp


def check_eval(path):
    r = json.loads(path.read_text())
    for row in ("model", "floor", "lookup"):
        assert np.isfinite(r[row]["W"][0]) and r[row]["W"][0] >= 0
    assert r["reps"] >= 1 and r["n_test"] > 0 and "--eval" in r["command"]
    return r


def losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run, key="weights"):
    return torch.load(run / "ckpt.pt", weights_only=True)[key]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
