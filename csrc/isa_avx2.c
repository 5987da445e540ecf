/* Every rule's kernels for the avx2 path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX avx2
#include "kernel.h"
