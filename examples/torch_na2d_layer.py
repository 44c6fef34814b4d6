"""A tiny 2D neighborhood-attention layer trained with torch autograd.

Fits random targets for a few steps to show that gradients flow through
na_rtc.na2d (queries, keys, values and the relative positional bias).
Run: python examples/torch_na2d_layer.py
"""

import torch

import na_rtc


class NeighborhoodSelfAttention2D(torch.nn.Module):
    def __init__(self, dim: int, heads: int, kernel_size: int):
        super().__init__()
        self.heads, self.kernel_size = heads, kernel_size
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.rpb = torch.nn.Parameter(torch.zeros(heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        torch.nn.init.trunc_normal_(self.rpb, std=0.02)

    def forward(self, x):  # x: [batch, height, width, dim]
        b, h, w, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, h, w, 3, self.heads, dim // self.heads).unbind(3)
        out = na_rtc.na2d(q, k, v, self.kernel_size, rpb=self.rpb)
        return self.proj(out.reshape(b, h, w, dim))


torch.manual_seed(0)
layer = NeighborhoodSelfAttention2D(dim=64, heads=4, kernel_size=7)
x, target = torch.randn(2, 16, 16, 64), torch.randn(2, 16, 16, 64)
optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
for step in range(20):
    loss = torch.nn.functional.mse_loss(layer(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")
