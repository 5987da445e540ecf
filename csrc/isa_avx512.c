/* The Adam kernel for the avx512 path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX avx512
#include "adam_kernel.h"
