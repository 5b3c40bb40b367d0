// The CPU kernels built for Intel CPUs with AMX (compiled with the AVX-512 flags plus
// -mamx-tile -mamx-bf16; CMakeLists.txt): the AVX-512 build whose bf16 products run on AMX
// tiles. ops.cpp calls it only on CPUs that have AMX-BF16 and after Linux granted the tile state.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <climits>
#include <new>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "attention.h"

namespace posattn {
namespace amx {
#include "attention_kernel.h"

bool request_tiles() {
  // Linux enables the 8 KB tile data state per process on request (XFEATURE_XTILEDATA = 18);
  // without it the first tile instruction faults.
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
}  // namespace amx
}  // namespace posattn
