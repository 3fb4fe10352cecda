"""A standard (non-B-cos) CIFAR-style ResNet for 32–64 px inputs (the demo's and the tests' small baseline)."""

from __future__ import annotations

import torch
import torch.nn as nn


class SmallResNet(nn.Module):
    """A standard (non-B-cos) CIFAR-style ResNet (3 stages of torchvision BasicBlocks, 16/32/64 wide) for 32–64 px."""

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages, inplanes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(inplanes, planes, stride, down))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
