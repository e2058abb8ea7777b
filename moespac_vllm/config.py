"""moespac configuration: one frozen dataclass tree, parsed once, passed down explicitly.

Sources, later ones overriding earlier ones:
1. defaults (below);
2. `MOESPAC_CONFIG`: a JSON object of the flat keys;
3. `MOESPAC_<KEY>` environment variables, one per flat key (e.g. `MOESPAC_CACHE_RATIO=0.25`);
4. vLLM's `--additional-config '{"moespac": {...}}'` (the flat keys again).

Flat keys (the user-facing names; README lists them):

| key                    | type        | meaning                                                        |
|------------------------|-------------|----------------------------------------------------------------|
| cache_ratio            | float (0,1] | expert slots per MoE layer on the device, as a share of E     |
| gpu_expert_budget_gb   | float > 0   | alternatively: device bytes for expert slots, split per layer  |
| policy                 | Policy      | cache/placement policy (`spac` is MoE-SpAc)                    |
| balancer               | BalancerKind| `exact` (combinatorial, hot path) or `milp` (HiGHS, oracle)    |
| utility_cap            | int >= 1    | the paper's K: utility levels are 0..K                         |
| theta_up / theta_down  | int >= 1    | the estimator's hysteresis (reference code: 5 and 1)           |
| theta_scale            | ThetaScale  | `fixed` (reference) or `window`: θ_up scaled by n / ref window |
| reference_window_tokens| int >= 1    | the window size θ_up is tuned for (reference: 9 = 1 + γ 8)     |
| estimator_source       | Source      | which routing signal feeds the estimator                      |
| profile                | str         | cost-model profile name, or a path to a calibrated JSON        |
| cpu_threads            | int >= 1    | CPU expert thread count (default: all cores)                   |
| prefetch               | bool        | issue prefetches between steps                                 |
| draft_length           | DraftLength | `adaptive` (governor.py: k per step, <= num_speculative_tokens)|
|                        |             | or `fixed` (vLLM's k); only read when a draft is configured    |
| stats_file             | path        | JSON-lines statistics, one object every `stats_interval_steps`|
| stats_interval_steps   | int >= 1    | how often the stats line is logged/written                     |
| record_trace           | path        | record routing + draft signal as a trace (npz)                 |

Every bad value raises `ValueError` whose message starts with the offending field's name.
This module is pure: it knows nothing about vLLM.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

ENV_PREFIX = "MOESPAC_"
ENV_JSON = "MOESPAC_CONFIG"
# MOESPAC_* variables that are not configuration keys. Any other MOESPAC_* variable that is not a
# flat key is a typo and is refused, so a misspelt setting cannot be silently ignored.
ENV_ENABLE = "MOESPAC_ENABLE"  # set by `--plugin moespac`; any value but 0/false/no/off enables
# Set by the process that built an enabled engine config, for the engine processes it starts
# (they inherit the environment; their plugin load sees no VllmConfig yet). Not a user setting.
ENV_ENGINE_ENABLED = "MOESPAC_ENGINE_ENABLED"
ENV_CACHE_DIR = "MOESPAC_CACHE_DIR"  # where measured cost profiles are cached
ENV_NON_CONFIG = frozenset(
    {ENV_JSON, ENV_ENABLE, ENV_ENGINE_ENABLED, ENV_CACHE_DIR, "MOESPAC_ALLOW_UNVERIFIED_VLLM",
     "MOESPAC_DATA_DIR", "MOESPAC_MODEL_DIR"}
)
# MOESPAC_* variables that do not ask for offloading: where data or caches live, the version gate.
ENV_NOT_ENABLING = frozenset(
    {ENV_ENGINE_ENABLED, ENV_CACHE_DIR, "MOESPAC_ALLOW_UNVERIFIED_VLLM", "MOESPAC_DATA_DIR",
     "MOESPAC_MODEL_DIR"}
)
HOW_TO_ENABLE = ("add a \"moespac\" section to --additional-config / additional_config=, set any "
                 "MOESPAC_<KEY> variable, or pass --plugin moespac")
DEFAULT_CACHE_RATIO = 0.25


class Policy(str, Enum):
    """Expert cache / placement policies. All run in the simulator; the vLLM layer runs all but
    `oracle` (which needs future routing)."""

    SPAC = "spac"  # ours: utility estimator + exact balancer + utility-space prefetch/evict
    SPAC_FAITHFUL = "spac-faithful"  # reference code: K=5, θ=(5,1), fixed threshold 1, no balancer
    LRU = "lru"  # on-demand fetch, LRU eviction (vLLM PR #37190-like)
    LFU = "lfu"  # on-demand fetch, LFU eviction
    STATIC = "static"  # hot experts pinned on device, the rest on CPU (KTransformers/Fiddler-like)
    HYBRIMOE = "hybrimoe"  # autoregressive score-based prefetch + CPU compute
    SD_LRU = "sd-lru"  # speculative decoding, on-demand fetch + LRU, no utility
    SD_STATIC = "sd-static"  # speculative decoding over `static`'s frozen hot set (llama.cpp + SD)
    ORACLE = "oracle"  # knows future routing: Belady eviction + exact balancer (simulator only)


class DraftLength(str, Enum):
    """How many draft tokens a speculative step verifies (governor.py)."""

    ADAPTIVE = "adaptive"  # per step, the k <= num_speculative_tokens the governor chooses
    FIXED = "fixed"  # always vLLM's num_speculative_tokens


class BalancerKind(str, Enum):
    EXACT = "exact"
    MILP = "milp"


class EstimatorSource(str, Enum):
    """Which routing signal moves the utility levels."""

    AUTO = "auto"  # draft routing when the draft has routers, else the verify window, else AR
    VERIFY = "verify"  # the target's routing over each verification window (1 + k tokens)
    DRAFT = "draft"  # draft routing logits (MoE draft / self-draft) plus the verify window
    AUTOREGRESSIVE = "autoregressive"  # plain decoding: a sliding window of recent tokens


class ThetaScale(str, Enum):
    """How the estimator's rise threshold θ_up follows the window size n (estimator.py)."""

    FIXED = "fixed"  # reference code: θ_up whatever n is (tuned for n = 9)
    WINDOW = "window"  # ours [I]: θ_up(n) = max(1, round(θ_up * n / reference_window_tokens))


@dataclass(frozen=True, slots=True)
class EstimatorConfig:
    utility_cap: int = 5
    theta_up: int = 5
    theta_down: int = 1
    source: EstimatorSource = EstimatorSource.AUTO
    theta_scale: ThetaScale = ThetaScale.FIXED
    reference_window_tokens: int = 9

    def __post_init__(self) -> None:
        _check_int("utility_cap", self.utility_cap, minimum=1)
        _check_int("theta_up", self.theta_up, minimum=1)
        _check_int("theta_down", self.theta_down, minimum=1)
        if not isinstance(self.source, EstimatorSource):
            raise ValueError(f"estimator_source: expected EstimatorSource, got {self.source!r}")
        if not isinstance(self.theta_scale, ThetaScale):
            raise ValueError(f"theta_scale: expected ThetaScale, got {self.theta_scale!r}")
        _check_int("reference_window_tokens", self.reference_window_tokens, minimum=1)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Device expert budget. Exactly one of the two is in force; `cache_ratio` defaults to 0.25."""

    cache_ratio: float | None = None
    gpu_expert_budget_gb: float | None = None

    def __post_init__(self) -> None:
        if self.cache_ratio is not None and self.gpu_expert_budget_gb is not None:
            raise ValueError(
                "cache_ratio: give either cache_ratio or gpu_expert_budget_gb, not both"
            )
        if self.cache_ratio is not None:
            r = _check_float("cache_ratio", self.cache_ratio)
            if not 0.0 < r <= 1.0:
                raise ValueError(f"cache_ratio: must be in (0, 1], got {r}")
        if self.gpu_expert_budget_gb is not None:
            b = _check_float("gpu_expert_budget_gb", self.gpu_expert_budget_gb)
            if b <= 0.0:
                raise ValueError(f"gpu_expert_budget_gb: must be > 0, got {b}")

    @property
    def effective_ratio(self) -> float | None:
        """The ratio in force when no byte budget is given."""
        if self.gpu_expert_budget_gb is not None:
            return None
        return DEFAULT_CACHE_RATIO if self.cache_ratio is None else self.cache_ratio

    def slots_per_layer(self, num_experts: int, num_layers: int, expert_bytes: int) -> int:
        """Device expert slots per MoE layer: ceil(ratio * E), or the byte budget split evenly
        over layers. At least 1, at most E."""
        if num_experts < 1 or num_layers < 1 or expert_bytes < 1:
            raise ValueError("num_experts, num_layers and expert_bytes must be positive")
        ratio = self.effective_ratio
        if ratio is not None:
            slots = math.ceil(ratio * num_experts - 1e-9)
        else:
            assert self.gpu_expert_budget_gb is not None
            budget_bytes = self.gpu_expert_budget_gb * 1e9
            slots = int(budget_bytes // (expert_bytes * num_layers))
            if slots < 1:
                raise ValueError(
                    f"gpu_expert_budget_gb: {self.gpu_expert_budget_gb} GB holds no expert slot "
                    f"({num_layers} layers x {expert_bytes / 1e6:.1f} MB per expert)"
                )
        return max(1, min(num_experts, slots))


@dataclass(frozen=True, slots=True)
class StatsConfig:
    stats_file: str | None = None
    stats_interval_steps: int = 50
    record_trace: str | None = None

    def __post_init__(self) -> None:
        _check_int("stats_interval_steps", self.stats_interval_steps, minimum=1)
        for name in ("stats_file", "record_trace"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{name}: must be a non-empty path string, got {v!r}")


@dataclass(frozen=True, slots=True)
class MoESpacConfig:
    cache: CacheConfig = field(default_factory=CacheConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    policy: Policy = Policy.SPAC
    balancer: BalancerKind = BalancerKind.EXACT
    profile: str = "auto"
    cpu_threads: int | None = None
    prefetch: bool = True
    draft_length: DraftLength = DraftLength.ADAPTIVE

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            raise ValueError(f"policy: expected Policy, got {self.policy!r}")
        if not isinstance(self.balancer, BalancerKind):
            raise ValueError(f"balancer: expected BalancerKind, got {self.balancer!r}")
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError(f"profile: must be a non-empty string, got {self.profile!r}")
        if self.cpu_threads is not None:
            _check_int("cpu_threads", self.cpu_threads, minimum=1)
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"prefetch: must be a boolean, got {self.prefetch!r}")
        if not isinstance(self.draft_length, DraftLength):
            raise ValueError(f"draft_length: expected DraftLength, got {self.draft_length!r}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MoESpacConfig:
        """Build from flat keys. Unknown keys and bad values raise ValueError naming the key."""
        return _build(_parse_flat(dict(values), origin="config"))

    @classmethod
    def resolve(
        cls,
        additional_config: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> MoESpacConfig:
        """Merge defaults < MOESPAC_CONFIG < MOESPAC_<KEY> < additional_config['moespac'].

        `additional_config` is vLLM's `--additional-config` dict (the whole dict; only its
        "moespac" entry is read) or None."""
        env = os.environ if environ is None else environ
        merged: dict[str, Any] = {}
        raw_json = env.get(ENV_JSON)
        if raw_json:
            merged.update(_parse_flat(json_object(ENV_JSON, raw_json), origin=ENV_JSON))
        merged.update(_parse_env(env))
        if additional_config:
            section = additional_config.get("moespac")
            if section is not None:
                if not isinstance(section, Mapping):
                    raise ValueError(
                        "moespac: --additional-config 'moespac' must be an object, got "
                        f"{type(section).__name__}"
                    )
                merged.update(_parse_flat(dict(section), origin="additional_config"))
        return _build(merged)

    def to_flat(self) -> dict[str, Any]:
        """The flat-key form (inverse of from_mapping), JSON-serialisable."""
        out: dict[str, Any] = {}
        for key, (path, _) in _KEYS.items():
            v: Any = self
            for part in path:
                v = getattr(v, part)
            out[key] = v.value if isinstance(v, Enum) else v
        return out

    def replace(self, **flat: Any) -> MoESpacConfig:
        """A copy with some flat keys changed (validated like any other input)."""
        merged = _parse_flat(self.to_flat(), origin="replace")
        if "cache_ratio" in flat and flat["cache_ratio"] is not None:
            merged["gpu_expert_budget_gb"] = None
        if "gpu_expert_budget_gb" in flat and flat["gpu_expert_budget_gb"] is not None:
            merged["cache_ratio"] = None
        merged.update(_parse_flat(flat, origin="replace"))
        return _build(merged)


# ---- parsing ------------------------------------------------------------------------------
def _check_int(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name}: must be an integer, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return v


def _check_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: must be a finite number, got {v!r}")
    return float(v)


def _to_int(name: str, v: Any) -> int:
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            raise ValueError(f"{name}: must be an integer, got {v!r}") from None
    return v


def _to_float(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            raise ValueError(f"{name}: must be a number, got {v!r}") from None
    return v


def _to_bool(name: str, v: Any) -> bool:
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: must be a boolean (true/false), got {v!r}")
    return v


def _to_enum(enum: type[Enum]):
    def conv(name: str, v: Any) -> Enum:
        if isinstance(v, enum):
            return v
        try:
            return enum(str(v).strip().lower())
        except ValueError:
            allowed = ", ".join(m.value for m in enum)  # type: ignore[attr-defined]
            raise ValueError(f"{name}: unknown value {v!r}; expected one of: {allowed}") from None

    return conv


def _to_opt_str(name: str, v: Any) -> str | None:
    if v is None or (isinstance(v, str) and v == ""):
        return None
    if not isinstance(v, str):
        raise ValueError(f"{name}: must be a string, got {v!r}")
    return v


def _to_opt_int(name: str, v: Any) -> int | None:
    if v is None or (isinstance(v, str) and v.strip() == ""):
        return None
    return _to_int(name, v)


# flat key -> (attribute path in the tree, converter)
_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "cache_ratio": (("cache", "cache_ratio"), _to_float),
    "gpu_expert_budget_gb": (("cache", "gpu_expert_budget_gb"), _to_float),
    "policy": (("policy",), _to_enum(Policy)),
    "balancer": (("balancer",), _to_enum(BalancerKind)),
    "utility_cap": (("estimator", "utility_cap"), _to_int),
    "theta_up": (("estimator", "theta_up"), _to_int),
    "theta_down": (("estimator", "theta_down"), _to_int),
    "estimator_source": (("estimator", "source"), _to_enum(EstimatorSource)),
    "theta_scale": (("estimator", "theta_scale"), _to_enum(ThetaScale)),
    "reference_window_tokens": (("estimator", "reference_window_tokens"), _to_int),
    "profile": (("profile",), lambda n, v: v.strip() if isinstance(v, str) else v),
    "cpu_threads": (("cpu_threads",), _to_opt_int),
    "prefetch": (("prefetch",), _to_bool),
    "draft_length": (("draft_length",), _to_enum(DraftLength)),
    "stats_file": (("stats", "stats_file"), _to_opt_str),
    "stats_interval_steps": (("stats", "stats_interval_steps"), _to_int),
    "record_trace": (("stats", "record_trace"), _to_opt_str),
}
FLAT_KEYS: tuple[str, ...] = tuple(_KEYS)


def _parse_flat(values: dict[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in _KEYS:
            raise ValueError(
                f"{key}: unknown moespac setting (from {origin}); known: {', '.join(FLAT_KEYS)}"
            )
        out[key] = _KEYS[key][1](key, raw)
    return out


def _parse_env(env: Mapping[str, str]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NON_CONFIG:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in _KEYS:
            raise ValueError(f"{name}: unknown moespac environment variable")
        raw[key] = value
    return _parse_flat(raw, origin="environment")


def _build(flat: dict[str, Any]) -> MoESpacConfig:
    # cache_ratio and gpu_expert_budget_gb are alternatives: a later source naming one clears
    # the other only through MoESpacConfig.replace; here both set is an error (CacheConfig).
    sections: dict[str, dict[str, Any]] = {"cache": {}, "estimator": {}, "stats": {}, "": {}}
    for key, value in flat.items():
        path, _ = _KEYS[key]
        if len(path) == 2:
            sections[path[0]][path[1]] = value
        else:
            sections[""][path[0]] = value
    return MoESpacConfig(
        cache=CacheConfig(**sections["cache"]),
        estimator=EstimatorConfig(**sections["estimator"]),
        stats=StatsConfig(**sections["stats"]),
        **sections[""],
    )


def enabled_by(additional_config: Mapping[str, Any] | None = None,
               environ: Mapping[str, str] | None = None) -> str | None:
    """Why offloading is on for an engine, or None when it is off (stock vLLM runs untouched).

    On when the engine's additional_config has a "moespac" section, or any MOESPAC_* variable
    other than the data/cache/version-gate ones is set (a config key, MOESPAC_CONFIG,
    MOESPAC_ENABLE from `--plugin moespac`, or the engine-process marker)."""
    env = os.environ if environ is None else environ
    if additional_config and "moespac" in additional_config:
        return "additional_config"
    if env.get(ENV_ENGINE_ENABLED, "") == "1":
        return "engine config"
    names = sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in ENV_NOT_ENABLING)
    if names == [ENV_ENABLE] and env[ENV_ENABLE].strip().lower() in ("0", "false", "no", "off"):
        return None
    return names[0] if names else None


def prepare_output_path(field_name: str, path: str) -> Path:
    """Make `path` writable before anything runs: create missing parent directories, then check
    that a file can be created there, and that `path` is not a symlink out of its directory.
    Raises ValueError naming `field_name` otherwise (so a run fails at start rather than losing
    its output at exit, or writing through a link into a file that is not ours)."""
    p = Path(path).expanduser()
    if p.is_symlink():
        # written only where the user pointed: a link out of its directory (to a file that is
        # not ours, e.g. /etc/passwd or another run's output) is refused, not followed
        target = p.resolve()
        if target.parent != p.parent.resolve():
            raise ValueError(f"{field_name}: {path} is a symlink to {target}, outside "
                             f"{p.parent}; give the file's own path")
    if p.is_dir():
        raise ValueError(f"{field_name}: {path} is a directory; give a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{field_name}: cannot create directory {p.parent} ({e.strerror})") \
            from None
    if not os.access(p.parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{field_name}: {path} is not writable")
    return p


def config_as_json(cfg: MoESpacConfig) -> str:
    return json.dumps(cfg.to_flat(), sort_keys=True)


def json_object(field_name: str, raw: str) -> dict[str, Any]:
    """`raw` parsed as a JSON object; ValueError naming `field_name` otherwise."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{field_name}: not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field_name}: must be a JSON object, got {type(value).__name__}")
    return value


def shared_data_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The shared real-data folder (routing traces, prompt sets): `$MOESPAC_DATA_DIR`, else
    `shared/data` beside the checkout, else beside the working directory; None when none exists.
    Read in place, never copied (several data sets' licences forbid it)."""
    env = os.environ if environ is None else environ
    candidates = [Path(env["MOESPAC_DATA_DIR"])] if env.get("MOESPAC_DATA_DIR") else []
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data",
                   Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


__all__ = [
    "BalancerKind",
    "CacheConfig",
    "DraftLength",
    "EstimatorConfig",
    "EstimatorSource",
    "FLAT_KEYS",
    "MoESpacConfig",
    "Policy",
    "StatsConfig",
    "ThetaScale",
    "config_as_json",
    "enabled_by",
    "json_object",
    "prepare_output_path",
    "shared_data_dir",
]
