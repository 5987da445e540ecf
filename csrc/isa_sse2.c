/* Every rule's kernels for the sse2 path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX sse2
#include "kernel.h"
