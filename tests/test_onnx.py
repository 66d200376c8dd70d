"""ONNX export (issue 22): every script's Sampler as one ONNX graph gives, in ONNX Runtime, the counts the PyTorch
sampler gives from the same cond and noise; wrong input shapes and a missing checkpoint or onnx give clear errors.
Smoke-sized networks with fresh weights (the export does not depend on training); VQ-GAN on a 12x12 image (9 tokens
instead of 121, the same code: its unrolled loop takes ~50 s to export at 44x44)."""
import json
import sys

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import data  # noqa: E402
from helpers import cli  # noqa: E402

TOL = 1e-4     # max |ONNX - PyTorch| / max count: float32 kernels of different libraries (measured ~1e-6)


def smoke(name, *extra):
    mod = __import__(name)
    a = mod.get_args(["--train", "--smoke", *extra])
    return mod, a, vars(a)


def make(name):
    """(module, Sampler with smoke-sized fresh networks, detector)."""
    if name == "vqgan":
        mod, a, cfg = smoke(name)
        nets = mod.build_networks(cfg)
        gpt = mod.GPT(cfg["codes"], 9, cfg["embed"], cfg["heads"], cfg["layers"], cfg["prefix"], cfg["mlp"])
        return mod, mod.Sampler(nets["tokenizer"], gpt, (12, 12), top_k=8), "neutron"
    if name == "sdigan_joint":
        mod, a, cfg = smoke(name)
        return mod, mod.Sampler(mod.build_model(cfg)), "joint"
    mod, a, cfg = smoke(name, *(["--detector", "proton"] if name == "sdigan_proton" else []))
    shape = data.SHAPES[a.detector]
    nets = mod.build_networks(cfg)
    s = {"vae": lambda: mod.Sampler(nets["vae"]),
         "sae_ng": lambda: mod.Sampler(mod.build_model(cfg)),
         "corrvae": lambda: mod.Sampler(mod.build_model(cfg)),
         "gan": lambda: mod.Sampler(nets["generator"], 1.05),
         "sdigan_proton": lambda: mod.Sampler(nets["generator"]),
         "ddpm": lambda: mod.Sampler(nets["unet"], shape, 3, 0.7),
         "flow_matching": lambda: mod.Sampler(nets["unet"], shape, 2, "midpoint"),
         "latent_fm": lambda: mod.Sampler(nets["vae"], nets["unet"], shape, 1.3, 2)}[name]()
    return mod, s.eval(), a.detector


def fake_ckpt(detector, shape):
    return dict(step=0, data=dict(detector=detector, shape=shape, mean=list(range(9)), std=[2.0] * 9))


def lifted(sampler):
    """Fresh networks often emit log-counts below 0 (all counts 0 after the clip): shift every output layer's bias
    so that the comparison sees real counts."""
    for m in sampler.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)) and m.bias is not None:
            with torch.no_grad():
                m.bias.add_(0.3)
    return sampler


@pytest.mark.parametrize("name", ["vae", "sae_ng", "gan", "sdigan_proton", "sdigan_joint", "corrvae", "vqgan", "ddpm",
                                  "flow_matching", "latent_fm"])
def test_onnx_runtime_equals_the_pytorch_sampler(name, tmp_path):
    torch.manual_seed(0)
    mod, s, det = make(name)
    s = lifted(s)
    path = tmp_path / f"{name}.onnx"
    data.export_onnx(s, fake_ckpt(det, data.SHAPES.get(det)), path, name, batches=())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["cond", *s.noise_shapes(1)]
    assert [o.name for o in sess.get_outputs()] == list(s.outputs)
    for n in (1, 4):                                     # traced at batch 2: the batch axis is dynamic
        cond = torch.randn(n, 9)
        noise = s.draw(n, torch.Generator().manual_seed(n))
        ref = s.run(cond, torch.Generator().manual_seed(n))      # run() draws the same noise from the same seed
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        out = sess.run(None, {"cond": cond.numpy(), **{k: v.numpy() for k, v in noise.items()}})
        for o, r in zip(out, ref):
            assert o.shape == r.shape and o.dtype == np.float32 and r.shape[0] == n
            assert r.max() > 0                           # real counts, not an all-zero image
            off = np.abs(o - r) > TOL * r.max()
            if s.meta.get("rounding") in ("nearest", "poisson"):   # whole photons: a count within float noise of
                # k + 0.5 (or of a Poisson CDF step) may round the other way
                assert off.mean() < 1e-3 and np.abs(o - r).max() <= 1 + TOL * r.max()
                assert np.equal(o, np.round(o)).all()
            else:
                assert not off.any(), (name, n, np.abs(o - r).max(), r.max())
    bad = {"cond": np.zeros((2, 8), np.float32), **{k: v.numpy() for k, v in s.draw(2).items()}}
    with pytest.raises(Exception, match=r"(?i)invalid dimensions for input: cond"):
        sess.run(None, bad)
    first = next(iter(s.noise_shapes(2)))
    bad = {"cond": np.zeros((2, 9), np.float32), **{k: v.numpy() for k, v in s.draw(2).items()}}
    bad[first] = bad[first][..., :-1]
    with pytest.raises(Exception, match=f"(?i)invalid (dimensions|rank) for input: {first}"):
        sess.run(None, bad)
    with pytest.raises(data.DataError, match=r"cond must be \(N, 9\)"):
        s.run(torch.zeros(2, 8))


def test_metadata_and_the_export_check(tmp_path):
    mod, s, det = make("flow_matching")
    diffs = data.export_onnx(s, fake_ckpt(det, (44, 44)), tmp_path / "fm.onnx", "flow_matching")
    assert s.meta["rounding"] == "nearest"                # the default: whole photons, so equal or 1 photon apart
    assert set(diffs) == {3, 5} and all(a in (0.0, 1.0) for a, r in diffs.values())
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "fm.onnx")).metadata_props}
    assert meta["model"] == "flow_matching" and meta["detector"] == "neutron" and json.loads(meta["steps"]) == 2
    assert json.loads(meta["feature_mean"]) == list(range(9)) and json.loads(meta["feature_std"]) == [2.0] * 9
    assert json.loads(meta["features"]) == data.FEATURES and json.loads(meta["inputs"]) == {"x0": [1, 44, 44]}


def test_export_command_line_and_its_errors(tmp_path):
    import vae
    mod, a, cfg = smoke("vae")
    m = vae.build_model(cfg)
    ck = dict(model="vae", args=cfg, weights=m.state_dict(), step=0, n_params=1,
              data=dict(detector="neutron", shape=[44, 44], mean=[0.0] * 9, std=[1.0] * 9))
    data.save_checkpoint(ck, tmp_path / "ckpt.pt")
    res = cli("vae.py", "--export", tmp_path / "v.onnx", "--ckpt", tmp_path / "ckpt.pt")
    assert "ONNX Runtime vs PyTorch" in res.stdout and (tmp_path / "v.onnx").exists()
    res = cli("vae.py", "--export", tmp_path / "w.onnx", "--ckpt", tmp_path / "missing.pt", ok=False)
    assert "checkpoint not found" in res.stderr
    res = cli("vae.py", "--export", tmp_path / "w.txt", "--ckpt", tmp_path / "ckpt.pt", ok=False)
    assert "ending in .onnx" in res.stderr


def test_missing_onnx_is_a_clear_error(monkeypatch, tmp_path):
    mod, s, det = make("vae")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)           # import onnxruntime -> ImportError
    with pytest.raises(data.DataError, match="pip install onnx onnxruntime"):
        data.export_onnx(s, None, tmp_path / "v.onnx", "vae")


@pytest.mark.parametrize("variant", ["embedding", "supervised"])
def test_vae_variants_export(variant, tmp_path):
    """vae.py's Table 4.3 rows: the embedding variant reads the particle-type index as a 10th cond column (the
    export and its check draw valid indices), the supervised autoencoder has a zero-width noise input."""
    import vae
    torch.manual_seed(0)
    mod, a, cfg = smoke("vae", "--variant", variant)
    s = lifted(vae.Sampler(vae.build_model(cfg)).eval())
    diffs = data.export_onnx(s, fake_ckpt("neutron", (44, 44)), tmp_path / "v.onnx", "vae")
    assert set(diffs) == {3, 5} and all(r < TOL for a_, r in diffs.values())
    cols = 10 if variant == "embedding" else 9
    assert s.example_cond(4, torch.Generator().manual_seed(0)).shape == (4, cols)
    with pytest.raises(data.DataError, match=rf"cond must be \(N, {cols}\)"):
        s.run(torch.zeros(2, 19 - cols))
