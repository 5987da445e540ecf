/* The Adam kernel for the avx2 path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX avx2
#include "adam_kernel.h"
