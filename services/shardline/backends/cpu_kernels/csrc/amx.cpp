// AMX support, permission and tile configuration (amx.h).
#include "amx.h"

#include <sys/syscall.h>
#include <unistd.h>

namespace shardline::cpu_kernels {
namespace {

// CPUID leaf 7, sub-leaf 0, EDX
constexpr unsigned CPUID_AMX_BF16_BIT = 22;
constexpr unsigned CPUID_AMX_TILE_BIT = 24;

bool amx_enable() {       // Linux asks each process to request the AMX tile state once
  static const bool ok = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

}  // namespace

bool amx_supported() {
  // gcc 12 has no __builtin_cpu_supports name for AMX: ask CPUID
  static const bool ok = [] {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    bool tile = d & (1u << CPUID_AMX_TILE_BIT), bf16 = d & (1u << CPUID_AMX_BF16_BIT);
    return tile && bf16 && amx_enable();
  }();
  return ok;
}

AMX_KERNEL void amx_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = AMX_PALETTE;
  for (int t = 0; t < AMX_TILE_REGISTERS; ++t) {
    cfg.rows[t] = AMX_TILE_ROWS;
    cfg.colsb[t] = AMX_TILE_ROW_BYTES;
  }
  // not _tile_loadconfig: gcc 12 does not see that it reads cfg, and drops the stores
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

AMX_KERNEL void amx_release() { _tile_release(); }

}  // namespace shardline::cpu_kernels
