/* rules/adagrad.h -- AdaGrad (Duchi, Hazan & Singer 2011), as torch.optim.Adagrad;
 * fastadam/reference/adagrad.py is the same sequence in NumPy.
 *
 * Per element, in T (constants rounded once from double; clr = lr/(1 + (t-1)*lr_decay)):
 *     g = grad * grad_mul
 *     g = g + l2_weight_decay * p                         [l2]
 *     s = s + g * g
 *     d = sqrt(s) + eps
 *     p = p - (clr * g) / d
 */
#ifndef FA_RULE_ADAGRAD_H
#define FA_RULE_ADAGRAD_H
enum { FA_ADAGRAD_LR_DECAY, FA_ADAGRAD_EPS }; /* hyper */
enum { FA_ADAGRAD_SUM = FA_STATE0 };          /* streams */
enum { ADAGRAD_L2_WEIGHT_DECAY = FA_C_RULE, ADAGRAD_EPS, ADAGRAD_CLR };
#define ADAGRAD_V_L2 (1u << FA_V_RULE_SHIFT)
#endif

#ifdef FA_HOST
static void fa_adagrad_consts(fa_consts *c, const fa_options *o, double t, double scalar)
{
    (void)scalar;
    c->v[ADAGRAD_L2_WEIGHT_DECAY] = o->weight_decay;
    c->v[ADAGRAD_EPS] = o->hyper[FA_ADAGRAD_EPS];
    c->v[ADAGRAD_CLR] = o->lr / (1.0 + (t - 1.0) * o->hyper[FA_ADAGRAD_LR_DECAY]);
    c->variant |= o->weight_decay != 0.0 ? ADAGRAD_V_L2 : 0u;
}

static unsigned fa_adagrad_required(const fa_options *o)
{
    (void)o;
    return 1u;
}

#else
FA_INLINE void FA_FN(adagrad_body)(const fa_consts *c, char *const *s, size_t n, const unsigned V,
                                   const fa_fused *fx_)
{
    (void)fx_;
    FA_STREAM(param, FA_PARAM);
    FA_STREAM(grad, FA_GRAD);
    FA_STREAM(sum, FA_ADAGRAD_SUM);
    FA_EMA_LOCALS(c, s)
    const T grad_mul = (T)c->v[FA_C_GRAD_MUL];
    const T l2_weight_decay = (T)c->v[ADAGRAD_L2_WEIGHT_DECAY];
    const T eps = (T)c->v[ADAGRAD_EPS];
    const T clr = (T)c->v[ADAGRAD_CLR];
    (void)l2_weight_decay;
#define FA_ADAGRAD_ELEMENT(i)                              \
    {                                                      \
        T p = FA_LD(param, i);                             \
        T g = FA_LD(grad, i) * grad_mul;                   \
        if (V & ADAGRAD_V_L2) g = g + l2_weight_decay * p; \
        const T sq = FA_LD(sum, i) + g * g;                \
        const T d = FA_SQRT(sq) + eps;                     \
        FA_ST(sum, i, sq);                                 \
        p = p - (clr * g) / d;                             \
        FA_EMA_UPDATE(V, i, p)                             \
        FA_ST(param, i, p);                                \
    }
    FA_LOOP(V, s, n, FA_ADAGRAD_ELEMENT);
#undef FA_ADAGRAD_ELEMENT
}
FA_DEFINE_ENTRY(adagrad, 8)
#endif
