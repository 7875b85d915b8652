/* Ghost batch norm of flat features: x (k * group rows x c), each run of `group` consecutive rows
   normalized with its own per-feature statistics, forward and backward in one pass each.

   Compiled with lstm_step.c into one library (normbench/kernels/build.py), twice: -DREAL=float
   and -DREAL=double. PyTorch's way takes about twenty small kernels for this; at the MLP's sizes
   (64 x 256, sub-batches of 8) their fixed costs are most of a training step. */

#include "common.h"

/* y = xhat w + b per sub-batch; keeps each sub-batch's mean, unbiased variance and 1/sqrt(var + eps)
   (biased var, for the backward pass), each (k x c). With running_mean and running_var (else NULL),
   updates them once per sub-batch, in order: r = (1 - f) r + f stat, f = factors[s]. */
void FN(ghost_bn_forward)(long k, long group, long c, double eps, IN x, IN w, IN b, OUT y, OUT mean, OUT var,
                          OUT rstd, OUT running_mean, OUT running_var, const double *restrict factors) {
    for (long s = 0; s < k; s++) {
        IN xs = x + s * group * c;
        real *ys = y + s * group * c, *mu = mean + s * c, *v = var + s * c, *r = rstd + s * c;
        for (long j = 0; j < c; j++) mu[j] = 0, v[j] = 0;
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) mu[j] += xs[i * c + j];
        for (long j = 0; j < c; j++) mu[j] /= (real)group;
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) v[j] += (xs[i * c + j] - mu[j]) * (xs[i * c + j] - mu[j]);
        for (long j = 0; j < c; j++) {
            r[j] = (real)1 / SQRT(v[j] / (real)group + (real)eps);
            v[j] = group > 1 ? v[j] / (real)(group - 1) : v[j];
        }
        if (running_mean) {
            real f = (real)factors[s];
            for (long j = 0; j < c; j++) {
                running_mean[j] = (1 - f) * running_mean[j] + f * mu[j];
                running_var[j] = (1 - f) * running_var[j] + f * v[j];
            }
        }
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) ys[i * c + j] = (xs[i * c + j] - mu[j]) * r[j] * w[j] + b[j];
    }
}

/* dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w, the means over each sub-batch; adds
   the affine's gradients to dw and db. sums (2 x c) is scratch. */
void FN(ghost_bn_backward)(long k, long group, long c, IN x, IN mean, IN rstd, IN w, IN dy, OUT dx, OUT dw,
                           OUT db, OUT sums) {
    real *sg = sums, *sgx = sums + c;
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
            sg[j] *= w[j] / (real)group;
            sgx[j] *= w[j] / (real)group;
        }
        for (long i = 0; i < group; i++)
            for (long j = 0; j < c; j++) {
                real xhat = (xs[i * c + j] - mu[j]) * r[j];
                dxs[i * c + j] = r[j] * (dys[i * c + j] * w[j] - sg[j] - xhat * sgx[j]);
            }
    }
}
