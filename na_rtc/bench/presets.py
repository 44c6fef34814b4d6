"""Benchmark problems: one :class:`Spec` per problem, named presets of them.

A spec is everything that decides the work: spatial shape, kernel, dilation,
stride, causal flags (one per axis), batch, heads (and key/value heads, with
GQA/MQA), head dim, dtype and the extra key/value tokens every query attends. Its
:attr:`Spec.key` names it in the results JSON, so a resumed run recognises
problems it has already measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Spec:
    """One benchmark problem; per-axis fields are tuples with one entry per spatial axis."""

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]
    batch: int
    heads: int
    head_dim: int
    dtype: str
    #: where the problem comes from (a performance target, a model's stage), shown in reports
    note: str = ""
    #: key/value heads with GQA/MQA (dividing ``heads``: query head h reads key/value head h // group); None: as
    #: many as ``heads``. Last and defaulted: positional constructions (runner.spec_from_json) keep their meaning
    heads_kv: int | None = None
    #: extra key/value tokens every query attends besides its neighborhood (``additional_keys``/
    #: ``additional_values``), one softmax over both; last and defaulted for the same reason as ``heads_kv``
    extra_tokens: int = 0

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def kv_heads(self) -> int:
        return self.heads if self.heads_kv is None else self.heads_kv

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA/MQA)."""
        return self.heads // self.kv_heads

    @property
    def qkv_shape(self) -> tuple[int, ...]:
        """The query's (and the output's) shape; key and value have :attr:`kv_shape`."""
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.spatial, self.kv_heads, self.head_dim)

    @property
    def extra_shape(self) -> tuple[int, ...]:
        """The extra keys' (and values') shape, ``[batch, tokens, heads_kv, head_dim]``."""
        return (self.batch, self.extra_tokens, self.kv_heads, self.head_dim)

    @property
    def key(self) -> str:
        """A stable, readable identity (the note is left out: it does not change the work)."""
        def axes(values):
            return "x".join(str(int(v)) for v in values)

        parts = [f"{self.ndim}d", axes(self.spatial), f"k{axes(self.kernel)}"]
        if any(d != 1 for d in self.dilation):
            parts.append(f"d{axes(self.dilation)}")
        if any(s != 1 for s in self.stride):
            parts.append(f"s{axes(self.stride)}")
        if any(self.causal):
            parts.append(f"c{axes(self.causal)}")
        parts += [f"b{self.batch}", f"h{self.heads}"]
        if self.heads_kv is not None:  # only when set: every key without GQA stays what results files hold
            parts.append(f"kv{self.heads_kv}")
        if self.extra_tokens:  # likewise: every key without extra tokens stays what results files hold
            parts.append(f"x{self.extra_tokens}")
        parts += [f"D{self.head_dim}", SHORT_DTYPE[self.dtype]]
        return "-".join(parts)

    @property
    def label(self) -> str:
        """Short human name: ``2D 128x128 k=13 dil=4 b2 h8 D64 fp16`` (``h16/kv4`` with GQA, ``+512 tokens`` at
        the end with extra tokens)."""
        def axes(values):
            return "x".join(str(int(v)) for v in values) if len(set(values)) > 1 else str(int(values[0]))

        text = f"{self.ndim}D {'x'.join(map(str, self.spatial))} k={axes(self.kernel)}"
        if any(d != 1 for d in self.dilation):
            text += f" dil={axes(self.dilation)}"
        if any(s != 1 for s in self.stride):
            text += f" stride={axes(self.stride)}"
        if any(self.causal):
            text += " causal" if all(self.causal) else f" causal={axes(self.causal)}"
        heads = f"h{self.heads}" if self.heads_kv is None else f"h{self.heads}/kv{self.heads_kv}"
        text += f" b{self.batch} {heads} D{self.head_dim} {SHORT_DTYPE[self.dtype]}"
        if self.extra_tokens:
            text += f" +{self.extra_tokens} tokens"
        return text

    def to_json(self) -> dict:
        record = asdict(self)
        record["key"], record["label"] = self.key, self.label
        return record


def spec(spatial, kernel, *, dilation=1, stride=1, causal=False, batch=1, heads=4, heads_kv=None, head_dim=32,
         dtype="float16", note="", extra_tokens=0) -> Spec:
    """A :class:`Spec` with scalar per-axis arguments broadcast over the axes; ``heads_kv``: key/value heads
    (GQA/MQA), dividing ``heads``; ``extra_tokens``: key/value tokens every query attends besides its
    neighborhood."""
    spatial = tuple(spatial) if isinstance(spatial, (tuple, list)) else (spatial,)
    ndim = len(spatial)

    def per_axis(value):
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
        if len(values) != ndim:
            raise ValueError(f"expected {ndim} values (one per spatial axis), got {value!r}")
        return values

    return Spec(spatial, tuple(int(v) for v in per_axis(kernel)), tuple(int(v) for v in per_axis(dilation)),
                tuple(int(v) for v in per_axis(stride)), tuple(bool(v) for v in per_axis(causal)),
                int(batch), int(heads), int(head_dim), DTYPES[dtype], note, _grouped_heads(int(heads), heads_kv),
                _extra_tokens(extra_tokens))


def _grouped_heads(heads: int, heads_kv) -> int | None:
    """``heads_kv`` checked, None where it equals ``heads``: the same work as without GQA gets the same key."""
    if heads_kv is None or int(heads_kv) == heads:
        return None
    if int(heads_kv) < 1 or heads % int(heads_kv):
        raise ValueError(f"heads_kv={heads_kv} must divide heads={heads} (each key/value head serves "
                         "heads // heads_kv query heads)")
    return int(heads_kv)


def _extra_tokens(extra_tokens) -> int:
    if int(extra_tokens) < 0:
        raise ValueError(f"extra_tokens={extra_tokens} must be 0 (none) or more")
    return int(extra_tokens)


# ---------------------------------------------------------------- presets

FLEX_TARGET = "target: fused vs FlexAttention"
SPLIT_TARGET = "target: split ops"
MEMORY_TARGET = "target: fused fwd/bwd, memory"

#: the exact shapes the performance targets are set on (``bench --targets`` judges them), the
#: FlexAttention comparison first: a slice whose budget runs out (make gpu-check runs one) has measured those
TARGETS = (
    spec((128, 128), 13, batch=2, heads=8, head_dim=64, dtype="bf16", note=FLEX_TARGET),
    spec((128, 128), 13, batch=2, heads=8, head_dim=128, dtype="bf16", note=FLEX_TARGET),
    spec(32768, 2047, batch=1, heads=8, head_dim=128, dtype="bf16", note=FLEX_TARGET),
    spec((56, 56), 7, batch=8, heads=4, head_dim=32, dtype="fp16", note=SPLIT_TARGET),
    spec((128, 128), 7, batch=2, heads=8, head_dim=32, dtype="fp16", note=SPLIT_TARGET),
    spec((128, 128), 13, batch=2, heads=8, head_dim=64, dtype="fp16", note=MEMORY_TARGET),
)

#: NAT/DiNAT-like sizes, long 1D kernels
SHAPES = (
    spec(4096, 127, batch=1, heads=4, head_dim=64, note="1D long kernel"),
    spec(32768, 2047, batch=1, heads=4, head_dim=64, note="1D very long kernel"),
    spec((56, 56), 7, batch=8, heads=2, head_dim=32, note="NAT-tiny stage 1"),
    spec((128, 128), 13, batch=2, heads=4, head_dim=32),
    spec((256, 256), 13, batch=1, heads=4, head_dim=32),
    spec((256, 256), 13, dilation=4, batch=1, heads=4, head_dim=32, note="DiNAT-style dilation"),
)

#: head dims x dtypes on one 2D problem
DTYPE_SWEEP = tuple(
    spec((128, 128), 13, batch=1, heads=4, head_dim=head_dim, dtype=dtype, note="head dim / dtype sweep")
    for dtype in ("fp32", "fp16", "bf16") for head_dim in (32, 64, 128)
)

#: tiny problems that run on the emulator in seconds: a CPU-only machine's view of the harness
QUICK = (
    spec(128, 15, batch=1, heads=2, head_dim=32, dtype="fp32", note="tiny 1D"),
    spec((12, 12), 5, batch=1, heads=2, head_dim=32, dtype="fp32", note="tiny 2D"),
    spec((12, 12), 3, dilation=2, causal=(True, False), batch=1, heads=2, head_dim=32, dtype="fp32",
         note="tiny 2D, dilation + causal"),
    spec((12, 12), 5, stride=2, batch=1, heads=2, head_dim=16, dtype="bf16", note="tiny 2D, stride, bf16"),
    spec((6, 8, 8), (3, 5, 5), batch=1, heads=2, head_dim=16, dtype="fp32", note="tiny 3D"),
    spec((12, 12), 5, batch=1, heads=4, heads_kv=2, head_dim=16, dtype="fp32", note="tiny 2D, GQA 2:1"),
    spec(128, 15, batch=1, heads=2, head_dim=32, dtype="fp32", extra_tokens=7, note="tiny 1D, extra tokens"),
)

#: grouped key/value heads, bf16: na_rtc reads each key/value head in place for its group of query heads,
#: FlexAttention (enable_gqa) likewise, with the same NA block mask
GQA = (
    spec((64, 64), 13, batch=2, heads=16, heads_kv=4, head_dim=64, dtype="bf16", note="GQA 4:1"),
    spec((64, 64), 13, batch=2, heads=16, heads_kv=1, head_dim=64, dtype="bf16", note="MQA 16:1"),
)

#: extra key/value tokens every query attends (text tokens beside image or sequence tokens), bf16: na_rtc's fused
#: op with additional_keys/additional_values against FlexAttention with the same NA mask, the tokens appended to
#: K/V and visible to every query
EXTRA_TOKENS = (
    spec((64, 64), 13, batch=2, heads=16, heads_kv=4, head_dim=64, dtype="bf16", extra_tokens=256,
         note="GQA 4:1, 256 extra tokens"),
    spec((64, 64), 13, batch=2, heads=16, heads_kv=4, head_dim=64, dtype="bf16", extra_tokens=512,
         note="GQA 4:1, 512 extra tokens"),
    spec(65536, 80, stride=16, batch=1, heads=24, head_dim=128, dtype="bf16", extra_tokens=512,
         note="1D long sequence, 512 extra tokens"),
)

VIDEO_DIFFUSION = "video diffusion (30x48x80 latent)"

#: video and volume problems, bf16. The dilated one dilates only the 16-long axes: a dilation of 2 on the
#: 8-frame axis would leave groups of 4 frames, shorter than the 7-frame window (NA needs length >= k * d).
THREE_D = (
    spec((16, 32, 32), (3, 7, 7), batch=2, heads=8, head_dim=64, dtype="bf16", note="3D video"),
    spec((8, 16, 16), 7, dilation=(1, 2, 2), batch=2, heads=8, head_dim=64, dtype="bf16", note="3D dilated"),
    spec((30, 48, 80), (18, 24, 24), batch=1, heads=24, head_dim=128, dtype="bf16", note=VIDEO_DIFFUSION),
    spec((30, 48, 80), (18, 24, 24), stride=(16, 8, 8), batch=1, heads=24, head_dim=128, dtype="bf16",
         note=VIDEO_DIFFUSION + ", strided"),
    spec((16, 32, 32), (5, 7, 7), causal=(True, False, False), batch=2, heads=8, head_dim=64, dtype="bf16",
         note="3D video, causal in time"),
)


NAT_TINY = "NAT-tiny stage 1"

#: what the portable backends (reference, blocked) are measured on beside the naive torch gather, fp32 as a
#: CPU computes; the NAT-tiny stage also against full attention over its 3136 tokens (the sdpa entry)
PORTABLE = (
    spec((128, 128), 13, batch=1, heads=4, head_dim=32, dtype="fp32", note="2D large kernel"),
    spec(4096, 127, batch=1, heads=4, head_dim=32, dtype="fp32", note="1D long kernel"),
    spec((64, 64), 7, dilation=2, batch=1, heads=4, head_dim=32, dtype="fp32", note="2D dilated"),
    spec((16, 32, 32), (3, 7, 7), batch=1, heads=4, head_dim=32, dtype="fp32", note="3D video"),
    spec((56, 56), 7, batch=8, heads=4, head_dim=32, dtype="fp32", note=NAT_TINY),
)


def _unique(*groups) -> tuple[Spec, ...]:
    seen, out = set(), []
    for group in groups:
        for item in group:
            if item.key not in seen:
                seen.add(item.key)
                out.append(item)
    return tuple(out)


#: what ``make gpu-check`` measures: the target shapes, with the first 3D problem right after the FlexAttention
#: targets (a slice whose budget runs out has measured the comparisons the targets judge, and one in 3D)
GPU_CHECK = _unique([s for s in TARGETS if s.note == FLEX_TARGET], THREE_D[:1], TARGETS)

PRESETS: dict[str, tuple[Spec, ...]] = {
    "quick": QUICK,
    "targets": TARGETS,
    "shapes": SHAPES,
    "dtypes": DTYPE_SWEEP,
    "3d": THREE_D,
    "gqa": GQA,
    "extra-tokens": EXTRA_TOKENS,
    "gpu-check": GPU_CHECK,
    "portable": PORTABLE,
    "full": _unique(TARGETS, SHAPES, DTYPE_SWEEP, THREE_D, GQA, EXTRA_TOKENS, PORTABLE),
}

PRESET_HELP = {
    "quick": "tiny 1D/2D/3D problems (fp32, dilation+causal, stride+bf16, GQA, extra tokens); runs on a CPU in well "
             "under a minute",
    "targets": "the shapes the performance targets are set on (bench --targets judges them; GPU sizes)",
    "shapes": "1D 4096 k=127, 1D 32768 k=2047, 2D 56x56 k=7, 128x128 k=13, 256x256 k=13 (+ dilation 4)",
    "dtypes": "2D 128x128 k=13 with head dims 32/64/128 in fp32/fp16/bf16",
    "3d": "3D bf16: 16x32x32 k=3x7x7, 8x16x16 k=7 dil=1x2x2, 30x48x80 k=18x24x24 (stride 1 and 16x8x8), "
          "16x32x32 k=5x7x7 causal in time (GPU sizes)",
    "gqa": "2D bf16 64x64 k=13, 16 heads with 4 key/value heads (GQA) and with 1 (MQA) (GPU sizes)",
    "extra-tokens": "bf16 with extra key/value tokens every query attends: 2D 64x64 k=13, 16 heads with 4 key/value "
                    "heads, +256 and +512 tokens; 1D 65536 k=80 stride=16, 24 heads, +512 tokens (GPU sizes)",
    "gpu-check": "what make gpu-check measures: the targets, with 3D 16x32x32 k=3x7x7 after the FlexAttention ones",
    "portable": "fp32 for the portable backends (reference, blocked) beside the naive torch gather: 2D 128x128 "
                "k=13, 1D 4096 k=127, 2D 64x64 k=7 dil=2, 3D 16x32x32 k=3x7x7, NAT-tiny 56x56 k=7 b8 (also against "
                "SDPA full attention); fits a CPU run",
    "full": "targets + shapes + dtypes + 3d + gqa + extra-tokens + portable (several slices on a GPU: use "
            "--resume)",
}

#: earlier preset names, still accepted by ``--preset`` (scripts and make targets may use them); not listed
PRESET_ALIASES = {"issues": "targets"}


def preset_name(name: str) -> str:
    """The preset ``name`` stands for (an alias resolved)."""
    return PRESET_ALIASES.get(name, name)
