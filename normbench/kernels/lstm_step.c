/* One LSTM step with norms inside, forward and backward, as single passes over plain arrays.

   Compiled by normbench/kernels/build.py with the machine's C compiler (once per machine, cached),
   twice: -DREAL=float and -DREAL=double. normbench/models/rnn/native.py calls it through ctypes with
   the tensors' data pointers; W_h's matmuls stay with PyTorch. Every array is C-contiguous, rows =
   the batch.

   A norm is given by `groups` and `cols`: cols = 0 normalizes each row in `groups` groups of
   consecutive features (layer norm: groups = 1; group norm), cols = 1 normalizes each feature over
   the rows (batch norm with the batch's statistics). Its mean and 1/sqrt(var + eps) are kept for the
   backward pass: one per (row, group), or one per feature.

   Gates are laid out (i, f, o, g), as in normbench's NormLSTM:
     y = norm_h(a) + x,  i, f, o = sigmoid(y),  g = tanh(y),  c = f c_prev + i g,  h = o tanh(norm_c(c)).

   float uses a polynomial exp written so that the compiler can vectorize the gate loops: sigmoid within
   2.5 ulp, tanh within 7.4 ulp (1.8e-7) of the exact values; double uses the C library's exp and tanh.
   NaN and infinity go through as in PyTorch's kernels: sigmoid(NaN) = NaN, tanh(-inf) = -1. */

#include <stdint.h>
#include <string.h>

#include "common.h"

/* exp for float: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2; Cephes' coefficients. */
static inline float exp_f(float x) {
    x = x > 89.0f ? 89.0f : x;  /* from about 88.4 up, 2^128 = infinity, as exp overflows near there */
    x = x < -87.3365447505531f ? -87.3365447505531f : x;  /* comparisons keep NaN */
    /* round to nearest by adding and removing 1.5 * 2^23: vectorizes without SSE4.1's roundps */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    n = n == n ? n : 0.0f;  /* NaN: p is NaN already */
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
static inline float sigmoid_float(float x) { return 1.0f / (1.0f + exp_f(-x)); }
static inline float tanh_float(float x) {
    /* 2 sigmoid(2x) - 1, and near 0, where that loses relative precision, its Taylor series */
    float x2 = x * x;
    float small = x + x * x2 * (-0.333333333f + x2 * (0.133333333f + x2 * (-0.0539682540f + x2 * 0.0218694885f)));
    float large = 2.0f / (1.0f + exp_f(-2.0f * x)) - 1.0f;
    return x2 < 0.0625f ? small : large;
}
static inline double sigmoid_double(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline double tanh_double(double x) { return tanh(x); }

#define SIGMOID CAT(sigmoid, REAL)
#define TANH CAT(tanh, REAL)

/* (sum, sum_sq and sum_prod, the vectorizable sums, are in common.h.) */

/* Mean and 1/sqrt(var + eps) of x (n x c) per (row, group), or per column; var is the biased one
   (per column, for batch norm's running averages: required there, unused otherwise). */
static void FN(stats)(IN x, long n, long c, long groups, int cols, real eps, OUT mean, OUT rstd, OUT var) {
    if (cols) {
        FN(col_stats)(x, n, c, eps, mean, var, rstd);
        return;
    }
    long m = c / groups;
    if (groups < LANES) {  /* few long groups (layer norm): partial sums along each */
        for (long k = 0; k < n * groups; k++) {
            const real *row = x + k * m;
            real mu = FN(sum)(row, m) / (real)m;
            mean[k] = mu;
            rstd[k] = (real)1 / SQRT(FN(sum_sq)(row, mu, m) / (real)m + eps);
        }
        return;
    }
    /* many short groups: every group of a row at once, the loops over groups vectorized */
    for (long i = 0; i < n; i++) {
        const real *xi = x + i * c;
        real *mu = mean + i * groups, *r = rstd + i * groups;
        for (long k = 0; k < groups; k++) mu[k] = 0, r[k] = 0;
        for (long j = 0; j < m; j++)
            for (long k = 0; k < groups; k++) mu[k] += xi[k * m + j];
        for (long k = 0; k < groups; k++) mu[k] /= (real)m;
        for (long j = 0; j < m; j++)
            for (long k = 0; k < groups; k++) r[k] += (xi[k * m + j] - mu[k]) * (xi[k * m + j] - mu[k]);
        for (long k = 0; k < groups; k++) r[k] = (real)1 / SQRT(r[k] / (real)m + eps);
    }
}

/* The gradient wrt x of xhat = (x - mean) * rstd, given g = dL/dxhat (n x c), written over g:
   rstd * (g - mean(g) - xhat * mean(g * xhat)), the means over each normalized set. */
static void FN(norm_backward)(OUT g, IN x, long n, long c, long groups, int cols, IN mean, IN rstd,
                              OUT sums) {
    if (cols) {
        real *sg = sums, *sgx = sums + c;
        for (long j = 0; j < c; j++) sg[j] = 0, sgx[j] = 0;
        for (long i = 0; i < n; i++)
            for (long j = 0; j < c; j++) {
                sg[j] += g[i * c + j];
                sgx[j] += g[i * c + j] * (x[i * c + j] - mean[j]) * rstd[j];
            }
        const real inv_n = (real)1 / (real)n;
        for (long j = 0; j < c; j++) sg[j] *= inv_n, sgx[j] *= inv_n;
        for (long i = 0; i < n; i++)
            for (long j = 0; j < c; j++) {
                real xhat = (x[i * c + j] - mean[j]) * rstd[j];
                g[i * c + j] = rstd[j] * (g[i * c + j] - sg[j] - xhat * sgx[j]);
            }
        return;
    }
    long m = c / groups;
    if (groups < LANES) {
        for (long k = 0; k < n * groups; k++) {
            real *gk = g + k * m;
            const real *xk = x + k * m;
            real mu = mean[k], r = rstd[k];
            real sg = FN(sum)(gk, m) / (real)m, sgx = FN(sum_prod)(gk, xk, mu, m) * r / (real)m;
            for (long j = 0; j < m; j++) gk[j] = r * (gk[j] - sg - (xk[j] - mu) * r * sgx);
        }
        return;
    }
    real *sg = sums, *sgx = sums + groups;  /* every group of a row at once, as in stats() */
    for (long i = 0; i < n; i++) {
        real *gi = g + i * c;
        const real *xi = x + i * c, *mu = mean + i * groups, *r = rstd + i * groups;
        for (long k = 0; k < groups; k++) sg[k] = 0, sgx[k] = 0;
        for (long j = 0; j < m; j++)
            for (long k = 0; k < groups; k++) {
                sg[k] += gi[k * m + j];
                sgx[k] += gi[k * m + j] * (xi[k * m + j] - mu[k]);
            }
        for (long k = 0; k < groups; k++) sg[k] /= (real)m, sgx[k] *= r[k] / (real)m;
        for (long j = 0; j < m; j++)
            for (long k = 0; k < groups; k++) {
                long at = k * m + j;
                gi[at] = r[k] * (gi[at] - sg[k] - (xi[at] - mu[k]) * r[k] * sgx[k]);
            }
    }
}

/* Row i's mean and rstd per feature: the per-column arrays themselves, or row i's (row, group) values
   spread over its features in `buf` (2 x c), so that the loops over features read them alike. */
static void FN(row_stats)(long i, long c, long groups, int cols, IN mean, IN rstd, OUT buf, const real **mu,
                          const real **r) {
    if (cols) {
        *mu = mean, *r = rstd;
        return;
    }
    long m = c / groups;
    for (long k = 0; k < groups; k++)
        for (long j = k * m; j < (k + 1) * m; j++) buf[j] = mean[i * groups + k], buf[c + j] = rstd[i * groups + k];
    *mu = buf, *r = buf + c;
}

/* Forward of step t. a (n x 4H): W_h h_{t-1}; x (n x 4H): the normalized input projection;
   wh, bh: norm_h's affine (the gate bias in bh). Writes s (n x 4H: i, f, o, g after their
   nonlinearities), c and tc = tanh(norm_c(c)) and h (n x H), and each norm's statistics. */
void FN(lstm_forward)(long n, long hid, IN a, IN x, IN c_prev, OUT s, OUT c, OUT tc, OUT h,
                      IN wh, IN bh, long gh, int colsh, double eps_h, OUT mean_h, OUT rstd_h, OUT var_h,
                      IN wc, IN bc, long gc, int colsc, double eps_c, OUT mean_c, OUT rstd_c, OUT var_c,
                      OUT buf) {
    long c4 = 4 * hid;
    const real *row_mu, *row_r;  /* row i's statistics per feature: see row_stats */
    FN(stats)(a, n, c4, gh, colsh, (real)eps_h, mean_h, rstd_h, var_h);
    for (long i = 0; i < n; i++) {
        const real *ai = a + i * c4, *xi = x + i * c4;
        real *si = s + i * c4;
        FN(row_stats)(i, c4, gh, colsh, mean_h, rstd_h, buf, &row_mu, &row_r);
        const real *restrict mu = row_mu, *restrict r = row_r;  /* not written in this row's loops */
        for (long j = 0; j < c4; j++) si[j] = (ai[j] - mu[j]) * r[j] * wh[j] + bh[j] + xi[j];
        for (long j = 0; j < 3 * hid; j++) si[j] = SIGMOID(si[j]);
        for (long j = 3 * hid; j < c4; j++) si[j] = TANH(si[j]);
        real *ci = c + i * hid;
        const real *cp = c_prev + i * hid;
        for (long j = 0; j < hid; j++) ci[j] = si[hid + j] * cp[j] + si[j] * si[3 * hid + j];
    }
    FN(stats)(c, n, hid, gc, colsc, (real)eps_c, mean_c, rstd_c, var_c);
    for (long i = 0; i < n; i++) {
        const real *ci = c + i * hid, *si = s + i * c4;
        real *ti = tc + i * hid, *hi = h + i * hid;
        FN(row_stats)(i, hid, gc, colsc, mean_c, rstd_c, buf, &row_mu, &row_r);
        const real *restrict mu = row_mu, *restrict r = row_r;  /* not written in this row's loops */
        for (long j = 0; j < hid; j++) ti[j] = (ci[j] - mu[j]) * r[j] * wc[j] + bc[j];
        for (long j = 0; j < hid; j++) ti[j] = TANH(ti[j]);
        for (long j = 0; j < hid; j++) hi[j] = si[2 * hid + j] * ti[j];
    }
}

/* Backward of step t, given dh = dL/dh_t and, in dc, dL/dc_{t+1} (ignored when f_next is NULL, the
   last step); f_next: the forget gate of step t + 1. Writes dc = dL/dc_t, dy = dL/dy (n x 4H, also
   x's gradient) and da = dL/da (n x 4H); adds the affines' gradients to dwh, dbh, dwc, dbc.
   gc_buf (n x H), sums and buf (2 x 4H each) are scratch. */
void FN(lstm_backward)(long n, long hid, IN a, IN s, IN c_prev, IN c, IN tc, IN dh, OUT dc, IN f_next,
                       OUT dy, OUT da, OUT gc_buf, OUT sums,
                       IN wh, long gh, int colsh, IN mean_h, IN rstd_h, OUT dwh, OUT dbh,
                       IN wc, long gc, int colsc, IN mean_c, IN rstd_c, OUT dwc, OUT dbc, OUT buf) {
    long c4 = 4 * hid;
    const real *row_mu, *row_r;  /* row i's statistics per feature: see row_stats */
    for (long i = 0; i < n; i++) {  /* through h = o tanh(norm_c(c)) to norm_c's normalized values */
        const real *si = s + i * c4, *ti = tc + i * hid, *ci = c + i * hid, *dhi = dh + i * hid;
        real *gi = gc_buf + i * hid;
        FN(row_stats)(i, hid, gc, colsc, mean_c, rstd_c, buf, &row_mu, &row_r);
        const real *restrict mu = row_mu, *restrict r = row_r;  /* not written in this row's loops */
        for (long j = 0; j < hid; j++) {
            real dyc = dhi[j] * si[2 * hid + j] * (1 - ti[j] * ti[j]);
            dwc[j] += dyc * (ci[j] - mu[j]) * r[j];
            dbc[j] += dyc;
            gi[j] = dyc * wc[j];
        }
    }
    FN(norm_backward)(gc_buf, c, n, hid, gc, colsc, mean_c, rstd_c, sums);
    for (long i = 0; i < n; i++) {  /* dc_t, then each gate's pre-activation */
        const real *si = s + i * c4, *ti = tc + i * hid, *cp = c_prev + i * hid, *dhi = dh + i * hid;
        const real *gi = gc_buf + i * hid;
        real *dci = dc + i * hid, *dyi = dy + i * c4;
        if (f_next) {
            const real *fi = f_next + i * c4 + hid;
            for (long j = 0; j < hid; j++) dci[j] = gi[j] + dci[j] * fi[j];
        } else {
            for (long j = 0; j < hid; j++) dci[j] = gi[j];
        }
        for (long j = 0; j < hid; j++) {
            real ig = si[j], fg = si[hid + j], og = si[2 * hid + j], gg = si[3 * hid + j];
            dyi[j] = dci[j] * gg * ig * (1 - ig);
            dyi[hid + j] = dci[j] * cp[j] * fg * (1 - fg);
            dyi[2 * hid + j] = dhi[j] * ti[j] * og * (1 - og);
            dyi[3 * hid + j] = dci[j] * ig * (1 - gg * gg);
        }
    }
    for (long i = 0; i < n; i++) {  /* norm_h's affine, then its input */
        const real *ai = a + i * c4, *dyi = dy + i * c4;
        real *dai = da + i * c4;
        FN(row_stats)(i, c4, gh, colsh, mean_h, rstd_h, buf, &row_mu, &row_r);
        const real *restrict mu = row_mu, *restrict r = row_r;  /* not written in this row's loops */
        for (long j = 0; j < c4; j++) {
            dwh[j] += dyi[j] * (ai[j] - mu[j]) * r[j];
            dbh[j] += dyi[j];
            dai[j] = dyi[j] * wh[j];
        }
    }
    FN(norm_backward)(da, a, n, c4, gh, colsh, mean_h, rstd_h, sums);
}

/* Batch norm's running averages after the forward pass: step t updates row rows[t] with its batch
   mean and (unbiased) variance by factor factors[t] (n > 1 rows of batch). */
void FN(running_update)(long steps, long c, long n, const long *restrict rows, const double *restrict factors,
                        IN mean, IN var, OUT running_mean, OUT running_var) {
    real unbias = n > 1 ? (real)n / (real)(n - 1) : (real)1;
    for (long t = 0; t < steps; t++) {
        real m = (real)factors[t];
        real *rm = running_mean + rows[t] * c, *rv = running_var + rows[t] * c;
        for (long j = 0; j < c; j++) {
            rm[j] = (1 - m) * rm[j] + m * mean[t * c + j];
            rv[j] = (1 - m) * rv[j] + m * var[t * c + j] * unbias;
        }
    }
}

/* Group norm of x (n x c, groups of c / groups consecutive features per row) with a per-feature affine,
   for the input projections of every step at once: y = xhat w + b, keeping mean and rstd (n x groups). */
void FN(group_norm_forward)(long n, long c, long groups, double eps, IN x, IN w, IN b, OUT y, OUT mean,
                            OUT rstd, OUT buf) {
    const real *row_mu, *row_r;  /* row i's statistics per feature: see row_stats */
    FN(stats)(x, n, c, groups, 0, (real)eps, mean, rstd, NULL);
    for (long i = 0; i < n; i++) {
        const real *xi = x + i * c;
        real *yi = y + i * c;
        FN(row_stats)(i, c, groups, 0, mean, rstd, buf, &row_mu, &row_r);
        const real *restrict mu = row_mu, *restrict r = row_r;  /* not written in this row's loops */
        for (long j = 0; j < c; j++) yi[j] = (xi[j] - mu[j]) * r[j] * w[j] + b[j];
    }
}

/* Its backward: dx from dy, and the affine's gradients added to dw and db. */
void FN(group_norm_backward)(long n, long c, long groups, IN x, IN mean, IN rstd, IN w, IN dy, OUT dx, OUT dw,
                             OUT db, OUT buf) {
    const real *row_mu, *row_r;  /* row i's statistics per feature: see row_stats */
    for (long i = 0; i < n; i++) {
        const real *xi = x + i * c, *dyi = dy + i * c;
        real *dxi = dx + i * c;
        FN(row_stats)(i, c, groups, 0, mean, rstd, buf, &row_mu, &row_r);
        const real *restrict mu = row_mu, *restrict r = row_r;  /* not written in this row's loops */
        for (long j = 0; j < c; j++) {
            dw[j] += dyi[j] * (xi[j] - mu[j]) * r[j];
            db[j] += dyi[j];
            dxi[j] = dyi[j] * w[j];
        }
    }
    FN(norm_backward)(dx, x, n, c, groups, 0, mean, rstd, buf);
}
