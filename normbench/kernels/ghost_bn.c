/* Ghost batch norm: x (k * group samples x c channels x sp positions; sp = 1 for flat features),
   each run of `group` consecutive samples normalized with its own per-channel statistics (over the
   run's samples and positions), forward and backward in one pass each.

   Compiled with lstm_step.c into one library (normbench/kernels/build.py), twice: -DREAL=float
   and -DREAL=double. PyTorch's way takes about twenty small kernels (flat) or layout copies each
   way (spatial) for this; at the MLP's sizes (64 x 256, sub-batches of 8) their fixed costs are
   most of a training step. Reciprocals are multiplied rather than divided by: the divisions, not
   the passes over x, were half the forward's time (flat statistics: common.h's col_stats, which the
   LSTM's batch norm shares). */

#include "common.h"

/* The running averages' update after sub-batch s: r = (1 - f) r + f stat, f = factors[s]. */
static void FN(update_running)(long c, IN mu, IN v, OUT running_mean, OUT running_var, real f) {
    for (long j = 0; j < c; j++) {
        running_mean[j] = (1 - f) * running_mean[j] + f * mu[j];
        running_var[j] = (1 - f) * running_var[j] + f * v[j];
    }
}

/* Flat features: every loop runs along the channels, which vectorizes. */
static void FN(flat_forward)(long k, long group, long c, real eps, IN x, IN w, IN b, OUT y, OUT mean, OUT var,
                             OUT rstd, OUT running_mean, OUT running_var, const double *restrict factors) {
    const real unbias = group > 1 ? (real)group / (real)(group - 1) : (real)1;
    for (long s = 0; s < k; s++) {
        IN xs = x + s * group * c;
        real *ys = y + s * group * c, *mu = mean + s * c, *v = var + s * c, *r = rstd + s * c;
        FN(col_stats)(xs, group, c, eps, mu, v, r);
        for (long j = 0; j < c; j++) v[j] *= unbias;
        if (running_mean) FN(update_running)(c, mu, v, running_mean, running_var, (real)factors[s]);
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) ys[i * c + j] = (xs[i * c + j] - mu[j]) * r[j] * w[j] + b[j];
    }
}

/* Spatial features: each (sample, channel) row of sp positions is contiguous, so the sums run along
   the rows (common.h's interleaved sums) and the normalization too. */
static void FN(spatial_forward)(long k, long group, long c, long sp, real eps, IN x, IN w, IN b, OUT y,
                                OUT mean, OUT var, OUT rstd, OUT running_mean, OUT running_var,
                                const double *restrict factors) {
    const long m = group * sp;
    const real inv_n = (real)1 / (real)m, inv_n1 = m > 1 ? (real)1 / (real)(m - 1) : (real)1;
    for (long s = 0; s < k; s++) {
        IN xs = x + s * group * c * sp;
        real *ys = y + s * group * c * sp, *mu = mean + s * c, *v = var + s * c, *r = rstd + s * c;
        for (long j = 0; j < c; j++) {
            real total = 0, squares = 0;
            for (long i = 0; i < group; i++) total += FN(sum)(xs + (i * c + j) * sp, sp);
            mu[j] = total * inv_n;
            for (long i = 0; i < group; i++) squares += FN(sum_sq)(xs + (i * c + j) * sp, mu[j], sp);
            r[j] = (real)1 / SQRT(squares * inv_n + eps);
            v[j] = squares * inv_n1;
        }
        if (running_mean) FN(update_running)(c, mu, v, running_mean, running_var, (real)factors[s]);
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) {
                IN xr = xs + (i * c + j) * sp;
                real *yr = ys + (i * c + j) * sp;
                const real mj = mu[j], rj = r[j], wj = w[j], bj = b[j];
                for (long t = 0; t < sp; t++) yr[t] = (xr[t] - mj) * rj * wj + bj;
            }
    }
}

/* y = xhat w + b per sub-batch; keeps each sub-batch's mean, unbiased variance and 1/sqrt(var + eps)
   (biased var, for the backward pass), each (k x c). With running_mean and running_var (else NULL),
   updates them once per sub-batch, in order: r = (1 - f) r + f stat, f = factors[s]. */
void FN(ghost_bn_forward)(long k, long group, long c, long sp, double eps, IN x, IN w, IN b, OUT y, OUT mean,
                          OUT var, OUT rstd, OUT running_mean, OUT running_var, const double *restrict factors) {
    if (sp == 1)
        FN(flat_forward)(k, group, c, (real)eps, x, w, b, y, mean, var, rstd, running_mean, running_var, factors);
    else
        FN(spatial_forward)(k, group, c, sp, (real)eps, x, w, b, y, mean, var, rstd, running_mean, running_var,
                            factors);
}

static void FN(flat_backward)(long k, long group, long c, IN x, IN mean, IN rstd, IN w, IN dy, OUT dx, OUT dw,
                              OUT db, OUT sums) {
    real *sg = sums, *sgx = sums + c;
    const real inv_n = (real)1 / (real)group;
    for (long s = 0; s < k; s++) {
        IN xs = x + s * group * c;
        IN dys = dy + s * group * c;
        real *dxs = dx + s * group * c;
        IN mu = mean + s * c;
        IN r = rstd + s * c;
        for (long j = 0; j < c; j++) sg[j] = 0, sgx[j] = 0;
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) {
                real xhat = (xs[i * c + j] - mu[j]) * r[j];
                sg[j] += dys[i * c + j];
                sgx[j] += dys[i * c + j] * xhat;
            }
        for (long j = 0; j < c; j++) {
            dw[j] += sgx[j];
            db[j] += sg[j];
            sg[j] *= w[j] * inv_n;
            sgx[j] *= w[j] * inv_n;
        }
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) {
                real xhat = (xs[i * c + j] - mu[j]) * r[j];
                dxs[i * c + j] = r[j] * (dys[i * c + j] * w[j] - sg[j] - xhat * sgx[j]);
            }
    }
}

static void FN(spatial_backward)(long k, long group, long c, long sp, IN x, IN mean, IN rstd, IN w, IN dy,
                                 OUT dx, OUT dw, OUT db) {
    const real inv_n = (real)1 / (real)(group * sp);
    for (long s = 0; s < k; s++) {
        const long first = s * group * c * sp;
        for (long j = 0; j < c; j++) {
            const real mj = mean[s * c + j], rj = rstd[s * c + j], wj = w[j];
            real sg = 0, sgx = 0;
            for (long i = 0; i < group; i++) {
                const long row = first + (i * c + j) * sp;
                sg += FN(sum)(dy + row, sp);
                sgx += FN(sum_prod)(dy + row, x + row, mj, sp);
            }
            sgx *= rj;  /* the sum of dy xhat */
            dw[j] += sgx;
            db[j] += sg;
            sg *= wj * inv_n;
            sgx *= wj * inv_n;
            for (long i = 0; i < group; i++) {
                const long row = first + (i * c + j) * sp;
                IN xr = x + row;
                IN dyr = dy + row;
                real *dxr = dx + row;
                for (long t = 0; t < sp; t++) {
                    real xhat = (xr[t] - mj) * rj;
                    dxr[t] = rj * (dyr[t] * wj - sg - xhat * sgx);
                }
            }
        }
    }
}

/* dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w, the means over each sub-batch's samples
   and positions; writes the affine's gradients to dw and db. sums (2 x c) is scratch. */
void FN(ghost_bn_backward)(long k, long group, long c, long sp, IN x, IN mean, IN rstd, IN w, IN dy, OUT dx,
                           OUT dw, OUT db, OUT sums) {
    for (long j = 0; j < c; j++) dw[j] = 0, db[j] = 0;
    if (sp == 1)
        FN(flat_backward)(k, group, c, x, mean, rstd, w, dy, dx, dw, db, sums);
    else
        FN(spatial_backward)(k, group, c, sp, x, mean, rstd, w, dy, dx, dw, db);
}
