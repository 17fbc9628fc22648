// Fused all-triplets margin loss over a reference set on the CPU (CONTRACT.md section 1):
//   l_i = sum_{p in P_i, n in N_i, lo < u <= hi} max(0, margin - u),  u = S_ip - S_in
// (pytorch-metric-learning's TripletMarginLoss with CosineSimilarity over all triplets, or
// over those a TripletMarginMiner selects: lo < u <= hi).
// Positives first: each anchor's positives (same label, valid, S < 1 - pos_eps: few in a memory
// of many classes) are found by label, their S computed by one dot product each and sorted.
// Then ONE pass over the memory: for a negative n, the triplets it forms are a contiguous range
// [a, b) of the sorted positives (u is monotone in S_ip, and so are the predicates u > lo,
// u <= hi and margin - u > 0, evaluated in fp32 as written), found by binary search; the
// range's loss is b - a times (S_in + margin) minus a prefix sum of S_ip. The gradient:
// dl/dS_in = b - a (the tile's coefficients times R, as the other losses), dl/dS_ip = minus
// the number of negatives whose range holds p (a difference array per split over the sorted
// positives), applied to the positive rows after the pass. A positive's S comes from the
// gather only and a negative's from the tile GEMM only, so every triplet is decided on one
// value; a negative whose u lies within 1e-5 of a bound or the margin for some positive is
// decided on its S recomputed by the gather's own dot product instead, so that a row held twice
// under two labels gives u = 0 exactly, as one GEMM over all columns (pytorch-metric-learning's)
// does. The reference-side gradient (in-batch loss) runs the pass for the positives' counts,
// then C = dl/dS per tile: dX = C R, dR = C^T X.
// The vector pass (triplet_row_vec, simd.h's widest lanes): for an anchor with at most
// kVecMaxPositives positives, L negatives at a time, the same fp32 predicates evaluated per
// positive instead of by binary search (both are monotone in S_ip, so the counts are those of
// the searches): the row's coefficient k = b - a per negative, each positive's count (what the
// difference array gives), and the loss k (S_in + margin) in double lanes, minus sum_p count_p
// S_ip. A negative near a bound (negative_s's test, the same fp32 arithmetic) takes the scalar
// path, as do anchors with more positives and the last w mod L columns of a row: the scalar
// code is the definition. Where the margin is the one bound (the default: no selection) and
// the positives fit in two vectors, a block's counts come first and the near test looks at two
// positives per lane only, those on either side of the lane's count (triplet_near_at, which
// checks the premise that makes this exact and otherwise tests every positive); the few near
// lanes' counts are then taken back out. (The anchor's own column enters the vector pass as a NaN score,
// which no predicate holds for: coefficient 0, as the scalar path gives it.)
// Thresholds (the default rows: 1..16 finite positives, the margin the one bound): the margin test
// fl(margin - fl(sp - sn)) > 0 holds exactly for sn >= sig_p, the first float where it does (found
// once per anchor, margin_threshold), ascending with sp; a lane's coefficient is the number of
// thresholds its score reaches, each positive one comparison and two masked adds (triplet_row_sig,
// and at 16 lanes triplet_row_sig16 in AVX-512, whose counts' lanes accumulate per anchor across a
// split's tiles and are added up once after the pass). negative_s's near test runs only on the
// blocks with a candidate lane: within a proven width of the thresholds either side of its count,
// or outside the range where the lo and hi tests hold (sig_tables).
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu/same_label.h"
#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
using cpu::Vec;

struct TripletParams {
  float margin, lo, hi, pos_thr;
  // The range [a, b) of positives (S sorted ascending) that form an active triplet with a
  // negative of similarity sn: lo < fl(sp - sn) <= hi and fl(margin - fl(sp - sn)) > 0.
  std::pair<int64_t, int64_t> range(const float* sp, int64_t np, float sn) const {
    const float* a = std::partition_point(sp, sp + np, [&](float v) { return !(v - sn > lo); });
    const float* b = std::partition_point(a, sp + np, [&](float v) {
      const float u = v - sn;
      return u <= hi && margin - u > 0.f;
    });
    return {a - sp, b - sp};
  }
};

// Each anchor's positives, sorted by S: offsets start[i]..start[i+1] into s (S), col (column)
// and prefix (prefix[start[i] + i + k] = sum of the anchor's first k S, in double).
struct Positives {
  std::vector<int64_t> start;
  std::vector<float> s;
  std::vector<int64_t> col;
  std::vector<double> prefix;
  // wide[i]: anchor i has a positive beyond 2^20 in magnitude or not finite, where a difference of
  // two prefix sums would lose the others (a range's sum is then added up term by term)
  std::vector<char> wide;
  // sig_ok[i]: anchor i's positives are all finite and at most kSigPositives, and its tables
  // (below) usable: the thresholds sig_k, the smallest float sn for which the margin test holds at
  // positive k (margin_threshold), ascending with S
  std::vector<char> sig_ok;
  // with sig_ok, anchor i's tables from tables[i * kSigTables]: kSigWidth thresholds (NaN past
  // np), then the lookup tables triplet_row_sig reads by lane (PositiveTable's layout: entry t
  // of n values is value min(t, n - 1)): the positives' S, and by k = 0..np the near test's
  // bounds from above and below (sig_tables)
  std::vector<float> tables;
  int64_t total() const { return start.back(); }
};

constexpr int kSigPositives = 16, kSigWidth = 32, kSigTables = 4 * kSigWidth;

// The float sn at which the margin test fl(margin - fl(sp - sn)) > 0 starts to hold: it holds
// exactly for sn >= the returned value (NaN: for no sn). The test is monotone in sn (rounding
// is), so a binary search over the floats in their order (bit patterns mapped to an ordered
// integer key, -inf to +inf) finds its first float; -inf never passes for a finite sp.
inline float margin_threshold(float sp, float margin) {
  auto holds = [&](uint32_t key) {
    const uint32_t b = key & 0x80000000u ? key ^ 0x80000000u : ~key;
    float s;
    std::memcpy(&s, &b, sizeof(s));
    const float u = sp - s;
    return margin - u > 0.f;
  };
  uint32_t lo = ~0xff800000u, hi = 0x7f800000u | 0x80000000u;  // the keys of -inf and +inf
  if (!holds(hi)) return std::numeric_limits<float>::quiet_NaN();
  while (lo < hi) {  // the first key in [lo, hi] that holds
    const uint32_t mid = lo + (hi - lo) / 2;
    if (holds(mid))
      hi = mid;
    else
      lo = mid + 1;
  }
  const uint32_t b = lo & 0x80000000u ? lo ^ 0x80000000u : ~lo;
  float s;
  std::memcpy(&s, &b, sizeof(s));
  return s;
}

// S_ij by the gather's dot product (cpu::gather_same_label's: the fp32 anchor against row j's
// fp32 value), for a negative decided on it (negative_s).
float pair_dot(const cpu::LossInputs& in, int64_t i, int64_t j) {
  thread_local std::vector<float> buf;
  buf.resize(in.D);
  return cpu::dot(in.x32.data_ptr<float>() + i * in.D, cpu::ref_row(in.ref, j, in.D, buf.data()), in.D);
}

// The scores in [t_hi, t_lo] pass the lo test at an anchor's first positive sp0 and the hi test at
// its last sp1 (so at every positive), for |lo|, |hi| > 2.5 (triplet_row_margin's argument).
inline std::pair<float, float> range_limits(float sp0, float sp1, float lo, float hi) {
  const double a0 = sp0, a1 = sp1;
  return {static_cast<float>(a1 - hi + 1e-6 * (std::abs(a1) + std::abs(hi))),
          static_cast<float>(a0 - lo - 1e-6 * (std::abs(a0) + std::abs(lo)))};
}

// An anchor's tables for triplet_row_sig (Positives::tables), 1 <= np <= kSigPositives: its
// thresholds, its positives' S, and the near test's bounds by k (the count of thresholds a score
// reaches): sig_{k-1} + w_{k-1} and sig_k - w_k, w_k = 1.1e-5 (1 + |sig_k|) + 1e-6 (|sig_k| +
// |sp_k| + |margin|), with the range limits at the ends (t_hi at k = 0, t_lo at k = np): a score
// below the first or at least the second is a candidate. Where t_hi <= sig_0 and sig_{np-1} <=
// t_lo (returned), every score that is no candidate lies in [t_hi, t_lo]: the lo and hi tests hold.
inline bool sig_tables(const float* sp, const float* sig, int64_t np, const TripletParams& prm, float* out) {
  const auto [t_hi, t_lo] = range_limits(sp[0], sp[np - 1], prm.lo, prm.hi);
  float a[kSigPositives + 1], b[kSigPositives + 1];
  a[0] = t_hi;
  for (int64_t p = 0; p < np; ++p) {
    const float w =
        1.1e-5f * (1.f + std::abs(sig[p])) + 1e-6f * (std::abs(sig[p]) + std::abs(sp[p]) + std::abs(prm.margin));
    a[p + 1] = sig[p] + w;
    b[p] = sig[p] - w;
  }
  b[np] = t_lo;
  for (int t = 0; t < kSigWidth; ++t) {
    out[t] = t < np ? sig[t] : std::numeric_limits<float>::quiet_NaN();
    out[kSigWidth + t] = sp[std::min<int64_t>(t, np - 1)];
    out[2 * kSigWidth + t] = a[std::min<int64_t>(t, np)];
    out[3 * kSigWidth + t] = b[std::min<int64_t>(t, np)];
  }
  return t_hi <= sig[0] && sig[np - 1] <= t_lo;
}

// Each anchor's positives: its same-label columns (cpu::gather_same_label, uncapped: every
// anchor is served this way) with S < 1 - pos_eps, sorted by S.
Positives gather_positives(const cpu::LossInputs& in, const TripletParams& prm) {
  const int64_t B = in.B;
  cpu::SameLabel cand;
  cpu::gather_same_label(in, cand, /*capped=*/false);
  std::vector<std::vector<std::pair<float, int64_t>>> per(B);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t k = cand.start[i]; k < cand.start[i + 1]; ++k)
      if (cand.s[k] < prm.pos_thr) per[i].emplace_back(cand.s[k], cand.col[k]);
    std::sort(per[i].begin(), per[i].end());  // by S, then column: a fixed order
  }
  Positives out;
  out.start.assign(1, 0);
  out.tables.resize(B * kSigTables);
  for (int64_t i = 0; i < B; ++i) {
    double acc = 0;
    bool finite = true, wide = false;
    std::vector<float> sig;  // (kept in the tables only)
    out.prefix.push_back(0.0);
    for (const auto& [s, j] : per[i]) {
      out.s.push_back(s);
      out.col.push_back(j);
      sig.push_back(margin_threshold(s, prm.margin));
      finite = finite && std::isfinite(s);
      wide = wide || !(std::abs(s) <= 0x1p20f);
      acc += s;
      out.prefix.push_back(acc);
    }
    out.wide.push_back(wide);
    const bool ok = finite && !per[i].empty() && per[i].size() <= kSigPositives &&
                    sig_tables(out.s.data() + out.start[i], sig.data(),
                               static_cast<int64_t>(per[i].size()), prm, out.tables.data() + i * kSigTables);
    out.sig_ok.push_back(ok);
    out.start.push_back(static_cast<int64_t>(out.s.size()));
  }
  return out;
}

// The pass over the memory. Per split: loss (double), active triplets and, with accumulate,
// the negatives' gradient C R; always the difference array of the positives' counts.
struct TripletSplits {
  Tensor loss;     // (P, B) f64
  Tensor active;   // (P, B) int64
  Tensor grad;     // (P, B, D) f32, or undefined
  Tensor diff;     // (P, total positives + B) int64: anchor i's np + 1 entries from start[i] + i
};

// The coefficient of a negative of similarity sn for anchor i (the number of its active
// triplets) and its range; nullptr-safe for anchors without positives.
inline std::pair<int64_t, int64_t> negative_range(const Positives& pos, const TripletParams& prm, int64_t i,
                                                  float sn) {
  const int64_t s0 = pos.start[i], np = pos.start[i + 1] - s0;
  if (np == 0) return {0, 0};
  return prm.range(pos.s.data() + s0, np, sn);
}

// The S a negative (anchor i, column j, sn from the tile GEMM) is decided on: sn, or where some
// positive puts u = S_ip - sn within 1e-5 of a bound or the margin, the gather's dot product (a
// GEMM and a dot product round one row differently; a row held under two labels must give u = 0).
inline float negative_s(const cpu::LossInputs& in, const Positives& pos, const TripletParams& prm, int64_t i,
                        int64_t j, float sn, const float* dot = nullptr) {
  const float* sp = pos.s.data() + pos.start[i];
  const float* end = pos.s.data() + pos.start[i + 1];
  if (sp == end) return sn;
  const float tol = 1e-5f * (1.f + std::abs(sn));
  for (const float t : {prm.lo, prm.hi, prm.margin}) {
    if (std::abs(t) > 2.5f) continue;  // +-3: no bound
    const float* near = std::lower_bound(sp, end, sn + t - tol);
    if (near != end && *near <= sn + t + tol) return dot != nullptr ? *dot : pair_dot(in, i, j);
  }
  return sn;
}

// Anchors with more positives keep the binary searches.
constexpr int64_t kVecMaxPositives = 64;

#if XBM_CPU_VECTOR
template <int L>
struct DoubleLanes {  // (as cpu::Lanes: a dependent vector_size outside the function using it)
  typedef double D __attribute__((vector_size(8 * L)));
  typedef double H __attribute__((vector_size(4 * L)));  // half of them: one register
};

// A row's loss lanes sum k (s + margin) in double, lane t of the blocks in lane t: two halves
// of L / 2 doubles, each a register (one vector of L doubles is kept in memory).
template <int L>
struct LossLanes {
  typedef DoubleLanes<L> DL;
  typename DL::H lo = typename DL::H{}, hi = typename DL::H{};
  XBM_INLINE void add(typename Vec<L>::I k, typename Vec<L>::F s, double margin) {
    const typename DL::D t = __builtin_convertvector(k, typename DL::D) * (__builtin_convertvector(s, typename DL::D) + margin);
    typename DL::H t0, t1;
    std::memcpy(&t0, &t, sizeof(t0));
    std::memcpy(&t1, reinterpret_cast<const char*>(&t) + sizeof(t0), sizeof(t1));
    lo += t0;
    hi += t1;
  }
  XBM_INLINE double sum() const {
    double l = 0;
    for (int t = 0; t < L / 2; ++t) l += lo[t];
    for (int t = 0; t < L / 2; ++t) l += hi[t];
    return l;
  }
};

// Whether any lane of a mask is set.
template <int L>
XBM_INLINE bool any_lane(typename Vec<L>::I m) {
  return Vec<L>::bits(m) != 0;
}

// Every lane holding *a: one broadcast (V::splat's 0 + a costs an add first, as 0 + -0 is +0;
// its bits or'ed into zeros are a plain broadcast, and the same value).
template <int L>
XBM_INLINE typename Vec<L>::F bcast(const float* a) {
  int32_t b;
  std::memcpy(&b, a, sizeof(b));
  return reinterpret_cast<typename Vec<L>::F>(typename Vec<L>::I{} | b);
}

// a where m is set, else b (int lanes).
template <int L>
XBM_INLINE typename Vec<L>::I select_int(typename Vec<L>::I m, typename Vec<L>::I a, typename Vec<L>::I b) {
  return (m & a) | (~m & b);
}

// The sorted positives sp[0..np), np <= 2 L, as two vectors (t0: the first L, t1: the rest),
// looked up lane by lane at indices taken modulo L (np <= L) or 2 L (__builtin_shuffle's
// rule): in [0, np) the positives, elsewhere some value the caller does not use.
template <int L>
struct PositiveTable {
  typename Vec<L>::F t0, t1;
  bool two;
  // From 2 L values laid out as fill's.
  XBM_INLINE void set(const float* buf, bool two_) {
    two = two_;
    t0 = Vec<L>::load(buf);
    t1 = Vec<L>::load(buf + L);
  }
  XBM_INLINE void fill(const float* sp, int64_t np) {
    two = np > L;
    float buf[2 * L];
    for (int t = 0; t < 2 * L; ++t) buf[t] = sp[std::min<int64_t>(t, np - 1)];
    t0 = Vec<L>::load(buf);
    t1 = Vec<L>::load(buf + L);
  }
  XBM_INLINE typename Vec<L>::F at(typename Vec<L>::I idx) const {
#if defined(__clang__)
    typename Vec<L>::F v;
    for (int t = 0; t < L; ++t) {
      const int i = idx[t] & (two ? 2 * L - 1 : L - 1);
      v[t] = i < L ? t0[i] : t1[i - L];
    }
    return v;
#else
    return two ? __builtin_shuffle(t0, t1, idx) : __builtin_shuffle(t0, idx);
#endif
  }
};

// One block's coefficients over the sorted positives sp[0..np): per lane the number of positives
// with lo < u <= hi and margin - u > 0, u = fl(sp - s) (each positive's lanes counted into
// cnt[p L ..]); the lo (hi) test left out where every lane passes it at the smallest (largest)
// positive, u being monotone in sp.
template <int L, bool CheckLo, bool CheckHi>
XBM_INLINE typename Vec<L>::I triplet_block_counts(typename Vec<L>::F s, const float* sp, int64_t np, float lo,
                                                   float hi, float margin, int32_t* cnt) {
  using V = Vec<L>;
  typename V::I k = typename V::I{};
  const typename V::F zero = V::splat(0.f), vm = V::splat(margin);
  for (int64_t p = 0; p < np; ++p) {
    const typename V::F u = bcast<L>(sp + p) - s;
    typename V::I m = V::gt(vm - u, zero);
    if (CheckLo) m &= V::gt(u, lo);
    if (CheckHi) m &= V::keep(u <= hi);
    const typename V::I c = V::load(cnt + p * L) - m;
    std::memcpy(cnt + p * L, &c, sizeof(c));
    k -= m;
  }
  return k;
}

// triplet_block_counts without the lo and hi tests (they hold for every lane at every positive),
// its masks applied as masked adds. Lt: margin - u > 0 evaluated as u < margin, the same answer
// for a margin of at least 2^-100 (fl(margin - u) is then 0 only where u = margin, never a
// flushed subnormal: a non-zero difference of two floats of such a size is at least 2^-124).
template <int L, bool Lt, bool Undo = false>
XBM_INLINE typename Vec<L>::I triplet_block_counts_margin(typename Vec<L>::F s, const float* sp, int64_t np,
                                                          typename Vec<L>::F vm, int32_t* cnt) {
  using V = Vec<L>;
  using I = typename V::I;
  I k = I{};
  const typename V::F zero = V::splat(0.f);
  const I one = I{} + (Undo ? -1 : 1);
#pragma GCC unroll 2
  for (int64_t p = 0; p < np; ++p) {
    const typename V::F u = bcast<L>(sp + p) - s;
    const I m = Lt ? (u < vm) : (vm - u > zero);
    I c = V::load(cnt + p * L);
    c = m ? c + one : c;
    std::memcpy(cnt + p * L, &c, sizeof(c));
    k = m ? k + one : k;
  }
  return k;
}

// Whether some positive lies within [fl(fl(s + t) - tol), fl(fl(s + t) + tol)] for one of the NB
// active bounds t (negative_s's test: the first positive not below the low end is at most the
// high end), tol = 1e-5 (1 + |s|), lane by lane.
template <int L, int NB>
XBM_INLINE typename Vec<L>::I triplet_block_near(typename Vec<L>::F s, const float* sp, int64_t np,
                                                 const float* bounds) {
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  I near = I{};
  if constexpr (NB > 0) {
    const F abs_s = reinterpret_cast<F>(reinterpret_cast<I>(s) & 0x7fffffff);
    const F tol = V::splat(1e-5f) * (V::splat(1.f) + abs_s);
    F lo[NB], hi[NB];
    for (int t = 0; t < NB; ++t) {
      const F c = s + bounds[t];
      lo[t] = c - tol;
      hi[t] = c + tol;
    }
    for (int64_t p = 0; p < np; ++p) {
      const F v = bcast<L>(sp + p);
      for (int t = 0; t < NB; ++t) near |= ~V::lt(v, lo[t]) & V::keep(v <= hi[t]);
    }
  }
  return near;
}

// triplet_block_near's answer for one bound t from two positives per lane, given c: for each
// lane an index in [0, np] (the count of positives below t's flip point, which puts the near
// positives, if any, at c - 1 or c). With A(v) = !(v < fl(fl(s + t) - tol)) (false, then true as
// v grows) and B(v) = v <= fl(fl(s + t) + tol) (true, then false), a positive is near when A and
// B hold for it: the near positives are an index range [n1, n2). Where B holds at c - 1 (or
// c = 0) and A at c (or c = np), n1 <= c <= n2, and the range is non-empty exactly when it holds
// c - 1 or c. ok is false when some lane does not meet that premise (the caller then runs
// triplet_block_near): the answer never rests on c being the count.
template <int L>
XBM_INLINE typename Vec<L>::I triplet_near_at(typename Vec<L>::F s, typename Vec<L>::I c, const PositiveTable<L>& tab,
                                              int32_t np, float t, bool& ok) {
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  const F abs_s = reinterpret_cast<F>(reinterpret_cast<I>(s) & 0x7fffffff);
  const F tol = V::splat(1e-5f) * (V::splat(1.f) + abs_s);
  const F ct = s + t;
  const F lo = ct - tol, hi = ct + tol;
  const I zero = I{}, vnp = zero + np;
  const I has_low = V::gt(c, zero), has_high = V::lt(c, vnp);
  const F vl = tab.at(c - 1), vh = tab.at(c);  // (used where has_low, has_high)
  const I al = ~V::lt(vl, lo), bl = V::keep(vl <= hi), ah = ~V::lt(vh, lo), bh = V::keep(vh <= hi);
  ok = V::bits(~((~has_low | bl) & (~has_high | ah))) == 0;
  return (has_low & al & bl) | (has_high & ah & bh);
}

// One block by the general rule: the near lanes (triplet_block_near, NB of the bounds) written
// into near and left out (coefficient 0), then the others counted with the lo and hi tests
// where some lane needs them. s: other-label lanes their score, the others -inf or NaN.
template <int L>
XBM_INLINE typename Vec<L>::I triplet_block_general(typename Vec<L>::F s, const float* sp, int64_t np, float lo,
                                                    float hi, float margin, const float* bounds, int nb, int32_t* cnt,
                                                    typename Vec<L>::I& near) {
  using V = Vec<L>;
  const typename V::F ninf = V::splat(-std::numeric_limits<float>::infinity());
  switch (nb) {
    case 0: near = typename V::I{}; break;
    case 1: near = triplet_block_near<L, 1>(s, sp, np, bounds); break;
    case 2: near = triplet_block_near<L, 2>(s, sp, np, bounds); break;
    default: near = triplet_block_near<L, 3>(s, sp, np, bounds); break;
  }
  s = V::select(near, ninf, s);
  const bool check_lo = any_lane<L>(~V::gt(bcast<L>(sp) - s, lo));
  const bool check_hi = any_lane<L>(V::ne(s, ninf) & ~V::keep(bcast<L>(sp + np - 1) - s <= hi));
  if (check_lo)
    return check_hi ? triplet_block_counts<L, true, true>(s, sp, np, lo, hi, margin, cnt)
                    : triplet_block_counts<L, true, false>(s, sp, np, lo, hi, margin, cnt);
  return check_hi ? triplet_block_counts<L, false, true>(s, sp, np, lo, hi, margin, cnt)
                  : triplet_block_counts<L, false, false>(s, sp, np, lo, hi, margin, cnt);
}

// The same out of line (for the margin-only rows' rare blocks that need the lo and hi tests):
// the block of scores sn and labels zj, its k and near lanes written to k_out and near_out.
template <int L>
XBM_INLINE void triplet_block_out_lanes(const float* sn, const int32_t* zj, int32_t yi, const float* sp, int64_t np,
                                        float lo, float hi, float margin, const float* bounds, int nb, int32_t* cnt,
                                        int32_t* k_out, int32_t* near_out) {
  using V = Vec<L>;
  const typename V::F s =
      V::select(V::ne(V::load(zj), yi), V::load(sn), V::splat(-std::numeric_limits<float>::infinity()));
  typename V::I near;
  const typename V::I k = triplet_block_general<L>(s, sp, np, lo, hi, margin, bounds, nb, cnt, near);
  std::memcpy(k_out, &k, sizeof(k));
  std::memcpy(near_out, &near, sizeof(near));
}
XBM_CPU_DISPATCH(void, triplet_block_out,
                 (const float* sn, const int32_t* zj, int32_t yi, const float* sp, int64_t np, float lo, float hi,
                  float margin, const float* bounds, int nb, int32_t* cnt, int32_t* k_out, int32_t* near_out),
                 (sn, zj, yi, sp, np, lo, hi, margin, bounds, nb, cnt, k_out, near_out))

// The sum of a vector's int32 lanes (exact: each lane a count of at most the row's blocks):
// halves added lane by lane down to 4, then those 4.
template <int L>
XBM_INLINE int64_t lane_sum(typename Vec<L>::I v) {
  if constexpr (L > 4) {
    typename Vec<L / 2>::I a, b;
    std::memcpy(&a, &v, sizeof(a));
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
    return lane_sum<L / 2>(a + b);
  } else {
    return static_cast<int64_t>(v[0]) + v[1] + v[2] + v[3];
  }
}

// One block's coefficients k (L negatives, scores s) written over the row at out and added to
// the row's lanes: the coefficients kacc, the nonzero lanes nz, the loss k (s + margin) in dl.
template <int L>
XBM_INLINE void triplet_block_finish(float* out, typename Vec<L>::I k, typename Vec<L>::F s, double dmargin,
                                     LossLanes<L>& dl, typename Vec<L>::I& kacc, typename Vec<L>::I& nz) {
  using V = Vec<L>;
  const typename V::I act = V::gt(k, typename V::I{});
  V::store(out, __builtin_convertvector(k, typename V::F));
  kacc += k;
  nz -= act;
  dl.add(k, V::select(act, s, V::splat(0.f)), dmargin);
}

// A row's totals: the loss lanes dl, the coefficients kacc and nonzero lanes nz summed into
// loss, active and nonzero, each positive's lanes of cnt into counts[p].
template <int L>
XBM_INLINE void triplet_row_totals(const LossLanes<L>& dl, typename Vec<L>::I kacc, typename Vec<L>::I nz,
                                   const int32_t* cnt, int64_t np, int64_t* counts, double& loss, int64_t& active,
                                   int64_t& nonzero) {
  int64_t a = 0, n = 0;
  for (int t = 0; t < L; ++t) {
    a += kacc[t];
    n += nz[t];
  }
  loss += dl.sum();
  active += a;
  nonzero += n;
  for (int64_t p = 0; p < np; ++p) counts[p] += lane_sum<L>(Vec<L>::load(cnt + p * L));
}

// Where a block's near lanes go: their columns and scores listed for the scalar path.
template <int L>
XBM_INLINE void list_near(typename Vec<L>::I near, typename Vec<L>::F sn, int64_t j, int64_t* near_cols,
                          float* near_s, int64_t& n_near) {
  for (uint32_t b = Vec<L>::bits(near); b != 0; b &= b - 1) {
    const int t = __builtin_ctz(b);
    near_cols[n_near] = j + t;
    near_s[n_near++] = sn[t];
  }
}

// Whether the lo and hi tests hold for every lane of a block at every positive: every score sn in
// [t_hi, t_lo] (range_limits, where thresholds: |lo|, |hi| > 2.5), or else checked at the first
// (lo) and last (hi) positive v0, vmax on s (the other-label lanes' scores, the others -inf).
template <int L>
XBM_INLINE bool lo_hi_hold(bool thresholds, typename Vec<L>::F sn, typename Vec<L>::F s, typename Vec<L>::F t_lo,
                           typename Vec<L>::F t_hi, typename Vec<L>::F v0, typename Vec<L>::F vmax, float lo,
                           float hi) {
  using V = Vec<L>;
  const typename V::F ninf = V::splat(-std::numeric_limits<float>::infinity());
  return (thresholds && !any_lane<L>(~(V::keep(sn <= t_lo) & V::keep(sn >= t_hi)))) ||
         !any_lane<L>(~V::gt(v0 - s, lo) | (V::ne(s, ninf) & ~V::keep(vmax - s <= hi)));
}

// triplet_row_vec's rows whose one bound is the margin (|lo|, |hi| > 2.5 or otherwise not
// bounds), np <= 2 L: a block's counts first (the margin's test only, where the lo and hi tests
// hold for every lane at every positive), its near lanes then found at each lane's count
// (triplet_near_at) and their counts taken back out. Blocks that need the lo or hi test take
// triplet_block_out. Lt: see triplet_block_counts_margin.
template <int L, bool Lt>
XBM_INLINE int64_t triplet_row_margin(float* row, int64_t w, const int32_t* z, int32_t yi, const float* sp,
                                      int64_t np, float lo, float hi, float margin, const float* bounds, int32_t* cnt,
                                      int64_t* counts, int64_t* near_cols, float* near_s, double& loss,
                                      int64_t& active, int64_t& nonzero) {
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  std::fill(cnt, cnt + np * L, 0);
  const F ninf = V::splat(-std::numeric_limits<float>::infinity());
  const F v0 = V::splat(sp[0]), vmax = V::splat(sp[np - 1]);
  const double dmargin = margin;
  LossLanes<L> dl;
  I kacc = I{}, nz = I{};
  int64_t n_near = 0;
  const F vm = V::splat(margin);
  PositiveTable<L> tab;
  tab.fill(sp, np);
  // Where lo and hi are far from 0 (|lo|, |hi| > 2.5: no subnormal results near them), a lane
  // with t_hi <= sn <= t_lo passes the lo test at sp[0] and the hi test at sp[np - 1]: with
  // t_lo <= sp[0] - next(lo) and t_hi >= sp[np - 1] - hi, fl(sp[0] - sn) >= next(lo) > lo and
  // fl(sp[np - 1] - sn) <= hi, rounding being monotone. (A same-label lane, -inf below, passes
  // both tests anyway.) The differences in double, moved inwards by 1e-6 of |sp| + |lo| (or
  // |hi|), more than next(lo) - lo and the rounding to float together (each at most 2^-23 of
  // it). Blocks that fail this take the tests themselves.
  const bool thresholds = std::abs(lo) > 2.5f && std::abs(hi) > 2.5f;
  const auto [f_hi, f_lo] = range_limits(sp[0], sp[np - 1], lo, hi);
  const F t_lo = V::splat(f_lo), t_hi = V::splat(f_hi);
  for (int64_t j = 0; j + L <= w; j += L) {
    const F sn = V::load(row + j);
    // other-label lanes: sn; same-label lanes: -inf, which no positive makes active or near
    const F s = V::select(V::ne(V::load(z + j), yi), sn, ninf);
    I k, near;
    if (__builtin_expect(lo_hi_hold<L>(thresholds, sn, s, t_lo, t_hi, v0, vmax, lo, hi), 1)) {
      k = triplet_block_counts_margin<L, Lt>(s, sp, np, vm, cnt);
      bool ok;
      near = triplet_near_at<L>(s, k, tab, static_cast<int32_t>(np), bounds[0], ok);
      if (__builtin_expect(!ok, 0)) near = triplet_block_near<L, 1>(s, sp, np, bounds);
      if (__builtin_expect(any_lane<L>(near), 0)) {  // their counts taken back out
        triplet_block_counts_margin<L, false, true>(V::select(near, s, ninf), sp, np, vm, cnt);
        k = select_int<L>(near, I{}, k);
      }
    } else {
      int32_t kb[L], nbuf[L];
      triplet_block_out(row + j, z + j, yi, sp, np, lo, hi, margin, bounds, 1, cnt, kb, nbuf);
      k = V::load(kb);
      near = V::load(nbuf);
    }
    if (__builtin_expect(any_lane<L>(near), 0)) list_near<L>(near, sn, j, near_cols, near_s, n_near);
    // (k > 0 never in a near lane, nor in one whose s is not finite)
    triplet_block_finish<L>(row + j, k, s, dmargin, dl, kacc, nz);
  }
  triplet_row_totals<L>(dl, kacc, nz, cnt, np, counts, loss, active, nonzero);
  return n_near;
}

// triplet_row_margin with the positives' thresholds (Positives::sig) and NP >= np lanes of counts
// kept in registers: a lane's coefficient k is the number of positives whose threshold its score
// reaches (one comparison and two masked adds per positive, the thresholds ascending; NP - np
// padding thresholds are NaN, which no score reaches), so k > 0 exactly where the first is
// reached. The near test (negative_s's, at the margin) runs only on blocks where some lane lies
// within a width w_k = 4e-5 (1 + |sig_k| + |sp_k| + |margin|) of sig_{k-1} above or sig_k below
// its k: a near positive q puts sn within 1e-5 (1 + |sn|) plus a few roundings of sig_q, and the
// thresholds are ascending, so some such lane is at k - 1 or k. There triplet_near_at decides,
// as in triplet_row_margin, and the near lanes' counts are taken back out. Blocks that need the lo
// or hi test take triplet_block_out (counts in cnt, zeroed at their first use).
template <int L, int NP>
XBM_INLINE int64_t triplet_row_sig(float* row, int64_t w, const int32_t* z, int32_t yi, const float* sp,
                                   const float* tables, int64_t np, float lo, float hi, float margin,
                                   const float* bounds, int32_t* cnt, int64_t* counts, int64_t* near_cols,
                                   float* near_s, double& loss, int64_t& active, int64_t& nonzero) {
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  static_assert(NP + 1 <= 2 * L && NP <= kSigWidth, "the near tables hold np + 1 entries in two vectors");
  const F ninf = V::splat(-std::numeric_limits<float>::infinity());
  const F v0 = V::splat(sp[0]), vmax = V::splat(sp[np - 1]);
  const float* th = tables;
  PositiveTable<L> tab, ta, tb;
  tab.set(tables + kSigWidth, np > L);
  ta.set(tables + 2 * kSigWidth, np + 1 > L);
  tb.set(tables + 3 * kSigWidth, np + 1 > L);
  const double dmargin = margin;
  LossLanes<L> dl;
  I c[NP];  // (indexed by constants only, every loop over it unrolled: registers)
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p) c[p] = I{};
  const I one = I{} + 1;
  bool cnt_used = false;
  int64_t nz_out = 0, n_near = 0;
  // (the lo and hi tests as in triplet_row_margin)
  const bool thresholds = std::abs(lo) > 2.5f && std::abs(hi) > 2.5f;
  const auto [f_hi, f_lo] = range_limits(sp[0], sp[np - 1], lo, hi);
  const F t_lo = V::splat(f_lo), t_hi = V::splat(f_hi);
  for (int64_t j = 0; j + L <= w; j += L) {
    const F sn = V::load(row + j);
    // other-label lanes: sn; same-label lanes: -inf, which no threshold is (sig > -inf)
    const F s = V::select(V::ne(V::load(z + j), yi), sn, ninf);
    I k = I{}, near = I{};
    if (__builtin_expect(lo_hi_hold<L>(thresholds, sn, s, t_lo, t_hi, v0, vmax, lo, hi), 1)) {
#pragma GCC unroll 32
      for (int p = 0; p < NP; ++p) {
        const I m = s >= bcast<L>(th + p);
        k = m ? k + one : k;
        c[p] = m ? c[p] + one : c[p];
      }
      if (__builtin_expect(any_lane<L>(V::lt(s, ta.at(k)) | ~V::lt(s, tb.at(k))), 0)) {
        bool ok;
        near = triplet_near_at<L>(s, k, tab, static_cast<int32_t>(np), bounds[0], ok);
        if (!ok) near = triplet_block_near<L, 1>(s, sp, np, bounds);
        if (any_lane<L>(near)) {  // their counts taken back out
#pragma GCC unroll 32
          for (int p = 0; p < NP; ++p) {
            const I m = near & V::keep(s >= bcast<L>(th + p));
            c[p] = m ? c[p] - one : c[p];
          }
          k = select_int<L>(near, I{}, k);
        }
      }
    } else {
      if (!cnt_used) std::fill(cnt, cnt + np * L, 0);
      cnt_used = true;
      int32_t kb[L], nbuf[L];
      triplet_block_out(row + j, z + j, yi, sp, np, lo, hi, margin, bounds, 1, cnt, kb, nbuf);
      k = V::load(kb);
      near = V::load(nbuf);
      nz_out += __builtin_popcount(V::bits(V::gt(k, I{})));
    }
    if (__builtin_expect(any_lane<L>(near), 0)) list_near<L>(near, sn, j, near_cols, near_s, n_near);
    // (k > 0 never in a near lane, nor in one whose s is not finite)
    const I act = V::gt(k, I{});
    V::store(row + j, __builtin_convertvector(k, F));
    dl.add(k, V::select(act, s, V::splat(0.f)), dmargin);
  }
  loss += dl.sum();
  int64_t a = 0;
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p) {
    if (p >= np) break;
    int64_t cp = lane_sum<L>(c[p]);
    if (cnt_used) cp += lane_sum<L>(V::load(cnt + p * L));
    counts[p] += cp;
    a += cp;
  }
  active += a;
  nonzero += lane_sum<L>(c[0]) + nz_out;
  return n_near;
}

#if defined(__x86_64__) || defined(__i386__)
// A lane mask's counts taken back: undo[p L + t] += 1 for each lane t of m with k_t > p, p < np
// (a lane of count k counted positives 0..k-1).
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) XBM_INLINE void triplet_undo16(
    __mmask16 m, __m512i k, int64_t np, int32_t* undo) {
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t p = 0; p < np; ++p) {
    const __mmask16 mp = _mm512_mask_cmpgt_epi32_mask(m, k, _mm512_set1_epi32(static_cast<int32_t>(p)));
    const __m512i u = _mm512_loadu_si512(undo + p * 16);
    _mm512_storeu_si512(undo + p * 16, _mm512_mask_add_epi32(u, mp, u, one));
  }
}

// triplet_row_sig at 16 lanes in AVX-512 intrinsics (the 16-lane build only): the same decisions.
// Every block is counted (each positive one comparison against its broadcast threshold and two
// masked adds, into registers that nothing else writes), the near tables looked up by one
// two-register permute each (entries past np + 1 repeat the last); the rare blocks (a near
// candidate, or a lane outside the range where the lo and hi tests hold) then take their counts
// back in undo and decide as triplet_row_sig does. The loss lanes sum k sn in double (exact
// products, one rounding per add, as a multiply then an add); margin times the active triplets
// is added at the end.
template <int L, int NP>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) XBM_INLINE int64_t triplet_row_sig16(
    float* row, int64_t w, const int32_t* z, int32_t yi, const float* sp, const float* tables, int64_t np, float lo,
    float hi, float margin, const float* bounds, int32_t* cnt, int32_t* acc, int64_t* counts, int64_t* near_cols,
    float* near_s, double& loss, int64_t& active, int64_t& nonzero) {
  static_assert(L == 16, "AVX-512");
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  static_assert(NP + 1 <= 2 * L && NP <= kSigPositives, "the near tables hold np + 1 entries in two vectors");
  const float* th = tables;
  const __m512 ta0 = _mm512_loadu_ps(tables + 2 * kSigWidth), ta1 = _mm512_loadu_ps(tables + 2 * kSigWidth + L);
  const __m512 tb0 = _mm512_loadu_ps(tables + 3 * kSigWidth), tb1 = _mm512_loadu_ps(tables + 3 * kSigWidth + L);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i vyi = _mm512_set1_epi32(yi), one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
  __m512i c[NP];  // (indexed by constants only, every loop over it unrolled: registers)
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p) c[p] = acc != nullptr ? _mm512_load_si512(acc + p * L) : zero;
  const __m512i c0_start = c[0];
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  int32_t* undo = cnt + kSigPositives * L;  // (cnt: triplet_block_out's counts)
  bool rare = false;
  int64_t nz_out = 0, n_near = 0;
  // (the lo and hi tests hold for every lane in [t_hi, t_lo]: range_limits; this path runs for
  // rows whose lo and hi are both beyond +-2.5, and a block with a lane outside has a candidate)
  const auto [f_hi, f_lo] = range_limits(sp[0], sp[np - 1], lo, hi);
  const __m512 t_lo = _mm512_set1_ps(f_lo), t_hi = _mm512_set1_ps(f_hi);
  for (int64_t j = 0; j + L <= w; j += L) {
    const __m512 sn = _mm512_loadu_ps(row + j);
    // other-label lanes: sn; same-label lanes: -inf, which no threshold is (sig > -inf)
    const __mmask16 other = _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(z + j), vyi);
    const __m512 s = _mm512_mask_blend_ps(other, ninf, sn);
    __m512i k = zero;
#pragma GCC unroll 32
    for (int p = 0; p < NP; ++p) {
      // m = s >= th[p] (_CMP_GE_OQ, the threshold broadcast from memory); k and c[p] + 1 in m's
      // lanes, in place (an asm: GCC copies k between registers for each masked add otherwise)
      __mmask16 m;
      asm("vcmpps $0x1d, %[t]%{1to16%}, %[s], %[m]\n\t"
          "vpaddd %[one], %[k], %[k]%{%[m]%}\n\t"
          "vpaddd %[one], %[c], %[c]%{%[m]%}"
          : [k] "+v"(k), [c] "+v"(c[p]), [m] "=&Yk"(m)
          : [s] "v"(s), [t] "m"(th[p]), [one] "v"(one));
    }
    // candidates: near a threshold, or (the tables' ends) outside [t_hi, t_lo]
    const __mmask16 cand = _mm512_cmp_ps_mask(s, _mm512_permutex2var_ps(ta0, k, ta1), _CMP_LT_OQ) |
                           _mm512_cmp_ps_mask(s, _mm512_permutex2var_ps(tb0, k, tb1), _CMP_NLT_UQ);
    if (__builtin_expect(cand != 0, 0)) {
      const __mmask16 in_range =
          _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(sn, t_lo, _CMP_LE_OQ), sn, t_hi, _CMP_GE_OQ);
      if (!rare) {
        std::fill(cnt, cnt + np * L, 0);
        std::fill(undo, undo + np * L, 0);
        rare = true;
      }
      const F sv = reinterpret_cast<F>(s);
      const F v0 = V::splat(sp[0]), vmax = V::splat(sp[np - 1]);
      __mmask16 near = 0;
      if (in_range != 0xffff &&
          any_lane<L>(~V::gt(v0 - sv, lo) | (V::ne(sv, reinterpret_cast<F>(ninf)) & ~V::keep(vmax - sv <= hi)))) {
        // a lane needs the lo or hi test: the block by the general rule, its counts in cnt
        triplet_undo16(0xffff, k, np, undo);
        int32_t kb[L], nbuf[L];
        triplet_block_out(row + j, z + j, yi, sp, np, lo, hi, margin, bounds, 1, cnt, kb, nbuf);
        k = _mm512_loadu_si512(kb);
        near = static_cast<__mmask16>(V::bits(V::load(nbuf)));
        nz_out += __builtin_popcount(_mm512_test_epi32_mask(k, k));
      } else {
        PositiveTable<L> tab;
        tab.set(tables + kSigWidth, np > L);
        bool ok;
        I nv = triplet_near_at<L>(sv, reinterpret_cast<I>(k), tab, static_cast<int32_t>(np), bounds[0], ok);
        if (!ok) nv = triplet_block_near<L, 1>(sv, sp, np, bounds);
        near = static_cast<__mmask16>(V::bits(nv));
        if (near != 0) {  // their counts taken back out
          triplet_undo16(near, k, np, undo);
          k = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~near), k);
        }
      }
      if (near != 0)
        list_near<L>(reinterpret_cast<I>(_mm512_movm_epi32(near)), reinterpret_cast<F>(sn), j, near_cols, near_s,
                     n_near);
    }
    // (k > 0 never in a near lane, nor in one whose s is not finite)
    _mm512_storeu_ps(row + j, _mm512_cvtepi32_ps(k));
    const __m512 sa = _mm512_maskz_mov_ps(_mm512_test_epi32_mask(k, k), s);
    acc0 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(k)), _mm512_cvtps_pd(_mm512_castps512_ps256(sa)),
                           acc0);
    acc1 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(k, 1)),
                           _mm512_cvtps_pd(_mm512_extractf32x8_ps(sa, 1)), acc1);
  }
  // nonzero coefficients: the counted lanes past the first threshold less those taken back, and the
  // general rule's
  int64_t nz = _mm512_reduce_add_epi32(_mm512_sub_epi32(c[0], c0_start)) + nz_out;
  if (rare) {  // the general rule's counts in, the taken-back ones out
    nz -= lane_sum<L>(V::load(undo));
#pragma GCC unroll 32
    for (int p = 0; p < NP; ++p)
      if (p < np)
        c[p] = _mm512_sub_epi32(_mm512_add_epi32(c[p], _mm512_loadu_si512(cnt + p * L)),
                                _mm512_loadu_si512(undo + p * L));
  }
  nonzero += nz;
  const double sum_ks = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
  if (acc != nullptr) {  // the lanes kept for the caller (triplet_pass adds them up once per anchor)
#pragma GCC unroll 32
    for (int p = 0; p < NP; ++p) _mm512_store_si512(acc + p * L, c[p]);
    loss += sum_ks;
    return n_near;
  }
  int64_t a = 0;
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p) {
    if (p >= np) break;
    const int64_t cp = _mm512_reduce_add_epi32(c[p]);
    counts[p] += cp;
    a += cp;
  }
  // sum k (sn + margin) over the row's blocks (the general rule's blocks' k counted in a too)
  loss += sum_ks + static_cast<double>(margin) * static_cast<double>(a);
  active += a;
  return n_near;
}

// triplet_row_sig16 at the NP for np <= 16 (an out-of-line AVX-512 function: the vector-extension
// templates that call it are compiled for no particular target).
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) int64_t triplet_row_sig_x16(
    float* row, int64_t w, const int32_t* z, int32_t yi, const float* sp, const float* tables, int64_t np, float lo,
    float hi, float margin, const float* bounds, int32_t* cnt, int32_t* acc, int64_t* counts, int64_t* near_cols,
    float* near_s, double& loss, int64_t& active, int64_t& nonzero) {
#define XBM_TRIPLET_ROW_SIG16(NP)                                                                                     \
  if (np <= NP)                                                                                                      \
    return triplet_row_sig16<16, NP>(row, w, z, yi, sp, tables, np, lo, hi, margin, bounds, cnt, acc, counts, near_cols, \
                                     near_s, loss, active, nonzero);
  XBM_TRIPLET_ROW_SIG16(2)
  XBM_TRIPLET_ROW_SIG16(4)
  XBM_TRIPLET_ROW_SIG16(6)
  XBM_TRIPLET_ROW_SIG16(8)
  XBM_TRIPLET_ROW_SIG16(10)
  XBM_TRIPLET_ROW_SIG16(12)
  XBM_TRIPLET_ROW_SIG16(14)
#undef XBM_TRIPLET_ROW_SIG16
  return triplet_row_sig16<16, 16>(row, w, z, yi, sp, tables, np, lo, hi, margin, bounds, cnt, acc, counts, near_cols,
                                   near_s, loss, active, nonzero);
}
#endif

// The columns [0, w - w mod L) of a row (its own column, if there, a NaN),
// 1 <= np <= kVecMaxPositives: the coefficients k written over the scores, the loss
// sum k (S_in + margin) added to loss (in double), the active triplets and nonzero
// coefficients counted, each positive's count added to counts[p]. The negatives near a bound
// are left out (coefficient 0), their columns listed in near_cols and their scores in near_s;
// returns their number. A NaN score is no negative's (no triplet, never near).
template <int L>
XBM_INLINE int64_t triplet_row_vec_lanes(float* row, int64_t w, const int32_t* z, int32_t yi, const float* sp,
                                         const float* tables, int64_t np, float lo, float hi, float margin,
                                         const float* bounds, int nb, int32_t* cnt, int64_t* counts,
                                         int64_t* near_cols, float* near_s, double& loss, int64_t& active,
                                         int64_t& nonzero) {
  if (nb == 1 && tables != nullptr && np + 1 <= 2 * L) {
#define XBM_TRIPLET_ROW_SIG(NP)                                                                              \
  if constexpr (NP + 1 <= 2 * L)                                                                            \
    if (np <= NP)                                                                                           \
      return triplet_row_sig<L, NP>(row, w, z, yi, sp, tables, np, lo, hi, margin, bounds, cnt, counts, near_cols, \
                                    near_s, loss, active, nonzero);
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (L == 16)
      if (np <= 16)
        return triplet_row_sig_x16(row, w, z, yi, sp, tables, np, lo, hi, margin, bounds, cnt, nullptr, counts, near_cols,
                                   near_s, loss, active, nonzero);
#endif
    XBM_TRIPLET_ROW_SIG(4)
    XBM_TRIPLET_ROW_SIG(8)
    XBM_TRIPLET_ROW_SIG(12)
    XBM_TRIPLET_ROW_SIG(16)
#undef XBM_TRIPLET_ROW_SIG
  }
  if (nb == 1 && np <= 2 * L)
    return margin >= 0x1p-100f ? triplet_row_margin<L, true>(row, w, z, yi, sp, np, lo, hi, margin, bounds, cnt, counts,
                                                             near_cols, near_s, loss, active, nonzero)
                               : triplet_row_margin<L, false>(row, w, z, yi, sp, np, lo, hi, margin, bounds, cnt,
                                                              counts, near_cols, near_s, loss, active, nonzero);
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  std::fill(cnt, cnt + np * L, 0);
  const F ninf = V::splat(-std::numeric_limits<float>::infinity());
  const double dmargin = margin;
  LossLanes<L> dl;
  I kacc = I{}, nz = I{};
  int64_t n_near = 0;
  for (int64_t j = 0; j + L <= w; j += L) {
    const F sn = V::load(row + j);
    // other-label lanes: sn; same-label lanes: -inf, which no positive makes active or near
    const F s = V::select(V::ne(V::load(z + j), yi), sn, ninf);
    I near;
    const I k = triplet_block_general<L>(s, sp, np, lo, hi, margin, bounds, nb, cnt, near);
    if (any_lane<L>(near)) list_near<L>(near, sn, j, near_cols, near_s, n_near);  // rare
    triplet_block_finish<L>(row + j, k, s, dmargin, dl, kacc, nz);
  }
  triplet_row_totals<L>(dl, kacc, nz, cnt, np, counts, loss, active, nonzero);
  return n_near;
}
XBM_CPU_DISPATCH(int64_t, triplet_row_vec,
                 (float* row, int64_t w, const int32_t* z, int32_t yi, const float* sp, const float* tables, int64_t np,
                  float lo, float hi, float margin, const float* bounds, int nb, int32_t* cnt, int64_t* counts,
                  int64_t* near_cols, float* near_s, double& loss, int64_t& active, int64_t& nonzero),
                 (row, w, z, yi, sp, tables, np, lo, hi, margin, bounds, nb, cnt, counts, near_cols, near_s, loss, active,
                  nonzero))
#endif

// Where a row's decisions go: the loss (double), the active triplets and nonzero coefficients,
// and with diff (the split's difference array at anchor i's entries, start[i] + i) the
// positives' counts; the coefficients k are written over the row's scores.
struct RowSink {
  double loss = 0;
  int64_t active = 0, nonzero = 0;
  int64_t* diff = nullptr;
};

// One negative's coefficient by the scalar definition (negative_s, then negative_range).
inline float decide_scalar(const cpu::LossInputs& in, const Positives& pos, const TripletParams& prm, int64_t i,
                           int64_t col, float sn_tile, RowSink& out, const float* dot = nullptr) {
  const int64_t s0 = pos.start[i];
  const float sn = negative_s(in, pos, prm, i, col, sn_tile, dot);
  const auto [a, b] = negative_range(pos, prm, i, sn);
  if (b <= a) return 0.f;
  const int64_t k = b - a;
  double sum_sp = 0;
  if (pos.wide[i]) {
    for (int64_t q = a; q < b; ++q) sum_sp += static_cast<double>(pos.s[s0 + q]);
  } else {
    sum_sp = pos.prefix[s0 + i + b] - pos.prefix[s0 + i + a];
  }
  out.loss += static_cast<double>(k) * (static_cast<double>(sn) + prm.margin) - sum_sp;
  out.active += k;
  if (out.diff) {
    out.diff[a] += 1;
    out.diff[b] -= 1;
  }
  ++out.nonzero;
  return static_cast<float>(k);
}

// Whether anchor i's rows take triplet_row_sig16 with its lanes kept in an accumulator (sig_acc):
// AVX-512, at most kSigPositives finite positives, the margin the one bound.
inline bool sig_acc_row(const Positives& pos, const TripletParams& prm, int64_t i) {
#if XBM_CPU_VECTOR && (defined(__x86_64__) || defined(__i386__))
  const int64_t np = pos.start[i + 1] - pos.start[i];
  return cpu::simd_lanes() == 16 && pos.sig_ok[i] && np >= 1 && np <= kSigPositives && std::abs(prm.lo) > 2.5f &&
         std::abs(prm.hi) > 2.5f && !(std::abs(prm.margin) > 2.5f);
#else
  (void)pos, (void)prm, (void)i;
  return false;
#endif
}

// Row i of a (B x w) score tile from column c0, replaced by its coefficients dl/dS_in (0 on
// columns that are not negatives). With acc (anchor i's kSigPositives x 16 lanes, sig_acc_row), the
// positives' counts of the vector columns are added to acc's lanes instead of out's diff, and
// out.loss gets only their sum k S_in (triplet_pass adds the rest once per anchor).
inline void decide_row(const cpu::LossInputs& in, const Positives& pos, const TripletParams& prm, int64_t i,
                       int64_t c0, int64_t w, float* row, const int32_t* z, int32_t yi, RowSink& out,
                       int32_t* acc = nullptr) {
  const int64_t self_col = in.self_col(i) - c0, s0 = pos.start[i], np = pos.start[i + 1] - s0;
  if (np == 0) {  // no positive: no triplet
    std::fill(row, row + w, 0.f);
    return;
  }
  int64_t j0 = 0;  // the columns from j0 on take the scalar path
#if XBM_CPU_VECTOR
  struct Scratch {  // one thread-local object (one TLS look-up per row)
    std::vector<int32_t> cnt;
    std::vector<int64_t> counts, near_cols;
    std::vector<float> near_s, rows;
    // Sized for a row of w columns; returns the lane counts' buffer, each positive's lanes on a
    // cache line of their own (a vector of them read and written once per block, never split
    // across two lines).
    int32_t* prepare(int64_t w) {
      if (cnt.empty()) cnt.resize(kVecMaxPositives * 16 + 16);
      if (static_cast<int64_t>(near_cols.size()) < w) {
        near_cols.resize(w);
        near_s.resize(w);
      }
      return reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(cnt.data()) + 63) & ~uintptr_t{63});
    }
  };
  thread_local Scratch sc;
#if defined(__x86_64__) || defined(__i386__)
  if (acc != nullptr) {  // (sig_acc_row)
    int32_t* cnt64 = sc.prepare(w);
    if (static_cast<int64_t>(sc.rows.size()) < 4 * in.D) sc.rows.resize(4 * in.D);
    const int64_t wv = w - w % 16;
    const bool own = self_col >= 0 && self_col < wv;
    if (own) row[self_col] = std::numeric_limits<float>::quiet_NaN();  // no negative: coefficient 0
    const float bounds[1] = {prm.margin};
    const int64_t n_near =
        triplet_row_sig_x16(row, wv, z, yi, pos.s.data() + s0, pos.tables.data() + i * kSigTables, np, prm.lo, prm.hi,
                            prm.margin, bounds, cnt64, acc, nullptr, sc.near_cols.data(), sc.near_s.data(), out.loss,
                            out.active, out.nonzero);
    if (own) row[self_col] = 0.f;
    // the near negatives (other-label, valid), their S by the gather's dot product four at a time
    for (int64_t t0 = 0; t0 < n_near; t0 += 4) {
      const float* rows[4];
      float dots[4];
      const int64_t nt = std::min<int64_t>(4, n_near - t0);
      for (int64_t r = 0; r < 4; ++r)
        rows[r] = cpu::ref_row(in.ref, c0 + sc.near_cols[t0 + std::min(r, nt - 1)], in.D, sc.rows.data() + r * in.D);
      cpu::dot4(in.x32.data_ptr<float>() + i * in.D, rows, in.D, dots);
      for (int64_t r = 0; r < nt; ++r) {
        const int64_t j = sc.near_cols[t0 + r];
        row[j] = decide_scalar(in, pos, prm, i, c0 + j, sc.near_s[t0 + r], out, dots + r);
      }
    }
    for (int64_t j = wv; j < w; ++j)
      row[j] = z[j] != yi && j != self_col ? decide_scalar(in, pos, prm, i, c0 + j, row[j], out) : 0.f;
    return;
  }
#endif
  if (np <= kVecMaxPositives) {
    const int L = cpu::simd_lanes();
    int32_t* cnt64 = sc.prepare(w);
    std::vector<int64_t>& counts = sc.counts;
    std::vector<int64_t>& near_cols = sc.near_cols;
    std::vector<float>& near_s = sc.near_s;
    counts.assign(np, 0);
    const bool own = self_col >= 0 && self_col < w - w % L;  // the own column in the vector part
    if (own) row[self_col] = std::numeric_limits<float>::quiet_NaN();  // no negative: coefficient 0
    float bounds[3];
    int nb = 0;
    for (const float t : {prm.lo, prm.hi, prm.margin})
      if (!(std::abs(t) > 2.5f)) bounds[nb++] = t;  // as negative_s: +-3 is no bound
    const float* sp = pos.s.data() + s0;
    const float* tables = pos.sig_ok[i] ? pos.tables.data() + i * kSigTables : nullptr;
    const int64_t n_near = triplet_row_vec(row, w, z, yi, sp, tables, np, prm.lo, prm.hi, prm.margin, bounds, nb, cnt64,
                                           counts.data(), near_cols.data(), near_s.data(), out.loss, out.active,
                                           out.nonzero);
    if (own) row[self_col] = 0.f;
    for (int64_t p = 0; p < np; ++p) {  // the positives' share of the loss, and their counts
      if (counts[p] == 0) continue;     // (a positive in no triplet, -inf perhaps, adds nothing)
      out.loss -= static_cast<double>(counts[p]) * static_cast<double>(sp[p]);
      if (out.diff) {
        out.diff[p] += counts[p];
        out.diff[p + 1] -= counts[p];
      }
    }
    for (int64_t t = 0; t < n_near; ++t)  // other-label, valid: negatives
      row[near_cols[t]] = decide_scalar(in, pos, prm, i, c0 + near_cols[t], near_s[t], out);
    j0 = w - w % L;
  }
#endif
  for (int64_t j = j0; j < w; ++j)
    row[j] = z[j] != yi && j != self_col ? decide_scalar(in, pos, prm, i, c0 + j, row[j], out) : 0.f;
}

TripletSplits triplet_pass(const cpu::LossInputs& in, const cpu::TilePlan& plan, const Positives& pos,
                           const TripletParams& prm, bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  TripletSplits st;
  st.loss = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
  st.active = at::zeros({plan.splits, B}, f32.dtype(at::kLong));
  st.diff = at::zeros({plan.splits, pos.total() + B}, f32.dtype(at::kLong));
  if (accumulate) st.grad = at::zeros({plan.splits, B, D}, f32);
  const int32_t* y = in.y_ptr();
  // The sig_acc_row anchors' lanes of counts, per split: kSigPositives vectors of 16 per anchor,
  // added up once after the pass (a row's share would take a horizontal sum per positive).
  constexpr int64_t kAcc = kSigPositives * 16;
  std::vector<char> sig_acc(B);
  bool any_acc = false;
  for (int64_t i = 0; i < B; ++i) any_acc |= (sig_acc[i] = sig_acc_row(pos, prm, i));
  const Tensor acc = at::zeros({any_acc ? plan.splits : 0, B, kAcc}, f32.dtype(at::kInt));  // 64-byte aligned
  cpu::ScratchPool scratch(in, plan);
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor tile = scratch[p].similarity(in, c0, w);
    float* s = tile.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    double* loss = st.loss[p].data_ptr<double>();
    int64_t* active = st.active[p].data_ptr<int64_t>();
    int64_t* diff = st.diff[p].data_ptr<int64_t>();
    int32_t* acc_p = any_acc ? acc[p].data_ptr<int32_t>() : nullptr;
    int64_t nonzero = 0;
    for (int64_t i = 0; i < B; ++i) {
      RowSink out;
      out.diff = diff + pos.start[i] + i;
      decide_row(in, pos, prm, i, c0, w, s + i * w, z, y[i], out, sig_acc[i] ? acc_p + i * kAcc : nullptr);
      loss[i] += out.loss;
      active[i] += out.active;
      nonzero += out.nonzero;
    }
    if (accumulate) cpu::add_sparse_rows(scratch[p], in, tile, c0, st.grad[p], nonzero);
  });
  // The accumulated anchors' counts per positive: into the difference array, the active
  // triplets, and the loss's sum over the active triplets of margin - S_ip (sum k S_in is in).
  for (int64_t p = 0; any_acc && p < plan.splits; ++p) {
    const int32_t* a = acc[p].data_ptr<int32_t>();
    double* loss = st.loss[p].data_ptr<double>();
    int64_t* active = st.active[p].data_ptr<int64_t>();
    int64_t* diff = st.diff[p].data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      if (!sig_acc[i]) continue;
      const int64_t s0 = pos.start[i], np = pos.start[i + 1] - s0;
      int64_t* d = diff + s0 + i;
      int64_t total = 0;
      double sum_sp = 0;
      for (int64_t q = 0; q < np; ++q) {
        int64_t cq = 0;
        for (int t = 0; t < 16; ++t) cq += a[i * kAcc + q * 16 + t];
        d[q] += cq;
        d[q + 1] -= cq;
        total += cq;
        sum_sp += static_cast<double>(cq) * static_cast<double>(pos.s[s0 + q]);
      }
      loss[i] += static_cast<double>(prm.margin) * static_cast<double>(total) - sum_sp;
      active[i] += total;
    }
  }
  return st;
}

// The pass's tiles: plan_tiles' with a score tile near 512 KiB instead of 256 (each row of a tile
// has a fixed cost in triplet_row_sig16, its accumulator lanes and tables loaded and stored: at
// B = 256, 512 columns a row measured 4-5% faster than 256, in one and two threads).
cpu::TilePlan triplet_plan(const cpu::LossInputs& in) {
  cpu::TilePlan plan = cpu::plan_tiles(in.B, in.n);
  const int64_t cols = std::max<int64_t>(64, std::min<int64_t>(1024, (int64_t{1} << 17) / std::max<int64_t>(in.B, 1)));
  plan.cols = (cols + 15) / 16 * 16;
  plan.tiles = in.n > 0 ? (in.n + plan.cols - 1) / plan.cols : 0;
  plan.splits = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), plan.tiles));
  return plan;
}

// Per positive (in the sorted order): the number of active triplets it is in.
std::vector<int64_t> positive_counts(const Positives& pos, const Tensor& diff_splits) {
  const Tensor diff = cpu::sum_splits(diff_splits);
  const int64_t* d = diff.data_ptr<int64_t>();
  std::vector<int64_t> counts(pos.total());
  for (size_t i = 0; i + 1 < pos.start.size(); ++i) {
    int64_t run = 0;
    for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k) counts[k] = (run += d[k + i]);
  }
  return counts;
}

TripletParams params(double margin, double lo, double hi, double pos_eps) {
  return {static_cast<float>(margin), static_cast<float>(lo), static_cast<float>(hi),
          static_cast<float>(1.0 - pos_eps)};
}

// Counts as the op returns them: int32, saturated.
Tensor int32_counts(const Tensor& active) {
  const Tensor c = active.clamp_max(std::numeric_limits<int32_t>::max()).to(at::kInt);
  return at::stack({c, c}, 1);
}

std::tuple<Tensor, Tensor, Tensor> triplet_all_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                       const Tensor& ref_labels,
                                                       const c10::optional<Tensor>& self_index, int64_t ref_valid,
                                                       double margin, double select_low, double select_high,
                                                       double pos_eps, bool need_grad, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const TripletParams prm = params(margin, select_low, select_high, pos_eps);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const Positives pos = gather_positives(in, prm);
  const TripletSplits st = triplet_pass(in, triplet_plan(in), pos, prm, need_grad);
  const Tensor loss = cpu::sum_splits(st.loss).to(at::kFloat);
  const Tensor counts = int32_counts(cpu::sum_splits(st.active));
  if (!need_grad) return {loss, at::empty({0}, loss.options()), counts};
  // The negatives' part (the splits' C R) and the positives' part -count_p r_p, anchor by anchor
  // in the sorted order, added in double: with many triplets the two are large integers times
  // rows that cancel, and an fp32 sum of them would keep only their leading digits.
  Tensor grad = st.grad.select(0, 0).to(at::kDouble);
  for (int64_t p = 1; p < st.grad.size(0); ++p) grad.add_(st.grad.select(0, p));
  const std::vector<int64_t> pc = positive_counts(pos, st.diff);
  double* g = grad.data_ptr<double>();
  const int64_t D = in.D;
  at::parallel_for(0, in.B, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(D);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k) {
        if (pc[k] == 0) continue;
        const double c = -static_cast<double>(pc[k]);
        const float* rp = cpu::ref_row(in.ref, pos.col[k], D, buf.data());
        for (int64_t d = 0; d < D; ++d) g[i * D + d] += c * static_cast<double>(rp[d]);
      }
  });
  return {loss, grad.to(at::kFloat), counts};
}

std::tuple<Tensor, Tensor> triplet_all_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                               const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                               int64_t ref_valid, double margin, double select_low,
                                               double select_high, double pos_eps, const Tensor& grad_rows,
                                               bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const TripletParams prm = params(margin, select_low, select_high, pos_eps);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const Positives pos = gather_positives(in, prm);
  const std::vector<int64_t> pc =
      positive_counts(pos, triplet_pass(in, triplet_plan(in), pos, prm, false).diff);
  // Each anchor's positives by column, with their coefficient -count_p.
  std::vector<std::vector<std::pair<int64_t, float>>> by_col(in.B);
  for (int64_t i = 0; i < in.B; ++i) {
    for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k)
      by_col[i].emplace_back(pos.col[k], -static_cast<float>(pc[k]));
    std::sort(by_col[i].begin(), by_col[i].end());
  }
  const Tensor g_rows = grad_rows.to(at::kFloat).contiguous();
  const float* gp = g_rows.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  return cpu::coefficient_backward(in, ref.size(0), [&](int64_t, int64_t c0, int64_t w, Tensor& c,
                                                        cpu::TileScratch&) {
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < in.B; ++i) {
      float* row = cp + i * w;
      RowSink out;  // the coefficients only
      decide_row(in, pos, prm, i, c0, w, row, z, y[i], out);
      for (int64_t j = 0; j < w; ++j) row[j] *= gp[i];
      // the positives in this tile (by column), from the gather: their S never from the tile
      const auto& list = by_col[i];
      auto it = std::lower_bound(list.begin(), list.end(), std::make_pair(c0, -std::numeric_limits<float>::infinity()));
      for (; it != list.end() && it->first < c0 + w; ++it) row[it->first - c0] = it->second * gp[i];
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("triplet_all_fwd", &triplet_all_fwd_cpu);
  m.impl("triplet_all_bwd", &triplet_all_bwd_cpu);
}

}  // namespace xbm_kernels
