"""Classifiers: a small CNN and a CIFAR-style ResNet-18 with a width setting.

Every ReLU is its own named module (no functional or shared ReLUs), so the
activation-bounds defense can attach a bound after each one by name. Models take [0, 1]
images and normalise internally.
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("cnn", "resnet18")

_MEAN_STD = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class Normalize(nn.Module):
    """Per-channel standardisation as a layer, so the model owns its preprocessing."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """conv16-conv32-pool-conv64-pool-fc128-fc (the pilot CNN of METHOD.md 7)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, norm: Normalize):
        super().__init__()
        self.norm = norm
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, 128)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(self.norm(x))))))
        x = self.pool2(self.relu3(self.conv3(x)))
        return self.fc2(self.relu4(self.fc1(self.flatten(x))))


class BasicBlock(nn.Module):
    """ResNet basic block with two separately named ReLUs (after conv1, after the sum)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool); `width` is the first stage's channels."""

    def __init__(self, in_channels: int, num_classes: int, width: int, norm: Normalize):
        super().__init__()
        self.norm = norm
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes, stages = width, []
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(planes, width * mult, stride),
                                        BasicBlock(width * mult, width * mult, 1)))
            planes = width * mult
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.norm(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def build_model(name: str, dataset: str, num_classes: int = 10, width: int = 64) -> nn.Module:
    """A fresh model for `dataset`'s images; seed torch beforehand for determinism."""
    from fmfl_flwr.data import IMAGE_SHAPE

    if name not in MODELS:
        raise ValueError(f"model={name!r} is not known; accepted: {', '.join(MODELS)}")
    channels, size, _ = IMAGE_SHAPE[dataset]
    norm = Normalize(*_MEAN_STD[dataset])
    if name == "cnn":
        return SmallCNN(channels, size, num_classes, norm)
    return ResNet18(channels, num_classes, width, norm)


def relu_names(model: nn.Module) -> list[str]:
    """Qualified names of every ReLU module, in forward-registration order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.ReLU)]
