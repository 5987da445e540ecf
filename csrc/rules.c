/* rules.c -- each rule's host side: per-step constants (double precision, once per block
 * run), the state streams its options need, its per-block scalar state. Built with
 * baseline flags only; the element updates live in the same headers (kernel.h). */
#include "fastadam.h"
#include "dispatch.h"

#include <math.h>

/* What every rule's constants start with: the gradient's multiplier and the average's
 * weights. The rule adds its own (from FA_C_RULE on) and its variant bits. */
static void fa_common_consts(fa_consts *c, const fa_options *o)
{
    for (int k = 0; k < FA_MAX_CONSTS; k++) c->v[k] = 0.0;
    c->v[FA_C_GRAD_MUL] = (o->maximize ? -1.0 : 1.0) / o->grad_scale;
    c->v[FA_C_EMA_DECAY] = o->ema ? o->ema_decay : 0.0;
    c->v[FA_C_ONE_MINUS_EMA_DECAY] = o->ema ? 1.0 - o->ema_decay : 0.0;
    c->variant = o->ema ? FA_V_EMA : 0u;
}

#define FA_HOST 1
#include "rules/all.h"

/* Indexed by fa_rule. */
const fa_rule_host fa_rules[FA_RULE_COUNT] = {
    {"adam", 3, 0, fa_adam_consts, fa_adam_required, 0},
    {"sgd", 1, 0, fa_sgd_consts, fa_sgd_required, 0},
    {"adagrad", 1, 0, fa_adagrad_consts, fa_adagrad_required, 0},
    {"rmsprop", 3, 0, fa_rmsprop_consts, fa_rmsprop_required, 0},
    {"adamax", 2, 0, fa_adamax_consts, fa_adamax_required, 0},
    {"nadam", 2, 1, fa_nadam_consts, fa_nadam_required, fa_nadam_scalar_after},
    {"radam", 2, 0, fa_radam_consts, fa_radam_required, 0},
    {"lion", 1, 0, fa_lion_consts, fa_lion_required, 0},
};

static int valid(fa_rule rule)
{
    return rule >= 0 && rule < FA_RULE_COUNT;
}

void fa_consts_init(fa_rule rule, fa_consts *c, const fa_options *o, double step, double scalar)
{
    fa_common_consts(c, o);
    if (valid(rule)) fa_rules[rule].consts(c, o, step, scalar);
}

double fa_scalar_after(fa_rule rule, const fa_options *o, double step, double scalar)
{
    return valid(rule) && fa_rules[rule].scalar_after ? fa_rules[rule].scalar_after(o, step, scalar)
                                                      : scalar;
}

int fa_rule_has_scalar(fa_rule rule)
{
    return valid(rule) && fa_rules[rule].has_scalar;
}
unsigned fa_rule_required(fa_rule rule, const fa_options *o)
{
    return valid(rule) ? fa_rules[rule].required(o) : 0u;
}
int fa_rule_nstate(fa_rule rule)
{
    return valid(rule) ? fa_rules[rule].nstate : 0;
}
const char *fa_rule_name(fa_rule rule)
{
    return valid(rule) ? fa_rules[rule].name : "?";
}
