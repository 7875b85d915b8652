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

#endif
