"""What the harness compares: the entry interface, and na_rtc's own entries.

An :class:`Entry` turns one problem's shared inputs into a :class:`Prepared`:
a forward callable and a forward+backward callable, plus notes (which kernels
run, how long a mask took to build). Everything outside those callables
(layout copies, index tables, masks) happens in ``prepare``, untimed.

An entry that cannot run raises :class:`Unavailable` with the reason (no
stride or extra tokens in the split ops, no FlexAttention in this torch, no
GPU), and the runner reports it. The other libraries' entries live in :mod:`.peers` (which builds on this module);
:func:`na_rtc.bench.runner.all_entries` lists both.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .presets import Spec


class Unavailable(Exception):
    """This entry cannot run this problem here; the message says why."""


@dataclass
class Inputs:
    """The one set of inputs every entry of a problem uses, heads-last torch tensors (key and value with the
    problem's key/value heads; the extra keys and values, where the problem has extra tokens, likewise)."""

    query: Any
    key: Any
    value: Any
    grad_out: Any
    device: str
    #: ``cuda`` or ``emulator``: where na_rtc's kernels run for this device
    kernel_backend: str
    #: why the kernel backend cannot run here (None when it can)
    kernel_backend_missing: str | None = None
    #: ``[batch, tokens, heads_kv, head_dim]``; None without extra tokens
    extra_k: Any = None
    extra_v: Any = None

    @property
    def qkv(self):
        return self.query, self.key, self.value

    @property
    def leaves(self):
        """What a backward differentiates: q, k, v, and the extra keys and values where there are some."""
        return self.qkv if self.extra_k is None else (*self.qkv, self.extra_k, self.extra_v)

    @property
    def extra_kwargs(self) -> dict:
        """The fused ops' keyword arguments for the extra tokens; none without them, so other calls are as before."""
        return {} if self.extra_k is None else {"additional_keys": self.extra_k, "additional_values": self.extra_v}


@dataclass
class Prepared:
    forward: Callable[[], Any]
    #: None when the entry has no backward; ``no_backward`` then says why
    forward_backward: Callable[[], Any] | None
    no_backward: str | None = None
    notes: dict = field(default_factory=dict)
    #: the forward's output as ``[batch, *spatial, heads, head_dim]`` in natural token order
    natural_output: Callable[[Any], Any] = lambda out: out
    #: whether the output should equal NA's (full attention does not)
    comparable: bool = True


@dataclass(frozen=True)
class Entry:
    name: str
    label: str
    prepare: Callable[[Spec, Inputs], Prepared]
    #: na_rtc kernel families the entry launches (for the compile-time table)
    families: tuple[str, ...] = ()
    #: runs na_rtc kernels on ``cuda``/``emulator`` (sized for the emulator on a CPU)
    uses_kernels: bool = False
    #: chosen when --entries is not given, on a GPU / on a CPU machine
    default_gpu: bool = True
    default_cpu: bool = True
    #: why the entry is not run on a CPU machine by default (shown as its reason)
    cpu_note: str | None = None
    #: the entry computes the problem's attention, so its time gives TFLOP/s (not the host-overhead entry)
    computes: bool = True
    #: calls na_rtc's public ops, which run on the reference backend where the kernels lack the problem's rank
    falls_back: bool = False
    #: runs na_rtc's reference backend whatever the problem
    reference: bool = False
    #: computes full attention over every token (not NA): sized by that work on a CPU
    full_attention: bool = False
    #: runs this na_rtc backend whatever the problem (a backend without kernels, such as ``blocked``)
    backend: str | None = None


def make_inputs(spec: Spec, device: str, kernel_backend: str, kernel_backend_missing: str | None = None) -> Inputs:
    """q, k, v and the output gradient, N(0, 1) in the problem's dtype, seeded by the problem; k and v with the
    problem's key/value heads (GQA/MQA: fewer than q's); the extra keys and values where it has extra tokens."""
    import torch

    # seeded by the problem (crc32: Python's hash() is salted per process), so every run draws the same inputs;
    # drawn in the order q, k, v, g, then the extra tokens' keys and values, so problems without GQA or extra
    # tokens draw what they always have
    generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(spec.key.encode()))
    dtype = getattr(torch, spec.dtype)
    shapes = [spec.qkv_shape, spec.kv_shape, spec.kv_shape, spec.qkv_shape]
    if spec.extra_tokens:
        shapes += [spec.extra_shape, spec.extra_shape]
    q, k, v, g, *extra = (torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes)
    for x in (q, k, v, *extra):
        x.requires_grad_(True)
    return Inputs(q, k, v, g, device, kernel_backend, kernel_backend_missing, *extra)


def window_kwargs(spec: Spec) -> dict:
    return {"stride": spec.stride, "dilation": spec.dilation, "is_causal": spec.causal}


def grads(out, inputs: Inputs, leaves=None):
    """Gradients of ``out`` (with the shared output gradient) for the leaves, not accumulated into ``.grad``."""
    import torch

    leaves = leaves if leaves is not None else inputs.leaves
    grad = inputs.grad_out if out.shape == inputs.grad_out.shape else inputs.grad_out.reshape(out.shape)
    return torch.autograd.grad(out, leaves, grad)


def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        import torch

        with torch.no_grad():
            return fn()

    return run


def refuse_extra_tokens(spec: Spec, why: str) -> None:
    """Unavailable where the problem has extra tokens, which the entry cannot take (``why``)."""
    if spec.extra_tokens:
        raise Unavailable(f"{why}; the fused entry measures the {spec.extra_tokens} extra tokens")


def _require_kernels(inputs: Inputs) -> None:
    if inputs.kernel_backend_missing:
        raise Unavailable(f"the {inputs.kernel_backend} backend is not available: {inputs.kernel_backend_missing}")


# ---------------------------------------------------------------- which backend serves a rank

#: the backend that serves every rank: na_rtc's automatic selection takes it where the kernels lack a rank
EVERY_RANK = "reference"


def served_backend(ndim: int, kernel_backend: str) -> str:
    """Where na_rtc's public ops run a problem of ``ndim`` axes in the kernel entries: the machine's kernel
    backend where its kernels serve that rank, else the reference backend, as a call's automatic selection
    does (so the bench measures 3D on whichever backend serves it, and moves to the kernels when they do)."""
    from .. import backends

    return kernel_backend if ndim in backends.get(kernel_backend).ranks else EVERY_RANK


def rank_note(ndim: int, kernel_backend: str) -> str:
    """Why a problem of ``ndim`` axes does not run on the kernel backend."""
    from .. import backends

    served = "/".join(f"{rank}D" for rank in sorted(backends.get(kernel_backend).ranks))
    return (f"the {kernel_backend} backend's kernels serve {served} only: na{ndim}d runs on the {EVERY_RANK} "
            "backend, as automatic selection picks")


def entry_backend(entry: Entry, spec: Spec, kernel_backend: str) -> str | None:
    """The na_rtc backend ``entry`` runs ``spec`` on (None: not na_rtc's)."""
    if entry.reference:
        return EVERY_RANK
    if entry.backend is not None:
        return entry.backend
    if not entry.uses_kernels:
        return None
    return served_backend(spec.ndim, kernel_backend) if entry.falls_back else kernel_backend


def _require_rank(spec: Spec, inputs: Inputs, measured_by: str = "the fused and split entries measure it") -> None:
    """Unavailable where the kernel backend lacks the problem's rank (entries that launch kernels directly)."""
    if served_backend(spec.ndim, inputs.kernel_backend) != inputs.kernel_backend:
        raise Unavailable(f"{rank_note(spec.ndim, inputs.kernel_backend)}; {measured_by}")


def _problem(spec: Spec, inputs: Inputs):
    from .. import _args

    q, k, v = inputs.qkv
    return _args.fused_problem(spec.ndim, q, k, v, spec.kernel, spec.stride, spec.dilation, spec.causal, None, None,
                               *_extra(inputs))


def _extra(inputs: Inputs) -> tuple:
    """The extra keys and values, detached, or () without extra tokens."""
    return () if inputs.extra_k is None else (inputs.extra_k.detach(), inputs.extra_v.detach())


def _executor(inputs: Inputs):
    from ..backends import executor

    return executor(inputs.kernel_backend)


# ---------------------------------------------------------------- na_rtc fused


def _fused_kernels_used(spec: Spec, inputs: Inputs) -> dict:
    """Which kernels the fused op will launch: fused ones, or the split ones composed (the fallback rule)."""
    from ..runtime.dispatch import Dispatcher
    from ..runtime.policy import Policy

    problem = _problem(spec, inputs)
    # the dispatcher's own rule: the device's architecture and the settings as a call reads them now
    dispatcher = Dispatcher(None, Policy.for_call(inputs.kernel_backend, problem))
    forward, backward = dispatcher.choose("forward", problem), dispatcher.choose("backward", problem)
    return {
        "forward_kernels": forward.kernels[0] if forward.path else "split kernels composed",
        "backward_kernels": ", ".join(backward.kernels) if backward.path else "split kernels composed",
    }


@contextlib.contextmanager
def _setting(name: str, value: str):
    """Environment setting ``name`` = ``value`` for the duration (the dispatcher reads settings per call)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def _tensor_cores_off():
    return _setting("NA_RTC_TENSOR_CORES", "0")


def _sixteen_warp_rows():
    return _setting("NA_RTC_TC_WARP_ROWS", "16")


def _wgmma_on():
    return _setting("NA_RTC_WGMMA", "1")


@contextlib.contextmanager
def _wgmma_one_warpgroup():
    with _wgmma_on(), _setting("NA_RTC_WGMMA_WARPGROUPS", "1"):
        yield


@contextlib.contextmanager
def _wgmma_chunk_keys(keys: int):
    with _wgmma_on(), _setting("NA_RTC_WGMMA_CHUNK_KEYS", str(keys)):
        yield


def _public_op(spec: Spec, suffix: str = ""):
    """``na_rtc.na{1,2,3}d{suffix}`` for the problem's rank."""
    import na_rtc

    return getattr(na_rtc, f"na{spec.ndim}d{suffix}")


def _backend_notes(spec: Spec, inputs: Inputs, backend: str) -> dict:
    notes = {"backend": backend}
    if backend != inputs.kernel_backend and backend == served_backend(spec.ndim, inputs.kernel_backend):
        notes["because"] = rank_note(spec.ndim, inputs.kernel_backend)
    return notes


def _prepare_fused(spec: Spec, inputs: Inputs, backend: str | None = None, mode=contextlib.nullcontext) -> Prepared:
    """``mode``: a context manager the calls run under (a setting that steers the dispatch)."""
    backend = backend or served_backend(spec.ndim, inputs.kernel_backend)
    kernels = backend == inputs.kernel_backend  # not the reference or blocked backend: na_rtc's kernels
    if kernels:
        _require_kernels(inputs)
    fn = _public_op(spec)
    kwargs = window_kwargs(spec)

    def forward():
        with mode():
            return fn(*inputs.qkv, spec.kernel, backend=backend, **kwargs, **inputs.extra_kwargs)

    def forward_backward():
        out = forward()
        with mode():  # the backward dispatches when autograd runs it
            return grads(out, inputs)

    notes = _backend_notes(spec, inputs, backend)
    if kernels:
        with mode():
            notes.update(_fused_kernels_used(spec, inputs))
    if spec.extra_tokens:  # where their time goes
        notes["extra_tokens"] = (f"{spec.extra_tokens}: forward kernels that stream them take them after each "
                                 "tile's neighborhood (others' results are merged with dense attention over them); "
                                 "the backward adds their dense part as chunked matrix products")
    return Prepared(no_grad(forward), forward_backward, notes=notes)


def _prepare_fused_variant(spec: Spec, inputs: Inputs, mode) -> Prepared:
    """The fused op under ``mode``, a setting that picks other kernels: nothing to compare where the kernels
    lack the problem's rank (the fused entry measures the reference backend there)."""
    _require_rank(spec, inputs, "the fused entry measures it")
    return _prepare_fused(spec, inputs, mode=mode)


def _prepare_reference(spec: Spec, inputs: Inputs) -> Prepared:
    """The fused op on the reference backend, where the fused entry runs the kernels (elsewhere it measures
    the reference backend itself)."""
    _require_rank(spec, inputs, "the fused entry measures it")
    return _prepare_fused(spec, inputs, EVERY_RANK)


def _prepare_blocked(spec: Spec, inputs: Inputs) -> Prepared:
    """The fused op on the blocked backend: query tiles attend the box of keys their windows cover as dense
    matrix products, with the exact NA mask inside the box. Its notes give the tiles and how many more
    query-key products the boxes hold than the neighborhoods (the price of the dense products)."""
    from ..blocked import tile_shape
    from ..blocked.tiles import tiles_of
    from .flops import axes_of, neighbor_pairs

    prepared = _prepare_fused(spec, inputs, "blocked")
    axes = axes_of(spec)
    tiles = tiles_of(axes, tile_shape(axes))
    pairs = neighbor_pairs(spec)
    prepared.notes.update({
        "tile": "x".join(map(str, tile_shape(axes))),
        "tiles": tiles.count, "box_keys": tiles.box_keys,
        "box_vs_window_products": round(tiles.count * tiles.tile_queries * tiles.box_keys / pairs, 2) if pairs
        else None,
    })
    return prepared


def _prepare_other_forward(spec: Spec, inputs: Inputs, table: Prepared, mode, already: str) -> Prepared:
    """The fused op under ``mode`` (a setting), where that picks another forward than ``table``'s; otherwise
    Unavailable: the forward ``already`` has that property, and the entry measuring ``table`` covers it."""
    used = table.notes.get("forward_kernels")
    prepared = _prepare_fused_variant(spec, inputs, mode)
    if prepared.notes.get("forward_kernels") == used:
        raise Unavailable(f"{already} here ({used})")
    return prepared


def _prepare_sixteen_warp_rows(spec: Spec, inputs: Inputs) -> Prepared:
    """The fused entry with NA_RTC_TC_WARP_ROWS=16, where that picks another forward than the table's."""
    return _prepare_other_forward(spec, inputs, _prepare_fused_variant(spec, inputs, contextlib.nullcontext),
                                  _sixteen_warp_rows,
                                  "the table's forward already has 16 query rows per warp (the fused entry measures it)")


def _prepare_wgmma(spec: Spec, inputs: Inputs) -> Prepared:
    """The fused entry with NA_RTC_WGMMA=1, where that runs the Hopper forward (sm_90 GPUs, fp16/bf16)."""
    prepared = _prepare_fused_variant(spec, inputs, _wgmma_on)
    used = prepared.notes.get("forward_kernels") or ""
    if "na_fused_wg_fwd" not in used:
        raise Unavailable(f"the wgmma forward does not serve this problem here (sm_90 GPUs, float16/bfloat16, "
                          f"head dim <= 128); the fused forward is {used or 'unknown'}")
    return prepared


def _prepare_wgmma_one_warpgroup(spec: Spec, inputs: Inputs) -> Prepared:
    """fused_wgmma with NA_RTC_WGMMA_WARPGROUPS=1, where that picks another forward (one warpgroup per block
    of 64 queries, 8 x 8 in 2D, instead of two per 128, 16 x 8 in 2D; the backward kernels likewise)."""
    return _prepare_other_forward(spec, inputs, _prepare_wgmma(spec, inputs), _wgmma_one_warpgroup,
                                  "the wgmma forward already has one warpgroup per block (fused_wgmma measures it)")


def _prepare_wgmma_32_key_chunks(spec: Spec, inputs: Inputs) -> Prepared:
    """fused_wgmma with NA_RTC_WGMMA_CHUNK_KEYS=32, where that picks another forward (chunks of 32 keys
    instead of the table's 64: less padding of a 2D box, twice the per-chunk work; the backward unchanged)."""
    return _prepare_other_forward(spec, inputs, _prepare_wgmma(spec, inputs), lambda: _wgmma_chunk_keys(32),
                                  "the wgmma forward already has chunks of 32 keys (fused_wgmma measures it)")


# ---------------------------------------------------------------- na_rtc split: qk, softmax, av


def _prepare_split(spec: Spec, inputs: Inputs) -> Prepared:
    from ..runtime.dispatch import Dispatcher

    backend = served_backend(spec.ndim, inputs.kernel_backend)
    if backend != EVERY_RANK:
        _require_kernels(inputs)
    if any(s != 1 for s in spec.stride):
        raise Unavailable("the split ops (na*_qk, na*_av) take no stride; only the fused ops do")
    refuse_extra_tokens(spec, "the split ops (na*_qk, na*_av) take no extra tokens; only the fused ops do")
    qk, av = _public_op(spec, "_qk"), _public_op(spec, "_av")
    scale = spec.head_dim**-0.5
    window = {"dilation": spec.dilation, "is_causal": spec.causal}

    def forward():
        # qk does not scale: callers pre-scale the query, as NATTEN's modules do
        attn = qk(inputs.query * scale, inputs.key, spec.kernel, backend=backend, **window).softmax(-1)
        return av(attn, inputs.value, spec.kernel, backend=backend, **window)

    def forward_backward():
        return grads(forward(), inputs)

    notes = _backend_notes(spec, inputs, backend)
    if backend != EVERY_RANK:
        problem = _problem(spec, inputs)
        chooser = Dispatcher()
        notes["forward_kernels"] = (f"{chooser.choose('qk', problem).kernels[0]}, torch softmax, "
                                    f"{chooser.choose('av', problem).kernels[0]}")
    return Prepared(no_grad(forward), forward_backward, notes=notes)


# ---------------------------------------------------------------- na_rtc straightforward kernels


def _prepare_naive_kernels(spec: Spec, inputs: Inputs) -> Prepared:
    """The straightforward kernels (one thread per output element) composed into attention.

    The same composition as the kernel backend's fallback (runtime/composed.py),
    dispatched with the tiled kernels off, so the tiled and fused kernels can
    be compared with what they replace.
    """
    from ..runtime.dispatch import Dispatcher
    from ..runtime.policy import Policy
    from ..runtime.tiling import accumulator_dtype

    refuse_extra_tokens(spec, "the straightforward kernels compose the split ops (qk, softmax, av), which take "
                              "no extra tokens")
    _require_kernels(inputs)
    _require_rank(spec, inputs)
    kernels = Dispatcher(_executor(inputs), Policy.of(tiled=False))
    problem = _problem(spec, inputs)
    acc = accumulator_dtype(problem.dtype)
    q, k, v = (x.detach() for x in inputs.qkv)
    grad_out = inputs.grad_out

    def probabilities():
        logits = kernels.qk(problem, q, k, None, acc, problem.scale, -math.inf)
        kernels.softmax(problem, logits)
        return logits

    def forward():
        probs = probabilities()
        return kernels.av(problem, probs, v), probs

    def forward_backward():
        out, probs = forward()
        grad_logits = kernels.qk(problem, grad_out, v, None, acc, 1.0, 0.0)
        kernels.softmax_backward(problem, probs, grad_logits)
        dq = kernels.av(problem, grad_logits, k, problem.scale)
        dk = kernels.inverse(problem, grad_logits, q, problem.scale)
        dv = kernels.inverse(problem, probs, grad_out)
        return out, dq, dk, dv

    return Prepared(lambda: forward()[0], forward_backward,
                    notes={"backend": inputs.kernel_backend, "forward_kernels": "na_qk_fwd, na_softmax_fwd, na_av_fwd"})


# ---------------------------------------------------------------- na_rtc's host overhead


#: warm calls per timed batch, and batches, of the host-overhead figures in the notes
HOST_CALLS, HOST_BATCHES = 200, 5


def _host_us(fn: Callable[[], Any]) -> float:
    """Microseconds per warm call of ``fn``: the median over batches of back-to-back calls."""
    import statistics
    import time

    for _ in range(HOST_CALLS // 10):
        fn()
    batches = []
    for _ in range(HOST_BATCHES):
        started = time.perf_counter()
        for _ in range(HOST_CALLS):
            fn()
        batches.append((time.perf_counter() - started) / HOST_CALLS * 1e6)
    return statistics.median(batches)


def _prepare_host_overhead(spec: Spec, inputs: Inputs) -> Prepared:
    """What a warm fused call costs the host before any kernel runs: the call's dispatch policy (settings read,
    the GPU's architecture), the choice of kernels, outputs allocated and launch plans built, on an executor
    that launches nothing (the op table the backend runs, as ``na_rtc.na*d`` reaches it after validating the
    arguments). Never verifies: a kernel without a verdict counts as trusted (an executor that launches
    nothing must not record verdicts). The timed figures are milliseconds like every entry's; the notes give
    microseconds per call."""
    from ..runtime.ops import make_ops

    _require_rank(spec, inputs, "the reference backend builds no launch plans to time")
    plans = []
    table = make_ops(lambda plan: plans.append(plan.kernel.name), inputs.kernel_backend, verification="peek")
    problem = _problem(spec, inputs)
    q, k, v = (x.detach() for x in inputs.qkv)
    grad_out = inputs.grad_out
    extra = _extra(inputs)
    if extra and not _tokens_stay_in_kernels(table, problem):
        refuse_extra_tokens(spec, "where the chosen dq kernel does not stream the extra tokens their part of the "
                                  "backward runs matrix products on the device, which this entry, timing host work "
                                  "with nothing launched, cannot leave out")

    def forward():
        return table["fused_forward"](problem, q, k, v, None, *extra)[0]

    def forward_backward():
        out, lse = table["fused_forward"](problem, q, k, v, None, *extra)
        return table["fused_backward"](problem, grad_out, q, k, v, None, out, lse, None, *extra)

    forward()
    counts = {"plans_forward": len(plans)}
    plans.clear()
    forward_backward()
    counts["plans_forward_backward"] = len(plans)
    notes = {"backend": inputs.kernel_backend, **counts, "host_us_forward": round(_host_us(forward), 2),
             "host_us_forward_backward": round(_host_us(forward_backward), 2)}
    return Prepared(forward, forward_backward, notes=notes, comparable=False)


def _tokens_stay_in_kernels(table, problem) -> bool:
    """Whether the op table's kernels take the problem's extra tokens in its forward and backward (nothing of
    theirs runs as matrix products)."""
    from ..runtime.dispatch import streams_extra_tokens

    dispatcher = table["fused_forward"].__self__.dispatcher(problem)
    route = dispatcher.forward_route(problem.without_extra_tokens())[0]
    pair = dispatcher.backward_pair(problem)[0]
    return (route is not None and streams_extra_tokens(route) and pair is not None
            and dispatcher.streams_extra_tokens_backward(problem, pair)[0])


# ---------------------------------------------------------------- the table


def na_rtc_entries() -> list[Entry]:
    return [
        Entry("fused", "na_rtc fused", _prepare_fused, families=("fused", "fused_bwd", "fused_tc", "fused_tc_bwd"),
              uses_kernels=True, falls_back=True),
        Entry("fused_simt", "na_rtc fused, SIMT kernels (NA_RTC_TENSOR_CORES=0)",
              lambda spec, inputs: _prepare_fused_variant(spec, inputs, _tensor_cores_off),
              families=("fused", "fused_bwd"),
              uses_kernels=True, default_cpu=False, cpu_note="tensor cores against SIMT is a GPU comparison"),
        Entry("fused_tc_rows16", "na_rtc fused, tensor-core forward with 16 query rows per warp "
              "(NA_RTC_TC_WARP_ROWS=16)", _prepare_sixteen_warp_rows,
              families=("fused_tc", "fused_tc_bwd"), uses_kernels=True, default_cpu=False,
              cpu_note="rows per warp of the tensor-core forward is a GPU comparison"),
        Entry("fused_wgmma", "na_rtc fused, Hopper wgmma forward and backward (NA_RTC_WGMMA=1)", _prepare_wgmma,
              families=("fused_wg", "fused_wg_bwd", "fused_tc_bwd"), uses_kernels=True, default_cpu=False,
              cpu_note="the wgmma forward against the mma.sync one is a GPU comparison"),
        Entry("fused_wgmma_1wg", "na_rtc fused, Hopper wgmma with one warpgroup per block "
              "(NA_RTC_WGMMA=1 NA_RTC_WGMMA_WARPGROUPS=1)", _prepare_wgmma_one_warpgroup,
              families=("fused_wg", "fused_wg_bwd", "fused_tc_bwd"), uses_kernels=True, default_cpu=False,
              cpu_note="warpgroups per block of the wgmma forward is a GPU comparison"),
        Entry("fused_wgmma_kc32", "na_rtc fused, Hopper wgmma forward with chunks of 32 keys "
              "(NA_RTC_WGMMA=1 NA_RTC_WGMMA_CHUNK_KEYS=32)", _prepare_wgmma_32_key_chunks,
              families=("fused_wg", "fused_wg_bwd", "fused_tc_bwd"), uses_kernels=True, default_cpu=False,
              cpu_note="keys per chunk of the wgmma forward is a GPU comparison"),
        Entry("split", "na_rtc split (qk, softmax, av)", _prepare_split, families=("naive", "tiled", "tiled_bwd"),
              uses_kernels=True, falls_back=True),
        Entry("naive_kernels", "na_rtc straightforward kernels", _prepare_naive_kernels, families=("naive",),
              uses_kernels=True),
        Entry("reference", "na_rtc reference (torch)", _prepare_reference, default_gpu=False, reference=True),
        Entry("blocked", "na_rtc blocked (block-sparse torch matmuls)", _prepare_blocked, default_gpu=False,
              backend="blocked"),
        Entry("host_overhead", "na_rtc host overhead of a warm fused call: dispatch and launch plans, nothing "
              "launched (notes: microseconds per call)", _prepare_host_overhead, computes=False),
    ]

