"""torch wiring: autograd Functions over ``torch.library`` custom ops.

Each op family has a forward and a backward custom op (``na_rtc::fused_fwd``,
``na_rtc::fused_bwd``, ...) with a fake implementation that only computes
shapes, so eager mode, ``torch.compile(fullgraph=True)``, export and meta
tensors all see the same opaque ops. The custom ops take plain arguments
(lists of ints, bools, a float, the backend's name) and rebuild the validated
problem inside, then call that backend's op table; the backward never stores
gathered neighborhoods. An autograd Function per family connects forward and
backward.

Every backward is itself differentiable (double backward, e.g. gradient
penalties), through four ops that are closed under differentiation: the split
forward ops ``qk`` and ``av`` and their backward ops, each the bilinear map the
others' derivatives need (see :class:`QKBackward` and :class:`AVBackward`). A
first-order backward runs the backward custom op directly; only when autograd
records the backward (``create_graph=True`` with inputs that require grad)
does it go through those Functions, and the fused op's backward is then
recomputed from the split ops, which have no stride.

This module imports torch; it is only imported once a torch tensor is seen.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _args, backends
from .window import flat_slot_table


def _window(problem: _args.Problem) -> tuple[list[int], list[int], list[int], list[bool]]:
    axes = problem.axes
    return ([a.kernel_size for a in axes], [a.stride for a in axes], [a.dilation for a in axes],
            [bool(a.causal) for a in axes])


def _split_args(problem: _args.Problem, backend) -> tuple:
    """The window arguments of the split custom ops (no stride)."""
    kernel_size, _, dilation, causal = _window(problem)
    return kernel_size, dilation, causal, backend.name


def _fused_args(problem: _args.Problem, backend) -> tuple:
    return (*_window(problem), problem.scale, backend.name)


def _query_start(problem: _args.Problem) -> list[int] | None:
    """The fused custom ops' ``query_start``: where a query box starts (None: every position)."""
    return None if problem.query_box is None else [first for first, _ in problem.query_box]


def _ops(backend: str) -> dict:
    return backends.get(backend).ops


def _without_autocast(impl):
    """Run a custom op's implementation with autocast off: inputs arrive already
    in the autocast dtype (functional._autocast), and the backends' own math
    (the reference's matmuls) must keep its fp32/fp64 accumulation."""

    @functools.wraps(impl)
    def run(*args, **kwargs):
        device_type = args[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return impl(*args, **kwargs)

    return run


def _no_rpb_grad(like: Tensor) -> Tensor:
    """Stand-in for a missing bias gradient (custom ops cannot return None)."""
    return like.new_empty((0,))


def _lse_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _recorded(*tensors) -> bool:
    """Whether autograd records work on these tensors now: in a backward, only
    under ``create_graph=True`` (grad mode is off in a plain backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------- custom ops: fused


@torch.library.custom_op("na_rtc::fused_fwd", mutates_args=())
@_without_autocast
def fused_fwd(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor], kernel_size: list[int],
              stride: list[int], dilation: list[int], is_causal: list[bool], scale: float,
              backend: str, additional_keys: Optional[Tensor] = None,
              additional_values: Optional[Tensor] = None, query_start: Optional[list[int]] = None
              ) -> tuple[Tensor, Tensor]:
    problem = _args.fused_problem(len(kernel_size), query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, rpb, additional_keys, additional_values, query_start)
    extra = (additional_keys, additional_values) if problem.extra_tokens else ()
    return _ops(backend)["fused_forward"](problem, query, key, value, rpb, *extra)


@fused_fwd.register_fake
def _(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend, additional_keys=None,
      additional_values=None, query_start=None):
    return (query.new_empty((*query.shape[:-1], value.shape[-1])),  # the value's head dim
            query.new_empty(query.shape[:-1], dtype=_lse_dtype(query)))


@torch.library.custom_op("na_rtc::fused_bwd", mutates_args=())
@_without_autocast
def fused_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor],
              output: Optional[Tensor], logsumexp: Optional[Tensor], kernel_size: list[int], stride: list[int],
              dilation: list[int], is_causal: list[bool], scale: float,
              backend: str, grad_lse: Optional[Tensor] = None, additional_keys: Optional[Tensor] = None,
              additional_values: Optional[Tensor] = None, query_start: Optional[list[int]] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # output and logsumexp may be None (the plain na*d_backward functions): the backend recomputes them;
    # grad_lse, the logsumexp's gradient, may be None: none reaches it. Without extra tokens their gradients are
    # empty stand-ins
    problem = _args.fused_problem(len(kernel_size), query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, rpb, additional_keys, additional_values, query_start)
    extra = (additional_keys, additional_values) if problem.extra_tokens else ()
    grads = _ops(backend)["fused_backward"](problem, grad_out, query, key, value, rpb, output, logsumexp, grad_lse,
                                            *extra)
    dq, dk, dv, drpb = grads[:4]
    dxk, dxv = grads[4:] if extra else (_no_rpb_grad(query), _no_rpb_grad(query))
    return dq, dk, dv, _no_rpb_grad(query) if drpb is None else drpb, dxk, dxv


@fused_bwd.register_fake
def _(grad_out, query, key, value, rpb, output, logsumexp, kernel_size, stride, dilation, is_causal, scale, backend,
      grad_lse=None, additional_keys=None, additional_values=None, query_start=None):
    drpb = _no_rpb_grad(query) if rpb is None else rpb.new_empty(rpb.shape)
    extra = ((additional_keys.new_empty(additional_keys.shape), additional_values.new_empty(additional_values.shape))
             if additional_keys is not None else (_no_rpb_grad(query), _no_rpb_grad(query)))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), drpb, *extra


# ---------------------------------------------------------------- custom ops: split


@torch.library.custom_op("na_rtc::qk_fwd", mutates_args=())
@_without_autocast
def qk_fwd(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: list[int], dilation: list[int],
           is_causal: list[bool], backend: str) -> Tensor:
    problem = _args.qk_problem(len(kernel_size), query, key, kernel_size, dilation, is_causal, rpb)
    return _ops(backend)["qk_forward"](problem, query, key, rpb)


@qk_fwd.register_fake
def _(query, key, rpb, kernel_size, dilation, is_causal, backend):
    slots = 1
    for k in kernel_size:
        slots *= k
    return query.new_empty((*query.shape[:-1], slots))


@torch.library.custom_op("na_rtc::qk_bwd", mutates_args=())
@_without_autocast
def qk_bwd(grad_attn: Tensor, query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: list[int],
           dilation: list[int], is_causal: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    problem = _args.qk_problem(len(kernel_size), query, key, kernel_size, dilation, is_causal, rpb)
    dq, dk, drpb = _ops(backend)["qk_backward"](problem, grad_attn, query, key, rpb)
    return dq, dk, _no_rpb_grad(query) if drpb is None else drpb


@qk_bwd.register_fake
def _(grad_attn, query, key, rpb, kernel_size, dilation, is_causal, backend):
    drpb = _no_rpb_grad(query) if rpb is None else rpb.new_empty(rpb.shape)
    return query.new_empty(query.shape), key.new_empty(key.shape), drpb


@torch.library.custom_op("na_rtc::av_fwd", mutates_args=())
@_without_autocast
def av_fwd(attn: Tensor, value: Tensor, kernel_size: list[int], dilation: list[int], is_causal: list[bool],
           backend: str) -> Tensor:
    problem = _args.av_problem(len(kernel_size), attn, value, kernel_size, dilation, is_causal)
    return _ops(backend)["av_forward"](problem, attn, value)


@av_fwd.register_fake
def _(attn, value, kernel_size, dilation, is_causal, backend):
    return value.new_empty((*attn.shape[:-1], value.shape[-1]))  # the query's heads (GQA/MQA: more than value's)


@torch.library.custom_op("na_rtc::av_bwd", mutates_args=())
@_without_autocast
def av_bwd(grad_out: Tensor, attn: Tensor, value: Tensor, kernel_size: list[int], dilation: list[int],
           is_causal: list[bool], backend: str) -> tuple[Tensor, Tensor]:
    problem = _args.av_problem(len(kernel_size), attn, value, kernel_size, dilation, is_causal)
    return _ops(backend)["av_backward"](problem, grad_out, attn, value)


@av_bwd.register_fake
def _(grad_out, attn, value, kernel_size, dilation, is_causal, backend):
    return attn.new_empty(attn.shape), value.new_empty(value.shape)


# ---------------------------------------------------------------- split: the four differentiable maps
#
# Per window slot t of query i with key n(i, t), out-of-window (causal) slots excluded:
#   qk(a, b, r)[i, t]   = a_i . b_n(i,t) + r[bias index]   (-inf outside the window)
#   av(w, x)[i]         = sum_t w[i, t] x_n(i,t)
#   dot(a, b)[i, t]     = a_i . b_n(i,t)                   (0 outside the window)
#   scatter(w, a)[j]    = sum over (i, t) with n(i, t) = j of w[i, t] a_i
#   bias_sum(w)         = sum of w over every slot using each bias entry
# qk_bwd(g, q, k) = (av(g, k), scatter(g, q), bias_sum(g)) and
# av_bwd(g, w, v) = (dot(g, v), scatter(w, g)); the derivatives of these are
# again av, qk/dot and av_bwd, so the four ops serve every order.


def _qk(backend, problem, query, key, rpb) -> Tensor:
    return NAQK.apply(backend, problem, query, key, rpb)


def _av(backend, problem, attn, value) -> Tensor:
    return NAAV.apply(backend, problem, attn, value)


@functools.lru_cache(maxsize=32)
def _window_mask(axes, device: str) -> Tensor:
    """``[1, *spatial, 1, slots]``: which slots lie inside the window (causal windows can be shorter)."""
    valid = flat_slot_table(axes).valid
    shape = (1, *(a.length for a in axes), 1, valid.shape[-1])
    return torch.tensor(valid, device=device).reshape(shape)


def _dot(backend, problem, a, b, bias=None) -> Tensor:
    """``dot(a, b)`` plus the bias entry of every slot (``bias`` needs windows that are never cut short)."""
    logits = _qk(backend, problem, a, b, bias)
    if any(axis.causal for axis in problem.axes):
        logits = torch.where(_window_mask(problem.axes, str(logits.device)), logits, logits.new_zeros(()))
    return logits


def qk_backward(backend, problem, grad_attn, query, key, rpb) -> tuple:
    """``(dq, dk, drpb or None)`` of the split ``qk``; differentiable when autograd records it."""
    if _recorded(grad_attn, query, key):
        return QKBackward.apply(backend, problem, grad_attn, query, key, rpb)
    dq, dk, drpb = qk_bwd(grad_attn, query, key, rpb, *_split_args(problem, backend))
    return dq, dk, None if rpb is None else drpb


def av_backward(backend, problem, grad_out, attn, value) -> tuple:
    """``(dattn, dv)`` of the split ``av``; differentiable when autograd records it."""
    if _recorded(grad_out, attn, value):
        return AVBackward.apply(backend, problem, grad_out, attn, value)
    return av_bwd(grad_out, attn, value, *_split_args(problem, backend))


class NAQK(torch.autograd.Function):
    """(query, key, rpb) -> attention logits."""

    @staticmethod
    def forward(ctx, backend, problem, query, key, rpb):
        ctx.backend, ctx.problem = backend, problem
        ctx.save_for_backward(query, key, rpb)
        return qk_fwd(query, key, rpb, *_split_args(problem, backend))

    @staticmethod
    def backward(ctx, grad_attn):
        query, key, rpb = ctx.saved_tensors
        return (None, None, *qk_backward(ctx.backend, ctx.problem, grad_attn, query, key, rpb))


class NAAV(torch.autograd.Function):
    """(attn, value) -> output."""

    @staticmethod
    def forward(ctx, backend, problem, attn, value):
        ctx.backend, ctx.problem = backend, problem
        ctx.save_for_backward(attn, value)
        return av_fwd(attn, value, *_split_args(problem, backend))

    @staticmethod
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        return (None, None, *av_backward(ctx.backend, ctx.problem, grad_out, attn, value))


def _add(a, b):
    return b if a is None else a if b is None else a + b


class QKBackward(torch.autograd.Function):
    """(grad_attn, query, key, rpb) -> (dq, dk, drpb): the backward of :class:`NAQK`, recorded for double backward.

    ``dq = av(g, k)``, ``dk = scatter(g, q)``, ``drpb = bias_sum(g)``; their
    derivatives (``gq``, ``gk``, ``grpb`` flowing back): ``d g = dot(gq, k) +
    dot(q, gk) + bias(grpb)``, ``d q = av(g, gk)``, ``d k = scatter(g, gq)``.
    """

    @staticmethod
    def forward(ctx, backend, problem, grad_attn, query, key, rpb):
        ctx.backend, ctx.problem, ctx.has_rpb = backend, problem, rpb is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_attn, query, key)
        dq, dk, drpb = qk_bwd(grad_attn, query, key, rpb, *_split_args(problem, backend))
        return dq, dk, drpb if rpb is not None else None

    @staticmethod
    def backward(ctx, gq, gk, grpb):
        grad_attn, query, key = ctx.saved_tensors
        backend, problem = ctx.backend, ctx.problem
        grpb = grpb if ctx.has_rpb else None
        d_grad, d_query, d_key = None, None, None
        if gq is not None:
            # av_bwd(gq, g, k) = (dot(gq, k), scatter(g, gq)): one term of d g and all of d k
            d_grad, d_key = av_backward(backend, problem, gq, grad_attn, key)
        if gk is not None or grpb is not None:
            other = gk if gk is not None else torch.zeros_like(key)
            d_grad = _add(d_grad, _dot(backend, problem, query, other, grpb))
        if gk is not None:
            d_query = _av(backend, problem, grad_attn, gk)
        return None, None, d_grad, d_query, d_key, None


class AVBackward(torch.autograd.Function):
    """(grad_out, attn, value) -> (dattn, dv): the backward of :class:`NAAV`, recorded for double backward.

    ``dattn = dot(g, v)``, ``dv = scatter(w, g)``; their derivatives (``gw``,
    ``gv`` flowing back): ``d g = av(gw, v) + av(w, gv)``, ``d w = dot(g, gv)``,
    ``d v = scatter(gw, g)``.
    """

    @staticmethod
    def forward(ctx, backend, problem, grad_out, attn, value):
        ctx.backend, ctx.problem = backend, problem
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_out, attn, value)
        return av_bwd(grad_out, attn, value, *_split_args(problem, backend))

    @staticmethod
    def backward(ctx, gw, gv):
        grad_out, attn, value = ctx.saved_tensors
        backend, problem = ctx.backend, ctx.problem
        d_grad, d_attn, d_value = None, None, None
        if gw is not None:
            d_grad = _av(backend, problem, gw, value)
        if gv is not None:
            d_grad = _add(d_grad, _av(backend, problem, attn, gv))
        if gw is not None and gv is not None:
            d_attn, d_value = av_backward(backend, problem, grad_out, gw, gv)
        elif gv is not None:
            d_attn = _dot(backend, problem, grad_out, gv)
        elif gw is not None:
            d_value = av_backward(backend, problem, grad_out, gw, value)[1]
        return None, None, d_grad, d_attn, d_value


# ---------------------------------------------------------------- fused


def _not_twice_differentiable(problem: _args.Problem) -> NotImplementedError:
    strides = tuple(a.stride for a in problem.axes)
    return NotImplementedError(
        f"na{problem.ndim}d with stride {strides if problem.ndim > 1 else strides[0]} has first derivatives only: "
        "its backward cannot be differentiated again (create_graph=True, e.g. a gradient penalty), because the "
        "second derivative is computed from the split ops, which have no stride. Use stride=1 there, or compute "
        "the gradient without create_graph"
    )


def _fused_backward_recorded(backend, problem, grad_out, query, key, value, rpb, grad_lse=None) -> tuple:
    """The fused backward as differentiable split ops: logits, softmax, and the split backwards (the
    logsumexp's gradient ``grad_lse``, if any, adds ``p * grad_lse`` to the logits' gradient).

    fp16/bf16 run in float32, as the fused kernels accumulate; the gradients
    come back in the inputs' dtypes.
    """
    if any(a.stride > 1 for a in problem.axes):
        raise _not_twice_differentiable(problem)
    compute = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    q, k, v, g = (x.to(compute) for x in (query, key, value, grad_out))
    bias = None if rpb is None else rpb.to(compute)
    scaled = q * problem.scale
    probs = _qk(backend, problem, scaled, k, bias).softmax(dim=-1)
    dprobs, dv = av_backward(backend, problem, g, probs, v)
    dlogits = probs * (dprobs - (probs * dprobs).sum(dim=-1, keepdim=True))
    if grad_lse is not None:
        dlogits = dlogits + probs * grad_lse.to(compute)[..., None]
    dscaled, dk, drpb = qk_backward(backend, problem, dlogits, scaled, k, bias)
    dq = dscaled * problem.scale
    return (dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype),
            None if rpb is None else drpb.to(rpb.dtype))


def _recorded_with_extra_tokens(backend, problem, grad_out, query, key, value, rpb, grad_lse, extra_keys,
                                extra_values) -> tuple:
    """The fused backward with extra tokens, differentiable: the forward recomputed from the split ops (the
    neighborhood's logits and weighted sum) and torch's matmuls (the tokens'), one softmax over both, and its
    gradients taken with ``create_graph``, so that they can be differentiated again."""
    if any(a.stride > 1 for a in problem.axes):
        raise _not_twice_differentiable(problem)
    spatial = problem.without_extra_tokens()
    compute = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    inputs = (query, key, value, rpb, extra_keys, extra_values)
    q, k, v, bias, xk, xv = (None if x is None else x.to(compute) for x in inputs)
    batch, kv_heads, group = problem.batch, problem.kv_heads, problem.group
    with torch.enable_grad():
        scaled = q * problem.scale
        slots = spatial.slots
        grouped = scaled.reshape(batch, -1, kv_heads, group, problem.head_dim)
        extra_logits = torch.einsum("bnkgd,btkd->bnkgt", grouped, xk).reshape(*problem.lse_shape, -1)
        logits = torch.cat((_qk(backend, spatial, scaled, k, bias), extra_logits), dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - lse[..., None])
        extra_out = torch.einsum("bnkgt,btkv->bnkgv", probs[..., slots:].reshape(*grouped.shape[:-1], -1), xv)
        out = _av(backend, spatial, probs[..., :slots], v) + extra_out.reshape(problem.out_shape)
        wanted = [x for x in inputs if x is not None and x.requires_grad]
        outputs, grads_out = [out], [grad_out.to(compute)]
        if grad_lse is not None:
            outputs.append(lse)
            grads_out.append(grad_lse.to(lse.dtype))
        found = iter(torch.autograd.grad(outputs, wanted, grads_out, create_graph=True, allow_unused=True))
    grads = [next(found) if x is not None and x.requires_grad else None for x in inputs]
    return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs))


def fused_backward(backend, problem, grad_out, query, key, value, rpb, output=None, logsumexp=None,
                   grad_lse=None, extra_keys=None, extra_values=None) -> tuple:
    """``(dq, dk, dv, drpb or None)`` of the fused op, ``grad_lse`` the logsumexp's gradient (or None), with
    extra tokens ``(..., d_extra_keys, d_extra_values)``; differentiable when autograd records it."""
    extra = problem.extra_tokens > 0
    if problem.query_box is not None and _recorded(grad_out, query, key, value, rpb, grad_lse, extra_keys,
                                                   extra_values):
        # the split ops have no query box: the recorded backward runs on every position (query_box.py)
        from . import query_box

        pad = functools.partial(query_box.pad, problem)
        grads = fused_backward(backend, problem.every_query(), pad(grad_out), pad(query), key, value, rpb,
                               pad(output), pad(logsumexp), pad(grad_lse), extra_keys, extra_values)
        return (query_box.crop(problem, grads[0]), *grads[1:])
    if _recorded(grad_out, query, key, value, rpb, grad_lse, extra_keys, extra_values):
        if extra:
            return _recorded_with_extra_tokens(backend, problem, grad_out, query, key, value, rpb, grad_lse,
                                               extra_keys, extra_values)
        return _fused_backward_recorded(backend, problem, grad_out, query, key, value, rpb, grad_lse)
    dq, dk, dv, drpb, dxk, dxv = fused_bwd(grad_out, query, key, value, rpb, output, logsumexp,
                                           *_fused_args(problem, backend), grad_lse, extra_keys, extra_values,
                                           _query_start(problem))
    grads = dq, dk, dv, None if rpb is None else drpb
    return (*grads, dxk, dxv) if extra else grads


class FusedNA(torch.autograd.Function):
    """(query, key, value, rpb, extra keys, extra values) -> (output, logsumexp), both differentiable: a
    logsumexp's gradient (merging partial attentions needs it) enters the backward as
    ``delta = rowsum(dOut * out) - dlse``."""

    @staticmethod
    def forward(ctx, backend, problem, query, key, value, rpb, extra_keys=None, extra_values=None):
        ctx.backend, ctx.problem = backend, problem
        ctx.set_materialize_grads(False)  # a logsumexp (or output) nothing depends on sends None, not zeros
        out, lse = fused_fwd(query, key, value, rpb, *_fused_args(problem, backend), extra_keys, extra_values,
                             _query_start(problem))
        ctx.save_for_backward(query, key, value, rpb, out, lse, extra_keys, extra_values)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, rpb, out, lse, extra_keys, extra_values = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = fused_backward(ctx.backend, ctx.problem, grad_out, query, key, value, rpb, out, lse, grad_lse,
                               extra_keys, extra_values)
        return (None, None, *grads, *((None, None) if len(grads) == 4 else ()))


# ---------------------------------------------------------------- custom ops: dense attention


@torch.library.custom_op("na_rtc::attention_fwd", mutates_args=())
@_without_autocast
def attention_fwd(query: Tensor, key: Tensor, value: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    # the fused op with an empty neighborhood and the keys as its extra tokens (_args.dense_problem)
    problem = _args.dense_problem(query, key, value, scale)
    return _ops(backend)["fused_forward"](problem, query, key, value, None, key, value)


@attention_fwd.register_fake
def _(query, key, value, scale, backend):
    return (query.new_empty((*query.shape[:-1], value.shape[-1])),
            query.new_empty(query.shape[:-1], dtype=_lse_dtype(query)))


@torch.library.custom_op("na_rtc::attention_bwd", mutates_args=())
@_without_autocast
def attention_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, output: Tensor, logsumexp: Tensor,
                  grad_lse: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    problem = _args.dense_problem(query, key, value, scale)
    dq, _, _, _, dk, dv = _ops(backend)["fused_backward"](problem, grad_out, query, key, value, None, output,
                                                          logsumexp, grad_lse, key, value)
    return dq, dk, dv


@attention_bwd.register_fake
def _(grad_out, query, key, value, output, logsumexp, grad_lse, scale, backend):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


class DenseAttention(torch.autograd.Function):
    """(query, key, value) -> (output, logsumexp) of :func:`na_rtc.attention`, both differentiable: the
    backend's fused op with an empty neighborhood and the keys as extra tokens, forward and backward."""

    @staticmethod
    def forward(ctx, backend, scale, query, key, value):
        ctx.backend, ctx.scale = backend, scale
        ctx.set_materialize_grads(False)
        out, lse = attention_fwd(query, key, value, scale, backend.name)
        ctx.save_for_backward(query, key, value, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = attention_bwd(grad_out, query, key, value, out, lse, grad_lse, ctx.scale, ctx.backend.name)
        return None, None, dq, dk, dv


#: op family -> autograd Function
FUNCTIONS = {"fused": FusedNA, "qk": NAQK, "av": NAAV}

#: op family -> backward as a function (for the plain na*_backward functions)
BACKWARDS = {"fused": fused_backward, "qk": qk_backward, "av": av_backward}

# FLOP formulas for torch's FlopCounterMode; needs the ops above
from . import _torch_flops  # noqa: E402, F401
