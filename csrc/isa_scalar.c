/* Every rule's kernels for the scalar path; its compile flags are set in CMakeLists.txt. */
#define FA_SUFFIX scalar
#include "kernel.h"
