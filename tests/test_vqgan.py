"""vqgan.py through its command line, and its pieces directly."""
import json

import pytest
import torch

import data
import vqgan as vq
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "vqgan.py"


@pytest.fixture(scope="module", params=["neutron", "proton"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"vq_{request.param}")
    cli(S, "--train", "--smoke", "--detector", request.param, "--out", out)
    return request.param, out


def test_smoke_train_sample_eval(run):
    det, out = run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model"] == "vqgan" and ck["state"]["stage1"]["step"] == 4 and ck["state"]["stage2"]["step"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s1 = [r for r in rows if r["stage"] == 1]
    assert s1 and all(1 <= r["perplexity"] <= 64 and 0 < r["usage"] <= 1 and r["rec_W"] >= 0 for r in s1)
    cli(S, "--sample", "--ckpt", out / "ckpt.pt", "--n", 40, "--out", out / "s.npz")   # no other flags
    check_samples(out / "s.npz", data.SHAPES[det], 40)
    e = cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 100, "--reps", 2)
    assert "reconstruction Wasserstein" in e.stdout and "codebook perplexity" in e.stdout
    r = check_eval(out / "eval.json")
    assert r["reconstruction_W"] >= 0 and r["perplexity"] >= 1 and r["temperature"] == 1.2 and r["top_k"] == 128
    cli(S, "--eval", "--ckpt", out / "ckpt.pt", "--max-test", 30, "--reps", 1, "--sweep")
    sw = json.loads((out / "sweep.json").read_text())
    assert [(r["temperature"], r["top_k"]) for r in sw["rows"]] == [(t, k) for t in (1.0, 1.2, 1.4) for k in (0, 128, 64)]
    assert all(v > 0 for v in sw["ms_per_sample_kv_cache"].values())


def test_stages_resume_determinism_and_errors(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", b, "--val-every", 2, "--stage", "1")        # stage 1 only ...
    assert "stage 2 is not trained yet" in cli(S, "--sample", "--ckpt", b / "ckpt.pt", ok=False).stderr
    cli(S, "--train", "--smoke", "--out", b, "--val-every", 2, "--stage", "2")        # ... then stage 2 on top
    assert losses(a) == losses(b) and len(losses(a)) == 4                             # same seed, same losses
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--max-steps", 3, "--stage", "1")  # interrupted
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")                         # finishes both
    for key in ("vqae", "disc", "gpt"):          # the codebook buffers and the adversarial part included
        assert_same_weights(weights(a, key), weights(c, key))
    (tmp_path / "junk.pt").write_text("junk")           # (wrong detector / model: data.load_checkpoint, tested elsewhere)
    assert "not a readable checkpoint" in cli(S, "--sample", "--ckpt", tmp_path / "junk.pt", ok=False).stderr
    assert "--temperature must be positive" in cli(S, "--sample", "--temperature", 0, ok=False).stderr
    assert "multiple of --heads" in cli(S, "--train", "--embed", 30, ok=False).stderr
    assert "exists: pass --resume" in cli(S, "--train", "--smoke", "--out", a, ok=False).stderr


def test_ema_update_hand_computed():
    cs, es = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z, idx = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), torch.tensor([0, 1, 0])
    new_cs, new_es, book = vq.ema_codebook(cs, es, z, idx, decay=0.5, eps=0.1)
    # counts 0.5 * 1 + 0.5 * (2, 1, 0); sums 0.5 * es + 0.5 * (z0 + z2, z1, 0)
    torch.testing.assert_close(new_cs, torch.tensor([1.5, 1.0, 0.5]))
    torch.testing.assert_close(new_es, torch.tensor([[1.3, 0.4], [0.0, 1.0], [0.5, 0.5]]))
    # Laplace smoothing: n = 3, (cs + 0.1) / (3 + 3 * 0.1) * 3 = (1.6, 1.1, 0.6) / 1.1
    smoothed = torch.tensor([1.6, 1.1, 0.6]) / 1.1
    torch.testing.assert_close(book, new_es / smoothed[:, None])
    torch.testing.assert_close(book[1], torch.tensor([0.0, 1.0]))


def test_quantizer_update_and_dead_code_restart():
    q = vq.Quantizer(codes=4, dim=2)
    q.cluster_size.copy_(torch.tensor([1.0, 1.0, 0.02, 1.0]))
    z = torch.nn.functional.normalize(torch.tensor([[3.0, 1.0], [1.0, 3.0]]), dim=1)[:, :, None, None]   # (2, 2, 1, 1)
    idx = torch.tensor([0, 1]).view(2, 1, 1)
    q.update(z, idx, decay=0.9, dead_below=0.03, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.0, 1.0, 1.0, 0.9]))    # code 2 restarted at count 1
    flat = z[:, :, 0, 0]
    assert any(torch.equal(q.codebook[2], v) for v in flat) and torch.equal(q.embed_sum[2], q.codebook[2])


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_shapes_and_kv_cache_equals_no_cache(shape):
    torch.manual_seed(0)
    det = "neutron" if shape == (44, 44) else "proton"
    vqae, disc, gpt = vq.build_model(dict(detector=det, ae_width=4, code_dim=8, codes=32, embed=16, heads=2, layers=2,
                                          prefix=3))
    x = torch.rand(3, 1, *shape)
    tok = vqae.tokens(x)
    assert tok.shape == (3,) + vq.grid(shape) and tok.shape[1] * tok.shape[2] == (121 if det == "neutron" else 112)
    assert vqae.decode(vqae.vq.embed(tok), shape).shape == x.shape and disc(x).dim() == 4
    cond = torch.randn(6, 9)
    for k in (0, 5):
        a = vq.sample_tokens(gpt, cond, torch.Generator().manual_seed(1), 1.2, k, kv_cache=True)
        b = vq.sample_tokens(gpt, cond, torch.Generator().manual_seed(1), 1.2, k, kv_cache=False)
        assert a.shape == (6, gpt.n_tokens) and torch.equal(a, b)
    c = vq.sample_tokens(gpt, cond, torch.Generator().manual_seed(2), 1.2, 5)
    assert not torch.equal(a, c) and len(set(a.flatten().tolist())) > 1
    out = vq.sample(vqae, gpt, cond, shape, torch.Generator().manual_seed(0))
    assert out.shape == (6,) + shape and torch.isfinite(out).all() and (out >= 0).all()


def test_top_k_and_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(1000, 1)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert set(vq.pick(logits, u, 1.0, 2).tolist()) == {0, 1}                     # only the two most likely
    assert set(vq.pick(logits, u, 1.0, 0).tolist()) == {0, 1, 2, 3}
    assert torch.equal(vq.pick(logits, u, 1e-4, 0), torch.zeros(1000, dtype=torch.long))   # T -> 0: argmax
    assert vq.pick(logits[:2], torch.tensor([0.0, 0.999999]), 1.0, 0).tolist() == [0, 3]        # CDF ends
