/* The Adam kernel for the neon path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX neon
#include "adam_kernel.h"
