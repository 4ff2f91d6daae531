// AMX (Advanced Matrix Extensions): whether the kernels may use it, and the tile set-up its
// kernels (linear_bf16.cpp's amx_block, attention_amx.cpp) run under.
//
// A thread that runs AMX kernels calls amx_config() first, which sets all AMX_TILE_REGISTERS
// tiles to AMX_TILE_ROWS rows of AMX_TILE_ROW_BYTES bytes (16 x 32 bf16, or 16 x 16 float32),
// and amx_release() when done.
//
// Tile register ids: GCC's _tile_* intrinsics are inline assembly that paste their tile argument
// into the instruction's text ("%%tmm" #dst), after macro expansion. A kernel names its tiles
// with #define's of integer literals (a constexpr value or an enumerator would be pasted as its
// name), defined and #undef'd in its own file.
#pragma once

#include "common.h"

namespace shardline {
namespace cpu_kernels __attribute__((visibility("hidden"))) {

constexpr int AMX_TILE_REGISTERS = 8;    // tmm0 .. tmm7
constexpr int AMX_TILE_ROWS = 16;
constexpr int AMX_TILE_ROW_BYTES = 64;
constexpr int AMX_PALETTE = 1;           // the palette of 8 tiles of up to 16 x 64 bytes

// the 64-byte operand of ldtilecfg
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// whether the CPU has AMX-TILE and AMX-BF16 and Linux lets this process use them (asked once)
bool amx_supported();

// this thread's tiles: all 16 rows x 64 bytes (declared with the definition's target attribute:
// in C++ a different one would declare another version of the function)
AMX_KERNEL void amx_config();

// this thread's tile state released
AMX_KERNEL void amx_release();

}  // namespace cpu_kernels
}  // namespace shardline
