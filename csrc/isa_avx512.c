/* Every rule's kernels for the avx512 path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX avx512
#include "kernel.h"
