"""tools/ablation.py: runs named by what they change against the baseline, rows read from metrics.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder, args, rows):
    folder.mkdir()
    torch.save(dict(args=args), folder / "ckpt.pt")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ablation_names_runs_by_their_change_and_keeps_the_rows(tmp_path):
    base = dict(lr=1e-3, ema=0.999, out="a", seed=0)
    fake_run(tmp_path / "base", base, [dict(step=250, val_W=20.0, val_loss=0.1, minutes=1.0)])
    fake_run(tmp_path / "ema0", {**base, "ema": 0.0, "out": "b"}, [dict(step=250, val_W=30.0, val_loss=0.2, minutes=1.0)])
    js = tmp_path / "abl.json"
    out = subprocess.run([sys.executable, "tools/ablation.py", str(tmp_path / "base"), str(tmp_path / "ema0"),
                          "--json", str(js)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| ema0 | ema=0.0 | 30.00 | 0.2000 |" in out.stdout and "| base | (baseline) | 20.00 |" in out.stdout
    runs = json.loads(js.read_text())["runs"]
    assert [r["changed"] for r in runs] == [{}, {"ema": 0.0}]           # 'out' differs too, but is not a setting
    bad = subprocess.run([sys.executable, "tools/ablation.py", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "needs metrics.jsonl and ckpt.pt" in bad.stderr


def test_gpu_table43_names_a_wrong_arch_and_stops_at_once_without_a_gpu():
    import os
    import subprocess
    import pytest
    import torch
    from conftest import ROOT
    run = lambda **env: subprocess.run(["bash", "tools/gpu_table43.sh"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=120, env={**os.environ, **env})
    bad = run(ARCH="cnn")
    assert bad.returncode == 2 and "ARCH=cnn: vit or vdvae" in bad.stderr
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the runs would start")
    out = run(ARCH="vdvae")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr


def test_round_probe_evaluates_whole_photons_and_restores_the_sampler(monkeypatch, tmp_path, smoke_run):
    """The probe runs a script's own --eval (data.main) on a real checkpoint with to_counts rounding; the
    script's evaluate is replaced only to look at what it sees."""
    import importlib.util
    sys.path.insert(0, str(ROOT))
    import data
    import flow_matching as fm
    import vqgan
    smoke_run("flow_matching.py", to=tmp_path / "fm")
    ckpt = str(tmp_path / "fm" / "ckpt.pt")
    spec = importlib.util.spec_from_file_location("round_probe", ROOT / "tools" / "round_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    seen, to_counts = {}, data.to_counts
    log = torch.log1p(torch.tensor([0.3, 1.6, 2.5001]))                       # counts 0.3, 1.6, 2.5001 in log space

    def look(x):
        return lambda args, ck, sampler, device: seen.update(ckpt=args.ckpt, model=ck["model"],
                                                             counts=data.to_counts(x))
    monkeypatch.setattr(fm, "evaluate", look(log))
    probe.main(["--ckpt", ckpt, "--max-test", "50"])
    assert seen["ckpt"] == ckpt and seen["counts"].tolist() == [0.0, 2.0, 3.0]   # what --eval sees
    assert seen["model"] == "flow_matching" and data.to_counts is to_counts     # the original put back
    monkeypatch.setattr(fm, "evaluate", look(torch.full((4000,), 0.3).log1p()))
    probe.main(["--stochastic", "--ckpt", ckpt])                              # floor(x + u): whole photons, same mean
    c = seen["counts"]
    assert set(c.unique().tolist()) == {0.0, 1.0} and abs(c.mean().item() - 0.3) < 0.03
    monkeypatch.setattr(fm, "evaluate", look(torch.full((4000,), 2.0).log1p()))
    probe.main(["--poisson", "--ckpt", ckpt])                                 # Poisson(mean 2): its mean and variance
    c = seen["counts"]
    assert torch.equal(c, c.round()) and abs(c.mean().item() - 2) < 0.1 and abs(c.var().item() - 2) < 0.25
    with pytest.raises(SystemExit, match="two different roundings"):
        probe.main(["--poisson", "--stochastic", "--ckpt", ckpt])
    monkeypatch.setattr(vqgan, "evaluate", look(log))
    with pytest.raises(SystemExit, match="a checkpoint of flow_matching.py, not of vqgan.py"):
        probe.main(["--script", "vqgan", "--ckpt", ckpt])                     # --script: any model script
    out = subprocess.run([sys.executable, "tools/round_probe.py", "--ckpt", "none.pt"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "error: none.pt: checkpoint not found" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "tools/round_probe.py", "--script", "bench", "--ckpt", "x.pt"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "--script takes one of flow_matching, latent_fm" in out.stderr and "(got 'bench')" in out.stderr


def test_sampler_features_prints_each_sampler_and_rejects_bad_specs(tmp_path, smoke_run):
    smoke_run("flow_matching.py", to=tmp_path / "fm")
    out = subprocess.run([sys.executable, "tools/sampler_features.py", "--ckpt", str(tmp_path / "fm" / "ckpt.pt"),
                          "--n", "40", "--samplers", "euler2,midpoint1r"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[1:] if not ln.startswith(" ")] == ["data", "euler2", "midpoint1r"]
    assert "haze 0.000 of the photons" in lines[-1]             # whole photons: nothing below half a photon
    bad = subprocess.run([sys.executable, "tools/sampler_features.py", "--ckpt", "x.pt", "--samplers", "rk4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "rk4 is not SOLVER STEPS [r]" in bad.stderr
