"""The other libraries' entries: naive torch NA, FlexAttention with an NA mask, SDPA.

- naive torch NA: one unchunked gather of every
  neighborhood plus einsum, in the input dtype; the index tables are built
  once in ``prepare``, outside the timed region. It is what a model author
  writes first, and what runs out of memory first. With GQA/MQA it repeats
  each key/value head for its group of query heads (timed), as a model
  author would. Extra tokens: a dense matmul of the queries against them,
  its logits concatenated with the neighborhood's for one softmax.
- FlexAttention: ``torch.compile``-d ``flex_attention`` with a block mask
  whose ``mask_mod`` is the exact NA neighbor test (the same window math,
  :func:`na_rtc.window.window`, as tables). Two token orders: natural
  (row-major) and tiled (tokens of one dilation group and one spatial tile
  contiguous, so a 128-token block is a compact 2D patch or 3D box and more
  blocks are empty; the tile is the one with the fewest non-empty blocks).
  With GQA/MQA, ``enable_gqa``: key/value heads shared in place.
  Extra tokens follow the spatial tokens in K/V (in either order) and the
  mask lets every query see them.
  The tiled order is applied to the inputs in ``prepare``: a model can keep
  its tokens in that order, so the permutation (and the extra tokens'
  concatenation) is not timed. Building the block mask is timed separately
  (``mask_build_ms``).
- NATTEN, where it is importable: its fused op for the problem's rank
  (``natten.na3d`` from 0.20 on, which takes a stride; 0.17's
  ``natten.functional.na3d`` without one), on the same heads-last inputs;
  with GQA/MQA only where that op takes fewer key/value heads than query
  heads (tried on a tiny problem first), with extra tokens only where it
  takes ``additional_keys``/``additional_values``; else Unavailable.
- SDPA: full self-attention over every token and the extra tokens, the cost
  NA avoids (``enable_gqa`` with GQA/MQA).
"""

from __future__ import annotations

import inspect
import math
import time

import numpy as np

from ..window import window
from .entries import Entry, Inputs, Prepared, Unavailable, grads, no_grad
from .flops import axes_of
from .presets import Spec

FLEX_BLOCK = 128


def _heads_first(x, order=None, requires_grad=None):
    """``[B, *spatial, H, D]`` -> contiguous ``[B, H, tokens, D]`` leaf (token order ``order`` if given)."""
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    flat = x.detach().reshape(b, -1, h, d)
    if order is not None:
        flat = flat[:, order]
    return flat.transpose(1, 2).contiguous().requires_grad_(x.requires_grad if requires_grad is None else requires_grad)


def _heads_first_kv(x, extra, order=None, requires_grad=True):
    """Key or value as :func:`_heads_first` makes them, the extra tokens' (``extra``, None without) appended
    after the spatial tokens in whichever order those are: one leaf, whose gradient holds both."""
    import torch

    kv = _heads_first(x, order, requires_grad=False)
    if extra is not None:
        kv = torch.cat([kv, _heads_first(extra, requires_grad=False)], dim=2)
    return kv.requires_grad_(requires_grad)


def _heads_last(out, spec: Spec, order=None):
    """``[B, H, tokens, D]`` (token order ``order``) -> ``[B, *spatial, H, D]`` in natural order."""
    tokens_first = out.transpose(1, 2)
    if order is not None:
        natural = tokens_first.new_empty(tokens_first.shape)
        natural[:, order] = tokens_first
        tokens_first = natural
    return tokens_first.reshape(spec.qkv_shape)


# ---------------------------------------------------------------- naive torch NA


def _memory_bytes(device: str) -> int | None:
    """The device's whole memory (a GPU's, or the machine's), None where unknown."""
    import os

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_gather_fits(spec: Spec, device: str) -> None:
    """Out of memory, said before building anything, where the gathered keys alone exceed the device's memory
    (a video problem's index tables would take tens of GB of host memory before the GPU refused the gather)."""
    slots = math.prod(spec.kernel)
    gathered = spec.batch * spec.tokens * slots * spec.heads * spec.head_dim * (4 if spec.dtype == "float32" else 2)
    total = _memory_bytes(device)
    if total is not None and gathered > total:
        raise MemoryError(f"the gathered keys alone would take {gathered / 2**30:.0f} GiB ({spec.tokens} tokens x "
                          f"{slots} window slots), more than the device's {total / 2**30:.0f} GiB")


def _prepare_naive_torch(spec: Spec, inputs: Inputs) -> Prepared:
    import torch

    from ..window import flat_slot_table

    _check_gather_fits(spec, inputs.device)
    table = flat_slot_table(axes_of(spec))
    keys = torch.tensor(table.keys, device=inputs.device)  # [tokens, slots]; a copy: the table is read-only
    # causal windows can hold fewer keys than slots: those slots are masked, every other slot is a neighbor
    invalid = None if table.all_valid else torch.as_tensor(~table.valid, device=inputs.device)[None, :, None, :]
    scale = spec.head_dim**-0.5
    b, h, d = spec.batch, spec.heads, spec.head_dim

    def forward():
        q = inputs.query.reshape(b, spec.tokens, h, d)
        k, v = (_per_query_head(x, spec.group).reshape(b, spec.tokens, h, d) for x in (inputs.key, inputs.value))
        # t: query token, s: window slot; k[:, keys] is the one unchunked gather, [b, t, s, h, d]
        logits = torch.einsum("bthd,btshd->bths", q, k[:, keys]) * scale  # [b, t, h, s]
        if invalid is not None:
            logits = logits.masked_fill(invalid, -math.inf)
        if inputs.extra_k is not None:
            return _with_extra_tokens(q, logits, v[:, keys], spec, inputs).reshape(spec.qkv_shape)
        attn = logits.softmax(dim=-1)
        return torch.einsum("bths,btshd->bthd", attn, v[:, keys]).reshape(spec.qkv_shape)

    return Prepared(no_grad(forward), lambda: grads(forward(), inputs))


def _with_extra_tokens(q, logits, gathered_v, spec: Spec, inputs: Inputs):
    """Attention over the neighborhood (``logits`` ``[b, t, h, s]``, values gathered ``[b, t, s, h, d]``) and
    the extra tokens, whose logits come from a dense matmul (every query sees every token): one softmax over the
    two sets of logits concatenated."""
    import torch

    extra_k, extra_v = (_per_query_head(x, spec.group) for x in (inputs.extra_k, inputs.extra_v))
    extra_logits = torch.einsum("bthd,bxhd->bthx", q, extra_k) * spec.head_dim**-0.5  # x: extra token
    attn = torch.cat([logits, extra_logits], dim=-1).softmax(dim=-1)
    slots = logits.shape[-1]
    return (torch.einsum("bths,btshd->bthd", attn[..., :slots], gathered_v)
            + torch.einsum("bthx,bxhd->bthd", attn[..., slots:], extra_v))


def _per_query_head(x, group: int):
    """Key/value ``[..., heads_kv, D]`` with each head repeated for its ``group`` query heads (a copy with
    GQA/MQA: the straightforward way, and differentiable, so the gradients sum over each group)."""
    return x if group == 1 else x.repeat_interleave(group, dim=-2)


def _gqa_kwargs(spec: Spec) -> dict:
    """``enable_gqa`` for FlexAttention and SDPA where key/value have fewer heads; nothing otherwise, so a
    problem without GQA calls them as before (and SDPA as torch before 2.5 takes it)."""
    return {"enable_gqa": True} if spec.group > 1 else {}


# ---------------------------------------------------------------- FlexAttention


def _flex_module():
    """``torch.nn.attention.flex_attention``, or :class:`Unavailable` saying why not."""
    try:
        from torch.nn.attention import flex_attention
    except Exception as error:  # ImportError on old torch; anything else on a broken install
        raise Unavailable(f"FlexAttention is not available in this torch ({type(error).__name__}: {error}); "
                          "it needs torch >= 2.5") from error
    return flex_attention


def _compiled_flex(module):
    """A fresh ``torch.compile`` of flex_attention, for one entry on one problem.

    dynamo keeps compiled code per function and, after a few recompiles (each
    shape, dtype and mask is one), silently runs flex_attention eagerly, which
    materializes the whole score matrix: a different and much slower function.
    Resetting before each entry keeps every measurement compiled and puts the
    compile into that entry's first call, where the report shows it.
    """
    import torch

    torch._dynamo.reset()
    return torch.compile(module.flex_attention, dynamic=False)


#: tiles of the tiled token order per rank: FLEX_BLOCK (128) tokens, then smaller ones (a block holding several)
#: for problems whose dilation groups no 128-token tile divides. 3D tiles are short on the first axis (time or
#: depth, usually the shortest and with the smallest window)
TILE_CANDIDATES = {
    1: [(FLEX_BLOCK,), (64,), (32,)],
    2: [(16, 8), (8, 16), (8, 8), (4, 8), (8, 4)],
    3: [(2, 8, 8), (1, 8, 16), (1, 16, 8), (4, 4, 8), (4, 8, 4), (8, 4, 4), (2, 4, 16), (2, 16, 4),
        (4, 4, 4), (2, 4, 8), (1, 8, 8), (2, 4, 4), (1, 4, 8)],
}


def _touching_tiles(axis, tile: int) -> int:
    """(query tile, key tile) pairs of one axis whose windows meet, over its dilation groups (tile divides
    every group). Windows never move backwards as the query grows, so a tile's keys run from its first
    query's window start to its last query's window end."""
    pairs = 0
    for g in range(axis.dilation):
        start, end = window(axis, np.arange(g, axis.length, axis.dilation))
        pairs += int(np.sum((end[tile - 1::tile] - 1) // tile - start[::tile] // tile + 1))
    return pairs


def nonempty_blocks(spec: Spec, tile: tuple[int, ...]) -> int:
    """Blocks of FlexAttention's block mask that hold a neighbor pair, in the tiled order of a FLEX_BLOCK-token
    ``tile`` dividing every dilation group: a block is one tile, and two tiles meet when they meet on every
    axis, so the count is the product of the per-axis counts."""
    return math.prod(_touching_tiles(axis, t) for axis, t in zip(axes_of(spec), tile))


def tile_shape(spec: Spec) -> tuple[int, ...]:
    """Query tile (per axis, group coordinates) of the tiled token order.

    Of the FLEX_BLOCK-token candidates whose sides divide every dilation
    group's length (a block is one whole tile), the one with the fewest
    non-empty blocks, FlexAttention's work (ties: the first listed). Where none
    divides, the first smaller candidate that does, else the first candidate
    (edge tiles partial).
    """
    fitting = fitting_tiles(spec)
    whole = [tile for tile in fitting if math.prod(tile) == FLEX_BLOCK]
    if whole:
        return min(whole, key=lambda tile: nonempty_blocks(spec, tile))
    return fitting[0] if fitting else TILE_CANDIDATES[spec.ndim][0]


def fitting_tiles(spec: Spec) -> list[tuple[int, ...]]:
    """The candidate tiles whose sides divide every dilation group's length."""
    group_lengths = [{-(-(length - g) // d) for g in range(d)} for length, d in zip(spec.spatial, spec.dilation)]
    return [tile for tile in TILE_CANDIDATES[spec.ndim]
            if all(all(n % t == 0 for n in lengths) for t, lengths in zip(tile, group_lengths))]


def tiled_order(spec: Spec, tile: tuple[int, ...]) -> np.ndarray:
    """``order[p]`` = natural (row-major) token index of the token at tiled position ``p``.

    Sorted by dilation group, then tile, then position inside the tile, per
    axis in that priority: a dilation group's tokens never share a block with
    another group's unless the group is smaller than a block.
    """
    coords = np.indices(spec.spatial).reshape(spec.ndim, -1)
    sort_keys = []
    for axis_coords, d, t in zip(coords, spec.dilation, tile):
        group, inside = axis_coords % d, axis_coords // d
        sort_keys.append((group, inside // t, inside % t))
    # np.lexsort sorts by the last key first: list keys least significant first
    groups = [k[0] for k in sort_keys]
    tiles = [k[1] for k in sort_keys]
    inner = [k[2] for k in sort_keys]
    return np.lexsort(list(reversed(groups + tiles + inner)))


def na_mask_mod(spec: Spec, device: str, order=None):
    """FlexAttention ``mask_mod``: key ``kv`` is in query ``q``'s neighborhood (:mod:`na_rtc.window`'s window math),
    or one of the problem's extra tokens (positions from ``spec.tokens`` on), which every query sees.

    ``order`` maps positions in the (tiled) token order back to natural token indices.
    """
    import torch

    axes = axes_of(spec)
    tables = []
    for axis in axes:
        start, end = window(axis, np.arange(axis.length, dtype=np.int64))
        tables.append((axis, torch.as_tensor(start, device=device), torch.as_tensor(end, device=device)))
    natural = None if order is None else torch.as_tensor(order, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = (q_idx, kv_idx) if natural is None else (natural[q_idx], natural[kv_idx])
        inside = None
        for axis, start, end in reversed(tables):  # row-major: the last axis varies fastest
            qa, ka = q % axis.length, k % axis.length
            q, k = q // axis.length, k // axis.length
            kg = ka // axis.dilation
            ok = (start[qa] <= kg) & (kg < end[qa])
            if axis.dilation > 1:
                ok = ok & (qa % axis.dilation == ka % axis.dilation)
            inside = ok if inside is None else inside & ok
        return inside

    return _extra_tokens_visible(mask_mod, spec.tokens) if spec.extra_tokens else mask_mod


def _extra_tokens_visible(mask_mod, tokens: int):
    """``mask_mod`` with every key position from ``tokens`` on (an extra token) visible to every query."""

    def with_extra_tokens(b, h, q_idx, kv_idx):
        # an extra token's position lies past the window tables (and the order): ask about a spatial key, overruled
        spatial = kv_idx.clamp(max=tokens - 1)
        return mask_mod(b, h, q_idx, spatial) | (kv_idx >= tokens)

    return with_extra_tokens


def _timed_block_mask(module, mask_mod, tokens: int, kv_tokens: int, device: str):
    """The block mask (``tokens`` queries, ``kv_tokens`` keys) and the seconds building it took (synchronized)."""
    import torch

    def build():
        return module.create_block_mask(mask_mod, None, None, tokens, kv_tokens, device=device,
                                        BLOCK_SIZE=FLEX_BLOCK, _compile=device.startswith("cuda"))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    started = time.perf_counter()
    mask = build()
    sync()
    first = time.perf_counter() - started
    started = time.perf_counter()
    mask = build()  # again: the first build includes tracing / compiling the mask function
    sync()
    return mask, first, time.perf_counter() - started


def _prepare_flex(spec: Spec, inputs: Inputs, tiled: bool) -> Prepared:
    module = _flex_module()
    tile = tile_shape(spec) if tiled else None
    order = tiled_order(spec, tile) if tiled else None
    if order is not None and np.array_equal(order, np.arange(spec.tokens)):
        raise Unavailable(f"the tiled token order (tile {tile}) is the natural order for this problem: "
                          "see the flex_natural entry")
    mask_mod = na_mask_mod(spec, inputs.device, order)
    block_mask, first_build, build = _timed_block_mask(module, mask_mod, spec.tokens, spec.tokens + spec.extra_tokens,
                                                       inputs.device)
    flex = _compiled_flex(module)
    order_t = None
    if order is not None:
        import torch

        order_t = torch.as_tensor(order, device=inputs.device)
    on_gpu = inputs.device.startswith("cuda")
    # on the CPU FlexAttention refuses inputs that require grad, even under no_grad
    q = _heads_first(inputs.query, order_t, requires_grad=on_gpu)
    k, v = (_heads_first_kv(x, extra, order_t, requires_grad=on_gpu)
            for x, extra in ((inputs.key, inputs.extra_k), (inputs.value, inputs.extra_v)))
    grad = _heads_first(inputs.grad_out, order_t).detach()
    scale = spec.head_dim**-0.5
    gqa = _gqa_kwargs(spec)

    def forward():
        return flex(q, k, v, block_mask=block_mask, scale=scale, **gqa)

    def forward_backward():
        import torch

        return torch.autograd.grad(forward(), (q, k, v), grad)

    notes = {"mask_build_ms": build * 1e3, "mask_build_first_ms": first_build * 1e3,
             "block_sparsity_percent": float(block_mask.sparsity()),
             "token_order": f"tiled {'x'.join(map(str, tile))} per dilation group" if tiled else "natural"}
    if spec.extra_tokens:
        notes["extra_tokens"] = f"{spec.extra_tokens}, after the spatial tokens in K/V, visible to every query"
    no_backward = None
    if not on_gpu:
        no_backward = "FlexAttention has no backward on the CPU"
    return Prepared(no_grad(forward), None if no_backward else forward_backward, no_backward, notes,
                    natural_output=lambda out: _heads_last(out, spec, order_t))


# ---------------------------------------------------------------- NATTEN


def _natten_op(spec: Spec):
    """NATTEN's fused op for the problem's rank and the keyword arguments its release adds, or Unavailable."""
    try:
        import natten
    except Exception as error:  # ImportError where it is not installed; anything else on a broken install
        raise Unavailable(f"NATTEN is not importable here ({type(error).__name__}: {error})") from error
    version = getattr(natten, "__version__", "of unknown version")
    fused = getattr(natten, f"na{spec.ndim}d", None)  # 0.20 and later: natten.na3d(..., stride, dilation, ...)
    if fused is not None:
        return fused, {"stride": _natten_axes(spec, spec.stride)}, version
    fused = getattr(getattr(natten, "functional", None), f"na{spec.ndim}d", None)  # 0.17: no stride
    if fused is None:
        raise Unavailable(f"NATTEN {version} has no fused na{spec.ndim}d (0.17 and later have)")
    if any(s != 1 for s in spec.stride):
        raise Unavailable(f"NATTEN {version} takes no stride (0.20 and later do)")
    return fused, {}, version


def _natten_axes(spec: Spec, values: tuple):
    """A per-axis argument as NATTEN takes it: one value in 1D (its 1D ops take ints), a tuple per axis above."""
    return values[0] if spec.ndim == 1 else values


def _require_natten_gqa(spec: Spec, inputs: Inputs, fused, version: str) -> None:
    """Unavailable where NATTEN's op refuses key/value with fewer heads than the query. Asked on a tiny problem
    of the same rank, dtype, head dim and device (one window of tokens per axis, ``spec``'s query heads per
    key/value head): releases differ, and an error of the real problem must stay an error, not a skip."""
    import torch

    def zeros(heads):
        return torch.zeros((1, *spec.kernel, heads, spec.head_dim), dtype=inputs.query.dtype,
                           device=inputs.query.device)

    try:
        with torch.no_grad():
            fused(zeros(spec.group), zeros(1), zeros(1), kernel_size=_natten_axes(spec, spec.kernel))
    except Exception as error:  # noqa: BLE001 - whatever the release raises for these shapes, it cannot run GQA
        said = (str(error).splitlines() or [""])[0][:200]
        raise Unavailable(f"NATTEN {version} does not take key/value with fewer heads than the query (GQA/MQA, "
                          f"heads_kv={spec.kv_heads} of heads={spec.heads}): {type(error).__name__}: {said}") from error


def _require_natten_extra_tokens(spec: Spec, fused, version: str) -> None:
    """Unavailable where NATTEN's op has no ``additional_keys``/``additional_values`` parameters (releases
    differ), read from its signature: a call with tokens would be the real problem's, whose errors must stay
    errors, not skips."""
    try:
        parameters = inspect.signature(fused).parameters
    except (TypeError, ValueError):  # a compiled op without a readable signature: nothing says it takes them
        parameters = {}
    if not {"additional_keys", "additional_values"} <= set(parameters):
        raise Unavailable(f"NATTEN {version}'s na{spec.ndim}d takes no additional_keys/additional_values (the "
                          f"{spec.extra_tokens} extra tokens)")


def _prepare_natten(spec: Spec, inputs: Inputs) -> Prepared:
    fused, extra, version = _natten_op(spec)
    if spec.group > 1:
        _require_natten_gqa(spec, inputs, fused, version)
    if spec.extra_tokens:
        _require_natten_extra_tokens(spec, fused, version)
    kwargs = {"kernel_size": _natten_axes(spec, spec.kernel), "dilation": _natten_axes(spec, spec.dilation),
              "is_causal": _natten_axes(spec, spec.causal), "scale": spec.head_dim**-0.5, **extra,
              **inputs.extra_kwargs}

    def forward():
        return fused(*inputs.qkv, **kwargs)

    return Prepared(no_grad(forward), lambda: grads(forward(), inputs), notes={"natten": version})


# ---------------------------------------------------------------- SDPA


def _prepare_sdpa(spec: Spec, inputs: Inputs) -> Prepared:
    import torch.nn.functional as F

    q = _heads_first(inputs.query)
    k, v = (_heads_first_kv(x, extra) for x, extra in ((inputs.key, inputs.extra_k), (inputs.value, inputs.extra_v)))
    grad = _heads_first(inputs.grad_out).detach()
    gqa = _gqa_kwargs(spec)

    def forward():
        return F.scaled_dot_product_attention(q, k, v, **gqa)

    def forward_backward():
        import torch

        return torch.autograd.grad(forward(), (q, k, v), grad)

    return Prepared(no_grad(forward), forward_backward,
                    notes={"attends_to": _sdpa_attends_to(spec)}, comparable=False)


def _sdpa_attends_to(spec: Spec) -> str:
    extra = f" and the {spec.extra_tokens} extra tokens" if spec.extra_tokens else ""
    return f"all {spec.tokens} tokens{extra} (full attention, not NA)"


FLEX_CPU_NOTE = ("FlexAttention is timed on a GPU only: on the CPU torch has no FlexAttention backward and compiles "
                 "C++ for the forward (name it with --entries to try the forward here)")


def peer_entries() -> list[Entry]:
    return [
        Entry("naive_torch", "naive torch NA (gather + einsum)", _prepare_naive_torch),
        Entry("flex_natural", "FlexAttention, natural order", lambda s, i: _prepare_flex(s, i, tiled=False),
              default_cpu=False, cpu_note=FLEX_CPU_NOTE),
        Entry("flex_tiled", "FlexAttention, tiled order", lambda s, i: _prepare_flex(s, i, tiled=True),
              default_cpu=False, cpu_note=FLEX_CPU_NOTE),
        Entry("natten", "NATTEN fused", _prepare_natten, default_cpu=False,
              cpu_note="NATTEN's fused kernels are timed on a GPU (name it with --entries to try it here)"),
        Entry("sdpa", "torch SDPA (full attention)", _prepare_sdpa, full_attention=True),
    ]


__all__ = ["peer_entries", "na_mask_mod", "tiled_order", "tile_shape"]
