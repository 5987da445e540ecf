/* The Adam kernel for the scalar path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX scalar
#include "adam_kernel.h"
