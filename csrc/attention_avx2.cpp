// The CPU kernels built for AVX2 + FMA CPUs without AVX-512 (compiled with -mavx2 -mfma; CMakeLists.txt): the portable source, vectorised by the compiler at 256 bits.
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
namespace avx2 {
#include "attention_kernel.h"
}  // namespace avx2
}  // namespace posattn
