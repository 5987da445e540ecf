/* Every rule's kernels for the neon path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX neon
#include "kernel.h"
