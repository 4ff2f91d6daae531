// rope_store_kv, and paged_attention with its AVX512 kernels: attend_fast (head_dim 64 or 128,
// up to 8 query heads per KV head) and attend (any other shape). paged_attention hands runs of
// a prefill chunk's rows to attention_amx.cpp where the CPU has AMX.
#include "amx.h"
#include "attention.h"
#include "kernels.h"

namespace shardline::cpu_kernels {

// ---- rotary + KV store ------------------------------------------------------------------------
namespace {

// One row's `heads` heads of hd channels, rotated in place ("rotate half": x * cos +
// [x2, x1] * sin_signed, cos / sin the row's position's); with norm (float32 [hd]), each head
// RMS-normalized by it first (Qwen3's, Gemma 3's q / k norm), in float32 before the rotation
KERNEL void rope_row(bf16_t* row, int64_t heads, int64_t hd, const float* cos,
                     const float* sin, const float* norm, float eps) {
  std::vector<float> v(hd);
  int64_t half = hd / 2;
  for (int64_t hh = 0; hh < heads; ++hh) {
    bf16_t* x = row + hh * hd;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t c = 0; c < hd; c += 16) {
      __m512 a = load_bf16x16(x + c);
      ss = _mm512_fmadd_ps(a, a, ss);
      _mm512_storeu_ps(v.data() + c, a);
    }
    if (norm) {
      __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / hd + eps));
      for (int64_t c = 0; c < hd; c += 16)
        _mm512_storeu_ps(v.data() + c, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(v.data() + c), inv),
                                                     _mm512_loadu_ps(norm + c)));
    }
    for (int64_t c = 0; c < hd; c += 16) {
      int64_t sw = (c + half) % hd;     // half is a multiple of 16: a whole vector swaps
      __m512 r = _mm512_fmadd_ps(_mm512_loadu_ps(v.data() + sw), _mm512_loadu_ps(sin + c),
                                 _mm512_mul_ps(_mm512_loadu_ps(v.data() + c),
                                               _mm512_loadu_ps(cos + c)));
      store_bf16x16(x + c, r);
    }
  }
}

}  // namespace

void rope_store_kv(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                   const at::Tensor& sin, const at::Tensor& slots, at::Tensor& k_cache,
                   at::Tensor& v_cache, int64_t heads, int64_t kv_heads,
                   const c10::optional<at::Tensor>& q_norm,
                   const c10::optional<at::Tensor>& k_norm, double eps) {
  check_rows(qkv, "qkv");
  int64_t t = qkv.size(0), hd = k_cache.size(2), n_slots = k_cache.size(1);
  check(qkv.size(1) == (heads + 2 * kv_heads) * hd && hd % 32 == 0,
        "rope_store_kv: qkv width (heads + 2 kv_heads) * head_dim, head_dim a multiple of 32");
  check(k_cache.is_contiguous() && v_cache.is_contiguous() &&
            k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
            k_cache.size(0) == kv_heads, "rope_store_kv: caches");
  check(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.size(1) == hd,
        "rope_store_kv: float32 cos / sin tables [positions, head_dim]");
  auto norm_ptr = [&](const c10::optional<at::Tensor>& w) -> const float* {
    if (!w.has_value()) return nullptr;
    check(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == hd,
          "rope_store_kv: q / k norm weights float32 [head_dim]");
    return w->data_ptr<float>();
  };
  const float* qn = norm_ptr(q_norm);
  const float* kn = norm_ptr(k_norm);
  float fe = static_cast<float>(eps);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  bf16_t* kc = bf16_mut(k_cache);
  bf16_t* vc = bf16_mut(v_cache);
  int64_t width = qkv.size(1);
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < cos.size(0) && sl[i] >= 0 && sl[i] < n_slots,
                "rope_store_kv: position or slot out of range");
  bf16_t* qp = bf16_mut(qkv);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, t, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      bf16_t* row = qp + i * width;
      if (qn == kn) {                          // no norms: q and k heads in one pass
        rope_row(row, heads + kv_heads, hd, cp + pos[i] * hd, sp + pos[i] * hd, qn, fe);
      } else {
        rope_row(row, heads, hd, cp + pos[i] * hd, sp + pos[i] * hd, qn, fe);
        rope_row(row + heads * hd, kv_heads, hd, cp + pos[i] * hd, sp + pos[i] * hd, kn, fe);
      }
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(kc + (h * n_slots + sl[i]) * hd, row + (heads + h) * hd, hd * 2);
        std::memcpy(vc + (h * n_slots + sl[i]) * hd, row + (heads + kv_heads + h) * hd, hd * 2);
      }
    }
  });
}

// ---- decode attention (AVX512) ----------------------------------------------------------------
namespace {

// One sequence, one KV head and its `group` query heads: softmax(q k^T * scale) v over the
// sequence's cached positions [first, len), read through its block table (softcap > 0: the
// scores soft-capped first).
KERNEL void attend(const bf16_t* q, int64_t group, int64_t hd, const bf16_t* kc,
                   const bf16_t* vc, const int64_t* table, int64_t first, int64_t len,
                   int64_t block, float scale, float softcap, bf16_t* out, int64_t out_stride) {
  const int64_t n = len - first;
  std::vector<float> qf(group * hd), scores(group * n), acc(group * hd, 0.f);
  for (int64_t c = 0; c < group * hd; c += 16) _mm512_storeu_ps(qf.data() + c, load_bf16x16(q + c));
  constexpr int64_t AHEAD = 8;      // positions to prefetch ahead (the cache is not in L2)
  // position first + i of the context
  auto row = [&](const bf16_t* base, int64_t i) {
    int64_t p = first + i;
    return base + (table[p / block] * block + p % block) * hd;
  };
  for (int64_t p = 0; p < n; ++p) {
    const bf16_t* k = row(kc, p);
    if (p + AHEAD < n) {
      const char* nk = reinterpret_cast<const char*>(row(kc, p + AHEAD));
      for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(nk + b, _MM_HINT_T0);
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < hd; c += 16)
        s = _mm512_fmadd_ps(load_bf16x16(k + c), _mm512_loadu_ps(qf.data() + g * hd + c), s);
      scores[g * n + p] = _mm512_reduce_add_ps(s) * scale;
    }
  }
  if (softcap > 0) cap_scores(scores.data(), group * n, softcap);
  softmax_rows(scores.data(), group, n, n);
  for (int64_t p = 0; p < n; ++p) {
    const bf16_t* v = row(vc, p);
    if (p + AHEAD < n) {
      const char* nv = reinterpret_cast<const char*>(row(vc, p + AHEAD));
      for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(nv + b, _MM_HINT_T0);
    }
    for (int64_t c = 0; c < hd; c += 16) {
      __m512 vv = load_bf16x16(v + c);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc.data() + g * hd + c;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + p]), vv,
                                            _mm512_loadu_ps(a)));
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < hd; c += 16)
      store_bf16x16(out + g * out_stride + c, _mm512_loadu_ps(acc.data() + g * hd + c));
}

// K prefetch distance: attend_fast prefetches K 16 * KPF positions ahead of use, and
// paged_attention an item's first KPF cache blocks while the item before it runs
constexpr int64_t KPF = 2;

// lane i of the result = sum of the 16 lanes of v[i]
KERNEL inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)      // per 128-bit lane: the lane's sums of v[4i .. 4i + 3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

// attend() for head_dim HD (64 or 128) and up to 8 query heads per KV head: scores of 16
// positions at a time with bf16 dot products and one transposed reduction; the weighted sum
// of V in registers, with bf16 weights (as PyTorch's bf16 attention rounds them). Positions
// [first, end) of the context: `len` below counts them, p indexes them from first.
// G (the query heads per KV head) is a template parameter so that the accumulators of the
// weighted sum (G x HD / 16 vectors) live in registers: with G a run-time value they were
// spilled to the stack and reloaded for every pair of positions.
template <int HD, int G>
KERNEL void attend_fast(const bf16_t* q, const bf16_t* kc, const bf16_t* vc,
                        const int64_t* table, int64_t first, int64_t end, int64_t block,
                        float scale, float softcap, bf16_t* out, int64_t out_stride) {
  constexpr int64_t group = G;
  const int64_t len = end - first;
  constexpr int P = HD / 32;                // bf16 pair vectors per head row
  const int64_t padded = (len + 15) / 16 * 16;  // scores of a head: whole 16-position blocks
  // per-thread scratch, grown as needed (not three allocations per item and head); every
  // element read is written first
  thread_local std::vector<float> scores;
  thread_local std::vector<int64_t> slot;   // cache slot of each position, without divisions
  thread_local std::vector<bf16_t> sb;
  if (static_cast<int64_t>(scores.size()) < group * padded) {
    scores.resize(group * padded);
    sb.resize(group * padded);
  }
  if (static_cast<int64_t>(slot.size()) < len) slot.resize(len);
  for (int64_t p = 0, b = first / block, j = first % block; p < len; ++p) {
    slot[p] = table[b] * block + j;
    if (++j == block) { j = 0; ++b; }
  }
  auto row = [&](const bf16_t* base, int64_t p) { return base + slot[p] * HD; };
  __m512bh qv[G][P];
  for (int64_t g = 0; g < group; ++g)
    for (int i = 0; i < P; ++i)
      qv[g][i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + g * HD + i * 32));
  __m512 part[16];
  for (int64_t p0 = 0; p0 < len; p0 += 16) {
    int64_t n = std::min<int64_t>(16, len - p0);
    const bf16_t* krow[16];
    for (int64_t j = 0; j < n; ++j) krow[j] = row(kc, p0 + j);
    for (int64_t j = n; j < 16; ++j) krow[j] = krow[0];   // past len: scores dropped later
    for (int64_t g = 0; g < group; ++g) {
      for (int j = 0; j < 16; ++j) {
        // prefetches spread over the products (a burst of them per block filled the line
        // fill buffers and stalled the arithmetic): with the first head, K 16 * KPF
        // positions ahead into L1; with the second, this block's V into L2 for the weighted sum
        if (g == 0 && p0 + 16 * KPF + j < len) {
          const char* nk = reinterpret_cast<const char*>(row(kc, p0 + 16 * KPF + j));
          for (int b = 0; b < HD * 2; b += 64) _mm_prefetch(nk + b, _MM_HINT_T0);
        }
        if (g == (G > 1 ? 1 : 0) && j < n) {
          const char* nv = reinterpret_cast<const char*>(row(vc, p0 + j));
          for (int b = 0; b < HD * 2; b += 64) _mm_prefetch(nv + b, _MM_HINT_T1);
        }
        __m512 a = _mm512_setzero_ps();
        for (int i = 0; i < P; ++i)
          a = _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(_mm512_loadu_si512(krow[j] + i * 32)), qv[g][i]);
        part[j] = a;
      }
      _mm512_storeu_ps(scores.data() + g * padded + p0,
                       _mm512_mul_ps(reduce16(part), _mm512_set1_ps(scale)));
    }
  }
  if (softcap > 0) cap_scores(scores.data(), group * padded, softcap);
  softmax_rows(scores.data(), group, len, padded);
  // the weighted sum of V two positions at a time, as bf16 pairs (p, p + 1) per channel:
  // unpacklo / unpackhi of rows p and p + 1 give, per 128-bit lane L of a 32-channel vector,
  // the pairs of channels 8L..8L+3 (lo) and 8L+4..8L+7 (hi); dpbf16 sums each pair into
  // f32 lane 4L+j. A permute puts the channels back in order at the end.
  // the weights in bf16: pair (p, p + 1) is the uint32 at p / 2 (positions past len are 0)
  for (int64_t c = 0; c < group * padded; c += 16) {
    __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(scores.data() + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sb.data() + c), reinterpret_cast<__m256i&>(h));
  }
  const uint32_t* wpair = reinterpret_cast<const uint32_t*>(sb.data());
  __m512 acc[G][2 * P];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < 2 * P; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < len; p += 2) {
    const bf16_t* v0 = row(vc, p);
    const bf16_t* v1 = p + 1 < len ? row(vc, p + 1) : nullptr;
    __m512bh pv[2 * P];
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) {
      __m512i a = _mm512_loadu_si512(v0 + i * 32);
      __m512i b = v1 ? _mm512_loadu_si512(v1 + i * 32) : _mm512_setzero_si512();
      pv[2 * i] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
      pv[2 * i + 1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __m512bh w = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(wpair[g * (padded / 2) + p / 2])));
#pragma GCC unroll 8
      for (int i = 0; i < 2 * P; ++i) acc[g][i] = _mm512_dpbf16_ps(acc[g][i], pv[i], w);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
      store_v_pairs(out + g * out_stride + i * 32, acc[g][2 * i], acc[g][2 * i + 1]);
}

// ATTEND_64[G - 1] = attend_fast<64, G>, G = 1 .. FAST_MAX_GROUP; ATTEND_128 likewise
constexpr int FAST_MAX_GROUP = 8;
using AttendFn = void (*)(const bf16_t*, const bf16_t*, const bf16_t*, const int64_t*, int64_t,
                         int64_t, int64_t, float, float, bf16_t*, int64_t);
template <int HD, int... Gs>
constexpr std::array<AttendFn, sizeof...(Gs)> attend_table(std::integer_sequence<int, Gs...>) {
  return {&attend_fast<HD, Gs + 1>...};
}
constexpr auto ATTEND_64 = attend_table<64>(std::make_integer_sequence<int, FAST_MAX_GROUP>{});
constexpr auto ATTEND_128 = attend_table<128>(std::make_integer_sequence<int, FAST_MAX_GROUP>{});

// attend_fast for head_dim 64 or 128 and up to FAST_MAX_GROUP query heads per KV head, else
// null (attend)
AttendFn attend_fast_for(int64_t hd, int64_t group) {
  if (group < 1 || group > FAST_MAX_GROUP) return nullptr;
  if (hd == 64) return ATTEND_64[group - 1];
  if (hd == 128) return ATTEND_128[group - 1];
  return nullptr;
}

// ---- paged_attention --------------------------------------------------------------------------
// every row's length within its table, and the blocks it reads (those holding positions
// [window_start, len)) within the cache's slots
void check_tables(const int64_t* tables, const int64_t* lens, int64_t d, int64_t max_blocks,
                  int64_t block, int64_t n_slots, int64_t window) {
  for (int64_t i = 0; i < d; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_blocks * block, "paged_attention: length");
    for (int64_t b = window_start(lens[i], window) / block; b < (lens[i] + block - 1) / block; ++b)
      TORCH_CHECK(tables[i * max_blocks + b] >= 0 && (tables[i * max_blocks + b] + 1) * block <= n_slots,
                  "paged_attention: block id out of range");
  }
}

// Runs of rows (first row, rows): with `amx`, up to AMX_COLUMNS consecutive rows of one prefill
// chunk (the same block table, lengths one apart), else single rows. Returns whether a run has
// more than one row (one for attend_columns_amx).
bool find_runs(bool amx, const int64_t* tables, const int64_t* lens, int64_t d,
               int64_t max_blocks, std::vector<std::pair<int64_t, int64_t>>& runs) {
  runs.clear();
  bool amx_runs = false;
  for (int64_t i = 0; i < d;) {
    int64_t r = 1;
    if (amx)
      while (r < AMX_COLUMNS && i + r < d && lens[i + r] == lens[i] + r &&
             std::memcmp(tables + (i + r) * max_blocks, tables + i * max_blocks,
                         max_blocks * sizeof(int64_t)) == 0)
        ++r;
    runs.emplace_back(i, r);
    amx_runs |= r > 1;
    i += r;
  }
  return amx_runs;
}

}  // namespace

// qkv [D, (H + 2 KV) * hd] -> [D, H * hd] (kernels.h)
at::Tensor paged_attention(const at::Tensor& qkv, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& lengths, int64_t block, int64_t heads,
                           double scale, int64_t window, double softcap) {
  check_rows(qkv, "qkv");
  check(window >= 0 && softcap >= 0, "paged_attention: window and softcap >= 0");
  int64_t d = qkv.size(0), kv_heads = k_cache.size(0), n_slots = k_cache.size(1),
          hd = k_cache.size(2);
  check(heads % kv_heads == 0, "paged_attention: heads a multiple of kv_heads");
  check(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
            block_tables.size(0) == d && lengths.scalar_type() == at::kLong && lengths.numel() == d,
        "paged_attention: int64 block tables [D, blocks] and lengths [D]");
  int64_t group = heads / kv_heads, max_blocks = block_tables.size(1), width = qkv.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  check_tables(tables, lens, d, max_blocks, block, n_slots, window);
  at::Tensor out = at::empty({d, heads * hd}, qkv.options());
  const bf16_t* qp = bf16_ptr(qkv);
  const bf16_t* kc = bf16_ptr(k_cache);
  const bf16_t* vc = bf16_ptr(v_cache);
  bf16_t* op = bf16_mut(out);
  float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  // With AMX, a run of several rows goes to attend_run_amx: its rows are the columns of
  // attend_columns_amx, a query head at a time. Single rows (decode rows) go through attend_fast
  // (or attend) even with AMX: a decode row's few query heads as AMX columns would leave most of
  // the 16 columns' work wasted.
  AttendFn fast = attend_fast_for(hd, group);
  AttendRunFn amx = attend_run_for(hd, block);
  // (first row, rows); the caller's thread keeps the storage: a reference, so that the
  // lambdas below read this thread's list from the pool's threads too
  thread_local std::vector<std::pair<int64_t, int64_t>> runs_store;
  std::vector<std::pair<int64_t, int64_t>>& runs = runs_store;
  bool amx_runs = find_runs(amx != nullptr, tables, lens, d, max_blocks, runs);
  // items (run, KV head) one at a time from a shared counter (parallel, chunks of 1): rows of
  // a prefill chunk attend ever longer contexts, so equal static parts would not be equal work
  int64_t items = static_cast<int64_t>(runs.size()) * kv_heads;
  auto one = [&](int64_t t) {
    auto [i, rows] = runs[t / kv_heads];
    int64_t h = t % kv_heads;
    const bf16_t* qh = qp + i * width + h * group * hd;
    const bf16_t* kh = kc + h * n_slots * hd;
    const bf16_t* vh = vc + h * n_slots * hd;
    bf16_t* oh = op + i * heads * hd + h * group * hd;
    const int64_t* table = tables + i * max_blocks;
    if (amx && rows > 1) {                      // the run's rows, a query head at a time
      thread_local std::vector<Columns> per_head;
      per_head.resize(group);
      for (int64_t g = 0; g < group; ++g) {
        Columns& cols = per_head[g];
        cols.n = rows;
        for (int64_t r = 0; r < rows; ++r) {
          cols.q[r] = qh + r * width + g * hd;
          cols.o[r] = oh + r * heads * hd + g * hd;
          cols.len[r] = lens[i] + r;
          cols.first[r] = window_start(cols.len[r], window);
        }
      }
      amx(per_head.data(), group, kh, vh, table, block, sc, cap);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      int64_t len = lens[i + r], first = window_start(len, window);
      if (fast) fast(qh + r * width, kh, vh, table, first, len, block, sc, cap, oh + r * heads * hd, hd);
      else attend(qh + r * width, group, hd, kh, vh, table, first, len, block, sc, cap,
                  oh + r * heads * hd, hd);
    }
  };
  // the first KPF blocks of K an item reads (from its window's start), prefetched while the
  // item before it runs (attend_fast prefetches 16 * KPF positions ahead from there on)
  auto prefetch_start = [&](int64_t t) {
    int64_t i = runs[t / kv_heads].first, h = t % kv_heads;
    int64_t b0 = window_start(lens[i], window) / block;
    for (int64_t b = b0; b < b0 + KPF && b * block < lens[i]; ++b) {
      const char* kb = reinterpret_cast<const char*>(
          kc + (h * n_slots + tables[i * max_blocks + b] * block) * hd);
      for (int64_t o = 0; o < std::min<int64_t>(block, lens[i] - b * block) * hd * 2; o += 64)
        _mm_prefetch(kb + o, _MM_HINT_T0);
    }
  };
  std::atomic<int64_t> next{0};
  int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if (amx_runs) amx_config();
    for (int64_t t = next.fetch_add(1); t < items; ) {
      int64_t after = next.fetch_add(1);
      if (after < items) prefetch_start(after);
      one(t);
      t = after;
    }
    if (amx_runs) amx_release();
  });
  return out;
}

}  // namespace shardline::cpu_kernels
