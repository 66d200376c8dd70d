"""The profile half of the GPU probe (issue 37): for flow_matching --paper (Euler 11) and latent_fm --paper
(its paper sampler), one bf16 sampler call at batch 256 under torch.profiler: the top 15 kernels by device time,
the op-by-op bytes per sample (bench.traffic) and the device's copy bandwidth, to read the achieved GB/s
against. Writes OUT/gpu_profile.json after every step and OUT/top15_<model>.txt.

    OUT=results/gpu_X python tools/gpu_profile.py          # on a GPU (tools/gpu_report.sh runs it)
    OUT=/tmp/p python tools/gpu_profile.py --smoke         # the script itself on a CPU: batch 2, CPU times
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402


def main(argv):
    smoke = "--smoke" in argv
    dev = torch.device("cpu" if smoke else "cuda")
    out = Path(os.environ.get("OUT", "/tmp/gpu_profile"))
    out.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke)", torch=torch.__version__)
    save = lambda: (out / "gpu_profile.json").write_text(json.dumps(res, indent=1))   # noqa: E731
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        big = torch.empty(2 ** 28, device=dev)                    # 1 GiB: read once, written once per clone
        res["copy_GBps"] = 2 * big.nbytes / bench.timed(lambda _: big.clone(), None, 3, dev) / 1e9
        save()
    batch = 2 if smoke else 256
    for name in ("flow_matching", "latent_fm"):
        try:
            import importlib
            mod = importlib.import_module(name)
            nets, _, _ = bench.load_nets(name, mod, "neutron", "/nonexistent", True, dev)
            steps = bench._default_sampler(mod, True)[0]
            sampler, nfe = bench.make_sampler(name, mod, nets, None, "neutron", steps, paper=True)
            cond = sampler.example_cond(batch, None).to(dev)
            run = torch.no_grad()(lambda c: bench._amp(sampler.run, c))
            run(cond)
            moved, ops = bench.traffic(run, cond[:min(batch, 64)])
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                run(cond)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cpu_time_total" if smoke else "self_device_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=15)
            (out / f"top15_{name}.txt").write_text(table)
            top = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:15]
            res[name] = dict(nfe=nfe, batch=batch, bytes_per_sample=moved, aten_ops_per_call=ops,
                             top15=[dict(name=e.key, calls=e.count, self_us=getattr(e, key)) for e in top])
        except Exception as e:                                     # report it, keep the other model
            res[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        print(name, json.dumps(res[name])[:300], flush=True)
        save()


if __name__ == "__main__":
    main(sys.argv[1:])
