"""NAT and DiNAT image classifiers trained on real data: scikit-learn's handwritten digits.

The architecture follows the NAT paper (Hassani et al., "Neighborhood
Attention Transformer") at a small scale:

- an overlapping convolutional tokenizer: two 3x3 stride-2 convolutions, so the
  token map is the image downsampled by 4;
- four levels of pre-norm transformer blocks, ``x + NA(LN(x))`` then
  ``x + MLP(LN(x))``, with ``na_rtc.NeighborhoodAttention2D`` as the attention;
- between levels an overlapping 3x3 stride-2 convolution that halves the
  resolution and doubles the channels;
- layer norm, global average pooling and a linear classifier.

The DiNAT variant (Hassani & Shi, "Dilated Neighborhood Attention
Transformer") alternates local NA (dilation 1) and dilated NA inside every
level. As in DiNAT the dilation of a level is the largest that still fits
``kernel_size * dilation <= L`` (the paper's 224px model: k=7 on 56, 28, 14, 7
tokens, dilations 8, 4, 2, 1), which makes the dilated layers see the whole
level, spread out.

Sizing for 8x8 digits: the images are upsampled to 48x48, so the tokenizer
gives 12x12 tokens and the levels run at 12, 6, 3 and 2 tokens per side
(a 3x3 stride-2 convolution with padding 1 maps 3 to 2). With kernel 3 every
level but the last satisfies ``L >= k * d`` on its own (DiNAT dilations
4, 2, 1, 1); the last level (2x2 < 3x3) relies on the layer's padding: the
input is zero-padded to 3x3 before the qkv projection and the output cropped
back, like NAT's last level, where the window covers the whole map.

Run:
    python examples/nat_digits.py [--variant nat|dinat] [--epochs N] [--device auto|cpu|cuda]
                                  [--plot PATH] [--quick]

``--quick`` trains a tiny model for a few batches on a subset (what the test
suite runs). Needs scikit-learn (``pip install -e ".[examples]"``); tqdm for
the progress bar is optional.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import na_rtc

# ---------------------------------------------------------------- sizing

NAMES = {"nat": "NAT", "dinat": "DiNAT"}


@dataclass(frozen=True)
class Config:
    image_size: int = 48  # 8x8 digits upsampled; 48 -> 12x12 tokens (see the module docstring)
    dims: tuple = (32, 64, 128, 256)  # doubled at every downsampler
    depths: tuple = (2, 2, 2, 2)  # even, so DiNAT's local/dilated pairs fill every level
    head_dim: int = 16
    kernel_size: int = 3
    mlp_ratio: float = 3.0  # NAT's ratio
    drop_path: float = 0.1  # stochastic depth: 1437 training images overfit otherwise


FULL = Config()
# Tiny but with the same structure (four levels, pairs of blocks), for CI.
QUICK = Config(dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), head_dim=8, drop_path=0.0)


def conv_out(size: int) -> int:
    """Output length of a 3x3, stride-2, padding-1 convolution: ceil(size / 2)."""
    return (size + 2 * 1 - 3) // 2 + 1


def level_sizes(config: Config) -> list[int]:
    """Token map side length at each level."""
    size = conv_out(conv_out(config.image_size))  # the two tokenizer convolutions
    sizes = [size]
    for _ in config.dims[1:]:
        size = conv_out(size)
        sizes.append(size)
    return sizes


def dilations(config: Config, variant: str) -> list[list[int]]:
    """Dilation of every block, per level.

    NAT: 1 everywhere. DiNAT: local (1) and dilated layers alternate, local
    first; the dilated layers use the largest dilation with
    ``kernel_size * dilation <= L``, which is 1 where the level is smaller
    than two windows (there the pair is two local layers, as in DiNAT's last
    level).
    """
    if variant not in ("nat", "dinat"):
        raise ValueError(f"variant must be 'nat' or 'dinat', got {variant!r}")
    k = config.kernel_size
    out = []
    for size, depth in zip(level_sizes(config), config.depths):
        dilated = max(1, size // k)
        out.append([dilated if variant == "dinat" and i % 2 == 1 else 1 for i in range(depth)])
    return out


# ---------------------------------------------------------------- model


class ConvTokenizer(nn.Module):
    """Two overlapping 3x3 stride-2 convolutions: [B, C, H, W] -> [B, H/4, W/4, dim]."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        # Overlapping (kernel 3 > stride 2) rather than ViT's non-overlapping
        # patches: NAT's point is that it keeps a convolution-like inductive bias.
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # channels last for the NA layers


class Downsampler(nn.Module):
    """Overlapping 3x3 stride-2 convolution: halves the resolution, doubles the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):  # [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]
        x = self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(x)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class NABlock(nn.Module):
    """Pre-norm transformer block with 2D neighborhood attention."""

    def __init__(self, dim: int, heads: int, kernel_size: int, dilation: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # rel_pos_bias as in NAT. Inputs smaller than kernel_size * dilation
        # (the last level here) are padded by the layer and cropped back.
        self.attn = na_rtc.NeighborhoodAttention2D(dim, heads, kernel_size, dilation=dilation, rel_pos_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):  # [B, H, W, C]
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Level(nn.Module):
    def __init__(self, blocks: list[NABlock], downsample: Downsampler | None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x):
        x = self.blocks(x)
        return x if self.downsample is None else self.downsample(x)


class NATClassifier(nn.Module):
    def __init__(self, config: Config, variant: str = "nat", num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.config, self.variant = config, variant
        self.dilations = dilations(config, variant)
        self.tokenizer = ConvTokenizer(in_channels, config.dims[0])
        total = sum(config.depths)
        # Stochastic depth grows linearly with depth, as in NAT/Swin.
        rates = [config.drop_path * i / max(1, total - 1) for i in range(total)]
        levels = []
        for index, (dim, level_dilations) in enumerate(zip(config.dims, self.dilations)):
            blocks = [NABlock(dim, dim // config.head_dim, config.kernel_size, d, config.mlp_ratio, rates.pop(0))
                      for d in level_dilations]
            last = index == len(config.dims) - 1
            levels.append(Level(blocks, None if last else Downsampler(dim)))
        self.levels = nn.ModuleList(levels)
        self.norm = nn.LayerNorm(config.dims[-1])
        self.head = nn.Linear(config.dims[-1], num_classes)

    def features(self, x) -> list[torch.Tensor]:
        """Token maps [B, H, W, C] entering each level (after the tokenizer / downsampler)."""
        x = self.tokenizer(x)
        maps = []
        for level in self.levels:
            maps.append(x)
            x = level(x)
        return maps + [x]

    def forward(self, x):
        x = self.features(x)[-1]
        return self.head(self.norm(x).mean(dim=(1, 2)))


def describe_levels(model: NATClassifier) -> list[str]:
    """One line per level: size, window, dilations and whether the layer pads."""
    config = model.config
    k = config.kernel_size
    lines = []
    for index, (size, dim, level_dilations) in enumerate(zip(level_sizes(config), config.dims, model.dilations)):
        for_d = []
        for d in sorted(set(level_dilations)):
            fits = size >= k * d
            for_d.append(f"d={d}: {'L >= k*d' if fits else f'padded {size} -> {k * d}'}")
        lines.append(f"level {index + 1}: {size}x{size} tokens, {dim} channels, {dim // config.head_dim} heads, "
                     f"kernel {k}, dilations {level_dilations} ({'; '.join(for_d)})")
    return lines


# ---------------------------------------------------------------- data


def load_data(image_size: int, seed: int, test_fraction: float = 0.2):
    """scikit-learn's 1797 8x8 digits (values 0..16), upsampled, split stratified."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit('this example needs scikit-learn: pip install -e ".[examples]" (or pip install scikit-learn)')
    digits = load_digits()  # ships inside the scikit-learn package: no download
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed)

    def prepare(images):
        x = torch.tensor(images, dtype=torch.float32)[:, None] / 16.0
        # Bilinear upsampling: the digits keep their shape, only the token
        # maps grow large enough for four levels of windows.
        return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)

    return prepare(x_train), torch.tensor(y_train), prepare(x_test), torch.tensor(y_test)


def augment(x, generator):
    """Small random rotations, scalings and shifts (handwriting varies that much)."""
    batch = x.shape[0]
    angle = (torch.rand(batch, generator=generator) - 0.5) * math.radians(20)
    scale = 1.0 + (torch.rand(batch, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(batch, 2, generator=generator) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)  # background stays 0


# ---------------------------------------------------------------- progress


class _Progress:
    """A minimal stand-in for tqdm: one line rewritten in place."""

    def __init__(self, iterable, total, desc):
        self.iterable, self.total, self.desc, self.postfix = iterable, total, desc, ""

    def __iter__(self):
        start = time.perf_counter()
        for i, item in enumerate(self.iterable):
            yield item
            done = i + 1
            width = 24
            bar = "#" * (width * done // self.total)
            print(f"\r{self.desc} [{bar:<{width}}] {done}/{self.total} {time.perf_counter() - start:5.1f}s "
                  f"{self.postfix}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

    def set_postfix_str(self, text):
        self.postfix = text


def progress(iterable, total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Progress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------- training


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model, x, y, mean, std, batch_size=256):
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model((x[start:start + batch_size] - mean) / std)
        target = y[start:start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss / len(x), correct / len(x)


def train(variant: str, epochs: int, device: torch.device, quick: bool, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    config = QUICK if quick else FULL
    x_train, y_train, x_test, y_test = load_data(config.image_size, seed)
    if quick:  # a few batches: the structure and the loop, not the accuracy
        x_train, y_train, x_test, y_test = x_train[:128], y_train[:128], x_test[:64], y_test[:64]
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    mean, std = x_train.mean(), x_train.std()

    model = NATClassifier(config, variant).to(device)
    log(f"{NAMES[variant]} on {device}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(x_train)} training / {len(x_test)} test images at {config.image_size}x{config.image_size}")
    for line in describe_levels(model):
        log("  " + line)

    batch_size = 32 if quick else 64
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = steps_per_epoch  # one epoch of linear warm-up, then cosine decay to zero
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if quick else 2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total_steps))))
    generator = torch.Generator().manual_seed(seed)

    history = {key: [] for key in ("train_loss", "train_acc", "test_loss", "test_acc", "seconds")}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        bar = progress(range(steps_per_epoch), steps_per_epoch, f"epoch {epoch}/{epochs}")
        for step in bar:
            index = order[step * batch_size:(step + 1) * batch_size]
            x, target = augment(x_train[index], generator), y_train[index]
            logits = model((x - mean) / std)
            loss = F.cross_entropy(logits, target, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(index)
            correct += (logits.argmax(1) == target).sum().item()
            bar.set_postfix_str(f"loss {loss.item():.3f}")
        test_loss, test_acc = evaluate(model, x_test, y_test, mean, std)
        history["train_loss"].append(loss_sum / len(x_train))
        history["train_acc"].append(correct / len(x_train))
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
        history["seconds"].append(time.perf_counter() - epoch_start)
        log(f"epoch {epoch:2d}  train loss {history['train_loss'][-1]:.4f}  train acc "
            f"{100 * history['train_acc'][-1]:5.1f}%  test loss {test_loss:.4f}  test acc {100 * test_acc:5.1f}%  "
            f"{history['seconds'][-1]:.1f}s")
    history["total_seconds"] = time.perf_counter() - start
    history["model"] = model
    return history


def plot(history: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, history["train_loss"], "o-", label="train (augmented, label smoothing)")
    left.plot(epochs, history["test_loss"], "s-", label="test")
    left.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    right.plot(epochs, [100 * a for a in history["train_acc"]], "o-", label="train")
    right.plot(epochs, [100 * a for a in history["test_acc"]], "s-", label="test")
    right.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("nat", "dinat"), default="nat")
    parser.add_argument("--epochs", type=int, default=None, help="default: 12, or 3 with --quick")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--plot", default=None, help="PNG of the training curve (default nat_digits_<variant>.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 is faster for tiny models and "
                             "on a busy machine")
    parser.add_argument("--quick", action="store_true", help="tiny model, a few batches on a subset (for tests)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 12)
    if epochs < 1:
        parser.error(f"--epochs must be >= 1, got {epochs}")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    history = train(args.variant, epochs, device, args.quick, args.seed)
    path = args.plot or f"nat_digits_{args.variant}.png"
    threads = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    summary = (f"{NAMES[args.variant]}: test accuracy {100 * history['test_acc'][-1]:.1f}% after {epochs} epoch{'s' * (epochs != 1)}, "
               f"{history['total_seconds']:.0f}s ({history['total_seconds'] / epochs:.1f}s per epoch) on "
               f"{device}{threads}")
    plot(history, path, summary)
    print(summary)
    print(f"training curve: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
