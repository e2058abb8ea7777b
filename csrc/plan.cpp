// moespac_vllm._plan: the engine's per-layer-forward plan in native code.
//
// What: `Planner` runs ExpertEngine.plan_layer / finish_layer (engine.py, the reference), the
// exact balancer's decision (balancer.ExactBalancer, narrow model), the slot table's verbs
// (cache.SlotTable: admit / victim / pin / unpin / touch / mark_ready), the estimator's level
// rule (estimator.UtilityEstimator._apply) and spac / hybrimoe / spac-faithful prefetch
// (engine._prefetch_layer, _faithful_prefetch), step for step as the Python code does them, on
// the very numpy arrays the Python objects own (cache.py, engine_state.py). The mover and the
// clock stay Python objects: they are called back in the order the Python engine calls them.
// So the two paths give identical plans, books and tables (tests/test_plan_native.py, hypothesis
// + the real Mixtral traces, every policy), and either can continue from the other's state.
//
// Why native: at Qwen3-30B-A3B scale (E=128, top-8, 22 slots) the Python plan costs 180-530 us
// per layer forward (issue 11; cProfile: sorted() keys, per-slot victim loops, numpy calls on
// 128-element rows, the balancer's Python-int bitsets), 9-25 ms of host time per decode step
// against a 5-6 ms step on the GPU. The same work here is a few microseconds
// (benchmarks/bench_layer_host.py --dims qwen3-30b-a3b).
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
constexpr int LINK_FREE_MS = 0, BEGIN_MS = 1, GAP_MS = 2, TICK = 0, STEP = 1;
constexpr double REL_TOL = 1e-12;  // balancer._REL_TOL
constexpr double INF = std::numeric_limits<double>::infinity();

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

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
    Planner(py::dict cfg, py::list tables, py::dict arrays, py::object mover_load,
            py::object mover_is_ready, py::object clock_now, py::object plan_cls,
            py::object as_ids)
        : load_(std::move(mover_load)), is_ready_(std::move(mover_is_ready)),
          now_(std::move(clock_now)), plan_cls_(std::move(plan_cls)),
          as_ids_(std::move(as_ids)) {
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
        clk_ = buffer<int64_t>(arrays["clock"], "clock", 2);
        offset_ = buffer<double>(arrays["layer_offset_ms"], "layer_offset_ms", L_);
        open_ = buffer<bool>(arrays["open"], "open", L_);
        if (has_est_) levels_ = buffer<int64_t>(arrays["levels"], "levels", LE);
        counts_.resize(size_t(E_));
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

    // ExpertEngine.plan_layer: ids any integer [T, K] array-like (int32/int64 C-contiguous
    // arrays are read in place, anything else goes through plan_native's converter first)
    py::object plan(int layer, py::object ids_obj, bool decoding) {
        check_layer(layer);
        py::array ids = ids_array(ids_obj);
        const py::ssize_t T = ids.shape(0), K = ids.shape(1);
        read_ids(ids);
        bool* pinned = masks_ + size_t(layer) * E_;
        bool* pending = pinned + size_t(L_) * E_;
        bool* pre = pending + size_t(L_) * E_;
        for (int e = 0; e < E_; ++e)
            if (pinned[e] || pending[e])
                value_error("layer: " + std::to_string(layer) +
                            " planned twice without finish_layer");
        count(T * K);
        routed_.clear();
        for (int e = 0; e < E_; ++e)
            if (counts_[size_t(e)]) routed_.push_back(e);
        Table& t = tables_[size_t(layer)];
        if (*t.n_loading) refresh(layer);
        if (decoding && !std::isnan(times_[BEGIN_MS]))
            offset_[layer] = now() - times_[BEGIN_MS];
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
        py::list fetches;
        for (int e : wait_) {
            fetches.append(py::make_tuple(e, t.slot_of[e]));
            if (decoding && pre[e]) {
                pre[e] = false;
                ++ctr_[PF_USED];
                ++ctr_[PF_LATE];
            }
        }
        for (int e : fetch_) {
            const int64_t slot = admit_engine(layer, e, true, demand_scores(layer), false, 0.0);
            load(layer, e, slot);
            fetches.append(py::make_tuple(e, slot));
            ++ctr_[FETCHED];
        }
        for (int e : wait_) pending[e] = true;
        for (int e : fetch_) pending[e] = true;
        // device = ready + wait + fetch
        std::fill(slot_map_.begin(), slot_map_.end(), -1);
        size_t n_device = 0;
        auto put = [&](int e) {
            slot_map_[size_t(e)] = int32_t(t.slot_of[e]);
            ++n_device;
        };
        for (int e : ready_) put(e);
        for (int e : wait_) put(e);
        for (int e : fetch_) put(e);
        py::array_t<int32_t> slot_ids({T, K});
        py::array_t<bool> cpu_mask({T, K});
        int32_t* so = slot_ids.mutable_data();
        bool* cm = cpu_mask.mutable_data();
        for (py::ssize_t i = 0; i < T * K; ++i) {
            so[i] = slot_map_[size_t(ids_[size_t(i)])];
            cm[i] = so[i] < 0;
        }
        py::list cpu, device;
        for (int e : routed_) {
            if (slot_map_[size_t(e)] < 0)
                cpu.append(e);
            else
                device.append(e);
        }
        if (decoding) {
            ctr_[DEVICE] += int64_t(n_device);
            ctr_[CPU] += int64_t(py::len(cpu));
        }
        return plan_cls_(layer, slot_ids, cpu_mask, py::tuple(fetches), py::tuple(cpu),
                         py::tuple(device));
    }

    // ExpertEngine.finish_layer (+ _commit_counts when decoding, without the estimator's
    // draft bookkeeping, which plan_native does in Python)
    void finish(int layer, py::object ids_obj, bool decoding) {
        check_layer(layer);
        py::array ids = ids_array(ids_obj);
        const py::ssize_t T = ids.shape(0), K = ids.shape(1);
        read_ids(ids);
        count(T * K);
        Table& t = tables_[size_t(layer)];
        bool* pinned = masks_ + size_t(layer) * E_;
        bool* pending = pinned + size_t(L_) * E_;
        for (int e = 0; e < E_; ++e) {
            if (!pending[e]) continue;
            const int64_t s = t.slot_of[e];
            if (s >= 0 && t.state[s] == LOADING && ready_cb(layer, s)) mark_ready(t, e);
        }
        for (int e = 0; e < E_; ++e) {
            if (!pinned[e]) continue;
            const int64_t s = t.slot_of[e];
            if (--t.pins[s] == 0) t.state[s] = READY;
        }
        std::fill(pinned, pinned + E_, false);
        std::fill(pending, pending + E_, false);
        const int64_t tick = ++clk_[TICK];
        for (int e = 0; e < E_; ++e)
            if (counts_[size_t(e)]) {
                t.last_use[e] = tick;
                ++t.uses[e];
            }
        if (!decoding) return;
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
        for (int layer = 0; layer < L_; ++layer) {
            if (!open_[layer]) continue;
            const double* sc = policy_ == SPAC ? spac_scores(layer) : score_ + size_t(layer) * E_;
            prefetch_layer(layer, sc, last_counts_ + size_t(layer) * E_, true);
        }
    }

    // _prefetch_layer with explicit score [E] float64 and tiebreak [E] int64 rows
    void prefetch_with(int layer, py::array score, py::array tiebreak, bool deadline) {
        check_layer(layer);
        const double* sc = buffer<double>(score, "score", E_);
        const int64_t* tb = buffer<int64_t>(tiebreak, "tiebreak", E_);
        std::vector<double> copy(sc, sc + E_);
        prefetch_layer(layer, copy.data(), tb, deadline);
    }

  private:
    int L_, E_, S_, policy_, order_;
    bool prefetch_, idle_only_, has_est_, theta_fixed_ = true, scores_ready_ = false;
    Costs costs_;
    double recency_a_, recency_b_, decay_, prefetch_floor_, faithful_threshold_;
    int64_t theta_up_ = 0, theta_down_ = 0, cap_ = 0, ref_ = 1;
    py::object load_, is_ready_, now_, plan_cls_, as_ids_, future_keep_, future_counts_keep_;
    std::vector<py::object> keep_;
    std::vector<Table> tables_;
    bool *masks_, *open_;
    double *score_, *times_, *offset_;
    int64_t *last_counts_, *ctr_, *clk_, *levels_ = nullptr, *next_use_ = nullptr,
            *future_ = nullptr;
    py::ssize_t future_rows_ = 0;
    std::vector<int64_t> counts_, ids_;
    std::vector<double> sc_;
    std::vector<int32_t> slot_map_;
    std::vector<int> routed_, ready_, loading_, absent_, wait_, fetch_, order_buf_;
    Exact exact_;
    std::vector<int64_t> tok_;
    std::vector<char> res_, fetch_flags_;

    void check_layer(int layer) const {
        if (layer < 0 || layer >= L_)
            value_error("layer: must be an integer in [0, " + std::to_string(L_) + "), got " +
                        std::to_string(layer));
    }

    py::array ids_array(const py::object& obj) {
        if (py::isinstance<py::array>(obj)) {
            py::array a = py::reinterpret_borrow<py::array>(obj);
            const char kind = a.dtype().kind();
            if (a.ndim() == 2 && kind == 'i' && (a.itemsize() == 8 || a.itemsize() == 4) &&
                (a.flags() & py::array::c_style))
                return a;
        }
        return as_ids_(obj).cast<py::array>();
    }

    void read_ids(const py::array& ids) {
        const py::ssize_t n = ids.size();
        ids_.resize(size_t(n));
        if (ids.itemsize() == 8) {
            const int64_t* p = static_cast<const int64_t*>(ids.data());
            std::copy(p, p + n, ids_.begin());
        } else {
            const int32_t* p = static_cast<const int32_t*>(ids.data());
            std::copy(p, p + n, ids_.begin());
        }
        for (int64_t v : ids_)
            if (v < 0 || v >= E_)
                value_error("topk_ids: expert ids must be in [0, " + std::to_string(E_) + ")");
    }

    void count(py::ssize_t n) {
        std::fill(counts_.begin(), counts_.end(), 0);
        for (py::ssize_t i = 0; i < n; ++i) ++counts_[size_t(ids_[size_t(i)])];
    }

    double now() { return now_().cast<double>(); }
    bool ready_cb(int layer, int64_t slot) { return is_ready_(layer, slot).cast<bool>(); }

    void load(int layer, int e, int64_t slot) {
        load_(layer, e, slot);
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
        for (int s = 0; s < S_; ++s) {
            const int64_t e = t.expert_in[s];
            if (e >= 0 && t.state[s] == LOADING && ready_cb(layer, s)) mark_ready(t, int(e));
        }
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

    // SlotTable.victim: the READY resident with the smallest key, or -1
    int victim(const Table& t, const double* scores, bool has_thr, double thr,
               const int64_t* next_use) const {
        int best = -1;
        for (int s = 0; s < S_; ++s) {
            if (t.state[s] != READY) continue;
            const int e = int(t.expert_in[s]);
            if (has_thr && order_ == O_UTILITY && !(scores[e] < thr)) continue;
            if (best < 0 || less(t, e, best, scores, next_use)) best = e;
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

    bool can_admit(const Table& t, const double* scores, bool has_thr, double thr,
                   const int64_t* next_use) const {
        for (int s = 0; s < S_; ++s)
            if (t.state[s] == FREE) return true;
        return victim(t, scores, has_thr, thr, next_use) >= 0;
    }

    // SlotTable.admit -> slot; *evicted = the expert evicted or -1
    int64_t admit(Table& t, int e, const double* scores, bool has_thr, double thr,
                  const int64_t* next_use, int* evicted) {
        if (t.slot_of[e] >= 0)
            value_error("expert: " + std::to_string(e) + " is already resident in slot " +
                        std::to_string(t.slot_of[e]));
        *evicted = -1;
        int64_t slot = -1;
        for (int s = 0; s < S_; ++s)
            if (t.state[s] == FREE) {
                slot = s;
                break;
            }
        if (slot < 0) {
            const int v = victim(t, scores, has_thr, thr, next_use);
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
                         double thr) {
        Table& t = tables_[size_t(layer)];
        int evicted;
        const int64_t slot = admit(t, e, scores, has_thr, thr, belady_key(layer), &evicted);
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

    void prefetch_layer(int layer, const double* score, const int64_t* tiebreak, bool deadline) {
        Table& t = tables_[size_t(layer)];
        order_buf_.clear();
        bool all_resident = true;
        for (int e = 0; e < E_; ++e) {
            if (prefetch_floor_ == 0.0 ? score[e] > prefetch_floor_ : score[e] >= prefetch_floor_) {
                order_buf_.push_back(e);
                if (t.slot_of[e] < 0) all_resident = false;
            }
        }
        if (order_buf_.empty() || all_resident) return;
        std::sort(order_buf_.begin(), order_buf_.end(), [&](int a, int b) {
            if (score[a] != score[b]) return score[a] > score[b];
            if (tiebreak[a] != tiebreak[b]) return tiebreak[a] > tiebreak[b];
            return a < b;
        });
        if (int(order_buf_.size()) > S_) order_buf_.resize(size_t(S_));
        const std::vector<int> order = order_buf_;
        const bool idle_only = idle_only_ && policy_ == SPAC;
        for (int e : order) {
            if (t.slot_of[e] >= 0) continue;
            if (!can_admit(t, score, true, score[e], belady_key(layer))) break;
            if (deadline && !fits_deadline(layer, idle_only)) break;
            const int64_t slot = admit_engine(layer, e, false, score, true, score[e]);
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
        .def(py::init<py::dict, py::list, py::dict, py::object, py::object, py::object,
                      py::object, py::object>())
        .def("plan", &Planner::plan)
        .def("finish", &Planner::finish)
        .def("prefetch_step", &Planner::prefetch_step)
        .def("prefetch_with", &Planner::prefetch_with)
        .def("set_future", &Planner::set_future)
        .def("oracle_prefetch", &Planner::oracle_prefetch);
    m.def("exact_solve", &exact_solve,
          "balancer.ExactBalancer.solve, narrow model: (tokens, resident, free_slots, gpu_fixed_ms, "
          "gpu_per_token_ms, cpu_fixed_ms, cpu_per_token_ms, fetch_ms, hidden_fetch_ms) -> "
          "(fetch, gpu_ms, cpu_ms)");
}
