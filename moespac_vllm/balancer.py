"""Heterogeneous Workload Balancer: per layer per step, which routed experts run on the device
(resident, or fetched over PCIe first) and which on the CPU, minimising the layer's makespan.

Shapes: M routed experts of one layer in one forward (each routed by n_i >= 1 of the T tokens).

Input, `BalanceProblem`: tokens[M] (n_i), resident[M] (already in a device slot), free_slots (slots
an on-demand fetch may take), `ExpertCosts` (cost_model.py: g(n) = gpu_fixed + gpu_per_token·n,
c(n) = cpu_fixed + cpu_per_token·n, fetch_ms per expert) and hidden_fetch_ms W (copy time that
overlaps other work and costs nothing).
Output, `Placement`: fetch[M] (non-resident experts copied then run on the device), on_cpu[M]
(the rest of the non-residents, plus residents moved off the device in the wider model below),
makespan_ms, gpu_ms, cpu_ms. Every routed expert is placed exactly once; at most free_slots
fetches.

THE MODEL (ours, [I] in MOESPAC.md terms; the paper's integer program was not retrieved). With F the
fetched set, m = |F|:

    GPU branch = Σ_{resident ∪ F} g(n_i) + max(0, fetch_ms·m − W)
    CPU branch = Σ_{non-resident \\ F} c(n_i)
    minimise makespan = max(GPU branch, CPU branch)   subject to m <= free_slots

The two branches run concurrently (GPU launched asynchronously, CPU experts, join), so a layer costs
the slower of the two; copies serialise on one PCIe link, and the first W ms of them hide behind
work already in flight (the draft phase, earlier layers).

Residents run on the device by default: a resident costs the device microseconds (its weights
are in HBM), while the CPU must stream its weights from DRAM (0.1-1 ms). Moving residents to the
CPU can still shorten a copy-bound layer, but never by more than the residents' own device time
G0 = Σ_{resident} g(n_i): take the optimum with moved set Q and put Q back on the device; the GPU
branch grows by Σ_Q g <= G0 and the CPU branch shrinks. `BalanceProblem(allow_resident_cpu=True)`
selects that wider model; every solver below honours it (on_cpu then may include residents).
Measured with the named cost profiles at Qwen3-30B-A3B dims, 2,000 random E=128 top-8 16-token
decisions (bench_balancer.py `resident_to_cpu`, benchmarks/README.md): h100-pcie5 improves 4.6 %
of them, mean 0.035 %, max 2.6 %; rtx4090-pcie4 10.6 %, mean 0.22 %, max 6.5 %; jetson-orin
(device slow relative to its CPU) 34 %, mean 2.6 %, max 22.6 %. The wider path costs ~4x the
default one, so it is off by default.

Solvers, one `Balancer` protocol (`solve(problem) -> Placement`):

* `ExactBalancer` (the hot path): exact and combinatorial. For a fixed m both branches depend on F
  only through V = Σ_{F} n_i: the CPU branch falls and the GPU branch rises with V, so the best V is
  the achievable one nearest the crossing point V*(m), on either side. Achievable (m, V) pairs form
  a cardinality-constrained subset sum over small integers; we group the non-residents by n and
  build the reachable set as one Python int bitset (bit m·stride + V, stride > Σ V) with binary
  splitting of each class's count: one shift-OR per piece. A relaxation (V anywhere between the
  sum of the m smallest and the m largest n) gives a lower bound LB(m) that is convex in m; we
  start at its minimiser and walk outwards while LB can still beat the best exact value. The
  chosen (m, V) is reconstructed into per-class counts by backtracking the pieces. Ties: fewer
  fetches. The wider model adds a dimension (residents kept, k): `_solve_wide`, same idea.
* `MilpBalancer`: the same model as a MILP for HiGHS (highspy), binaries per non-resident expert,
  continuous makespan and exposed-copy variables. The oracle in tests and benchmarks.
* `CvxpyBalancer`: the same MILP through cvxpy (solver HIGHS), for cross-checking the formulation.
* `FixedCpuBalancer`: the reference code's behaviour (threshold 1, no balancer): nothing is fetched
  on demand, every non-resident routed expert runs on the CPU. For `spac-faithful`.

highspy and cvxpy are imported lazily inside their classes: a GPU machine without them can import
this module and use `ExactBalancer`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

import numpy as np

from moespac_vllm.config import BalancerKind
from moespac_vllm.cost_model import ExpertCosts

# Relative tolerance used only for pruning and tie-breaking inside ExactBalancer (the model is
# evaluated in float64; 1e-12 is far below the 1e-9 at which solvers are compared).
_REL_TOL = 1e-12


@dataclass(frozen=True, slots=True, eq=False)
class BalanceProblem:
    """One layer's decision. tokens[M] int >= 1, resident[M] bool (see module docstring)."""

    tokens: np.ndarray
    resident: np.ndarray
    free_slots: int
    costs: ExpertCosts
    hidden_fetch_ms: float = 0.0
    allow_resident_cpu: bool = False  # the wider model: residents may run on the CPU too

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens)
        resident = np.asarray(self.resident)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens: expected a 1-D integer array, got {tokens.dtype} "
                             f"{tokens.shape}")
        if tokens.size and int(tokens.min()) < 1:
            raise ValueError("tokens: every routed expert has >= 1 token")
        if resident.shape != tokens.shape or resident.dtype != np.bool_:
            raise ValueError(f"resident: expected a bool array of shape {tokens.shape}, got "
                             f"{resident.dtype} {resident.shape}")
        fs = self.free_slots
        if isinstance(fs, bool) or not isinstance(fs, (int, np.integer)) or fs < 0:
            raise ValueError(f"free_slots: must be a non-negative integer, got {fs!r}")
        if not isinstance(self.costs, ExpertCosts):
            raise ValueError(f"costs: expected ExpertCosts, got {type(self.costs).__name__}")
        c = self.costs
        if not all(map(math.isfinite, (c.gpu_fixed_ms, c.gpu_per_token_ms, c.cpu_fixed_ms,
                                       c.cpu_per_token_ms, c.fetch_ms))):
            raise ValueError(f"costs: every time must be finite, got {c}")
        w = self.hidden_fetch_ms
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating)) \
                or not math.isfinite(w) or w < 0:
            raise ValueError(f"hidden_fetch_ms: must be a finite number >= 0, got {w!r}")
        if not isinstance(self.allow_resident_cpu, (bool, np.bool_)):
            raise ValueError(f"allow_resident_cpu: must be a boolean, got "
                             f"{self.allow_resident_cpu!r}")
        object.__setattr__(self, "tokens", tokens.astype(np.int64, copy=False))
        object.__setattr__(self, "resident", resident)
        object.__setattr__(self, "free_slots", int(fs))
        object.__setattr__(self, "hidden_fetch_ms", float(w))

    @property
    def num_experts(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class Placement:
    """fetch[M]: fetched then run on the device; on_cpu[M]: run on the CPU (non-residents not
    fetched, plus residents moved off the device when the problem allows it)."""

    fetch: np.ndarray
    on_cpu: np.ndarray
    makespan_ms: float
    gpu_ms: float
    cpu_ms: float

    @property
    def num_fetched(self) -> int:
        return int(np.count_nonzero(self.fetch))


class Balancer(Protocol):
    def solve(self, problem: BalanceProblem) -> Placement: ...


def branch_times(problem: BalanceProblem, fetch: np.ndarray,
                 resident_cpu: np.ndarray | None = None) -> tuple[float, float]:
    """(gpu_ms, cpu_ms) of placing `fetch` (non-residents not fetched go to the CPU; residents
    marked in `resident_cpu` too)."""
    c = problem.costs
    tok = problem.tokens
    on_gpu = problem.resident | fetch
    if resident_cpu is not None:
        on_gpu = on_gpu & ~resident_cpu
    n_gpu = int(np.count_nonzero(on_gpu))
    n_fetch = int(np.count_nonzero(fetch))
    n_cpu = tok.shape[0] - n_gpu
    v_gpu = int(tok[on_gpu].sum())
    v_cpu = int(tok.sum()) - v_gpu
    exposed = max(0.0, c.fetch_ms * n_fetch - problem.hidden_fetch_ms)
    gpu = c.gpu_fixed_ms * n_gpu + c.gpu_per_token_ms * v_gpu + exposed
    cpu = c.cpu_fixed_ms * n_cpu + c.cpu_per_token_ms * v_cpu
    return gpu, cpu


def evaluate(problem: BalanceProblem, fetch: np.ndarray,
             resident_cpu: np.ndarray | None = None) -> Placement:
    """The placement that fetches exactly `fetch` [M] bool (and runs the residents marked in
    `resident_cpu` on the CPU), with its times. Raises ValueError if it fetches a resident, more
    than free_slots experts, or moves a resident the problem does not allow to move. Every solver
    reports through this (or the same integer totals), so makespans are comparable bit for bit."""
    f = np.asarray(fetch, dtype=bool)
    if f.shape != problem.tokens.shape:
        raise ValueError(f"fetch: expected shape {problem.tokens.shape}, got {f.shape}")
    if np.any(f & problem.resident):
        raise ValueError("fetch: a resident expert cannot be fetched")
    if int(np.count_nonzero(f)) > problem.free_slots:
        raise ValueError(f"fetch: {int(np.count_nonzero(f))} fetches exceed free_slots "
                         f"{problem.free_slots}")
    on_cpu = ~(problem.resident | f)
    if resident_cpu is not None:
        r = np.asarray(resident_cpu, dtype=bool)
        if r.shape != f.shape or np.any(r & ~problem.resident):
            raise ValueError("resident_cpu: must mark residents only, shape like tokens")
        if r.any() and not problem.allow_resident_cpu:
            raise ValueError("resident_cpu: the problem does not allow residents on the CPU")
        on_cpu = on_cpu | r
        resident_cpu = r
    gpu, cpu = branch_times(problem, f, resident_cpu)
    return Placement(fetch=f, on_cpu=on_cpu, makespan_ms=max(gpu, cpu), gpu_ms=gpu, cpu_ms=cpu)


class FixedCpuBalancer:
    """Reference code (threshold 1, no balancer): no on-demand fetch; non-residents on the CPU."""

    def solve(self, problem: BalanceProblem) -> Placement:
        return evaluate(problem, np.zeros(problem.num_experts, dtype=bool))


class ExactBalancer:
    """Exact optimum of the model by a bitset subset-sum over (fetch count, fetched tokens).

    Written for CPython speed (measured in benchmarks/README.md): a few numpy calls to read the
    problem, then plain ints; the reported times use the same integer totals as `branch_times`,
    so they equal `evaluate`'s bit for bit."""

    def solve(self, problem: BalanceProblem) -> Placement:
        # plain-int reads: numpy reductions on ~50 elements cost more than these loops
        tok = problem.tokens.tolist()
        res = problem.resident.tolist()
        if problem.allow_resident_cpu and any(res):
            return _solve_wide(problem, tok, res)
        c = problem.costs
        ag, bg, ac, bc = c.gpu_fixed_ms, c.gpu_per_token_ms, c.cpu_fixed_ms, c.cpu_per_token_ms
        n_all = len(tok)
        class_counts = [0] * (max(tok) + 1 if tok else 1)
        n_res = v_res = 0
        for n, r in zip(tok, res):
            if r:
                n_res += 1
                v_res += n
            else:
                class_counts[n] += 1
        n_nr = n_all - n_res
        v_all = sum(tok)
        v_nr = v_all - v_res
        m_max = min(problem.free_slots, n_nr)
        if m_max == 0:
            m, v, per_class = 0, 0, {}
        else:
            m, v, per_class = _choose(class_counts, n_nr, v_nr, m_max, n_res, v_res,
                                      ag, bg, ac, bc, c.fetch_ms, problem.hidden_fetch_ms)
        fetch = np.zeros(n_all, dtype=bool)
        if m:
            picked = []
            for i, (n, r) in enumerate(zip(tok, res)):
                if not r and per_class.get(n, 0):
                    per_class[n] -= 1
                    picked.append(i)
            fetch[picked] = True
        n_gpu = n_all - n_nr + m
        v_gpu = v_all - v_nr + v
        exposed = max(0.0, c.fetch_ms * m - problem.hidden_fetch_ms)
        gpu = ag * n_gpu + bg * v_gpu + exposed
        cpu = ac * (n_all - n_gpu) + bc * (v_all - v_gpu)
        return Placement(fetch=fetch, on_cpu=~(problem.resident | fetch),
                         makespan_ms=max(gpu, cpu), gpu_ms=gpu, cpu_ms=cpu)



def _add_classes(reach: int, mask: int, stride: int, counts: Sequence[int], tag: bool,
                 pieces: list[tuple[int, bool, int, int]], history: list[int]) -> int:
    """OR each token-count class into the reachable bitset by binary splitting (pieces of 1, 2, 4,
    ... experts of that class), recording each piece and the bitset after it for backtracking.
    A piece of `take` experts with n tokens shifts by take * (stride + n)."""
    for n, cnt in enumerate(counts):
        take = 1
        while cnt > 0:
            if take > cnt:
                take = cnt
            shift = take * (stride + n)
            reach = (reach | (reach << shift)) & mask
            pieces.append((shift, tag, n, take))
            history.append(reach)
            cnt -= take
            take <<= 1
    return reach

def _choose(class_counts: list[int], n_nr: int, v_nr: int, m_max: int, n_res: int, v_res: int,
            ag: float, bg: float, ac: float, bc: float, fms: float, hidden: float,
            ) -> tuple[int, int, dict[int, int]]:
    """Optimal (m, V) and the per-class counts {n: how many experts with n tokens to fetch}.

    class_counts[n] = non-residents routed by n tokens; m_max = min(free_slots, n_nr) >= 1."""
    g0 = ag * n_res + bg * v_res
    c_all = ac * n_nr + bc * v_nr
    slope = bg + bc
    asc: list[int] = []
    for n, cnt in enumerate(class_counts):
        if cnt:
            asc += [n] * cnt
    prefix = [0, *accumulate(asc)]  # prefix[m] = Vmin(m); Vmax(m) = v_nr - prefix[n_nr - m]

    def lower_bound(m: int) -> float:
        a = g0 + ag * m + max(0.0, fms * m - hidden)
        b = c_all - ac * m
        if slope <= 0.0:
            return a if a > b else b
        lo = prefix[m]
        hi = v_nr - prefix[n_nr - m]
        v = (b - a) / slope
        v = lo if v < lo else hi if v > hi else v
        ga = a + bg * v
        cb = b - bc * v
        return ga if ga > cb else cb

    # reachable (m, V) as bits m*stride + V, built by binary splitting of each class's count
    stride = v_nr + 1
    mask = (1 << ((m_max + 1) * stride)) - 1
    reach = 1
    history = [reach]
    pieces: list[tuple[int, bool, int, int]] = []  # (shift, is_fetch, n, how many experts)
    reach = _add_classes(reach, mask, stride, class_counts, True, pieces, history)
    row_mask = (1 << stride) - 1

    def best_for(m: int) -> tuple[float, int]:
        row = (reach >> (m * stride)) & row_mask  # never 0: some m-subset always exists
        a = g0 + ag * m + max(0.0, fms * m - hidden)
        b = c_all - ac * m
        if slope <= 0.0:
            return (a if a > b else b), (row & -row).bit_length() - 1
        # clamped: a subnormal slope sends V* to +-inf; outside [0, stride) only one side exists
        vstar = min(max((b - a) / slope, -1.0), float(stride))
        best_mk, best_v = math.inf, -1
        lo = math.floor(vstar)
        if lo >= 0:
            below = row & ((2 << lo) - 1) if lo < stride else row
            if below:
                v = below.bit_length() - 1
                ga, cb = a + bg * v, b - bc * v
                best_mk, best_v = (ga if ga > cb else cb), v
        hi = max(0, math.ceil(vstar))
        if hi < stride:
            above = row >> hi
            if above:
                v = hi + (above & -above).bit_length() - 1
                ga, cb = a + bg * v, b - bc * v
                mk = ga if ga > cb else cb
                if mk < best_mk:
                    best_mk, best_v = mk, v
        return best_mk, best_v

    # LB is convex in m (module docstring): binary-search its leftmost minimiser
    lo_m, hi_m = 0, m_max
    while lo_m < hi_m:
        mid = (lo_m + hi_m) // 2
        if lower_bound(mid + 1) < lower_bound(mid):
            lo_m = mid + 1
        else:
            hi_m = mid
    best_m = lo_m
    best_mk, best_v = best_for(best_m)
    # walk outwards while LB can still win; left (fewer fetches) wins ties, right must be better
    left, right = best_m - 1, best_m + 1
    lb_left = lower_bound(left) if left >= 0 else math.inf
    lb_right = lower_bound(right) if right <= m_max else math.inf
    while True:
        tol = _REL_TOL * abs(best_mk)
        go_left = lb_left <= best_mk + tol
        go_right = lb_right < best_mk - tol
        if not go_left and not go_right:
            break
        if go_left and (not go_right or lb_left <= lb_right):
            mk, v = best_for(left)
            if mk <= best_mk + tol:
                best_mk, best_v, best_m = min(mk, best_mk), v, left
            left -= 1
            lb_left = lower_bound(left) if left >= 0 else math.inf
        else:
            mk, v = best_for(right)
            if mk < best_mk - tol:
                best_mk, best_v, best_m = mk, v, right
            right += 1
            lb_right = lower_bound(right) if right <= m_max else math.inf

    # backtrack the pieces from bit best_m*stride + best_v
    pos = best_m * stride + best_v
    per_class: dict[int, int] = {}
    for i in range(len(pieces) - 1, -1, -1):
        if not (history[i] >> pos) & 1:
            shift, _, n, take = pieces[i]
            pos -= shift
            per_class[n] = per_class.get(n, 0) + take
    if pos != 0:  # pragma: no cover - a bitset invariant, not an input error
        raise AssertionError("balancer: backtracking did not reach the empty set")
    return best_m, best_v, per_class


def _solve_wide(problem: BalanceProblem, tok: list[int], res: list[int]) -> Placement:
    """The wider model (residents may run on the CPU), exactly.

    With S the experts on the device, m = |S ∩ non-residents| (copies), k = |S ∩ residents|
    (kept) and t = Σ_S n_i, the branches are GPU = ag (m + k) + bg t + X(m) and
    CPU = ac (M - m - k) + bc (V - t): for a fixed (m, k) the best t is again the reachable one
    nearest the crossing. The reachable (m, k, t) form one bitset (bit m·Sm + k·Sk + t); every
    (m, k) gets a relaxation bound (t anywhere between its smallest and largest sums), and the
    pairs are evaluated in increasing bound order until the bound exceeds the best exact value.
    Ties: fewer fetches, then fewer residents moved. ~3-5x the cost of the fixed-resident path
    (bench_balancer.py `resident_to_cpu`)."""
    c = problem.costs
    ag, bg, ac, bc = c.gpu_fixed_ms, c.gpu_per_token_ms, c.cpu_fixed_ms, c.cpu_per_token_ms
    fms, hidden = c.fetch_ms, problem.hidden_fetch_ms
    width = max(tok) + 1
    nr_counts = [0] * width
    r_counts = [0] * width
    for n, r in zip(tok, res):
        if r:
            r_counts[n] += 1
        else:
            nr_counts[n] += 1
    n_all = len(tok)
    n_res = sum(r_counts)
    n_nr = n_all - n_res
    v_all = sum(tok)
    m_max = min(problem.free_slots, n_nr)
    sk = v_all + 1  # stride of k
    sm = (n_res + 1) * sk  # stride of m
    mask = (1 << ((m_max + 1) * sm)) - 1
    reach = 1
    history = [reach]
    pieces: list[tuple[int, bool, int, int]] = []  # (shift, is_fetch, n, how many)
    # residents first: their pieces then shift the small (k, t) bitset, not the full one
    for is_fetch, counts, stride in ((False, r_counts, sk), (True, nr_counts, sm)):
        reach = _add_classes(reach, mask, stride, counts, is_fetch, pieces, history)

    # relaxation bound for every (m, k), vectorised
    asc_nr = np.repeat(np.arange(width), nr_counts)
    asc_r = np.repeat(np.arange(width), r_counts)
    pre_nr = np.concatenate(([0], np.cumsum(asc_nr)))
    pre_r = np.concatenate(([0], np.cumsum(asc_r)))
    v_nr, v_res = int(pre_nr[-1]), int(pre_r[-1])
    ms = np.arange(m_max + 1)[:, None]
    ks = np.arange(n_res + 1)[None, :]
    lo = pre_nr[ms] + pre_r[ks]
    hi = (v_nr - pre_nr[n_nr - ms]) + (v_res - pre_r[n_res - ks])
    a = ag * (ms + ks) + np.maximum(0.0, fms * ms - hidden)  # GPU without the token term
    b = ac * (n_all - ms - ks) + bc * v_all  # CPU without the token term
    slope = bg + bc
    if slope > 0.0:
        with np.errstate(over="ignore", invalid="ignore"):
            t = np.clip((b - a) / slope, lo, hi)
        lb = np.maximum(a + bg * t, b - bc * t)
    else:
        lb = np.maximum(a, b)
    flat = lb.ravel()
    order = np.argsort(flat, kind="stable").tolist()
    flat = flat.tolist()
    row_mask = (1 << sk) - 1
    best_mk, best_key, t_best = math.inf, (0, 0), 0  # key: (fetches, residents moved)
    kk = n_res + 1
    for idx in order:
        if flat[idx] > best_mk + _REL_TOL * abs(best_mk):
            break
        m, k = divmod(idx, kk)
        row = (reach >> (m * sm + k * sk)) & row_mask
        ga0 = ag * (m + k) + max(0.0, fms * m - hidden)
        cb0 = ac * (n_all - m - k) + bc * v_all
        cands = []
        if slope <= 0.0:
            cands.append((row & -row).bit_length() - 1)
        else:
            tstar = min(max((cb0 - ga0) / slope, -1.0), float(sk))
            lo_t = math.floor(tstar)
            if lo_t >= 0:
                below = row & ((2 << lo_t) - 1) if lo_t < sk else row
                if below:
                    cands.append(below.bit_length() - 1)
            hi_t = max(0, math.ceil(tstar))
            if hi_t < sk and row >> hi_t:
                above = row >> hi_t
                cands.append(hi_t + (above & -above).bit_length() - 1)
        key = (m, n_res - k)
        for tt in cands:
            ga, cb = ga0 + bg * tt, cb0 - bc * tt
            mk = ga if ga > cb else cb
            tol = _REL_TOL * abs(best_mk) if best_mk < math.inf else 0.0
            if mk < best_mk - tol:
                best_mk, best_key, t_best = mk, key, tt
            elif mk <= best_mk + tol and key < best_key:
                best_mk, best_key, t_best = min(mk, best_mk), key, tt

    m, moved = best_key
    k = n_res - moved
    pos = m * sm + k * sk + t_best
    fetch_per: dict[int, int] = {}
    keep_per: dict[int, int] = {}
    for i in range(len(pieces) - 1, -1, -1):
        if not (history[i] >> pos) & 1:
            shift, is_fetch, n, take = pieces[i]
            pos -= shift
            d = fetch_per if is_fetch else keep_per
            d[n] = d.get(n, 0) + take
    if pos != 0:  # pragma: no cover - a bitset invariant, not an input error
        raise AssertionError("balancer: backtracking did not reach the empty set")
    fetch = np.zeros(n_all, dtype=bool)
    resident_cpu = np.zeros(n_all, dtype=bool)
    for i, (n, r) in enumerate(zip(tok, res)):
        if r:
            if keep_per.get(n, 0):
                keep_per[n] -= 1
            else:
                resident_cpu[i] = True
        elif fetch_per.get(n, 0):
            fetch_per[n] -= 1
            fetch[i] = True
    exposed = max(0.0, fms * m - hidden)
    gpu = ag * (m + k) + bg * t_best + exposed
    cpu = ac * (n_all - m - k) + bc * (v_all - t_best)
    return Placement(fetch=fetch, on_cpu=~(problem.resident | fetch) | resident_cpu,
                     makespan_ms=max(gpu, cpu), gpu_ms=gpu, cpu_ms=cpu)


class MilpBalancer:
    """The model as a MILP solved by HiGHS (highspy): the oracle for `ExactBalancer`.

    Columns: x_i binary per non-resident (fetch), [y_j binary per resident (run on CPU) when
    problem.allow_resident_cpu], z makespan, e exposed copy time. Rows:
        G0 + Σ g_i x_i - Σ g_j y_j + e <= z          (device branch)
        C  - Σ c_i x_i + Σ c_j y_j      <= z          (CPU branch; C = all non-residents on CPU)
        fetch_ms Σ x_i - e <= W,  Σ x_i <= free_slots,  e >= 0;  minimise z.
    The reported makespan is recomputed from the rounded binaries (`evaluate`), not read from z,
    so it is exact for the placement HiGHS chose."""

    def __init__(self, time_limit_s: float = 10.0):
        import highspy  # lazy: only the oracle needs it

        self._highspy = highspy
        self.time_limit_s = time_limit_s

    def solve(self, problem: BalanceProblem) -> Placement:
        fetch, to_cpu = self._solve(problem)
        return evaluate(problem, fetch, to_cpu)

    def _solve(self, problem: BalanceProblem) -> tuple[np.ndarray, np.ndarray]:
        hs = self._highspy
        c = problem.costs
        tok = problem.tokens.astype(float)
        res = problem.resident
        nr_idx = np.flatnonzero(~res)
        r_idx = np.flatnonzero(res) if problem.allow_resident_cpu \
            else np.zeros(0, dtype=np.int64)
        fetch = np.zeros(problem.num_experts, dtype=bool)
        to_cpu = np.zeros(problem.num_experts, dtype=bool)
        nx, ny = nr_idx.size, r_idx.size
        if nx + ny == 0:
            return fetch, to_cpu
        # Scale times so the model's numbers are O(1e3): HiGHS tolerances are absolute (~1e-7),
        # and the exact comparison in tests is at 1e-9 relative.
        g = c.gpu_fixed_ms + c.gpu_per_token_ms * tok
        cc = c.cpu_fixed_ms + c.cpu_per_token_ms * tok
        g0 = float(g[res].sum())
        c_all = float(cc[~res].sum())
        magnitude = max(g0 + float(g.sum()) + c.fetch_ms * nx, c_all + float(cc.sum()), 1e-12)
        s = 1e3 / magnitude
        inf = hs.kHighsInf
        ncol = nx + ny + 2
        iz, ie = nx + ny, nx + ny + 1
        lp = hs.HighsLp()
        lp.num_col_ = ncol
        lp.num_row_ = 4
        lp.col_cost_ = np.r_[np.zeros(nx + ny), 1.0, 0.0]
        lp.col_lower_ = np.zeros(ncol)
        lp.col_upper_ = np.r_[np.ones(nx + ny), inf, inf]
        lp.row_lower_ = np.full(4, -inf)
        lp.row_upper_ = np.array([-g0 * s, -c_all * s, problem.hidden_fetch_ms * s,
                                  float(problem.free_slots)])
        # column-wise sparse matrix
        starts, index, value = [], [], []
        for i in nr_idx:
            starts.append(len(index))
            index += [0, 1, 2, 3]
            value += [g[i] * s, -cc[i] * s, c.fetch_ms * s, 1.0]
        for j in r_idx:
            starts.append(len(index))
            index += [0, 1]
            value += [-g[j] * s, cc[j] * s]
        starts.append(len(index))
        index += [0, 1]
        value += [-1.0, -1.0]  # z
        starts.append(len(index))
        index += [0, 2]
        value += [1.0, -1.0]  # e
        starts.append(len(index))
        lp.a_matrix_.format_ = hs.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
        lp.a_matrix_.value_ = np.array(value, dtype=float)
        lp.integrality_ = [hs.HighsVarType.kInteger] * (nx + ny) + [hs.HighsVarType.kContinuous] * 2
        h = hs.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("mip_rel_gap", 0.0)
        h.setOptionValue("mip_abs_gap", 0.0)
        h.setOptionValue("time_limit", float(self.time_limit_s))
        h.setOptionValue("threads", 1)
        h.passModel(lp)
        h.run()
        status = h.getModelStatus()
        if status != hs.HighsModelStatus.kOptimal:
            raise RuntimeError(f"balancer: HiGHS ended with {h.modelStatusToString(status)}")
        x = np.asarray(h.getSolution().col_value)
        fetch[nr_idx] = x[:nx] > 0.5
        to_cpu[r_idx] = x[nx:nx + ny] > 0.5
        return fetch, to_cpu


class CvxpyBalancer:
    """The same MILP written in cvxpy and solved by HIGHS: cross-checks the formulation."""

    def __init__(self) -> None:
        import cvxpy  # lazy

        self._cp = cvxpy

    def solve(self, problem: BalanceProblem) -> Placement:
        cp = self._cp
        c = problem.costs
        tok = problem.tokens.astype(float)
        res = problem.resident
        nr = ~res
        nx = int(np.count_nonzero(nr))
        if nx == 0 and not (problem.allow_resident_cpu and res.any()):
            return evaluate(problem, np.zeros(problem.num_experts, dtype=bool))
        g = c.gpu_fixed_ms + c.gpu_per_token_ms * tok
        cc = c.cpu_fixed_ms + c.cpu_per_token_ms * tok
        g0 = float(g[res].sum())
        c_all = float(cc[nr].sum())
        z = cp.Variable()
        e = cp.Variable(nonneg=True)
        x = cp.Variable(nx, boolean=True) if nx else None
        ny = int(np.count_nonzero(res)) if problem.allow_resident_cpu else 0
        y = cp.Variable(ny, boolean=True) if ny else None
        fetched_gpu = g[nr] @ x if x is not None else 0.0
        fetched_cpu = cc[nr] @ x if x is not None else 0.0
        n_fetched = cp.sum(x) if x is not None else 0.0
        moved_gpu = g[res] @ y if y is not None else 0.0
        moved_cpu = cc[res] @ y if y is not None else 0.0
        cons = [
            g0 + fetched_gpu - moved_gpu + e <= z,
            c_all - fetched_cpu + moved_cpu <= z,
            c.fetch_ms * n_fetched - problem.hidden_fetch_ms <= e,
        ]
        if x is not None:
            cons.append(n_fetched <= problem.free_slots)
        prob = cp.Problem(cp.Minimize(z), cons)
        prob.solve(solver=cp.HIGHS, mip_rel_gap=0.0, mip_abs_gap=0.0)
        if prob.status != cp.OPTIMAL:
            raise RuntimeError(f"balancer: cvxpy/HiGHS ended with {prob.status}")
        fetch = np.zeros(problem.num_experts, dtype=bool)
        if nx:
            fetch[np.flatnonzero(nr)] = np.asarray(x.value) > 0.5
        to_cpu = np.zeros(problem.num_experts, dtype=bool)
        if y is not None:
            to_cpu[np.flatnonzero(res)] = np.asarray(y.value) > 0.5
        return evaluate(problem, fetch, to_cpu)


def random_problem(rng: np.random.Generator, *, adversarial: bool = False,
                   num_experts: int | None = None, top_k: int | None = None,
                   num_tokens: int | None = None) -> BalanceProblem:
    """A random layer decision for tests and bench_balancer.py (not used on the serving path).

    Routing: each of T tokens takes its top-K of E experts by Gumbel-perturbed log-popularity,
    popularity ~ Dirichlet(alpha) with alpha in [0.05, 1] (skewed, like real routers). Residency:
    each routed expert resident with a random per-instance probability; free slots uniform in
    [0, non-residents + 2]. Costs drawn around real profiles (device 1-20 µs per expert, CPU
    0.1-1 ms per expert, fetch 0.1-0.5 ms, hidden copy window 0-3 ms), or, with `adversarial`,
    from degenerate families: integer costs (exact ties), zero per-token or zero fixed costs, a
    device slower than the CPU, free fetches, fetches that can never hide, all/none resident."""
    e = int(num_experts or rng.choice([8, 16, 32, 64, 128, 256]))
    k = int(top_k or rng.integers(1, min(8, e) + 1))
    t = int(num_tokens or rng.integers(1, 33))
    alpha = float(rng.uniform(0.05, 1.0))
    logp = np.log(rng.dirichlet(np.full(e, alpha)) + 1e-30)
    keys = logp[None, :] + rng.gumbel(size=(t, e))
    ids = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    counts = np.bincount(ids.ravel(), minlength=e)
    tokens = counts[counts > 0]
    m = tokens.shape[0]
    resident = rng.random(m) < rng.uniform(0.0, 1.0)
    hidden = float(rng.choice([0.0, rng.uniform(0.0, 3.0)]))
    if not adversarial:
        costs = ExpertCosts(
            gpu_fixed_ms=rng.uniform(0.001, 0.02), gpu_per_token_ms=rng.uniform(0.0, 0.005),
            cpu_fixed_ms=rng.uniform(0.1, 1.0), cpu_per_token_ms=rng.uniform(0.002, 0.05),
            fetch_ms=rng.uniform(0.1, 0.5))
    else:
        family = int(rng.integers(0, 7))
        if family == 0:  # small integers: many exact ties
            v = rng.integers(0, 4, size=5).astype(float)
            costs = ExpertCosts(*v)
            hidden = float(rng.integers(0, 4))
        elif family == 1:  # no per-token cost: V does not matter for a fixed m
            costs = ExpertCosts(rng.uniform(0, 0.02), 0.0, rng.uniform(0.1, 1), 0.0,
                                rng.uniform(0, 0.5))
        elif family == 2:  # no fixed cost: only tokens matter
            costs = ExpertCosts(0.0, rng.uniform(0, 0.01), 0.0, rng.uniform(0, 0.1),
                                rng.uniform(0, 0.5))
        elif family == 3:  # a device slower than the CPU
            costs = ExpertCosts(rng.uniform(0.5, 2), rng.uniform(0, 0.1), rng.uniform(0, 0.5),
                                rng.uniform(0, 0.05), rng.uniform(0, 0.5))
        elif family == 4:  # free fetches
            costs = ExpertCosts(rng.uniform(0, 0.02), rng.uniform(0, 0.005),
                                rng.uniform(0.1, 1), rng.uniform(0, 0.05), 0.0)
        elif family == 5:  # fetches that never hide, expensive
            costs = ExpertCosts(rng.uniform(0, 0.02), rng.uniform(0, 0.005),
                                rng.uniform(0.1, 1), rng.uniform(0, 0.05), rng.uniform(1, 5))
            hidden = 0.0
        else:  # all or none resident, generous slots
            costs = ExpertCosts(rng.uniform(0.001, 0.02), rng.uniform(0, 0.005),
                                rng.uniform(0.1, 1), rng.uniform(0.002, 0.05),
                                rng.uniform(0.1, 0.5))
            resident = np.full(m, bool(rng.integers(0, 2)))
    n_nr = int(np.count_nonzero(~resident))
    free = int(rng.integers(0, n_nr + 3))
    return BalanceProblem(tokens=tokens.astype(np.int64), resident=resident, free_slots=free,
                          costs=costs, hidden_fetch_ms=hidden)


def make_balancer(kind: BalancerKind) -> Balancer:
    """`exact` (hot path) or `milp` (HiGHS oracle). `FixedCpuBalancer` is built directly."""
    if isinstance(kind, str) and not isinstance(kind, BalancerKind):
        try:
            kind = BalancerKind(kind.strip().lower())
        except ValueError:
            raise ValueError(f"balancer: unknown kind {kind!r}; expected exact or milp") from None
    if kind is BalancerKind.EXACT:
        return ExactBalancer()
    if kind is BalancerKind.MILP:
        return MilpBalancer()
    raise ValueError(f"balancer: unknown kind {kind!r}")


__all__ = [
    "BalanceProblem",
    "Balancer",
    "CvxpyBalancer",
    "ExactBalancer",
    "FixedCpuBalancer",
    "MilpBalancer",
    "Placement",
    "branch_times",
    "evaluate",
    "make_balancer",
    "random_problem",
]
