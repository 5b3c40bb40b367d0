// The CPU kernels built for the portable path (any CPU; the compiler's baseline vector width).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <climits>
#include <new>


#include "attention.h"

namespace posattn {
namespace generic {
#include "attention_kernel.h"
}  // namespace generic
}  // namespace posattn
