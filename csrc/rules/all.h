/* rules/all.h -- every rule, in fa_rule order. Included by rules.c (with FA_HOST: the
 * per-step constants) and by kernel.h once per element type (the element updates).
 * Adding a rule: its header here, its fa_rule value, its entries in rules.c and in
 * kernel.h's table, its NumPy reference and its Python class. */
#include "adam.h"
#include "sgd.h"
#include "adagrad.h"
#include "rmsprop.h"
#include "adamax.h"
#include "nadam.h"
#include "radam.h"
#include "lion.h"
