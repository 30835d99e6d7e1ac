#pragma once

namespace fused_xent {

// Name of the instruction set the CPU kernels run with on this machine.
const char* simd_level();

}  // namespace fused_xent
