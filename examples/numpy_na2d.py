"""2D neighborhood attention in plain NumPy: fused op, split ops, gradients.

Run: python examples/numpy_na2d.py
"""

import numpy as np

import na_rtc

rng = np.random.default_rng(0)
batch, height, width, heads, head_dim, kernel = 2, 24, 32, 4, 32, 7
q, k, v = (rng.standard_normal((batch, height, width, heads, head_dim)) for _ in range(3))
rpb = 0.02 * rng.standard_normal((heads, 2 * kernel - 1, 2 * kernel - 1))

# Fused: softmax(q.k * scale + rpb) over each 7x7 window, times v.
out, lse = na_rtc.na2d(q, k, v, kernel, rpb=rpb, return_lse=True)

# The same with the split ops, which expose the attention weights.
logits = na_rtc.na2d_qk(q * head_dim**-0.5, k, kernel, rpb=rpb)  # [2, 24, 32, 4, 49]
weights = np.exp(logits - lse[..., None])  # the logsumexp normalizes the softmax
out_split = na_rtc.na2d_av(weights, v, kernel)
print("fused vs split, max |difference|:", float(np.abs(out - out_split).max()))

# Gradients of sum(out * grad_out) without any autograd framework.
grad_out = rng.standard_normal(out.shape)
dq, dk, dv, drpb = na_rtc.na2d_backward(grad_out, q, k, v, kernel, rpb=rpb, output=out, logsumexp=lse)
print("gradient shapes:", dq.shape, dk.shape, dv.shape, drpb.shape)

# Dilation 2 and a causal first axis, per-axis arguments as tuples.
out_dilated = na_rtc.na2d(q, k, v, (5, 7), dilation=(2, 1), is_causal=(True, False))
print("dilated causal output:", out_dilated.shape, out_dilated.dtype)
