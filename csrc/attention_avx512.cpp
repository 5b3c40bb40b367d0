// The CPU kernels built for the AVX-512 path (compiled with -mavx512f and friends; CMakeLists.txt); ops.cpp calls it only on CPUs that have AVX-512.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <climits>
#include <new>
#include <immintrin.h>

#include "attention.h"

namespace posattn {
namespace avx512 {
#include "attention_kernel.h"
}  // namespace avx512
}  // namespace posattn
