"""The LSTM and GRU recurrences with norms inside, each one autograd node with a hand-written backward.

Autograd through a step loop makes some twenty nodes per step, each with its own bookkeeping. Here
a step is one matmul and a few elementwise kernels each way, and everything a step produces is
written into buffers for the whole sequence (the matmul's output, the gates, the cell states, the
hidden states), so nothing is stacked afterwards: W_h's gradient is one matmul over all steps, and
the norms' affine gradients come from per-step outputs or one reduction over all steps.

The LSTM takes g = tanh(x) as 2 sigmoid(2x) - 1, so one sigmoid covers all four gates (tanh costs
several sigmoids on CPU); the doubling is folded into the g rows of norm_h's affine and a scale on
x_t. Its backward first computes, for all steps at once, the factor that turns each gate's incoming
gradient into the gradient of its pre-activation; a step then needs one multiplication for all
gates. The norm twins are in `step_norms`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_aten = torch.ops.aten


class LSTMRecurrence(torch.autograd.Function):
    """h_T of `NormLSTM._loop`. xs (T, N, 4H): the normalized input projections, gates (i, f, o, g);
    w_nh, b_nh: norm_h's affine, with the gate bias in b_nh; w_nc, b_nc: norm_c's."""

    @staticmethod
    def forward(ctx, xs, w_h, w_nh, b_nh, w_nc, b_nc, norm_h, norm_c):
        steps, n, hid = xs.shape[0], xs.shape[1], w_h.shape[1]
        k = torch.ones_like(w_nh)
        k[3 * hid:] = 2
        w_nh2, b_nh2 = w_nh * k, b_nh * k
        a = xs.new_empty(steps, n, 4 * hid)  # W_h h_{t-1}: norm_h's input
        s = xs.new_empty(steps, n, 4 * hid)  # sigmoid of the gates: i, f, o, (g + 1) / 2
        c = xs.new_zeros(steps + 1, n, hid)  # cell states, c_0 = 0
        hs = xs.new_zeros(steps + 1, n, hid)  # hidden states, h_0 = 0
        tanh_c = xs.new_empty(steps, n, hid)
        w_ht, h_all, c_all = w_h.t(), hs.unbind(0), c.unbind(0)
        # every step's views, made in one call each rather than one per step
        views = zip(xs.unbind(0), a.unbind(0), s.unbind(0), *(part.unbind(0) for part in s.split(hid, dim=2)),
                    tanh_c.unbind(0))
        for t, (x_t, a_t, s_t, i, f, o, s_g, tanh_c_t) in enumerate(views):
            y = norm_h.forward(torch.mm(h_all[t], w_ht, out=a_t), w_nh2, b_nh2, t)
            torch.sigmoid(y.addcmul_(x_t, k), out=s_t)
            c_t = torch.mul(f, c_all[t], out=c_all[t + 1])  # c = f c + i g, with g = 2 s_g - 1
            c_t.sub_(i).addcmul_(i, s_g, value=2)
            torch.tanh(norm_c.forward(c_t, w_nc, b_nc, t), out=tanh_c_t)
            torch.mul(o, tanh_c_t, out=h_all[t + 1])
        ctx.norms = norm_h, norm_c
        ctx.save_for_backward(w_h, w_nh, w_nc, s, c, hs, tanh_c, a)
        return hs[steps].clone()

    @staticmethod
    def factors(s: torch.Tensor, c: torch.Tensor, tanh_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For all steps at once: p (T, N, 4, H), the gradient of the gate pre-activations per unit
        gradient of c_t (i, f, g) or of h_t (o); and p_c (T, N, H), that of norm_c's output per unit
        gradient of h_t."""
        hid = c.shape[2]
        i, f, o, s_g = s.split(hid, dim=2)
        p = torch.empty_like(s).view(*s.shape[:2], 4, hid)
        g = s_g * 2 - 1
        _aten.sigmoid_backward.grad_input(g, i, grad_input=p[:, :, 0])  # dc/di = g
        _aten.sigmoid_backward.grad_input(c[:-1], f, grad_input=p[:, :, 1])  # dc/df = c_{t-1}
        _aten.sigmoid_backward.grad_input(tanh_c, o, grad_input=p[:, :, 2])  # dh/do = tanh(norm_c(c))
        _aten.tanh_backward.grad_input(i, g, grad_input=p[:, :, 3])  # dc/dg = i
        return p, _aten.tanh_backward(o, tanh_c)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        w_h, w_nh, w_nc, s, c, hs, tanh_c, a = ctx.saved_tensors
        norm_h, norm_c = ctx.norms
        steps, n, hid = c.shape[0] - 1, c.shape[1], c.shape[2]
        p, p_c = LSTMRecurrence.factors(s, c, tanh_c)
        dxs = torch.empty_like(s)  # the gates' gradients: xs's, and norm_h's output's
        dys_c = torch.empty_like(tanh_c)  # norm_c's output's
        das = torch.empty_like(a)  # norm_h's input's
        # every step's views, made in one call each rather than one per step
        views = zip(p.unbind(0), p[:, :, 2].unbind(0), p_c.unbind(0), dxs.unbind(0),
                    dxs.view(steps, n, 4, hid).unbind(0), dxs[:, :, 2 * hid:3 * hid].unbind(0), dys_c.unbind(0),
                    das.unbind(0), s[:, :, hid:2 * hid].unbind(0))
        dc = f_next = None
        for t, (p_t, p_o, p_c_t, dx_t, dx4_t, dx_o, dy_c, da_t, f_t) in reversed(list(enumerate(views))):
            dc_t = norm_c.backward(torch.mul(dh, p_c_t, out=dy_c), w_nc, t)
            dc = dc_t if dc is None else dc_t.addcmul_(dc, f_next)
            f_next = f_t
            torch.mul(dc.unsqueeze(1), p_t, out=dx4_t)
            torch.mul(dh, p_o, out=dx_o)  # o takes its gradient from h_t, not c_t
            dh = torch.mm(da_t.copy_(norm_h.backward(dx_t, w_nh, t)), w_h)
        dw_h = das.view(-1, 4 * hid).t() @ hs[:-1].view(-1, hid)
        return dxs, dw_h, *norm_h.param_grads(dxs), *norm_c.param_grads(dys_c), None, None


class GRURecurrence(torch.autograd.Function):
    """h_T of `NormGRU._loop`. xs (T, N, 3H): the normalized input projections with the gate bias,
    gates (r, z, n); w_n, b_n: norm_h's affine, with b_hn in the n rows of b_n."""

    @staticmethod
    def forward(ctx, xs, w_h, w_n, b_n, norm_h):
        steps, n, hid = xs.shape[0], xs.shape[1], w_h.shape[1]
        a = xs.new_empty(steps, n, 3 * hid)  # W_h h_{t-1}: norm_h's input
        ys = []  # norm_h's output
        rz = xs.new_empty(steps, n, 2 * hid)
        cand = xs.new_empty(steps, n, hid)  # n_t
        hs = xs.new_zeros(steps + 1, n, hid)
        w_ht = w_h.t()
        for t, x_t in enumerate(xs.unbind(0)):
            y = norm_h.forward(torch.mm(hs[t], w_ht, out=a[t]), w_n, b_n, t)  # (N, 3H)
            rz_t = torch.add(x_t[:, :2 * hid], y[:, :2 * hid], out=rz[t]).sigmoid_()
            ys.append(y)
            torch.tanh(torch.addcmul(x_t[:, 2 * hid:], rz_t[:, :hid], y[:, 2 * hid:]), out=cand[t])
            torch.lerp(cand[t], hs[t], rz_t[:, hid:], out=hs[t + 1])  # (1 - z) n + z h
        ctx.norm_h, ctx.ys = norm_h, ys
        ctx.save_for_backward(w_h, w_n, a, rz, cand, hs)
        return hs[steps].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        w_h, w_n, a, rz, cand, hs = ctx.saved_tensors
        steps, hid = a.shape[0], w_h.shape[1]
        dxs = torch.empty_like(a)  # the gradient of the gates' input part
        dys = torch.empty_like(a)  # of norm_h's output
        das = torch.empty_like(a)  # of norm_h's input
        drz = dh.new_empty(dh.shape[0], 2 * hid)
        for t in reversed(range(steps)):
            r, z = rz[t, :, :hid], rz[t, :, hid:]
            dy = dys[t]
            dh_z = dh * z
            dv = _aten.tanh_backward.grad_input(dh - dh_z, cand[t], grad_input=dxs[t, :, 2 * hid:])
            torch.mul(dv, ctx.ys[t][:, 2 * hid:], out=drz[:, :hid])
            torch.mul(dh, hs[t] - cand[t], out=drz[:, hid:])
            _aten.sigmoid_backward.grad_input(drz, rz[t], grad_input=dy[:, :2 * hid])
            torch.mul(dv, r, out=dy[:, 2 * hid:])
            dxs[t, :, :2 * hid] = dy[:, :2 * hid]
            dh = torch.addmm(dh_z, das[t].copy_(ctx.norm_h.backward(dy, w_n, t)), w_h)
        dw_h = das.view(-1, 3 * hid).t() @ hs[:-1].view(-1, hid)
        return dxs, dw_h, *ctx.norm_h.param_grads(dys), None
