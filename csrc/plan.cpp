// moespac_vllm._plan: the engine's per-layer-forward plan in native code.
//
// What: `Planner` runs ExpertEngine.plan_layer / finish_layer (engine.py, the reference), the
// exact balancer's decision (balancer.ExactBalancer, narrow model), the slot table's verbs
// (cache.SlotTable: admit / victim / pin / unpin / touch / mark_ready), the estimator's level
// rule (estimator.UtilityEstimator._apply) and spac / hybrimoe / spac-faithful prefetch
// (engine._prefetch_layer, _faithful_prefetch), step for step as the Python code does them, on
// the very numpy arrays the Python objects own (cache.py, engine_state.py). The mover stays a
// Python object, called back in the order the Python engine calls it; the clock is read once per
// call (see now()). So the two paths give identical plans, books and tables
// (tests/test_plan_native.py, hypothesis + the real Mixtral traces, every policy), and either can
// continue from the other's state.
//
// Why native: at Qwen3-30B-A3B scale (E=128, top-8, 22 slots) the Python plan costs 180-530 us
// per layer forward (issue 11; cProfile: sorted() keys, per-slot victim loops, numpy calls on
// 128-element rows, the balancer's Python-int bitsets), 9-25 ms of host time per decode step
// against a 5-6 ms step on the GPU. Here it is 3-12 us (benchmarks/bench_layer_host.py --dims
// qwen3-30b-a3b, a 2-core EPYC VM, quiet; 6-25 us on a slower Zen 3 VM, where lru and lfu,
// the policies with many on-demand copies, pass 20 us at 4-9 tokens). What a forward costs
// now is mostly its calls into Python: plan_layer / finish_layer are plain METH_FASTCALL
// functions (entry_points), routing is read in place whatever its integer dtype, the LayerPlan
// is filled slot by slot, and what is left is the mover: 2-16 loads per forward and one
// ready_mask poll per refresh / finish (2 per forward at lru, 9 tokens, where 24 is_ready
// calls were: on a CUDA mover each was an event query; ready_mask costs ~log2(n) + 1 of them).
// Why C++17 + pybind11: the build skeleton (setup.py) already compiles csrc/*.cpp with
// pybind11, which needs no extra toolchain on a fresh machine (Rust/PyO3 would need cargo);
// pybind11's numpy buffers give zero-copy pointers into the tables, and the module uses only
// the C++ standard library and CPython, never torch's C++ ABI, so one build serves every torch.
//
// Floating point: every expression is written in the order the Python code evaluates it, and
// the module is built without -ffast-math or FMA contraction (ISO C++17, baseline x86-64), so
// makespans and scores are the same doubles as Python's.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// config.Policy, in the order plan_native.POLICY_CODES gives
enum Policy { SPAC = 0, SPAC_FAITHFUL, LRU, SD_LRU, LFU, STATIC, HYBRIMOE, ORACLE };
// cache.EvictionOrder
enum Order { O_LRU = 0, O_LFU, O_UTILITY, O_BELADY };
// cache.py state codes
constexpr int8_t FREE = 0, LOADING = 1, READY = 2, IN_USE = 3;
// engine_state.COUNTER_NAMES
enum Ctr { STEPS = 0, TOKENS, HITS, MISSES, FETCHED, DEVICE, CPU, PF_ISSUED, PF_USED, PF_WASTED,
           PF_LATE };
// engine_state timeline / clock slots
constexpr int LINK_FREE_MS = 0, BEGIN_MS = 1, GAP_MS = 2, TICK = 0, STEP = 1, DECODING = 2;
constexpr double REL_TOL = 1e-12;  // balancer._REL_TOL
constexpr double INF = std::numeric_limits<double>::infinity();

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

// ---- calling Python back without pybind11's argument tuples --------------------------------
// PyObject_Vectorcall on a bound method prepends `self` in the spare slot before the arguments
// (PY_VECTORCALL_ARGUMENTS_OFFSET), so a callback allocates nothing but its result (ints below
// 257 are CPython's cached objects). Measured here: 0.19 us per call through pybind11's
// operator(), ~0.1 us less this way, at 30-60 callbacks per Qwen3 layer forward.
py::object call(const py::object& fn, std::initializer_list<long long> ints) {
    PyObject* args[4] = {nullptr, nullptr, nullptr, nullptr};
    size_t n = 0;
    for (long long v : ints) {
        args[1 + n] = PyLong_FromLongLong(v);
        if (!args[1 + n]) {
            for (size_t i = 0; i < n; ++i) Py_DECREF(args[1 + i]);
            throw py::error_already_set();
        }
        ++n;
    }
    PyObject* r = PyObject_Vectorcall(fn.ptr(), args + 1, n | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                      nullptr);
    for (size_t i = 0; i < n; ++i) Py_DECREF(args[1 + i]);
    if (!r) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(r);
}

py::object steal(PyObject* p) {
    if (!p) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(p);
}

py::object new_int(long long v) { return steal(PyLong_FromLongLong(v)); }

template <class T>
T* buffer(const py::array& a, const char* name, py::ssize_t n) {
    if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style) ||
        !a.writeable() || a.size() != n)
        value_error(std::string(name) + ": expected a writeable C-contiguous array of " +
                    std::to_string(n) + " " + std::string(py::str(py::dtype::of<T>())));
    return static_cast<T*>(const_cast<void*>(a.data()));
}

// ---- the exact balancer (balancer.ExactBalancer.solve, _choose, _add_classes) ---------------
struct Bits {
    std::vector<uint64_t> w;
    size_t nbits = 0;
    void init(size_t n) {
        nbits = n;
        w.assign((n + 63) / 64, 0);
    }
    // self = (self | self << shift) & mask(nbits)
    void shift_or(size_t shift) {
        const size_t ws = shift >> 6, bs = shift & 63, n = w.size();
        for (size_t i = n; i-- > ws;) {
            uint64_t v = w[i - ws] << bs;
            if (bs && i > ws) v |= w[i - ws - 1] >> (64 - bs);
            w[i] |= v;
        }
        if (nbits & 63) w.back() &= (uint64_t(1) << (nbits & 63)) - 1;
    }
    // lowest set bit in [lo, hi), or -1
    long lowest(size_t lo, size_t hi) const {
        for (size_t i = lo >> 6; i < w.size() && (i << 6) < hi; ++i) {
            uint64_t v = w[i];
            if ((i << 6) < lo) v &= ~uint64_t(0) << (lo & 63);
            if (v) {
                size_t p = (i << 6) + __builtin_ctzll(v);
                return p < hi ? long(p) : -1;
            }
        }
        return -1;
    }
    // highest set bit in [lo, hi), or -1
    long highest(size_t lo, size_t hi) const {
        if (hi <= lo) return -1;
        for (size_t i = ((hi - 1) >> 6) + 1; i-- > (lo >> 6);) {
            uint64_t v = w[i];
            if (((i + 1) << 6) > hi) v &= (hi & 63) ? (uint64_t(1) << (hi & 63)) - 1 : ~uint64_t(0);
            if (v) {
                size_t p = (i << 6) + 63 - __builtin_clzll(v);
                return p >= lo ? long(p) : -1;
            }
        }
        return -1;
    }
};

struct Piece {
    size_t shift;
    int n;
    int take;
};

struct Costs {
    double ag, bg, ac, bc, fms;
};

struct Placement {
    double gpu, cpu;
};

class Exact {
  public:
    // tok[M] >= 1, res[M]; writes fetch[M]; returns the branch times (hidden fetch time 0 or
    // `hidden`, the narrow model: residents stay on the device)
    Placement solve(const std::vector<int64_t>& tok, const std::vector<char>& res, int64_t free_slots,
                    const Costs& c, double hidden, std::vector<char>& fetch) {
        const double ag = c.ag, bg = c.bg, ac = c.ac, bc = c.bc;
        const int64_t n_all = int64_t(tok.size());
        int64_t maxn = 0;
        for (auto n : tok) maxn = std::max(maxn, n);
        counts_.assign(size_t(maxn + 1), 0);
        int64_t n_res = 0, v_res = 0, v_all = 0;
        for (size_t i = 0; i < tok.size(); ++i) {
            v_all += tok[i];
            if (res[i]) {
                ++n_res;
                v_res += tok[i];
            } else {
                ++counts_[size_t(tok[i])];
            }
        }
        const int64_t n_nr = n_all - n_res, v_nr = v_all - v_res;
        const int64_t m_max = std::min(free_slots, n_nr);
        int64_t m = 0, v = 0;
        per_class_.assign(counts_.size(), 0);
        if (m_max > 0) choose(n_nr, v_nr, m_max, n_res, v_res, c, hidden, m, v);
        fetch.assign(tok.size(), 0);
        if (m) {
            for (size_t i = 0; i < tok.size(); ++i) {
                if (!res[i] && per_class_[size_t(tok[i])]) {
                    --per_class_[size_t(tok[i])];
                    fetch[i] = 1;
                }
            }
        }
        const int64_t n_gpu = n_all - n_nr + m, v_gpu = v_all - v_nr + v;
        const double exposed = std::max(0.0, c.fms * double(m) - hidden);
        return {ag * double(n_gpu) + bg * double(v_gpu) + exposed,
                ac * double(n_all - n_gpu) + bc * double(v_all - v_gpu)};
    }

  private:
    std::vector<int64_t> counts_, per_class_, prefix_;
    std::vector<Piece> pieces_;
    std::vector<uint64_t> history_;  // the bitset before each piece, one after another
    Bits reach_;

    void remember() { history_.insert(history_.end(), reach_.w.begin(), reach_.w.end()); }
    bool before_piece(size_t i, size_t pos) const {
        return (history_[i * reach_.w.size() + (pos >> 6)] >> (pos & 63)) & 1u;
    }

    void choose(int64_t n_nr, int64_t v_nr, int64_t m_max, int64_t n_res, int64_t v_res,
                const Costs& c, double hidden, int64_t& out_m, int64_t& out_v) {
        const double ag = c.ag, bg = c.bg, ac = c.ac, bc = c.bc, fms = c.fms;
        const double g0 = ag * double(n_res) + bg * double(v_res);
        const double c_all = ac * double(n_nr) + bc * double(v_nr);
        const double slope = bg + bc;
        prefix_.assign(1, 0);
        for (size_t n = 0; n < counts_.size(); ++n)
            for (int64_t k = 0; k < counts_[n]; ++k) prefix_.push_back(prefix_.back() + int64_t(n));

        auto lower_bound = [&](int64_t mm) -> double {
            const double a = g0 + ag * double(mm) + std::max(0.0, fms * double(mm) - hidden);
            const double b = c_all - ac * double(mm);
            if (slope <= 0.0) return a > b ? a : b;
            const double lo = double(prefix_[size_t(mm)]);
            const double hi = double(v_nr - prefix_[size_t(n_nr - mm)]);
            double vv = (b - a) / slope;
            vv = vv < lo ? lo : vv > hi ? hi : vv;
            const double ga = a + bg * vv, cb = b - bc * vv;
            return ga > cb ? ga : cb;
        };

        const size_t stride = size_t(v_nr + 1);
        reach_.init(size_t(m_max + 1) * stride);
        reach_.w[0] = 1;
        pieces_.clear();
        history_.clear();
        remember();
        for (size_t n = 0; n < counts_.size(); ++n) {
            int64_t cnt = counts_[n];
            int64_t take = 1;
            while (cnt > 0) {
                if (take > cnt) take = cnt;
                const size_t shift = size_t(take) * (stride + n);
                reach_.shift_or(shift);
                pieces_.push_back({shift, int(n), int(take)});
                remember();
                cnt -= take;
                take <<= 1;
            }
        }

        auto best_for = [&](int64_t mm, double& best_mk, int64_t& best_v) {
            const size_t base = size_t(mm) * stride;
            const double a = g0 + ag * double(mm) + std::max(0.0, fms * double(mm) - hidden);
            const double b = c_all - ac * double(mm);
            if (slope <= 0.0) {
                best_mk = a > b ? a : b;
                best_v = reach_.lowest(base, base + stride) - long(base);
                return;
            }
            double vstar = (b - a) / slope;
            vstar = -1.0 > vstar ? -1.0 : vstar;
            vstar = double(stride) < vstar ? double(stride) : vstar;
            best_mk = INF;
            best_v = -1;
            const double flo = std::floor(vstar);
            if (flo >= 0.0) {
                const size_t lo = size_t(flo);
                const size_t top = lo < stride ? lo + 1 : stride;
                const long p = reach_.highest(base, base + top);
                if (p >= 0) {
                    const double vv = double(p - long(base));
                    const double ga = a + bg * vv, cb = b - bc * vv;
                    best_mk = ga > cb ? ga : cb;
                    best_v = p - long(base);
                }
            }
            const double fhi = std::max(0.0, std::ceil(vstar));
            if (fhi < double(stride)) {
                const long p = reach_.lowest(base + size_t(fhi), base + stride);
                if (p >= 0) {
                    const double vv = double(p - long(base));
                    const double ga = a + bg * vv, cb = b - bc * vv;
                    const double mk = ga > cb ? ga : cb;
                    if (mk < best_mk) {
                        best_mk = mk;
                        best_v = p - long(base);
                    }
                }
            }
        };

        int64_t lo_m = 0, hi_m = m_max;
        while (lo_m < hi_m) {
            const int64_t mid = (lo_m + hi_m) / 2;
            if (lower_bound(mid + 1) < lower_bound(mid))
                lo_m = mid + 1;
            else
                hi_m = mid;
        }
        int64_t best_m = lo_m, best_v = -1;
        double best_mk = INF;
        best_for(best_m, best_mk, best_v);
        int64_t left = best_m - 1, right = best_m + 1;
        double lb_left = left >= 0 ? lower_bound(left) : INF;
        double lb_right = right <= m_max ? lower_bound(right) : INF;
        for (;;) {
            const double tol = REL_TOL * std::fabs(best_mk);
            const bool go_left = lb_left <= best_mk + tol;
            const bool go_right = lb_right < best_mk - tol;
            if (!go_left && !go_right) break;
            double mk;
            int64_t vv;
            if (go_left && (!go_right || lb_left <= lb_right)) {
                best_for(left, mk, vv);
                if (mk <= best_mk + tol) {
                    best_mk = best_mk < mk ? best_mk : mk;
                    best_v = vv;
                    best_m = left;
                }
                --left;
                lb_left = left >= 0 ? lower_bound(left) : INF;
            } else {
                best_for(right, mk, vv);
                if (mk < best_mk - tol) {
                    best_mk = mk;
                    best_v = vv;
                    best_m = right;
                }
                ++right;
                lb_right = right <= m_max ? lower_bound(right) : INF;
            }
        }
        size_t pos = size_t(best_m) * stride + size_t(best_v);
        for (size_t i = pieces_.size(); i-- > 0;) {
            if (!before_piece(i, pos)) {
                pos -= pieces_[i].shift;
                per_class_[size_t(pieces_[i].n)] += pieces_[i].take;
            }
        }
        if (pos != 0) throw std::runtime_error("balancer: backtracking did not reach the empty set");
        out_m = best_m;
        out_v = best_v;
    }
};

// ---- one layer's slot table (cache.SlotTable's arrays) ------------------------------------
struct Table {
    int64_t *slot_of, *expert_in, *pins, *last_use, *uses, *n_loading;
    int8_t* state;
    bool* ready;
};

class Planner {
  public:
    // hooks: load / ready_mask (the mover's bound methods), now (the clock's), as_ids (converts
    // routing the native code does not read in place), window_ids (the engine's list),
    // drop_draft (the estimator's, or None), plan_type (LayerPlan) and plan_fields (its six
    // member descriptors in field order, or None: then LayerPlan(...) is called)
    Planner(py::dict cfg, py::list tables, py::dict arrays, py::dict hooks)
        : load_(hooks["load"]), ready_mask_(hooks["ready_mask"]), now_(hooks["now"]),
          plan_cls_(hooks["plan_type"]), as_ids_(hooks["as_ids"]),
          window_ids_(hooks["window_ids"]), drop_draft_(hooks["drop_draft"]) {
        if (!PyList_Check(window_ids_.ptr()))
            value_error("window_ids: expected the engine's list of per-layer routing");
        py::object fields = hooks["plan_fields"];
        if (!fields.is_none()) {
            py::tuple f = fields.cast<py::tuple>();
            if (f.size() != 6) value_error("plan_fields: expected LayerPlan's 6 member descriptors");
            for (size_t i = 0; i < 6; ++i) {
                if (!Py_TYPE(f[i].ptr())->tp_descr_set)
                    value_error("plan_fields: expected data descriptors");
                plan_fields_[i] = f[i];
            }
            if (!PyType_Check(plan_cls_.ptr())) value_error("plan_type: expected a class");
            fast_plan_ = true;
        }
        empty_ = steal(PyTuple_New(0));
        L_ = cfg["num_layers"].cast<int>();
        E_ = cfg["num_experts"].cast<int>();
        S_ = cfg["num_slots"].cast<int>();
        policy_ = cfg["policy"].cast<int>();
        order_ = cfg["order"].cast<int>();
        prefetch_ = cfg["prefetch"].cast<bool>();
        costs_ = {cfg["gpu_fixed_ms"].cast<double>(), cfg["gpu_per_token_ms"].cast<double>(),
                  cfg["cpu_fixed_ms"].cast<double>(), cfg["cpu_per_token_ms"].cast<double>(),
                  cfg["fetch_ms"].cast<double>()};
        recency_a_ = cfg["recency_a"].cast<double>();
        recency_b_ = cfg["recency_b"].cast<double>();
        decay_ = cfg["decay"].cast<double>();
        prefetch_floor_ = cfg["prefetch_floor"].cast<double>();
        idle_only_ = cfg["idle_only"].cast<bool>();
        faithful_threshold_ = cfg["faithful_threshold"].cast<double>();
        has_est_ = cfg["estimator"].cast<bool>();
        if (has_est_) {
            theta_fixed_ = cfg["theta_fixed"].cast<bool>();
            theta_up_ = cfg["theta_up"].cast<int64_t>();
            theta_down_ = cfg["theta_down"].cast<int64_t>();
            cap_ = cfg["utility_cap"].cast<int64_t>();
            ref_ = cfg["reference_window_tokens"].cast<int64_t>();
        }
        if (py::ssize_t(tables.size()) != L_) value_error("tables: one per layer expected");
        for (auto item : tables) {
            py::tuple t = item.cast<py::tuple>();
            keep_.push_back(t);
            Table tb;
            tb.slot_of = buffer<int64_t>(t[0], "slot_of", E_);
            tb.expert_in = buffer<int64_t>(t[1], "expert_in", S_);
            tb.state = buffer<int8_t>(t[2], "state", S_);
            tb.pins = buffer<int64_t>(t[3], "pins", S_);
            tb.last_use = buffer<int64_t>(t[4], "last_use", E_);
            tb.uses = buffer<int64_t>(t[5], "uses", E_);
            tb.ready = buffer<bool>(t[6], "ready", E_);
            tb.n_loading = buffer<int64_t>(t[7], "n_loading", 1);
            tables_.push_back(tb);
        }
        keep_.push_back(arrays);
        const py::ssize_t LE = py::ssize_t(L_) * E_;
        masks_ = buffer<bool>(arrays["masks"], "masks", 3 * LE);
        score_ = buffer<double>(arrays["score"], "score", LE);
        last_counts_ = buffer<int64_t>(arrays["last_counts"], "last_counts", LE);
        ctr_ = buffer<int64_t>(arrays["counters"], "counters", 11);
        times_ = buffer<double>(arrays["times"], "times", 4);
        clk_ = buffer<int64_t>(arrays["clock"], "clock", 3);
        offset_ = buffer<double>(arrays["layer_offset_ms"], "layer_offset_ms", L_);
        open_ = buffer<bool>(arrays["open"], "open", L_);
        if (has_est_) levels_ = buffer<int64_t>(arrays["levels"], "levels", LE);
        counts_.resize(size_t(E_));
        seen_.resize((size_t(E_) + 63) / 64);
        sc_.resize(size_t(E_));
        slot_map_.resize(size_t(E_));
    }

    // the oracle's future: next_use [steps + 1, L, E] and, when integral, the counts
    // [steps, L, E] (else py::none(): its end-of-step placement stays in Python)
    void set_future(py::array next_use, py::object counts) {
        if (next_use.ndim() != 3 || next_use.shape(1) != L_ || next_use.shape(2) != E_)
            value_error("next_use: expected [steps + 1, L, E]");
        future_rows_ = next_use.shape(0);
        next_use_ = buffer<int64_t>(next_use, "next_use", next_use.size());
        future_keep_ = next_use;
        future_ = nullptr;
        if (!counts.is_none()) {
            py::array f = counts.cast<py::array>();
            future_ = buffer<int64_t>(f, "future_counts", (future_rows_ - 1) * L_ * E_);
            future_counts_keep_ = f;
        }
    }

    // ExpertEngine._oracle_prefetch: the next step's experts, most tokens first, while an
    // evictable resident is not needed before them and the copy lands before its layer starts.
    // Returns False (nothing done) when the counts are not held here.
    bool oracle_prefetch() {
        if (!future_) return false;
        now_valid_ = false;
        const int64_t nxt = clk_[STEP] + 1;
        if (nxt >= future_rows_ - 1) return true;
        for (int layer = 0; layer < L_; ++layer) {
            Table& t = tables_[size_t(layer)];
            const size_t row = (size_t(nxt) * L_ + size_t(layer)) * E_;
            const int64_t* need = future_ + row;
            const int64_t* key = next_use_ + row;
            order_buf_.clear();
            for (int e = 0; e < E_; ++e)
                if (need[e]) order_buf_.push_back(e);
            std::sort(order_buf_.begin(), order_buf_.end(), [&](int a, int b) {
                if (need[a] != need[b]) return need[a] > need[b];
                return a < b;
            });
            if (int(order_buf_.size()) > S_) order_buf_.resize(size_t(S_));
            const std::vector<int> order = order_buf_;
            for (int e : order) {
                if (t.slot_of[e] >= 0) continue;
                const int v = victim(t, nullptr, false, 0.0, key);
                int n_free = 0;
                for (int s = 0; s < S_; ++s) n_free += t.state[s] == FREE;
                if (n_free == 0 && (v < 0 || key[v] <= nxt)) break;
                if (!fits_deadline(layer, false)) break;
                int evicted;
                const int64_t slot = admit(t, e, nullptr, false, 0.0, key, &evicted);
                bool* pre = masks_ + (2 * size_t(L_) + size_t(layer)) * E_;
                if (evicted >= 0 && pre[evicted]) {
                    pre[evicted] = false;
                    ++ctr_[PF_WASTED];
                }
                pre[e] = true;
                ++ctr_[PF_ISSUED];
                load(layer, e, slot);
            }
        }
        return true;
    }

    // ExpertEngine.plan_layer -> a LayerPlan (new reference). topk_ids: an integer [T, K]
    // ndarray of any integer dtype and strides is read in place, anything else goes through
    // plan_native's converter first. Decode/verify vs prefill: the engine's clock[DECODING].
    py::object plan(int layer, PyObject* ids_obj) {
        check_layer(layer);
        now_valid_ = false;
        const bool decoding = clk_[DECODING] != 0;
        py::ssize_t T, K;
        py::object ids = read_ids(ids_obj, T, K);
        bool* pinned = masks_ + size_t(layer) * E_;
        bool* pending = pinned + size_t(L_) * E_;
        bool* pre = pending + size_t(L_) * E_;
        if (any(pinned) || any(pending))
            value_error("layer: " + std::to_string(layer) + " planned twice without finish_layer");
        count(T * K);
        Table& t = tables_[size_t(layer)];
        if (*t.n_loading) refresh(layer);
        if (decoding && !std::isnan(times_[BEGIN_MS]))
            offset_[layer] = now() - times_[BEGIN_MS];
        if (decoding && PyList_SetItem(window_ids_.ptr(), layer, ids.inc_ref().ptr()) < 0)
            throw py::error_already_set();
        ready_.clear();
        loading_.clear();
        absent_.clear();
        for (int e : routed_) {
            if (t.ready[e])
                ready_.push_back(e);
            else if (t.slot_of[e] >= 0)
                loading_.push_back(e);
            else
                absent_.push_back(e);
        }
        for (int e : ready_) {
            const int64_t s = t.slot_of[e];
            ++t.pins[s];
            t.state[s] = IN_USE;
            pinned[e] = true;
        }
        if (decoding) {
            ctr_[HITS] += int64_t(ready_.size());
            ctr_[MISSES] += int64_t(loading_.size() + absent_.size());
            for (int e : ready_)
                if (pre[e]) {
                    pre[e] = false;
                    ++ctr_[PF_USED];
                }
        }
        wait_.clear();
        fetch_.clear();
        scores_ready_ = false;
        if (loading_.empty() && absent_.empty()) {
        } else if ((!decoding && policy_ != STATIC) || policy_ == LRU || policy_ == SD_LRU ||
                   policy_ == LFU) {
            on_demand(t);
        } else if (policy_ == SPAC || policy_ == HYBRIMOE || policy_ == ORACLE) {
            balance(t);
        }
        py::object fetches = steal(PyTuple_New(py::ssize_t(wait_.size() + fetch_.size())));
        py::ssize_t nf = 0;
        auto put_fetch = [&](int e, int64_t slot) {
            PyObject* pair = PyTuple_New(2);
            if (!pair) throw py::error_already_set();
            PyTuple_SET_ITEM(fetches.ptr(), nf++, pair);
            PyTuple_SET_ITEM(pair, 0, new_int(e).release().ptr());
            PyTuple_SET_ITEM(pair, 1, new_int(slot).release().ptr());
        };
        for (int e : wait_) {
            put_fetch(e, t.slot_of[e]);
            if (decoding && pre[e]) {
                pre[e] = false;
                ++ctr_[PF_USED];
                ++ctr_[PF_LATE];
            }
        }
        for (int e : fetch_) {
            const int64_t slot = admit_engine(layer, e, true, demand_scores(layer), false, 0.0);
            load(layer, e, slot);
            put_fetch(e, slot);
            ++ctr_[FETCHED];
        }
        for (int e : wait_) pending[e] = true;
        for (int e : fetch_) pending[e] = true;
        // device = ready + wait + fetch
        std::fill(slot_map_.begin(), slot_map_.end(), -1);
        py::ssize_t n_device = 0;
        auto put = [&](int e) {
            slot_map_[size_t(e)] = int32_t(t.slot_of[e]);
            ++n_device;
        };
        for (int e : ready_) put(e);
        for (int e : wait_) put(e);
        for (int e : fetch_) put(e);
        auto& api = py::detail::npy_api::get();
        py::object slot_ids = new_array(api.NPY_INT32_, T, K);
        py::object cpu_mask = new_array(api.NPY_BOOL_, T, K);
        int32_t* so = reinterpret_cast<int32_t*>(py::detail::array_proxy(slot_ids.ptr())->data);
        bool* cm = reinterpret_cast<bool*>(py::detail::array_proxy(cpu_mask.ptr())->data);
        for (py::ssize_t i = 0; i < T * K; ++i) {
            so[i] = slot_map_[size_t(ids_[size_t(i)])];
            cm[i] = so[i] < 0;
        }
        const py::ssize_t n_cpu = py::ssize_t(routed_.size()) - n_device;
        py::object cpu = steal(PyTuple_New(n_cpu)), device = steal(PyTuple_New(n_device));
        py::ssize_t ic = 0, id = 0;
        for (int e : routed_) {
            if (slot_map_[size_t(e)] < 0)
                PyTuple_SET_ITEM(cpu.ptr(), ic++, new_int(e).release().ptr());
            else
                PyTuple_SET_ITEM(device.ptr(), id++, new_int(e).release().ptr());
        }
        if (decoding) {
            ctr_[DEVICE] += int64_t(n_device);
            ctr_[CPU] += int64_t(n_cpu);
        }
        return make_plan(new_int(layer), slot_ids, cpu_mask, fetches, cpu, device);
    }

    // ExpertEngine.finish_layer (+ _commit_counts when decoding; the estimator's pending draft
    // signal for the layer is dropped through its drop_draft, as estimator.observe does)
    void finish(int layer, PyObject* ids_obj) {
        check_layer(layer);
        now_valid_ = false;
        const bool decoding = clk_[DECODING] != 0;
        py::ssize_t T, K;
        py::object ids = read_ids(ids_obj, T, K);
        count(T * K);
        Table& t = tables_[size_t(layer)];
        bool* pinned = masks_ + size_t(layer) * E_;
        bool* pending = pinned + size_t(L_) * E_;
        polled_.clear();
        for_each(pending, [&](int e) {
            const int64_t s = t.slot_of[e];
            if (s >= 0 && t.state[s] == LOADING) polled_.push_back(e);
        });
        mark_ready_polled(layer, t);
        for_each(pinned, [&](int e) {
            const int64_t s = t.slot_of[e];
            if (--t.pins[s] == 0) t.state[s] = READY;
        });
        std::fill(pinned, pinned + E_, false);
        std::fill(pending, pending + E_, false);
        const int64_t tick = ++clk_[TICK];
        for (int e : routed_) {
            t.last_use[e] = tick;
            ++t.uses[e];
        }
        if (!decoding) return;
        commit(layer, T);
        if (!drop_draft_.is_none()) call(drop_draft_, {layer});
    }

    // _commit_counts: the layer's routing (counts_) into the levels and scores
    void commit(int layer, py::ssize_t T) {
        const size_t row = size_t(layer) * E_;
        for (int e = 0; e < E_; ++e) last_counts_[row + e] = counts_[size_t(e)];
        if (has_est_) {
            const int64_t n = std::max<int64_t>(1, T);
            const int64_t up = theta_fixed_ ? theta_up_
                                            : std::max<int64_t>(1, (2 * theta_up_ * n + ref_) / (2 * ref_));
            int64_t* u = levels_ + row;
            for (int e = 0; e < E_; ++e) {
                const int64_t d = counts_[size_t(e)] - u[e];
                u[e] += d >= up;
                u[e] -= d <= -theta_down_;
                u[e] = std::min(u[e], cap_);
            }
        }
        double* s = score_ + row;
        if (policy_ == HYBRIMOE || policy_ == SPAC) {
            for (int e = 0; e < E_; ++e) s[e] = decay_ * s[e] + (counts_[size_t(e)] > 0 ? 1.0 : 0.0);
        } else if (policy_ == STATIC) {
            for (int e = 0; e < E_; ++e) s[e] += double(counts_[size_t(e)]);
        }
        if (policy_ == SPAC_FAITHFUL && prefetch_) faithful_prefetch(layer);
    }

    // end_step's prefetch for spac and hybrimoe, every layer not yet whole
    void prefetch_step() {
        now_valid_ = false;
        for (int layer = 0; layer < L_; ++layer) {
            if (!open_[layer]) continue;
            const double* sc = policy_ == SPAC ? spac_scores(layer) : score_ + size_t(layer) * E_;
            prefetch_layer(layer, sc, last_counts_ + size_t(layer) * E_, true);
        }
    }

    // _prefetch_layer with explicit score [E] float64 and tiebreak [E] int64 rows
    void prefetch_with(int layer, py::array score, py::array tiebreak, bool deadline) {
        check_layer(layer);
        now_valid_ = false;
        const double* sc = buffer<double>(score, "score", E_);
        const int64_t* tb = buffer<int64_t>(tiebreak, "tiebreak", E_);
        std::vector<double> copy(sc, sc + E_);
        prefetch_layer(layer, copy.data(), tb, deadline);
    }

  private:
    int L_, E_, S_, policy_, order_;
    bool prefetch_, idle_only_, has_est_, theta_fixed_ = true, scores_ready_ = false;
    bool fast_plan_ = false, now_valid_ = false;
    double now_ms_ = 0.0;
    Costs costs_;
    double recency_a_, recency_b_, decay_, prefetch_floor_, faithful_threshold_;
    int64_t theta_up_ = 0, theta_down_ = 0, cap_ = 0, ref_ = 1;
    py::object load_, ready_mask_, now_, plan_cls_, as_ids_, window_ids_, drop_draft_, empty_,
        future_keep_, future_counts_keep_;
    py::object plan_fields_[6];
    std::vector<py::object> keep_;
    std::vector<Table> tables_;
    bool *masks_, *open_;
    double *score_, *times_, *offset_;
    int64_t *last_counts_, *ctr_, *clk_, *levels_ = nullptr, *next_use_ = nullptr,
            *future_ = nullptr;
    py::ssize_t future_rows_ = 0;
    std::vector<int64_t> counts_, ids_;
    std::vector<uint64_t> seen_;
    std::vector<double> sc_;
    std::vector<int32_t> slot_map_;
    std::vector<int> routed_, ready_, loading_, absent_, wait_, fetch_, order_buf_;
    std::vector<int> polled_;  // experts whose LOADING slots one ready_mask call asks about
    Exact exact_;
    std::vector<int64_t> tok_;
    std::vector<char> res_, fetch_flags_;

    void check_layer(int layer) const {
        if (layer < 0 || layer >= L_)
            value_error("layer: must be an integer in [0, " + std::to_string(L_) + "), got " +
                        std::to_string(layer));
    }

    // The routing as an integer [T, K] ndarray (a new reference): `obj` itself when it is one
    // in native byte order, else what plan_native's converter makes of it (which raises the
    // ValueError naming topk_ids for anything that is not integer [T, K]). Its values go to
    // ids_ (row-major), each checked to be an expert id.
    py::object read_ids(PyObject* obj, py::ssize_t& T, py::ssize_t& K) {
        py::object a = py::reinterpret_borrow<py::object>(obj);
        if (!readable_ids(obj)) {
            a = as_ids_(a);
            if (!readable_ids(a.ptr()))
                value_error("topk_ids: the converter did not return an integer [T, K] array");
        }
        const auto* p = py::detail::array_proxy(a.ptr());
        T = p->dimensions[0];
        K = p->dimensions[1];
        ids_.resize(size_t(T * K));
        switch (py::reinterpret_borrow<py::dtype>(p->descr).itemsize() |
                (py::detail::array_descriptor_proxy(p->descr)->kind == 'u' ? 16 : 0)) {
            case 1: gather<int8_t>(p); break;
            case 2: gather<int16_t>(p); break;
            case 4: gather<int32_t>(p); break;
            case 8: gather<int64_t>(p); break;
            case 16 | 1: gather<uint8_t>(p); break;
            case 16 | 2: gather<uint16_t>(p); break;
            case 16 | 4: gather<uint32_t>(p); break;
            default: gather<uint64_t>(p); break;
        }
        for (int64_t v : ids_)
            if (v < 0 || v >= E_)
                value_error("topk_ids: expert ids must be in [0, " + std::to_string(E_) + ")");
        return a;
    }

    static bool readable_ids(PyObject* obj) {
        if (!py::detail::npy_api::get().PyArray_Check_(obj)) return false;
        const auto* p = py::detail::array_proxy(obj);
        const auto* d = py::detail::array_descriptor_proxy(p->descr);
        if (p->nd != 2 || (d->kind != 'i' && d->kind != 'u')) return false;
        const uint16_t one = 1;
        const char native = *reinterpret_cast<const char*>(&one) ? '<' : '>';
        if (d->byteorder != '=' && d->byteorder != '|' && d->byteorder != native) return false;
        const py::ssize_t size = py::reinterpret_borrow<py::dtype>(p->descr).itemsize();
        return size == 1 || size == 2 || size == 4 || size == 8;
    }

    template <class V>
    void gather(const py::detail::PyArray_Proxy* p) {
        const py::ssize_t T = p->dimensions[0], K = p->dimensions[1];
        const py::ssize_t s0 = p->strides[0], s1 = p->strides[1];
        const char* base = p->data;
        size_t i = 0;
        for (py::ssize_t r = 0; r < T; ++r)
            for (py::ssize_t c = 0; c < K; ++c) {
                V v;
                std::memcpy(&v, base + r * s0 + c * s1, sizeof(V));
                ids_[i++] = int64_t(v);
            }
    }

    // counts_[E] of ids_[0:n], and routed_: the experts with a count, ascending
    void count(py::ssize_t n) {
        std::fill(counts_.begin(), counts_.end(), 0);
        std::fill(seen_.begin(), seen_.end(), 0);
        for (py::ssize_t i = 0; i < n; ++i) {
            const int64_t e = ids_[size_t(i)];
            ++counts_[size_t(e)];
            seen_[size_t(e) >> 6] |= uint64_t(1) << (e & 63);
        }
        routed_.clear();
        for (size_t w = 0; w < seen_.size(); ++w)
            for (uint64_t b = seen_[w]; b; b &= b - 1)
                routed_.push_back(int(w * 64 + size_t(__builtin_ctzll(b))));
    }

    // The per-expert [E] bool rows (pinned / pending) are read eight flags at a time: a handful
    // of 128 flags is set, and a branch per flag mispredicted often enough to show in a profile.
    bool any(const bool* mask) const {
        uint64_t acc = 0;
        int e = 0;
        for (; e + 8 <= E_; e += 8) {
            uint64_t w;
            std::memcpy(&w, mask + e, 8);
            acc |= w;
        }
        for (; e < E_; ++e) acc |= uint64_t(mask[e]);
        return acc != 0;
    }

    template <class F>
    void for_each(const bool* mask, F&& f) const {  // f(e) for each set flag, ascending
        int e = 0;
        for (; e + 8 <= E_; e += 8) {
            uint64_t w;
            std::memcpy(&w, mask + e, 8);
            for (; w; w &= ~(uint64_t(0xFF) << (__builtin_ctzll(w) & ~7)))
                f(e + (__builtin_ctzll(w) >> 3));
        }
        for (; e < E_; ++e)
            if (mask[e]) f(e);
    }

    // A fresh C-contiguous [T, K] array of `typenum` (NPY_INT32 / NPY_BOOL).
    static py::object new_array(int typenum, py::ssize_t T, py::ssize_t K) {
        auto& api = py::detail::npy_api::get();
        Py_intptr_t dims[2] = {T, K};
        return steal(api.PyArray_NewFromDescr_(api.PyArray_Type_, api.PyArray_DescrFromType_(typenum),
                                               2, dims, nullptr, nullptr, 0, nullptr));
    }

    // LayerPlan(layer, slot_ids, cpu_mask, fetches, cpu_experts, device_experts). The frozen
    // slotted dataclass's __init__ sets each field through object.__setattr__, 0.9 us a plan
    // (measured); with its member descriptors (plan_fields, checked by plan_native) the same
    // six slots are set directly on a new instance: the same object, without that cost.
    py::object make_plan(py::object layer, py::object slot_ids, py::object cpu_mask,
                         py::object fetches, py::object cpu, py::object device) {
        if (!fast_plan_)
            return plan_cls_(layer, slot_ids, cpu_mask, fetches, cpu, device);
        auto* tp = reinterpret_cast<PyTypeObject*>(plan_cls_.ptr());
        py::object obj = steal(tp->tp_new(tp, empty_.ptr(), nullptr));
        const py::object* values[6] = {&layer, &slot_ids, &cpu_mask, &fetches, &cpu, &device};
        for (size_t i = 0; i < 6; ++i) {
            PyObject* d = plan_fields_[i].ptr();
            if (Py_TYPE(d)->tp_descr_set(d, obj.ptr(), values[i]->ptr()) < 0)
                throw py::error_already_set();
        }
        return obj;
    }

    // The clock, read once per call into the planner: every decision of one plan (or one
    // step's prefetch) uses the time it started at, as the Python engine does on any clock
    // that does not move while the engine runs (the simulator's, the tests'); on a wall clock
    // the two differ by the engine's own run time, microseconds against millisecond copies.
    double now() {
        if (!now_valid_) {
            py::object r = steal(PyObject_CallNoArgs(now_.ptr()));
            now_ms_ = PyFloat_AsDouble(r.ptr());
            if (now_ms_ == -1.0 && PyErr_Occurred()) throw py::error_already_set();
            now_valid_ = true;
        }
        return now_ms_;
    }

    // The experts in polled_ (each in a LOADING slot) whose copies the mover reports landed
    // become READY: one ready_mask(layer, slots) call for all of them (the Python engine's).
    void mark_ready_polled(int layer, Table& t) {
        const py::ssize_t n = py::ssize_t(polled_.size());
        if (n == 0) return;
        py::object slots = steal(PyList_New(n));
        for (py::ssize_t i = 0; i < n; ++i)
            PyList_SET_ITEM(slots.ptr(), i,
                            new_int(t.slot_of[polled_[size_t(i)]]).release().ptr());
        py::object lay = new_int(layer);
        PyObject* args[3] = {nullptr, lay.ptr(), slots.ptr()};
        py::object r = steal(PyObject_Vectorcall(ready_mask_.ptr(), args + 1,
                                                 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
        py::object seq = steal(PySequence_Fast(r.ptr(), "ready_mask: expected a sequence"));
        if (PySequence_Fast_GET_SIZE(seq.ptr()) != n)
            value_error("ready_mask: returned " +
                        std::to_string(PySequence_Fast_GET_SIZE(seq.ptr())) + " answers for " +
                        std::to_string(n) + " slots");
        PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
        for (py::ssize_t i = 0; i < n; ++i) {
            const int v = PyObject_IsTrue(items[i]);
            if (v < 0) throw py::error_already_set();
            if (v) mark_ready(t, polled_[size_t(i)]);
        }
    }

    void load(int layer, int e, int64_t slot) {
        call(load_, {layer, e, slot});
        const double n = now();
        const double lf = times_[LINK_FREE_MS];
        times_[LINK_FREE_MS] = (lf > n ? lf : n) + costs_.fms;
    }

    bool fits_deadline(int layer, bool idle_only) {
        double deadline = now() + times_[GAP_MS];
        if (!idle_only) deadline += offset_[layer];
        const double n = now();
        const double lf = times_[LINK_FREE_MS];
        return (lf > n ? lf : n) + costs_.fms <= deadline;
    }

    // ---- slot table verbs --------------------------------------------------------------
    void refresh(int layer) {
        Table& t = tables_[size_t(layer)];
        polled_.clear();
        for (int s = 0; s < S_; ++s) {
            const int64_t e = t.expert_in[s];
            if (e >= 0 && t.state[s] == LOADING) polled_.push_back(int(e));
        }
        mark_ready_polled(layer, t);
    }

    static void mark_ready(Table& t, int e) {
        const int64_t s = t.slot_of[e];
        if (t.state[s] == LOADING) {
            t.state[s] = READY;
            t.ready[e] = true;
            --*t.n_loading;
        }
    }

    int64_t num_evictable(const Table& t) const {  // threshold None: free + READY slots
        int64_t n = 0;
        for (int s = 0; s < S_; ++s) n += t.state[s] == FREE || t.state[s] == READY;
        return n;
    }

    // SlotTable.victim: the READY resident with the smallest key, or -1. One loop per order
    // (an admission scans every slot: ~15 of them per Qwen3 layer forward under lru at W=4)
    int victim(const Table& t, const double* scores, bool has_thr, double thr,
               const int64_t* next_use) const {
        const int64_t *lu = t.last_use, *uses = t.uses;
        switch (order_) {
            case O_LRU:
                return victim_by(t, [&](int a, int b) {
                    return lu[a] != lu[b] ? lu[a] < lu[b] : a < b;
                });
            case O_LFU:
                return victim_by(t, [&](int a, int b) {
                    if (uses[a] != uses[b]) return uses[a] < uses[b];
                    return lu[a] != lu[b] ? lu[a] < lu[b] : a < b;
                });
            case O_UTILITY:
                if (!scores) break;  // the generic loop raises at its first comparison
                return victim_by(t, [&](int a, int b) {
                    return scores[a] != scores[b] ? scores[a] < scores[b] : a < b;
                }, has_thr ? scores : nullptr, thr);
            default:
                break;
        }
        int best = -1;
        for (int s = 0; s < S_; ++s) {
            if (t.state[s] != READY) continue;
            const int e = int(t.expert_in[s]);
            if (has_thr && order_ == O_UTILITY && !(scores[e] < thr)) continue;
            if (best < 0 || less(t, e, best, scores, next_use)) best = e;
        }
        return best;
    }

    // the READY resident smallest by `less`; with `below`, only those with below[e] < thr
    template <class Less>
    int victim_by(const Table& t, Less less, const double* below = nullptr, double thr = 0.0) const {
        int best = -1;
        for (int s = 0; s < S_; ++s) {
            if (t.state[s] != READY) continue;
            const int e = int(t.expert_in[s]);
            if (below && !(below[e] < thr)) continue;
            if (best < 0 || less(e, best)) best = e;
        }
        return best;
    }

    bool less(const Table& t, int a, int b, const double* scores, const int64_t* next_use) const {
        switch (order_) {
            case O_LRU:
                if (t.last_use[a] != t.last_use[b]) return t.last_use[a] < t.last_use[b];
                return a < b;
            case O_LFU:
                if (t.uses[a] != t.uses[b]) return t.uses[a] < t.uses[b];
                if (t.last_use[a] != t.last_use[b]) return t.last_use[a] < t.last_use[b];
                return a < b;
            case O_UTILITY:
                if (!scores) value_error("scores: the utility order needs per-expert scores");
                if (scores[a] != scores[b]) return scores[a] < scores[b];
                return a < b;
            default:
                if (!next_use) value_error("next_use: the belady order needs each expert's next use");
                if (next_use[a] != next_use[b]) return next_use[a] > next_use[b];
                return a < b;
        }
    }

    // Where SlotTable.admit would put a newcomer: the first FREE slot, else the victim's.
    struct Choice {
        int64_t free_slot = -1;
        int victim = -1;
        bool ok() const { return free_slot >= 0 || victim >= 0; }
    };

    Choice choose(const Table& t, const double* scores, bool has_thr, double thr,
                  const int64_t* next_use) const {
        Choice c;
        for (int s = 0; s < S_; ++s)
            if (t.state[s] == FREE) {
                c.free_slot = s;
                return c;
            }
        c.victim = victim(t, scores, has_thr, thr, next_use);
        return c;
    }

    bool can_admit(const Table& t, const double* scores, bool has_thr, double thr,
                   const int64_t* next_use) const {
        return choose(t, scores, has_thr, thr, next_use).ok();
    }

    // SlotTable.admit -> slot; *evicted = the expert evicted or -1. `chosen`: what choose()
    // gave for the same arguments on the same table (a prefetch asks can_admit first)
    int64_t admit(Table& t, int e, const double* scores, bool has_thr, double thr,
                  const int64_t* next_use, int* evicted, const Choice* chosen = nullptr) {
        if (t.slot_of[e] >= 0)
            value_error("expert: " + std::to_string(e) + " is already resident in slot " +
                        std::to_string(t.slot_of[e]));
        *evicted = -1;
        const Choice c = chosen ? *chosen : choose(t, scores, has_thr, thr, next_use);
        int64_t slot = c.free_slot;
        if (slot < 0) {
            const int v = c.victim;
            if (v < 0) value_error("expert: no slot can be freed (all pinned, loading or protected)");
            *evicted = v;
            slot = t.slot_of[v];
            t.slot_of[v] = -1;
            t.expert_in[slot] = -1;
            t.state[slot] = FREE;
            t.ready[v] = false;
        }
        t.slot_of[e] = slot;
        t.expert_in[slot] = e;
        t.state[slot] = LOADING;
        ++*t.n_loading;
        return slot;
    }

    const int64_t* belady_key(int layer) const {
        if (!next_use_) return nullptr;
        const py::ssize_t s = std::min<py::ssize_t>(clk_[STEP] + 1, future_rows_ - 1);
        return next_use_ + (size_t(s) * L_ + size_t(layer)) * E_;
    }

    // ExpertEngine._admit
    int64_t admit_engine(int layer, int e, bool demand, const double* scores, bool has_thr,
                         double thr, const Choice* chosen = nullptr) {
        Table& t = tables_[size_t(layer)];
        int evicted;
        const int64_t slot =
            admit(t, e, scores, has_thr, thr, belady_key(layer), &evicted, chosen);
        bool* pre = masks_ + (2 * size_t(L_) + size_t(layer)) * E_;
        if (evicted >= 0 && pre[evicted]) {
            pre[evicted] = false;
            ++ctr_[PF_WASTED];
        }
        if (!demand) {
            pre[e] = true;
            ++ctr_[PF_ISSUED];
        }
        return slot;
    }

    // ---- scores (ExpertEngine._scores) -------------------------------------------------
    const double* spac_scores(int layer) {
        const size_t row = size_t(layer) * E_;
        for (int e = 0; e < E_; ++e)
            sc_[size_t(e)] = double(levels_[row + e]) + score_[row + e] * recency_a_ * recency_b_;
        return sc_.data();
    }

    const double* demand_scores(int layer) {
        if (policy_ == SPAC) {
            if (!scores_ready_) spac_scores(layer);
            scores_ready_ = true;
            return sc_.data();
        }
        if (has_est_) {
            if (!scores_ready_) {
                const size_t row = size_t(layer) * E_;
                for (int e = 0; e < E_; ++e) sc_[size_t(e)] = double(levels_[row + e]);
            }
            scores_ready_ = true;
            return sc_.data();
        }
        if (policy_ == HYBRIMOE) return score_ + size_t(layer) * E_;
        return nullptr;
    }

    // ---- decisions ---------------------------------------------------------------------
    void on_demand(const Table& t) {
        const int64_t room = num_evictable(t);
        wait_ = loading_;
        fetch_ = absent_;
        by_tokens(fetch_);
        if (int64_t(fetch_.size()) > room) fetch_.resize(size_t(room));
    }

    void by_tokens(std::vector<int>& v) const {  // sorted by (-counts[e], e)
        std::sort(v.begin(), v.end(), [&](int a, int b) {
            if (counts_[size_t(a)] != counts_[size_t(b)]) return counts_[size_t(a)] > counts_[size_t(b)];
            return a < b;
        });
    }

    void balance(const Table& t) {
        tok_.clear();
        res_.clear();
        for (int e : ready_) {
            tok_.push_back(counts_[size_t(e)]);
            res_.push_back(1);
        }
        for (int e : loading_) {
            tok_.push_back(counts_[size_t(e)]);
            res_.push_back(0);
        }
        for (int e : absent_) {
            tok_.push_back(counts_[size_t(e)]);
            res_.push_back(0);
        }
        const int64_t free = num_evictable(t) + int64_t(loading_.size());
        Placement p = exact_.solve(tok_, res_, free, costs_, 0.0, fetch_flags_);
        int64_t n_fetched = 0;
        for (char f : fetch_flags_) n_fetched += f;
        const double diff = times_[LINK_FREE_MS] - now();
        const double backlog = diff > 0.0 ? diff : 0.0;
        if (backlog > 0.0 && n_fetched > 0) {
            // balancer.evaluate(problem, no fetch): branch_times with the residents only
            int64_t n_gpu = 0, v_gpu = 0, v_all = 0;
            for (size_t i = 0; i < tok_.size(); ++i) {
                v_all += tok_[i];
                if (res_[i]) {
                    ++n_gpu;
                    v_gpu += tok_[i];
                }
            }
            const double exposed = std::max(0.0, costs_.fms * 0.0 - 0.0);
            const double gpu = costs_.ag * double(n_gpu) + costs_.bg * double(v_gpu) + exposed;
            const double cpu = costs_.ac * double(int64_t(tok_.size()) - n_gpu) +
                               costs_.bc * double(v_all - v_gpu);
            const double none_mk = cpu > gpu ? cpu : gpu;
            const double a = p.gpu + backlog;
            if (none_mk <= (p.cpu > a ? p.cpu : a)) std::fill(fetch_flags_.begin(), fetch_flags_.end(), 0);
        }
        const size_t nr = ready_.size(), nl = loading_.size();
        for (size_t i = nr; i < fetch_flags_.size(); ++i) {
            if (!fetch_flags_[i]) continue;
            if (i < nr + nl)
                wait_.push_back(loading_[i - nr]);
            else
                fetch_.push_back(absent_[i - nr - nl]);
        }
        const int64_t room = free - int64_t(nl);
        if (int64_t(fetch_.size()) > room) {
            by_tokens(fetch_);
            fetch_.resize(size_t(room));
        }
    }

    // ExpertEngine._prefetch_layer: the S best candidates (score above the floor) by (score,
    // tiebreak) descending, expert ascending; each one not resident is admitted while a slot can
    // be had for it (and, with `deadline`, its copy lands in time); the first refusal ends it.
    void prefetch_layer(int layer, const double* score, const int64_t* tiebreak, bool deadline) {
        Table& t = tables_[size_t(layer)];
        auto before = [&](int a, int b) {  // a ranks before b
            if (score[a] != score[b]) return score[a] > score[b];
            if (tiebreak[a] != tiebreak[b]) return tiebreak[a] > tiebreak[b];
            return a < b;
        };
        auto candidate = [&](int e) {
            return prefetch_floor_ == 0.0 ? score[e] > prefetch_floor_ : score[e] >= prefetch_floor_;
        };
        // Most layers admit nothing in most steps, and the loop below would find that out at
        // its first non-resident candidate; that one is the best-ranked non-resident, and it is
        // in the top S iff fewer than S candidates rank before it. Its two checks are pure, so
        // asking them first decides exactly what the loop would, in O(E + S), without the sort
        // (which was ~5 us a layer, 250 us of spac's 270 us step at Qwen3 scale).
        int first = -1;
        for (int e = 0; e < E_; ++e)
            if (t.slot_of[e] < 0 && candidate(e) && (first < 0 || before(e, first))) first = e;
        if (first < 0) return;  // no candidate, or all resident
        int ahead = 0;
        for (int e = 0; e < E_; ++e) ahead += candidate(e) && before(e, first);
        if (ahead >= S_) return;
        const bool idle_only = idle_only_ && policy_ == SPAC;
        if (!can_admit(t, score, true, score[first], belady_key(layer))) return;
        if (deadline && !fits_deadline(layer, idle_only)) return;
        order_buf_.clear();
        for (int e = 0; e < E_; ++e)
            if (candidate(e)) order_buf_.push_back(e);
        const size_t top = std::min(order_buf_.size(), size_t(S_));
        std::partial_sort(order_buf_.begin(), order_buf_.begin() + top, order_buf_.end(), before);
        order_buf_.resize(top);
        const std::vector<int> order = order_buf_;
        for (int e : order) {
            if (t.slot_of[e] >= 0) continue;
            const Choice c = choose(t, score, true, score[e], belady_key(layer));
            if (!c.ok()) break;
            if (deadline && !fits_deadline(layer, idle_only)) break;
            const int64_t slot = admit_engine(layer, e, false, score, true, score[e], &c);
            load(layer, e, slot);
        }
    }

    void faithful_prefetch(int layer) {
        Table& t = tables_[size_t(layer)];
        const int64_t* lv = levels_ + size_t(layer) * E_;
        std::vector<double> levels(lv, lv + E_);
        std::vector<int> order;
        for (int e = 0; e < E_; ++e)
            if (lv[e] >= 1) order.push_back(e);
        std::sort(order.begin(), order.end(), [&](int a, int b) {
            if (lv[a] != lv[b]) return lv[a] > lv[b];
            return a < b;
        });
        for (int e : order) {
            if (t.slot_of[e] >= 0) continue;
            if (!can_admit(t, levels.data(), true, faithful_threshold_, nullptr)) break;
            const int64_t slot =
                admit_engine(layer, e, false, levels.data(), true, faithful_threshold_);
            load(layer, e, slot);
        }
    }
};

// balancer.ExactBalancer.solve (narrow model) on plain arrays, for the property tests:
// -> (fetch [M] bool, gpu_ms, cpu_ms)
py::tuple exact_solve(py::array_t<int64_t, py::array::c_style | py::array::forcecast> tokens,
                      py::array_t<bool, py::array::c_style | py::array::forcecast> resident,
                      int64_t free_slots, double gpu_fixed_ms, double gpu_per_token_ms,
                      double cpu_fixed_ms, double cpu_per_token_ms, double fetch_ms,
                      double hidden_fetch_ms) {
    const py::ssize_t M = tokens.size();
    if (resident.size() != M) value_error("resident: expected one flag per routed expert");
    std::vector<int64_t> tok(tokens.data(), tokens.data() + M);
    std::vector<char> res(resident.data(), resident.data() + M);
    for (int64_t n : tok)
        if (n < 1) value_error("tokens: every routed expert has >= 1 token");
    if (free_slots < 0) value_error("free_slots: must be a non-negative integer");
    std::vector<char> fetch;
    Exact solver;
    Placement p = solver.solve(tok, res, free_slots,
                               {gpu_fixed_ms, gpu_per_token_ms, cpu_fixed_ms, cpu_per_token_ms,
                                fetch_ms},
                               hidden_fetch_ms, fetch);
    py::array_t<bool> out(M);
    for (py::ssize_t i = 0; i < M; ++i) out.mutable_data()[i] = fetch[size_t(i)] != 0;
    return py::make_tuple(out, p.gpu, p.cpu);
}

// ---- the per-forward entry points as plain CPython functions ---------------------------------
// plan_layer(layer, topk_ids) / finish_layer(layer, topk_ids), METH_FASTCALL, bound to a capsule
// holding the Planner (and a reference to its Python object, so it outlives them): a call costs
// what a builtin's does, where pybind11's method dispatcher took 0.19 us (measured).
// The capsule is unnamed: a named one costs a strcmp on every call, and no other code sees it.
Planner* capsule_planner(PyObject* self) {
    return static_cast<Planner*>(PyCapsule_GetPointer(self, nullptr));
}

bool entry_args(PyObject* const* args, Py_ssize_t nargs, const char* name, int& layer) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s(layer, topk_ids): expected 2 arguments, got %zd", name,
                     nargs);
        return false;
    }
    const long v = PyLong_AsLong(args[0]);
    if (v == -1 && PyErr_Occurred()) return false;
    if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "layer: out of range, got %ld", v);
        return false;
    }
    layer = int(v);
    return true;
}

// a C++ exception -> the Python error it stands for (pybind11's translation, by hand)
void set_python_error() {
    try {
        throw;
    } catch (py::error_already_set& e) {
        e.restore();
    } catch (const py::builtin_exception& e) {
        e.set_error();
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
}

PyObject* plan_entry(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    int layer;
    if (!entry_args(args, nargs, "plan_layer", layer)) return nullptr;
    try {
        return capsule_planner(self)->plan(layer, args[1]).release().ptr();
    } catch (...) {
        set_python_error();
        return nullptr;
    }
}

PyObject* finish_entry(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    int layer;
    if (!entry_args(args, nargs, "finish_layer", layer)) return nullptr;
    try {
        capsule_planner(self)->finish(layer, args[1]);
        Py_RETURN_NONE;
    } catch (...) {
        set_python_error();
        return nullptr;
    }
}

PyMethodDef ENTRY_DEFS[] = {
    {"plan_layer", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(plan_entry)),
     METH_FASTCALL, "ExpertEngine.plan_layer(layer, topk_ids) -> LayerPlan, natively"},
    {"finish_layer",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(finish_entry)), METH_FASTCALL,
     "ExpertEngine.finish_layer(layer, topk_ids), natively"},
};

void release_capsule(PyObject* capsule) {
    Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(capsule)));
}

// (plan_layer, finish_layer) bound to `self` (a Planner)
py::tuple entry_points(py::object self) {
    Planner& planner = self.cast<Planner&>();
    py::object capsule = steal(PyCapsule_New(&planner, nullptr, release_capsule));
    if (PyCapsule_SetContext(capsule.ptr(), self.inc_ref().ptr()) < 0) {
        self.dec_ref();
        throw py::error_already_set();
    }
    py::object plan = steal(PyCFunction_New(&ENTRY_DEFS[0], capsule.ptr()));
    py::object finish = steal(PyCFunction_New(&ENTRY_DEFS[1], capsule.ptr()));
    return py::make_tuple(plan, finish);
}

}  // namespace

PYBIND11_MODULE(_plan, m) {
    m.doc() =
        "The engine's per-layer-forward plan in C++ (pybind11, no torch ABI): slot lookup, miss "
        "set, the exact balancer, pin/touch, fetch admission, the commit after the layer and "
        "spac/hybrimoe/spac-faithful prefetch, on the numpy arrays the Python engine owns. "
        "Reference: moespac_vllm.engine.ExpertEngine (tests/test_plan_native.py); wrapper: "
        "moespac_vllm.plan_native; benchmark: benchmarks/bench_layer_host.py. C++17 + pybind11 "
        "because the build skeleton already compiles it on a fresh machine with no extra "
        "toolchain and numpy buffers give zero-copy pointers into the tables.";
    py::class_<Planner>(m, "Planner")
        .def(py::init<py::dict, py::list, py::dict, py::dict>())
        .def("entry_points", &entry_points,
             "(plan_layer, finish_layer): the per-forward calls as plain CPython functions")
        .def("prefetch_step", &Planner::prefetch_step)
        .def("prefetch_with", &Planner::prefetch_with)
        .def("set_future", &Planner::set_future)
        .def("oracle_prefetch", &Planner::oracle_prefetch);
    m.def("exact_solve", &exact_solve,
          "balancer.ExactBalancer.solve, narrow model: (tokens, resident, free_slots, gpu_fixed_ms, "
          "gpu_per_token_ms, cpu_fixed_ms, cpu_per_token_ms, fetch_ms, hidden_fetch_ms) -> "
          "(fetch, gpu_ms, cpu_ms)");
}
