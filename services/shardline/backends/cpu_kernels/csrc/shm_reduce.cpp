// shm_all_reduce: the sum of a tensor over the tensor-parallel ranks of one host, through a
// shared-memory buffer (shm_comm.py maps it into every rank), for the CPU kernels' per-layer
// partial sums. gloo's all_reduce goes through the loopback socket and a wake-up of the
// receiving thread (about 0.3 ms, more when the ranks' steps are skewed); here a rank copies
// its tensor into its slot, raises its flag and spins until every rank's flag is up.
//
// The buffer: a header of flags, one cache line each, flag(parity, rank) holding the sequence
// number of the last call that rank published in that parity's slots; then two parities of
// `world` slots of slot_bytes. Call `seq` (1, 2, ... the same on every rank) uses parity
// seq & 1, so a rank writes a slot again only two calls later: by then every rank has
// published call seq + 1, which it does after it has summed call seq.
#include "kernels.h"

#include <chrono>
#include <cstring>

#include <sched.h>

namespace shardline::cpu_kernels {
namespace {

constexpr int64_t FLAG_BYTES = 64;            // one cache line per flag
constexpr int64_t SPINS_BEFORE_YIELD = 1 << 14;

int64_t* flag(uint8_t* base, int64_t parity, int64_t world, int64_t rank) {
  return reinterpret_cast<int64_t*>(base + (parity * world + rank) * FLAG_BYTES);
}

}  // namespace

int64_t shm_header_bytes(int64_t world) {
  return ((2 * world * FLAG_BYTES + 4095) / 4096) * 4096;
}

void shm_all_reduce(at::Tensor x, at::Tensor shm, int64_t rank, int64_t world, int64_t seq,
                    int64_t slot_bytes, double timeout_s) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kBFloat16 ||
                                    x.scalar_type() == at::kFloat),
              "shm_all_reduce: x must be a contiguous bf16 or float32 tensor");
  TORCH_CHECK(shm.scalar_type() == at::kByte && shm.is_contiguous(),
              "shm_all_reduce: shm must be a contiguous uint8 tensor");
  TORCH_CHECK(0 <= rank && rank < world && seq > 0, "shm_all_reduce: rank in [0, world), seq > 0");
  const int64_t header = shm_header_bytes(world);
  const int64_t nbytes = x.numel() * x.element_size();
  TORCH_CHECK(nbytes <= slot_bytes, "shm_all_reduce: ", nbytes, " bytes exceed a slot's ",
              slot_bytes);
  TORCH_CHECK(shm.numel() >= header + 2 * world * slot_bytes,
              "shm_all_reduce: shm holds fewer than 2 x ", world, " slots of ", slot_bytes);
  uint8_t* base = shm.data_ptr<uint8_t>();
  const int64_t parity = seq & 1;
  uint8_t* slots = base + header + parity * world * slot_bytes;
  std::memcpy(slots + rank * slot_bytes, x.data_ptr(), nbytes);
  __atomic_store_n(flag(base, parity, world, rank), seq, __ATOMIC_RELEASE);

  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < world; ++r) {
    int64_t* f = flag(base, parity, world, r);
    for (int64_t spin = 1; __atomic_load_n(f, __ATOMIC_ACQUIRE) != seq; ++spin) {
      _mm_pause();
      if (spin % SPINS_BEFORE_YIELD == 0) {      // a peer descheduled: let others run
        sched_yield();
        double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                      start).count();
        TORCH_CHECK(waited < timeout_s, "shm_all_reduce: rank ", r, " did not arrive within ",
                    timeout_s, " s (call ", seq, ")");
      }
    }
  }
  // every rank sums the slots in rank order: the same float32 sum, the same rounding
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    float* out = x.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      float s = 0.f;
      for (int64_t r = 0; r < world; ++r) s += reinterpret_cast<const float*>(slots + r * slot_bytes)[i];
      out[i] = s;
    }
  } else {
    at::BFloat16* out = x.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) {
      float s = 0.f;
      for (int64_t r = 0; r < world; ++r)
        s += static_cast<float>(reinterpret_cast<const at::BFloat16*>(slots + r * slot_bytes)[i]);
      out[i] = static_cast<at::BFloat16>(s);
    }
  }
}

}  // namespace shardline::cpu_kernels
