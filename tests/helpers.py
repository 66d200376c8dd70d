"""Running the model scripts as a user would: through their command line (in this process by default, see cli)."""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback

import numpy as np
import torch

from conftest import ROOT


def cli(script, *args, ok=True, timeout=600, subprocess_=None):
    """Run `python SCRIPT ARGS` as a user would and check its exit status.

    By default in this process (runpy, with sys.argv and the standard streams swapped): the script's code path
    is the same as from a shell, but the ~2 s of `import torch` is paid once per test session instead of once
    per call, which is most of the suite's time. ZDC_TEST_SUBPROCESS=1 (or subprocess_=True) runs each call in
    a real subprocess instead, e.g. to rule out state leaking between calls."""
    if subprocess_ is None:
        subprocess_ = os.environ.get("ZDC_TEST_SUBPROCESS") == "1"
    argv = [script, *map(str, args)]
    if subprocess_:
        out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    else:
        out = _run_in_process(argv)
    if ok:
        assert out.returncode == 0, f"{script} {' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    else:
        assert out.returncode != 0, f"{script} {' '.join(map(str, args))} should have failed"
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


def _run_in_process(argv):
    """What the interpreter does with `python SCRIPT ARGS`: run it as __main__, turn SystemExit into an exit
    status (a message goes to stderr with status 1) and an uncaught exception into its traceback, status 1."""
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    old_argv, old_cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    sys.argv = argv
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


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
