"""Train a small residual CNN on scikit-learn's bundled 8x8 digits with fused_act's activations.

    python examples/train_digits.py                       # fused kernels where available
    python examples/train_digits.py --backend reference   # the pure-PyTorch reference

The network uses Mish, ACON-C, Meta-ACON, FReLU, SiLU and GELU.  Runs on the GPU if there is one,
else on the CPU (the Triton backend on the CPU needs TRITON_INTERPRET=1).  Prints loss and
accuracy per epoch; with the same seed the fused and reference runs give the same curve.
"""

import argparse
import time

import torch
from torch import nn

import fused_act


class Block(nn.Module):
    """Conv -> BatchNorm -> activation -> Conv -> BatchNorm, plus the input, -> activation."""

    def __init__(self, c: int, act1: nn.Module, act2: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = act1
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = act2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(y)) + x)


class DigitsNet(nn.Module):
    """A small ResNet-style CNN for 1x8x8 images and 10 classes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), fused_act.nn.Mish())
        self.block1 = Block(width, fused_act.nn.AconC(width), fused_act.nn.FReLU(width))
        self.block2 = Block(width, fused_act.nn.MetaAconC(width, r=4), fused_act.nn.SiLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 64, 64),
                                  fused_act.nn.GELU(approximate="tanh"), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


def load_digits(device: torch.device, limit: int | None = None):
    """(train x, train y, test x, test y) from scikit-learn's bundled digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    tr, te = slice(n_test, None), slice(0, n_test)
    xs = x[tr][:limit], y[tr][:limit], x[te][:limit], y[te][:limit]
    return [t.to(device) for t in xs]


def train(epochs: int, backend: str, limit: int | None = None, batch: int = 64,
          seed: int = 0, quiet: bool = False) -> list[tuple[float, float]]:
    """Train and return (mean training loss, test accuracy) per epoch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused_act.set_backend(backend)
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits(device, limit)
    model = DigitsNet().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed + epoch))
        total = 0.0
        for i in range(0, len(xtr), batch):
            idx = order[i:i + batch].to(device)
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        history.append((total / len(xtr), acc))
        if not quiet:
            print(f"epoch {epoch + 1}: loss {total / len(xtr):.4f}  test accuracy {acc:.4f}  "
                  f"({seconds:.2f} s, {device.type}, backend {backend})")
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"])
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    args = p.parse_args()
    train(args.epochs, args.backend, args.limit)


if __name__ == "__main__":
    main()
