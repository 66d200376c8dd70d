"""Per-sample generation time of every model, side by side, on the device at hand.

One run times every model script's own `Sampler` (imported, nothing copied; the module its sample() runs:
forward(cond, *noise) -> counts) from a fixed batch of conditions to raw photon counts: noise, every network
evaluation of the sampler, decoding, ReLU/expm1. The
weights come from runs/<script>/ckpt.pt when that checkpoint exists (its size and settings), otherwise the
script's default configuration is freshly initialised (`--paper`: the reference sizes), which times the same.

Modes (one row each):
  eager      torch.no_grad, fp32: the scripts' code as it is.
  inference  the same under torch.inference_mode (CPU default).
  bf16       (CPU default) bf16 autocast (this CPU generation has avx512_bf16); outputs cast back to fp32. On a
             CPU with the 4-d weights in contiguous (NCHW) memory format, a copy: oneDNN's bf16 convolutions are
             slower on NHWC weights than fp32 (flow_matching, batch 256: bf16 NHWC 8.7, fp32 NHWC 7.0, bf16
             contiguous 5.2 ms / sample), so the row times the layout bf16 is fast in (flow_matching --amp too).
  channels_last (--channels-last, CPU) fp32 with the Sampler's 4-d weights in channels-last (NHWC) memory
             format, a copy: oneDNN's NHWC convolutions; the same arithmetic, so the same counts.
  compile    (--compile) the Sampler's networks (each child module's forward, not the unrolled sampler) in
             torch.compile(fullgraph=True, dynamic=False); on a GPU with mode max-autotune-no-cudagraphs, bf16
             weights and autocast, inside bench.py's own whole-sampler CUDA graph (comparable with graph-opt).
             A network the sampler calls through another method (vae.decode) stays eager. Compilation happens in
             the warm-up and takes minutes on a small CPU, so it is opt-in.
  bf16-weights (--bf16-weights) bf16 autocast with the convolution and linear weights stored in bf16 and
             channels-last (autocast then casts no weights on each call; norms stay fp32).
  onnx       (--onnx, CPU) the Sampler exported by data.export_onnx (what --export writes) run in ONNX Runtime's
             CPU execution provider with torch's thread count; noise drawn by torch as in the other rows. The
             export time is in the JSON (onnx_export_s), not in the timing.
  amp        (GPU) bf16 autocast.
  graph      (GPU) bf16 autocast with the whole sampling loop (all steps) captured in one CUDA graph: static
             condition and output buffers, warm-up on a side stream, then replay. The noise is drawn on the GPU
             inside the graph (generator=None), so every replay draws fresh noise.
  graph-opt  (GPU) graph on the bf16-weights copy (bf16 conv/linear weights, channels-last).
Every GPU row runs with torch.backends.cudnn.benchmark on (the UNets' channel counts are odd: 4, 12, 20, 28);
--channels-last, --compile, --bf16-weights and --onnx add their rows on either device (onnx: CPU only, a GPU row
says so). Fresh weights are put in the memory format the script's load_sampler gives a checkpoint's.
Timing (timed()): warm-up calls (three when a call is fast), then --repeats measurements, each of K back-to-back
calls between one pair of clock readings lasting >= 0.1 s, divided by K; the median. On a GPU the clock is a pair
of CUDA events and the end event is synchronised before reading it (the published timings skipped that
synchronisation and may undercount); on a CPU perf_counter. Conditions are standard-normal standardised
features (the cost does not depend on their values).

Columns: ms/sample (the median of --repeats) and its spread ((max - min) / median); samples/s; bytes moved per
sample op by op (the inputs and outputs of every non-view aten op of one call: an upper bound on memory traffic,
what an unfused sampler moves) and the GB/s that implies; NFE (network evaluations per sample); parameters; FLOPs per sample counted
by torch.utils.flop_counter (matmuls, convolutions, attention; elementwise work not counted) on a small batch;
achieved FLOP/s and its fraction of the device's peak: on a GPU the datasheet dense peak of the mode's dtype
(PEAKS; fp32 rows against the non-tensor-core fp32 peak, so TF32 convolutions can exceed it), on a CPU the
practical peak = the FLOP/s of a large fp32 matmul measured at start-up with the same threads. Peak memory:
torch.cuda.max_memory_allocated on a GPU; not measured on a CPU (n/a). The "toy MC" row is data.py's toy
simulator (both calorimeters per event, numpy, one core): a toy, not GEANT. sdigan_joint.py's rows are per particle
(its ZN and ZP responses together), and the run ends with the poster's comparison (ML in PL 2023): the joint model
against gan.py (ZN) + sdigan_proton.py (ZP), per mode and batch (JSON key joint_vs_separate).

Numerical check: every non-eager row is compared with fp32 eager on the same conditions ("W vs fp32": the
channel-sum Wasserstein between the two outputs; "(noise)": the same between two eager runs with different noise,
the scale to read it against; "%sum": the mean relative photon-sum difference where both drew the same noise, e.g.
bf16 quantisation). On a GPU the eager row runs in true fp32 (TF32 off). --paper always times fresh weights at the
published sizes, never a checkpoint. A model that cannot be loaded (e.g. a stage-1-only checkpoint) is reported as
skipped and the others are timed; the JSON is rewritten after every model.

Usage:
    python bench.py                                     # quick (~1 min on a CPU): batch 32, one measurement per row
    python bench.py --full                              # the published setting: batch 256 (CPU) / 256,4096 (GPU)
    python bench.py --models flow_matching,ddpm --steps 1,11,50 --batch 256,1024
    python bench.py --device cpu --compile --onnx --channels-last --json runs/bench_cpu.json
    python bench.py --detector proton                   # the ZP versions (sdigan_proton.py is ZP only)
    python bench.py --models gan,sdigan_proton,sdigan_joint  # the joint model against the two separate ones
"""
import argparse
import contextlib
import copy
import importlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import metrics

MODELS = ["vae", "sae_ng", "gan", "sdigan_proton", "vqgan", "ddpm", "flow_matching", "latent_fm", "corrvae",
          "sdigan_joint"]
FIXED_DETECTOR = {"sdigan_proton": "proton", "sdigan_joint": "joint"}   # scripts tied to one detector
ITERATIVE = {"ddpm", "flow_matching", "latent_fm"}
TRAFFIC = {"eager", "inference", "bf16", "amp", "bf16-weights", "channels_last"}   # rows whose traffic is counted
CHANNELS_LAST = {"flow_matching", "ddpm"}              # scripts whose load_sampler puts weights channels-last          # models whose cost scales with --steps
PEAKS = {  # dense datasheet peaks, FLOP/s: (fp32 without tensor cores, bf16 tensor cores)
    "H200": (67e12, 989e12), "H100 PCIe": (51e12, 756e12), "H100": (67e12, 989e12), "A100": (19.5e12, 312e12),
    "L40S": (91.6e12, 362e12), "A10": (31.2e12, 125e12), "V100": (15.7e12, 0), "T4": (8.1e12, 0),
}


# ----------------------------------------------------------------------------------------------------------
# One sampler per model script: its Sampler module, forward(cond, *noise) -> counts, and its NFE
# ----------------------------------------------------------------------------------------------------------
def _shape(ck, detector):
    return tuple(ck["data"]["shape"]) if ck else data.SHAPES[detector]


def make_sampler(name, mod, nets, ck, detector, steps, paper=False):
    """The script's own Sampler (data.Sampler: forward(cond, *noise) -> counts, noise_shapes(n), run(cond)) for
    these networks, and its NFE: network evaluations per sample (the steps; one GPT call per token for VQ-GAN; 1
    for the single-pass models). Only the constructors differ; every mode below calls the one signature."""
    shape = lambda: _shape(ck, detector)                 # only the samplers that need it ask (joint: two shapes)
    build = {"flow_matching": lambda: mod.Sampler(nets[0], shape(), steps, *_default_sampler(mod, paper)[1:]),
             "ddpm": lambda: mod.Sampler(nets[0], shape(), steps),
             "latent_fm": lambda: mod.Sampler(nets[0], nets[1], shape(), ck["scale"] if ck else 1.0, steps,
                                              **dict(zip(("solver", "rounding"), _default_sampler(mod, paper)[1:]))),
             "gan": lambda: mod.Sampler(nets[0], ck["scale"] if ck else 1.0),
             "vqgan": lambda: mod.Sampler(nets[0], nets[-1], shape())}
    s = build.get(name, lambda: mod.Sampler(nets[0]))().eval()
    return s, s.meta.get("nfe", s.meta.get("steps", 1))


def load_nets(name, mod, detector, runs, paper, device):
    """(networks in sampling order, checkpoint or None, what was timed): trained weights if runs/<name>/ckpt.pt
    exists and is a complete checkpoint of this detector, else fresh weights. --paper always times fresh weights at
    the published size (a checkpoint would be the CPU-sized model, silently)."""
    path = Path(runs) / name / "ckpt.pt"
    if path.exists() and not paper:
        a = mod.get_args(["--sample", "--ckpt", str(path), "--device", str(device)])
        ck = data.load_checkpoint(path, name)            # the script's sampler: its networks in sampling order
        nets = list(mod.load_sampler(ck, a, device).children())
        if ck["data"]["detector"] == detector:
            return nets, ck, str(path)
    a = mod.get_args(["--train", "--detector", detector] + (["--paper"] if paper else []))
    nets = mod.build_model(vars(a))
    nets = list(nets) if isinstance(nets, (tuple, list)) else [nets]
    if name == "vqgan":                                  # (autoencoder, discriminator, GPT): no discriminator
        nets = [nets[0], nets[2]]
    fmt = torch.channels_last if name in CHANNELS_LAST else torch.preserve_format   # as load_sampler's
    return [m.to(device, memory_format=fmt).eval() for m in nets], None, "fresh weights"


# ----------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------
def timed(fn, cond, repeats, device, min_seconds=0.1):
    """Median seconds per call of fn(cond). Warm-up: one call, two more when a call is fast (< min_seconds:
    allocator, cuDNN plans, graph pools settle). Then `repeats` measurements, each of K back-to-back calls
    between one pair of clock readings (CUDA events, synchronised; perf_counter on a CPU), K chosen so that a
    measurement lasts >= min_seconds: sub-millisecond graph replays are not timed one by one."""
    return float(np.median(timings(fn, cond, repeats, device, min_seconds)))


def timings(fn, cond, repeats, device, min_seconds=0.1):
    """The `repeats` measurements (seconds per call) behind timed()."""
    def clock(k):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                fn(cond)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(k):
            fn(cond)
        return time.perf_counter() - t0
    first = clock(1)
    if first < min_seconds:
        clock(2)
    k = max(1, math.ceil(min_seconds / max(clock(1), 1e-7)))
    return [clock(k) / k for _ in range(repeats)]


def traffic(fn, cond):
    """(bytes per sample, aten ops per call) of one call of fn(cond), op by op: the inputs and outputs of every
    non-view aten op (an upper bound on the memory traffic of an unfused sampler; a fused kernel moves less)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Count(TorchDispatchMode):
        ops = moved = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                Count.ops += 1
                Count.moved += sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                                   if isinstance(t, torch.Tensor))
            return out
    with torch.no_grad(), Count():
        fn(cond)
    return Count.moved / len(cond), Count.ops


def cuda_graph(fn, cond):
    """(replay(cond) -> counts, None) with fn's whole call captured in one CUDA graph, or (None, reason) when
    that is not possible (no GPU, or an operation in fn that cannot be captured)."""
    if cond.device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    try:
        static_cond = cond.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                    # warm-up outside the capture (allocator, cuDNN plans)
            for _ in range(2):
                fn(static_cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(static_cond)
    except Exception as e:                               # capture refused: report it, never crash the table
        torch.cuda.synchronize()
        torch.cuda.set_stream(torch.cuda.default_stream(cond.device))   # never leave later rows on a capture stream
        return None, f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

    def replay(c):
        static_cond.copy_(c)
        graph.replay()
        return static_out
    return replay, None


def flops_per_sample(fn, cond):
    """FLOPs of fn on a batch, divided by the batch size (torch's flop counter: matmul, conv, attention).
    Attention runs on SDPA's math backend here: the fused CPU kernel has no FLOP formula and would count 0,
    so CPU and GPU rows count the same FLOPs."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(cond)
    return counter.get_total_flops() / len(cond)


def cpu_peak(n=2048, repeats=5):
    """Practical fp32 peak of this CPU: FLOP/s of an n x n matmul with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / t


def _time(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def device_peak(device, bf16):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (fp32, b16) in PEAKS.items():
        if key in name:
            return (b16 if bf16 else fp32) or None
    return None


def toy_row(n=2000, seed=0):
    """Time per event of the toy Monte Carlo (both calorimeters; numpy, one core)."""
    rng = np.random.default_rng(seed)
    particles = data.draw_particles(n, rng)
    data.simulate(particles[:100], rng)
    t = min(_time(lambda: data.simulate(particles, rng)) for _ in range(3))
    return dict(model="toy MC (not GEANT)", mode="numpy", steps=None, batch=n, ms_per_sample=1e3 * t / n,
                samples_per_s=n / t, params=0, flops_per_sample=None, flops_per_s=None, peak_fraction=None,
                peak_mem_mb=None, weights="-")


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------
def agreement(ref, out, same_noise):
    """How far a mode's output is from fp32 eager on the same conditions: the channel-sum Wasserstein between
    the two batches and, when both drew the same noise, the mean relative difference of the photon sums."""
    if isinstance(ref, (tuple, list)):                  # the joint model: the worse of its detectors
        checks = [agreement(r, o, same_noise) for r, o in zip(ref, out)]
        return {k: None if checks[0][k] is None else max(c[k] for c in checks) for k in checks[0]}
    ref, out = metrics.as_counts(ref), metrics.as_counts(out)
    rel = np.abs(out.sum((1, 2)) - ref.sum((1, 2))).mean() / max(ref.sum((1, 2)).mean(), 1e-9) if same_noise else None
    return dict(check_W=metrics.wasserstein(ref, out)[0], check_rel_sum=None if rel is None else float(rel))


def seeded(fn, cond, seed=0):
    """fn(cond) with the device's default generator seeded: the samplers draw their noise from it."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn(cond)


def bench_model(name, args, device, modes, cpu_peak_flops, bar=None, save=lambda rows: None):
    """The rows of one model script. Every non-eager row is checked against fp32 eager: check_W is the
    channel-sum Wasserstein between the two outputs (same conditions; same noise except in CUDA graphs, which
    draw their own), to read against check_W_noise = eager vs eager with other noise; check_rel_sum the mean
    relative photon-sum difference where the noise is the same (e.g. bf16 quantisation of log1p outputs)."""
    mod = importlib.import_module(name)
    detector = FIXED_DETECTOR.get(name, args.detector)
    nets, ck, source = load_nets(name, mod, detector, args.runs, args.paper, device)
    n_params = sum(p.numel() for m in nets for p in m.parameters())
    tqdm.write(f"  {name}: {'trained weights from ' + source if ck else 'random initialisation (' + source + ')'}"
          + (" at the published size" if args.paper else ""))
    rows = []
    paper = args.paper or bool(ck and ck.get("args", {}).get("paper"))   # a --paper checkpoint: the paper's sampler
    for steps in (args.steps if name in ITERATIVE else [None]):
        sampler, nfe = make_sampler(name, mod, nets, ck, detector, steps or _default_sampler(mod, paper)[0], paper)
        base, built = sampler.run, {}                    # built: the compiled module / ONNX session, once per sampler
        flops = flops_per_sample(torch.no_grad()(base), sampler.example_cond(8, None).to(device))
        for batch in args.batch:
            cond = sampler.example_cond(batch, None).to(device)   # vae --variant embedding: + type index
            with fp32_exact(device):
                ref = seeded(base, cond)
                noise_w = agreement(ref, seeded(base, cond, 1), False)["check_W"]
            for mode in modes:
                row = dict(model=name, mode=mode, steps=nfe, batch=batch, params=n_params, weights=source,
                           flops_per_sample=flops, detector=detector, check_W_noise=noise_w)
                if bar is not None:
                    bar.set_postfix_str(f"{name} {mode} batch {batch}")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)        # before a capture: the graph's pool counts
                try:
                    with fp32_exact(device) if mode == "eager" else contextlib.nullcontext():
                        fn, note = _mode_fn(mode, sampler, name, cond, built)
                        if fn is None:
                            rows.append(dict(row, ms_per_sample=None, note=note))
                            save(rows)
                            tqdm.write(f"  {name:<19} {mode:<10} {note}")
                            continue
                        ts = timings(fn, cond, args.repeats, device)
                        t = float(np.median(ts))
                        same_noise = "graph" not in mode and not (mode == "compile" and device.type == "cuda")
                        check = {} if mode == "eager" else agreement(ref, seeded(fn, cond), same_noise)
                        moved = traffic(fn, cond[:min(len(cond), 64)]) if mode in TRAFFIC else (None, None)
                        if mode == "onnx":
                            check["onnx_export_s"] = built["export_s"]
                except Exception as e:  # e.g. torch.compile without a working compiler
                    rows.append(dict(row, ms_per_sample=None, note=f"failed: {type(e).__name__}: {str(e)[:100]}"))
                    save(rows)
                    tqdm.write(f"  {name:<19} {mode:<10} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                finally:
                    if bar is not None:
                        bar.update()
                peak = device_peak(device, mode != "eager") if device.type == "cuda" else cpu_peak_flops
                row.update(ms_per_sample=1e3 * t / batch, ms_spread=(max(ts) - min(ts)) / t, samples_per_s=batch / t,
                           bytes_per_sample=moved[0], aten_ops=moved[1],
                           GB_per_s=moved[0] and moved[0] * batch / t / 1e9, flops_per_s=flops * batch / t,
                           peak_fraction=(flops * batch / t / peak) if peak else None,
                           peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                           **check)
                rows.append(row)
                save(rows)                                      # the JSON after every row (short GPU loans)
                tqdm.write(format_row(row))
    return rows


@contextlib.contextmanager
def fp32_exact(device):
    """True fp32 on a GPU: cuDNN convolutions and matmuls default to TF32 on Ampere and later, which would make
    the 'eager' row (and the reference output of the checks) TF32, not fp32."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _default_sampler(mod, paper):
    """(steps, ...) a script samples with by default, at the published setting with --paper (flow_matching:
    (steps, solver, rounding))."""
    a = mod.get_args(["--sample"] + (["--paper"] if paper else []))
    if hasattr(mod, "sampler_for"):                   # flow_matching, latent_fm: the paper's Euler, the CPU default's midpoint
        return mod.sampler_for(a, paper)
    return getattr(a, "steps", None), None


def _mode_fn(mode, sampler, name, cond, built):
    """fn(cond) for one mode, or (None, why not). Every mode draws the noise from the device's default generator
    (sampler.draw(n, None)), so under seeded() each one sees the noise fp32 eager saw."""
    base = sampler.run
    if mode == "eager":
        return torch.no_grad()(base), None
    if mode == "inference":
        return torch.inference_mode()(base), None
    if mode == "bf16":                                   # CPU bf16 autocast on a contiguous copy (see the top)
        if "bf16" not in built:
            built["bf16"] = copy.deepcopy(sampler).to(memory_format=torch.contiguous_format)
        return torch.no_grad()(lambda c: _amp(built["bf16"].run, c)), None
    if mode == "amp":                                    # GPU bf16 autocast (fp16 where bf16 is unsupported)
        return torch.no_grad()(lambda c: _amp(base, c)), None
    if mode == "channels_last":                          # a copy: the other rows keep the contiguous weights
        if "channels_last" not in built:
            built["channels_last"] = copy.deepcopy(sampler).to(memory_format=torch.channels_last)
        return torch.no_grad()(built["channels_last"].run), None
    if mode == "bf16-weights":
        if "bf16w" not in built:
            built["bf16w"] = bf16_weights(sampler)
        return torch.no_grad()(lambda c: _amp(built["bf16w"].run, c)), None
    if mode == "graph-opt":                              # bf16 weights, channels-last, in one CUDA graph
        if "bf16w" not in built:
            built["bf16w"] = bf16_weights(sampler)
        with torch.no_grad():
            return cuda_graph(torch.no_grad()(lambda c: _amp(built["bf16w"].run, c)), cond)
    if mode == "compile":                                # the networks compiled; GPU: + bf16 weights and a graph
        if "compiled" not in built:
            cuda = cond.device.type == "cuda"
            built["compiled"] = compile_networks(bf16_weights(sampler) if cuda else copy.deepcopy(sampler), cuda)
        if cond.device.type != "cuda":
            return torch.no_grad()(built["compiled"].run), None
        with torch.no_grad():
            return cuda_graph(torch.no_grad()(lambda c: _amp(built["compiled"].run, c)), cond)
    if mode == "onnx":
        return onnx_fn(sampler, name, cond, built)
    if mode == "graph":
        with torch.no_grad():
            return cuda_graph(torch.no_grad()(lambda c: _amp(base, c)), cond)
    raise ValueError(mode)


def bf16_weights(sampler):
    """A copy of the sampler with its convolution and linear weights in bf16 and channels-last (what autocast
    would cast them to on every call); norms and the rest stay fp32. Run it under autocast."""
    s = copy.deepcopy(sampler).to(memory_format=torch.channels_last)
    for m in s.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.to(torch.bfloat16)
    return s


def compile_networks(sampler, cuda):
    """The sampler with each of its networks (child modules) replaced by torch.compile(network): the solver
    loop stays python, so the graph capture around it (graph rows) sees the compiled kernels."""
    for name, net in list(sampler.named_children()):
        setattr(sampler, name, torch.compile(net, fullgraph=True, dynamic=False,
                                             mode="max-autotune-no-cudagraphs" if cuda else None))
    return sampler


def select_modes(cuda, args):
    """The rows of a run: the device's base modes, then the optional ones asked for (on either device)."""
    modes = ["eager", "amp", "graph", "graph-opt"] if cuda else ["eager", "inference", "bf16"]
    modes += [m for m, on in (("bf16-weights", args.bf16_weights), ("channels_last", args.channels_last),
                              ("compile", args.compile), ("onnx", args.onnx)) if on]
    return [m for m in modes if args.only is None or m in args.only.split(",")]


def onnx_fn(sampler, name, cond, built):
    """fn(cond) that runs the Sampler exported by data.export_onnx in ONNX Runtime (CPU execution provider, the
    same number of threads as torch), noise drawn by torch as in the other rows; or (None, why not)."""
    if cond.device.type != "cpu":
        return None, "ONNX Runtime rows are timed on a CPU (--device cpu)"
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed (pip install onnx onnxruntime)"
    if "session" not in built:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            data.export_onnx(sampler, None, Path(tmp) / f"{name}.onnx", name, batches=())
            built["export_s"] = time.perf_counter() - t0
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
            built["session"] = ort.InferenceSession(str(Path(tmp) / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
    sess = built["session"]

    def fn(c):
        feeds = {"cond": c.numpy(), **{k: v.numpy() for k, v in sampler.draw(len(c), None, c.device).items()}}
        outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)     # the joint model: (ZN, ZP)
    return fn, None


def _amp(fn, c):
    with data.autocast(c.device, True):
        return fn(c)


def joint_vs_separate(rows, detector):
    """The poster's comparison (ML in PL 2023): the joint model's time per particle (both responses) against the
    sum of the separate models' times, gan.py for ZN and sdigan_proton.py for ZP, per mode and batch."""
    if detector != "neutron":                            # gan.py's row is then not the ZN model
        return []
    ms = {(r["model"], r["mode"], r["batch"]): r.get("ms_per_sample") for r in rows if r.get("ms_per_sample")}
    out = []
    for (model, mode, batch), joint in ms.items():
        zn, zp = ms.get(("gan", mode, batch)), ms.get(("sdigan_proton", mode, batch))
        if model == "sdigan_joint" and zn and zp:
            out.append(dict(mode=mode, batch=batch, joint_ms=joint, gan_ms=zn, sdigan_proton_ms=zp,
                            ratio=joint / (zn + zp)))
    return out


def fmt(v, f):
    """format(v, f), or 'n/a' right-aligned to the same width."""
    return format("n/a", f">{''.join(ch for ch in f.split('.')[0] if ch.isdigit()) or 0}") if v is None else format(v, f)


def format_row(r):
    return (f"  {r['model']:<19} {r['mode']:<10} {fmt(r['steps'], 'd') if r['steps'] else '-':>4} {r['batch']:>6} "
            f"{fmt(r['ms_per_sample'], '10.4f')} {fmt(r.get('samples_per_s'), '10.0f')} {r['params']:>9,d} "
            f"{fmt(r['flops_per_sample'] and r['flops_per_sample'] / 1e6, '9.2f')} "
            f"{fmt(r['flops_per_s'] and r['flops_per_s'] / 1e9, '9.2f')} {fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '6.1f')} "
            f"{fmt(r['peak_mem_mb'], '8.1f')} {fmt(r.get('check_W'), '8.3f')} {fmt(r.get('check_W_noise'), '8.3f')} "
            f"{fmt(r.get('check_rel_sum') and 100 * r['check_rel_sum'], '7.3f')}")


HEADER = (f"  {'model':<19} {'mode':<10} {'NFE':>4} {'batch':>6} {'ms/sample':>10} {'samples/s':>10} {'params':>9} "
          f"{'MFLOP/smp':>9} {'GFLOP/s':>9} {'%peak':>6} {'peak MB':>8} {'W vs fp32':>8} {'(noise)':>8} {'%sum':>7}")


def markdown(paths):
    """Markdown tables regenerated from bench JSON files (one per file, its device and command above it):
    results as data, the tables by command (`python bench.py --table results/gpu_*/bench_*.json`)."""
    out = []
    for path in paths:
        try:
            d = json.loads(Path(path).read_text())
            rows = d["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise data.DataError(f"--table: {path} is not a bench.py JSON ({type(e).__name__}: {e})") from None
        out += [f"`{d.get('command', '?')}` ({path}): {d.get('device', '?')}, torch {d.get('torch', '?')}", "",
                "| model | mode | NFE | batch | ms / sample | samples / s | parameters | % of peak | peak MB "
                "| W vs fp32 (noise) | % sum | weights |", "|" + "---|" * 12]
        for r in rows:
            if "ms_per_sample" not in r:
                out.append(f"| {r.get('model', '?')} | {r.get('mode', '-')} | {r.get('note', 'no timing')} |" + " |" * 9)
                continue
            w = "-" if r.get("check_W") is None else f"{r['check_W']:.3f} ({r['check_W_noise']:.3f})"
            out.append(f"| {r['model']} | {r['mode']} | {r.get('steps') or '-'} | {r['batch']} | {r['ms_per_sample']:.4f} "
                       f"| {fmt(r.get('samples_per_s'), '.0f')} | {fmt(r.get('params'), ',d')} "
                       f"| {fmt(r.get('peak_fraction') and 100 * r['peak_fraction'], '.1f')} "
                       f"| {fmt(r.get('peak_mem_mb'), '.0f')} | {w} "
                       f"| {fmt(r.get('check_rel_sum') and 100 * r['check_rel_sum'], '.3f')} | {r.get('weights', '')} |")
        out.append("")
    return "\n".join(out)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model scripts to time (default: all)")
    p.add_argument("--detector", default="neutron", choices=list(data.SHAPES),
                   help="calorimeter (sdigan_proton is always ZP, sdigan_joint both)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default: 32 on a CPU, 256 with --full; "
                   "256,4096 on a GPU)")
    p.add_argument("--steps", default=None, help="comma-separated step counts for the iterative models "
                   "(ddpm, flow_matching, latent_fm; default: each script's default)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=None, help="timed measurements per row, median (default: 1 on a "
                   "CPU, 3 with --full or on a GPU)")
    p.add_argument("--full", action="store_true", help="the published setting on a CPU: batch 256, 3 repeats "
                   "(minutes: DDPM's 50 steps and VQ-GAN's 121 tokens dominate); the default answers in about a minute")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd Sampler (slow to compile)")
    p.add_argument("--channels-last", action="store_true", help="also time fp32 with channels-last weights")
    p.add_argument("--bf16-weights", action="store_true", help="also time bf16 autocast on bf16 weights")
    p.add_argument("--only", default=None, metavar="MODES", help="time only these of the selected modes, e.g. "
                   "compile (comma-separated; the fp32 eager reference of the checks still runs)")
    p.add_argument("--onnx", action="store_true", help="also time the Sampler exported to ONNX in ONNX Runtime (CPU; "
                   "needs onnx and onnxruntime; the export takes seconds, VQ-GAN's unrolled 121 steps minutes)")
    p.add_argument("--paper", action="store_true", help="fresh weights at the reference (paper) sizes")
    p.add_argument("--runs", default="runs", help="folder with <model>/ckpt.pt checkpoints to take weights from")
    p.add_argument("--no-toy", action="store_true", help="skip the toy Monte Carlo row")
    p.add_argument("--json", default="runs/bench.json", help="where to write the results")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print Markdown tables from bench JSON files (e.g. results/gpu_*/bench_*.json) and exit")
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    unknown = [m for m in a.models if m not in MODELS]
    if unknown or not a.models:
        p.error(f"--models: unknown {unknown or 'empty list'}; choose from {','.join(MODELS)}")
    try:
        a.batch = [int(b) for b in a.batch.split(",")] if a.batch else None
        a.steps = [int(s) for s in a.steps.split(",")] if a.steps else [None]
        assert all(b > 0 for b in a.batch or [1]) and all(s is None or s > 0 for s in a.steps)
    except (ValueError, AssertionError):
        p.error("--batch and --steps take positive comma-separated integers, e.g. 256,1024")
    if a.repeats is not None and a.repeats <= 0:
        p.error(f"--repeats must be positive (got {a.repeats})")
    return a


def main(argv=None):
    args = get_args(argv)
    if args.table:
        print(markdown(args.table))
        return []
    device = data.pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:   # cuda:N: events, peaks and memory stats of device N ("cuda" alone means the current device)
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    args.batch = args.batch or ([256, 4096] if cuda else [256] if args.full else [32])
    args.repeats = args.repeats or (3 if cuda or args.full else 1)
    modes = select_modes(cuda, args)                    # on a GPU an onnx row says it is CPU-only
    torch.backends.cudnn.benchmark = cuda                 # the timed GPU rows: cuDNN picks its fastest kernels
    info = dict(device=torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version())
    peak = None if cuda else cpu_peak()
    if cuda:
        info["peak_flops"] = dict(fp32=device_peak(device, False), bf16=device_peak(device, True))
    else:
        info["peak_flops"] = dict(fp32_matmul_measured=peak)
    print(f"device: {info['device']}, torch {info['torch']}, {info['threads']} threads; peak used for %peak: "
          + (f"{peak / 1e9:.1f} GFLOP/s (2048^2 fp32 matmul, measured)" if peak else "datasheet table PEAKS"))
    print(HEADER)
    rows, out = [], Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_rows = sum(len(args.steps if m in ITERATIVE else [None]) for m in args.models) * len(args.batch) * len(modes)
    bar = tqdm(total=n_rows, desc="bench", unit="row", leave=False, file=sys.stderr)
    for name in args.models:
        try:
            rows += bench_model(name, args, device, modes, peak, bar, save=lambda part: out.write_text(
                json.dumps(dict(info, command="python " + " ".join(sys.argv), rows=rows + part), indent=1)))
        except Exception as e:            # e.g. a stage-1-only checkpoint: report it, time the other models
            rows.append(dict(model=name, mode="-", note=f"skipped: {type(e).__name__}: {str(e)[:160]}"))
            tqdm.write(f"  {name:<19} skipped: {type(e).__name__}: {str(e)[:160]}")
        out.write_text(json.dumps(dict(info, command="python " + " ".join(sys.argv), rows=rows), indent=1))
    bar.close()
    if not args.no_toy:
        rows.append(toy_row())
        print(format_row(rows[-1]))
    both = joint_vs_separate(rows, args.detector)
    for c in both:
        print(f"  joint vs separate, {c['mode']}, batch {c['batch']}: sdigan_joint {c['joint_ms']:.4f} ms per particle "
              f"(ZN + ZP) vs gan {c['gan_ms']:.4f} + sdigan_proton {c['sdigan_proton_ms']:.4f} = "
              f"{c['gan_ms'] + c['sdigan_proton_ms']:.4f} ms: x{c['ratio']:.2f}")
    out.write_text(json.dumps(dict(info, command="python " + " ".join(sys.argv), rows=rows, joint_vs_separate=both),
                              indent=1))
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:
        sys.exit(f"error: {e}")
