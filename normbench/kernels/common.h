/* What normbench's C kernels share. Each .c file is compiled twice, with -DREAL=float and
   -DREAL=double; FN(name) names a function for that precision (name_float, name_double), which is how
   normbench/kernels/build.py finds them. */

#ifndef NORMBENCH_COMMON_H
#define NORMBENCH_COMMON_H

#include <math.h>

#ifndef REAL
#define REAL float
#endif

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, REAL)

typedef REAL real;
/* Array parameters: no two of them overlap, which lets the compiler vectorize without run-time checks. */
#define IN const real *restrict
#define OUT real *restrict

static inline float sqrt_float(float x) { return sqrtf(x); }
static inline double sqrt_double(double x) { return sqrt(x); }
#define SQRT CAT(sqrt, REAL)

/* Sums over m consecutive values: of x, of (x - mu)^2, and of g (x - mu), in LANES interleaved
   partial sums, which the compiler can vectorize (it may not reorder one running sum). */
#define LANES 8
#define REDUCE(term)                                                   \
    real acc[LANES] = {0}, total = 0;                                  \
    long j = 0;                                                        \
    for (; j + LANES <= m; j += LANES)                                 \
        for (long l = 0; l < LANES; l++) acc[l] += term(j + l);        \
    for (; j < m; j++) acc[0] += term(j);                              \
    for (long l = 0; l < LANES; l++) total += acc[l];                  \
    return total;

#define X(k) x[k]
#define SQ(k) ((x[k] - mu) * (x[k] - mu))
#define PROD(k) (g[k] * (x[k] - mu))
static inline real FN(sum)(IN x, long m) { REDUCE(X) }
static inline real FN(sum_sq)(IN x, real mu, long m) { REDUCE(SQ) }
static inline real FN(sum_prod)(IN g, IN x, real mu, long m) { REDUCE(PROD) }
#undef X
#undef SQ
#undef PROD

/* Per-column mean, biased variance and 1/sqrt(var + eps) of x (n x c): batch norm's statistics over
   the rows, the loops along the columns (which vectorize). Reciprocals are multiplied rather than
   divided by: on this project's CPUs the divisions cost as much as the passes over x. */
static inline void FN(col_stats)(IN x, long n, long c, real eps, OUT mean, OUT var, OUT rstd) {
    const real inv_n = (real)1 / (real)n;
    for (long j = 0; j < c; j++) mean[j] = 0, var[j] = 0;
    for (long i = 0; i < n; i++)
        for (long j = 0; j < c; j++) mean[j] += x[i * c + j];
    for (long j = 0; j < c; j++) mean[j] *= inv_n;
    for (long i = 0; i < n; i++)
        for (long j = 0; j < c; j++) var[j] += (x[i * c + j] - mean[j]) * (x[i * c + j] - mean[j]);
    for (long j = 0; j < c; j++) {
        var[j] *= inv_n;
        rstd[j] = (real)1 / SQRT(var[j] + eps);
    }
}

#endif
