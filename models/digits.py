"""Digits (8x8) classifiers: an MLP and a small residual CNN, trained on CPU."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.datasets import digits_as_images, digits_split
from models.exporter import TorchModelSpec

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
EPOCHS_MLP = 30
EPOCHS_CNN = 12


class DigitsMLP(nn.Module):
    """64-128-64-10 ReLU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN + skip, then ReLU; 1x1 Conv-BN projection if widths differ."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        # No conv bias: BN's shift makes it redundant (as in torchvision ResNets),
        # so folding BN must also synthesize a Conv bias.
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class DigitsCNN(nn.Module):
    """Stem -> ResBlock(c1) -> MaxPool -> ResBlock(c2) -> GAP -> Linear.

    32/64 channels keep the fp32 ONNX file around 0.3 MB.
    """

    def __init__(self, c1: int = 32, c2: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.block1 = ResidualBlock(c1, c1)
        self.pool = nn.MaxPool2d(2)
        self.block2 = ResidualBlock(c1, c2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block1(self.stem(x)))
        return self.fc(self.flatten(self.gap(self.block2(x))))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Train on one intra-op thread, restoring the previous setting afterwards.

    These models are tiny: with a second busy process on a 2-core box, two
    spinning torch threads made CNN training 3x slower than one thread. One
    thread also makes the trained weights independent of the core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig) -> nn.Module:
    """Plain Adam + cross-entropy; shuffling uses its own seeded generator."""
    gen = torch.Generator().manual_seed(cfg.seed)
    # Copies: the cached split is read-only and torch warns on such arrays.
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(cfg.epochs):
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        logger.debug("epoch %d loss %.4f", epoch, total / len(xt))
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        pred = model.eval()(torch.tensor(x)).argmax(dim=1)
    return float((pred.numpy() == y).mean())


def _build(name: str, model: nn.Module, as_images: bool, cfg: TrainConfig) -> TorchModelSpec:
    split = digits_split()
    shape = digits_as_images if as_images else np.ascontiguousarray
    x_train, x_test = shape(split.x_train), shape(split.x_test)
    start = time.perf_counter()
    with single_thread():
        train_classifier(model, x_train, split.y_train, cfg)
    train_seconds = time.perf_counter() - start
    acc = accuracy(model, x_test, split.y_test)
    logger.info("%s: trained in %.1fs, test accuracy %.4f", name, train_seconds, acc)
    return TorchModelSpec(
        module=model,
        # Batch 2, not 1: torch.export specializes size-1 dims to constants.
        example_inputs={"input": x_test[:2]},
        output_names=("logits",),
        dynamic_axes={"input": {0: "batch"}},
        check_inputs={"input": x_test},
        # Only the CNN has BN; graphopt's fold pass needs it left unfused.
        keep_batchnorm=as_images,
        metadata={"test_accuracy": acc, "train_seconds": round(train_seconds, 3), "epochs": cfg.epochs},
    )


def build_mlp(seed: int = 0) -> TorchModelSpec:
    torch.manual_seed(seed)
    return _build("mlp", DigitsMLP(), False, TrainConfig(epochs=EPOCHS_MLP, seed=seed))


def build_cnn(seed: int = 0) -> TorchModelSpec:
    torch.manual_seed(seed)
    return _build("cnn", DigitsCNN(), True, TrainConfig(epochs=EPOCHS_CNN, batch_size=64, lr=3e-3, seed=seed))
