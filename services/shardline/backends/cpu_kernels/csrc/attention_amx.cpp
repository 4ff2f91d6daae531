// paged_attention's runs of prefill rows on AMX tiles: up to AMX_COLUMNS query "columns"
// (Columns: the rows of a prefill chunk, one query head at a time) against one sequence's cache
// and one KV head.
//   scores^T = K . Q^T per 16 positions: A = the K block as it is in the cache (16 positions x
//     32 channels per tile, rows HD * 2 bytes apart), B = the columns' queries as channel
//     pairs, C = 16 positions x 16 columns;
//   softmax per column over its own positions [first, len) (as attend_fast: float32, weights
//     rounded to bf16, other positions weigh 0);
//   out = P . V per 32 positions: A = P (16 columns x 32 positions), B = V as position pairs
//     (v_pairs, built once for all the query heads of a KV head: channels in attend_fast's
//     lane order, put back on store), C = 16 columns x 16 channels, four tiles per 64 channels.
// Positions start at lo, the columns' smallest first rounded down to 16 (with a sliding window,
// the blocks before it are not read).
// The caller (paged_attention) has configured the thread's tiles (amx_config).
#include "amx.h"
#include "attention.h"

namespace shardline::cpu_kernels {
namespace {

// The tiles (literals: see amx.h). Scores: C TILE_S0, TILE_S1 (16 positions each), A TILE_K0,
// TILE_K1 (K, two 32-channel slices), B TILE_Q0, TILE_Q1 (the queries' matching slices).
// P . V: C TILE_O0 .. TILE_O3 (16 channels each), A TILE_P (the weights), B TILE_V0 .. TILE_V2
// (V pairs; the fourth V tile of a pass is loaded into TILE_V0 again).
#define TILE_S0 0
#define TILE_S1 1
#define TILE_K0 4
#define TILE_Q0 5
#define TILE_K1 6
#define TILE_Q1 7
#define TILE_O0 0
#define TILE_O1 1
#define TILE_O2 2
#define TILE_O3 3
#define TILE_P 4
#define TILE_V0 5
#define TILE_V1 6
#define TILE_V2 7

// C tile CT = K block (16 positions, rows HD * 2 bytes apart) . queries^T (qt: S slices of 32
// channels, each 16 channel pairs x 16 columns); with S == 2 the queries are already in TILE_Q0
// and TILE_Q1. (A macro: the tile intrinsics take their tile numbers as literals.)
#define SCORES_TILE(CT, krow, qt)                                \
  do {                                                           \
    _tile_zero(CT);                                              \
    if constexpr (S == 2) {                                      \
      _tile_loadd(TILE_K0, (krow), HD * 2);                      \
      _tile_loadd(TILE_K1, (krow) + 32, HD * 2);                 \
      _tile_dpbf16ps(CT, TILE_K0, TILE_Q0);                      \
      _tile_dpbf16ps(CT, TILE_K1, TILE_Q1);                      \
    } else {                                                     \
      for (int s2 = 0; s2 < S; s2 += 2) {                        \
        _tile_loadd(TILE_K0, (krow) + s2 * 32, HD * 2);          \
        _tile_loadd(TILE_Q0, (qt) + s2 * 256, 64);               \
        _tile_loadd(TILE_K1, (krow) + (s2 + 1) * 32, HD * 2);    \
        _tile_loadd(TILE_Q1, (qt) + (s2 + 1) * 256, 64);         \
        _tile_dpbf16ps(CT, TILE_K0, TILE_Q0);                    \
        _tile_dpbf16ps(CT, TILE_K1, TILE_Q1);                    \
      }                                                          \
    }                                                            \
  } while (0)

// st[j][c] (16 positions x 16 columns, float32) -> sc[c * cp + j] * scale for c < n
KERNEL inline void scores_to_rows(const float* st, int64_t n, float scale, float* sc,
                                  int64_t cp) {
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                           192, 208, 224, 240);
  for (int64_t c = 0; c < n; ++c)
    _mm512_storeu_ps(sc + c * cp, _mm512_mul_ps(_mm512_i32gather_ps(column, st + c, 4),
                                                _mm512_set1_ps(scale)));
}

// 16 consecutive cache rows (16 positions of one cache block, as block % 16 == 0) into L1
KERNEL inline void prefetch_rows(const bf16_t* rows, int64_t hd) {
  const char* p = reinterpret_cast<const char*>(rows);
  for (int64_t o = 0; o < 16 * hd * 2; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// V of positions [lo, ctx) (lo a multiple of 16) as AMX B tiles of position pairs: per 32
// positions and 64 channels, four tiles of 16 pairs x 64 bytes (unpacklo / unpackhi of channels
// c0 .. c0 + 31, then c0 + 32 .. c0 + 63), zeros past ctx; tile t of (p0, c0) at
// vv + (((p0 - lo) / 32 * HD / 64 + c0 / 64) * 4 + t) * 512
template <int HD>
KERNEL void v_pairs(const bf16_t* vc, const int64_t* table, int64_t block, int64_t lo,
                    int64_t ctx, bf16_t* vv) {
  auto slot = [&](int64_t p) { return table[p / block] * block + p % block; };
  for (int64_t p0 = lo; p0 < ctx; p0 += 32)
    for (int64_t c0 = 0; c0 < HD; c0 += 64) {
      bf16_t* tiles = vv + (((p0 - lo) / 32) * (HD / 64) + c0 / 64) * 4 * 512;
      for (int64_t half = 0; half < 2; ++half) {   // positions p0 + 16 half + 2 pr, + 1
        int64_t h0 = p0 + 16 * half;
        const bf16_t* vb0 = h0 < ctx ? vc + slot(h0) * HD + c0 : nullptr;   // 16 rows
        for (int64_t pr = 0; pr < 8; ++pr) {
          int64_t a = h0 + 2 * pr, b = a + 1;
          for (int h2 = 0; h2 < 2; ++h2) {
            __m512i va = a < ctx ? _mm512_loadu_si512(vb0 + (2 * pr) * HD + h2 * 32) : _mm512_setzero_si512();
            __m512i vb = b < ctx ? _mm512_loadu_si512(vb0 + (2 * pr + 1) * HD + h2 * 32) : _mm512_setzero_si512();
            bf16_t* dst = tiles + (2 * h2 * 16 + 8 * half + pr) * 32;
            _mm512_storeu_si512(dst, _mm512_unpacklo_epi16(va, vb));
            _mm512_storeu_si512(dst + 16 * 32, _mm512_unpackhi_epi16(va, vb));
          }
        }
      }
    }
}

// [lo, ctx): the positions any of the columns attends, lo rounded down to 16
inline std::pair<int64_t, int64_t> column_span(const Columns& cols) {
  int64_t lo = cols.first[0], ctx = 0;
  for (int64_t c = 0; c < cols.n; ++c) {
    lo = std::min(lo, cols.first[c]);
    ctx = std::max(ctx, cols.len[c]);
  }
  return {lo / 16 * 16, ctx};
}

template <int HD>
AMX_KERNEL void attend_columns_amx(const Columns& cols, const bf16_t* kc, const bf16_t* vv,
                                   const int64_t* table, int64_t block, float scale,
                                   float softcap) {
  static_assert(HD % 64 == 0, "attend_columns_amx: head_dim a multiple of 64");
  constexpr int S = HD / 32;                       // 32-channel slices of a head
  const int64_t n = cols.n;
  auto [lo, ctx] = column_span(cols);              // scores of column c: sc[c * cp + p - lo]
  const int64_t cp = (ctx - lo + 31) / 32 * 32;    // scores per column: whole 32-position groups
  thread_local std::vector<uint32_t> qt;           // [S][16 pairs][16 columns]
  thread_local std::vector<float> sc;              // [16 columns][cp]
  thread_local std::vector<bf16_t> pb;             // [16 columns][cp]
  qt.resize(S * 16 * 16);
  if (static_cast<int64_t>(sc.size()) < 16 * cp) { sc.resize(16 * cp); pb.resize(16 * cp); }
  alignas(64) float st[16 * 16];
  auto slot = [&](int64_t p) { return table[p / block] * block + p % block; };
  // the columns' queries as channel pairs: qt[s][pr][c] = pair s * 16 + pr of column c
  for (int64_t c = 0; c < 16; ++c) {
    const uint32_t* qc = c < n ? reinterpret_cast<const uint32_t*>(cols.q[c]) : nullptr;
    for (int64_t pp = 0; pp < HD / 2; ++pp)
      qt[(pp / 16) * 256 + (pp % 16) * 16 + c] = qc ? qc[pp] : 0u;
  }
  // scores, 32 positions per pass: the first 16 into TILE_S0, the next 16 into TILE_S1 (whose
  // products run while TILE_S0 is stored), transposed into sc[c][p]. K of the next pass's 32
  // positions into L1 (a chunk after a long cached prefix reads it from memory)
  if constexpr (S == 2) {                          // the queries stay in TILE_Q0 and TILE_Q1
    _tile_loadd(TILE_Q0, qt.data(), 64);
    _tile_loadd(TILE_Q1, qt.data() + 256, 64);
  }
  for (int64_t p0 = lo; p0 < ctx; p0 += 32) {
    bool second_block = p0 + 16 < ctx;
    for (int64_t b = p0 + 32; b < std::min(ctx, p0 + 64); b += 16) prefetch_rows(kc + slot(b) * HD, HD);
    SCORES_TILE(TILE_S0, kc + slot(p0) * HD, qt.data());
    if (second_block) SCORES_TILE(TILE_S1, kc + slot(p0 + 16) * HD, qt.data());
    _tile_stored(TILE_S0, st, 64);                 // st[position j][column c]
    scores_to_rows(st, n, scale, sc.data() + p0 - lo, cp);
    if (second_block) {
      _tile_stored(TILE_S1, st, 64);
      scores_to_rows(st, n, scale, sc.data() + p0 - lo + 16, cp);
    }
  }
  // softmax per column over its own positions [first, len) (relative to lo: [f, l)), scores
  // soft-capped first where softcap > 0; weights in bf16, 0 elsewhere and for columns past n
  for (int64_t c = 0; c < 16; ++c) {
    bf16_t* pc = pb.data() + c * cp;
    int64_t f = c < n ? cols.first[c] - lo : 0, l = c < n ? cols.len[c] - lo : 0;
    if (l > f) {
      if (softcap > 0) cap_scores(sc.data() + c * cp + f, l - f, softcap);
      softmax_rows(sc.data() + c * cp + f, 1, l - f, cp);
    }
    for (int64_t i = 0; i < cp; i += 16) {
      int64_t m = std::min<int64_t>(16, std::max<int64_t>(0, l - i));
      int64_t skip = std::min<int64_t>(16, std::max<int64_t>(0, f - i));   // before first
      uint32_t bits = ((m >= 16 ? 0xFFFFu : (1u << m) - 1) >> skip) << skip;
      __mmask16 mask = static_cast<__mmask16>(bits);
      __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, sc.data() + c * cp + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pc + i), reinterpret_cast<__m256i&>(h));
    }
  }
  // out = P . V, 64 channels (four C tiles) per pass
  for (int64_t c0 = 0; c0 < HD; c0 += 64) {
    _tile_zero(TILE_O0); _tile_zero(TILE_O1); _tile_zero(TILE_O2); _tile_zero(TILE_O3);
    for (int64_t p0 = lo; p0 < ctx; p0 += 32) {
      const bf16_t* tiles = vv + (((p0 - lo) / 32) * (HD / 64) + c0 / 64) * 4 * 512;
      // B: TILE_V0, V1, V2, then the fourth V tile into TILE_V0 again, whose product was
      // issued first
      _tile_loadd(TILE_P, pb.data() + p0 - lo, cp * 2);
      _tile_loadd(TILE_V0, tiles, 64);
      _tile_loadd(TILE_V1, tiles + 512, 64);
      _tile_loadd(TILE_V2, tiles + 2 * 512, 64);
      _tile_dpbf16ps(TILE_O0, TILE_P, TILE_V0);
      _tile_dpbf16ps(TILE_O1, TILE_P, TILE_V1);
      _tile_dpbf16ps(TILE_O2, TILE_P, TILE_V2);
      _tile_loadd(TILE_V0, tiles + 3 * 512, 64);
      _tile_dpbf16ps(TILE_O3, TILE_P, TILE_V0);
    }
    alignas(64) float ot[4][16 * 16];
    _tile_stored(TILE_O0, ot[0], 64);
    _tile_stored(TILE_O1, ot[1], 64);
    _tile_stored(TILE_O2, ot[2], 64);
    _tile_stored(TILE_O3, ot[3], 64);
    for (int64_t c = 0; c < n; ++c)
      for (int h2 = 0; h2 < 2; ++h2)
        store_v_pairs(cols.o[c] + c0 + h2 * 32, _mm512_load_ps(ot[2 * h2] + c * 16),
                      _mm512_load_ps(ot[2 * h2 + 1] + c * 16));
  }
}

#undef SCORES_TILE
#undef TILE_S0
#undef TILE_S1
#undef TILE_K0
#undef TILE_Q0
#undef TILE_K1
#undef TILE_Q1
#undef TILE_O0
#undef TILE_O1
#undef TILE_O2
#undef TILE_O3
#undef TILE_P
#undef TILE_V0
#undef TILE_V1
#undef TILE_V2

// a run's query heads against one KV head (AttendRunFn): V re-laid once (v_pairs), then
// attend_columns_amx per query head
template <int HD>
void attend_run_amx(const Columns* heads, int64_t group, const bf16_t* kc, const bf16_t* vc,
                    const int64_t* table, int64_t block, float scale, float softcap) {
  auto [lo, ctx] = column_span(heads[0]);          // the same positions for every query head
  thread_local std::vector<bf16_t> vv;
  int64_t need = (ctx - lo + 31) / 32 * (HD / 64) * 4 * 512;
  if (static_cast<int64_t>(vv.size()) < need) vv.resize(need);
  v_pairs<HD>(vc, table, block, lo, ctx, vv.data());
  for (int64_t g = 0; g < group; ++g)
    attend_columns_amx<HD>(heads[g], kc, vv.data(), table, block, scale, softcap);
}

}  // namespace

// attend_run_amx for head_dim 64, 128 or 256 (Gemma) where AMX is there and the cache block
// size is a multiple of 16 (a block of 16 positions never straddles two cache blocks), else null
AttendRunFn attend_run_for(int64_t hd, int64_t block) {
  if (block % 16 != 0 || !amx_supported()) return nullptr;
  if (hd == 64) return &attend_run_amx<64>;
  if (hd == 128) return &attend_run_amx<128>;
  if (hd == 256) return &attend_run_amx<256>;
  return nullptr;
}

}  // namespace shardline::cpu_kernels
