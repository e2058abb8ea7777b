"""`profile: auto`: the cost profile measured on this machine at start-up, cached per machine+dims.

A named profile describes somebody else's machine; `auto` measures this one the first time a model
with these expert dims starts here (`calibrate.calibrate`, short budget: host->device GB/s from
pinned memory, device expert time and CPU expert time at the model's dims, a few repetitions of
two token counts), writes the result as a calibrated JSON under the cache directory, and reads
it back on later starts (no measurement). The budget aims at <= 3 s of measurement on a GPU box
(benchmarks: `moespac calibrate` times the full version).

Cache key: the device name, the CPU count and model, and the dims (H, I, dtype bytes). The file is
a plain calibrated profile: `profile: <that path>` names it explicitly.

Inputs: `ModelDims`, a device string; output: `(CostProfile, label)` where the label says which
profile is in force and whether it was measured now or read from the cache. Pure library: no vLLM.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moespac_vllm.config import ENV_CACHE_DIR
from moespac_vllm.cost_model import CostProfile, get_profile
from moespac_vllm.trace import ModelDims

logger = logging.getLogger("moespac_vllm.startup_profile")

# the short budget: two token counts, few repetitions, one CPU expert per call
SHORT_TOKENS = (1, 8)
SHORT_REPS = 2


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$MOESPAC_CACHE_DIR`, else `$XDG_CACHE_HOME/moespac`, else `~/.cache/moespac`."""
    env = os.environ if environ is None else environ
    if env.get(ENV_CACHE_DIR):
        return Path(env[ENV_CACHE_DIR]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "moespac"


def machine_key(device_name: str) -> str:
    """What makes two machines' costs differ: the device, the CPU (model and count)."""
    cpu = platform.processor() or platform.machine()
    return f"{device_name}|{cpu}|{os.cpu_count()}"


def cache_path(dims: ModelDims, device_name: str, root: Path) -> Path:
    key = f"{machine_key(device_name)}|H{dims.hidden_size}|I{dims.intermediate_size}|" \
          f"b{dims.dtype_bytes}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / f"auto-H{dims.hidden_size}-I{dims.intermediate_size}-{digest}.json"


def _short_calibration(dims: ModelDims, device: str) -> Any:
    from moespac_vllm.calibrate import calibrate

    return calibrate(dims, device=device, tokens=SHORT_TOKENS, device_experts=2, cpu_experts=1,
                     reps=SHORT_REPS)


def resolve(profile: str, dims: ModelDims, *, device: str = "auto", device_name: str = "",
            root: Path | None = None,
            measure: Callable[[ModelDims, str], Any] = _short_calibration,
            ) -> tuple[CostProfile, str]:
    """The profile in force and its label. `profile` other than `auto` is resolved by
    `cost_model.get_profile` (ValueError naming `profile` when it cannot be)."""
    if profile != "auto":
        return get_profile(profile), profile
    root = cache_dir() if root is None else root
    path = cache_path(dims, device_name, root)
    if path.is_file():
        try:
            return CostProfile.load(path), f"auto (measured on this machine, cached {path})"
        except (ValueError, KeyError, OSError) as e:  # a torn or stale file: measure again
            logger.warning("moespac: cached profile %s unreadable (%s); measuring again", path, e)
    t0 = time.perf_counter()
    cal = measure(dims, device)
    prof = CostProfile.from_calibration(path.stem, cal)
    elapsed_s = time.perf_counter() - t0
    try:
        root.mkdir(parents=True, exist_ok=True)
        prof.save(path)
        where = f"cached {path}"
    except OSError as e:
        where = f"not cached: {e.strerror}"
    return prof, f"auto (measured on this machine in {elapsed_s:.1f} s, {where})"


__all__ = ["SHORT_REPS", "SHORT_TOKENS", "cache_dir", "cache_path", "machine_key", "resolve"]
