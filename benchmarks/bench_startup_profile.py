"""`profile: auto` at start-up: how long the first start on a machine spends measuring the cost
profile (`startup_profile.resolve`: a short `calibrate` at the model's dims), and that the second
start reads the cache. Target: <= 3 s of measurement on the serving machine (torch already
imported, as inside vLLM). One JSON line per dims, tagged with the device and the load.

    python benchmarks/bench_startup_profile.py --dims qwen3-30b-a3b mixtral-8x7b --json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def run(dims_names: list[str], device: str) -> list[dict]:
    import torch

    from moespac_vllm.calibrate import describe_device, parse_dims
    from moespac_vllm.startup_profile import resolve

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else \
        ("cpu" if device == "auto" else device)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out = []
    for spec in dims_names:
        dims = parse_dims(spec)
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            prof, label = resolve("auto", dims, device=dev, device_name=name, root=Path(root))
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, label2 = resolve("auto", dims, device=dev, device_name=name, root=Path(root))
            cached_s = time.perf_counter() - t0
        costs = prof.expert_costs(dims)
        out.append({"bench": "startup_profile", "device": describe_device(), "dims": spec,
                    "first_start_s": round(first_s, 3), "cached_start_s": round(cached_s, 4),
                    "within_3s": first_s <= 3.0, "label": label, "cached_label": label2,
                    "fetch_ms": round(costs.fetch_ms, 4),
                    "gpu_fixed_ms": round(costs.gpu_fixed_ms, 4),
                    "cpu_fixed_ms": round(costs.cpu_fixed_ms, 4),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "command": sys.argv})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for r in run(args.dims, args.device):
        print(json.dumps(r) if args.json else
              f"{r['dims']}: first start {r['first_start_s']:.2f} s, cached "
              f"{r['cached_start_s'] * 1e3:.1f} ms ({r['device']}, load {r['load_avg_1m']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
