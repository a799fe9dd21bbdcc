"""VGG16Inception: VGG16's convolutional blocks 1-4 followed by a naive Inception module.

The DALAResNet50 paper's comparison names "VGG16Inception". The published model of that
name and shape on BreakHis that we found (papers and public code) is VGGIN-Net (Saini and
Susan, "VGGIN-Net: Deep Transfer Network for Imbalanced Breast Cancer Dataset", IEEE/ACM
TCBB 2022, doi:10.1109/TCBB.2022.3163277; the authors' code:
github.com/SainiManisha/VGGIN-Net, ``vgginnet.py``), evaluated with the same
imbalance-aware metrics (G-mean, IBA). Taking it as the paper's VGG16Inception is OUR
READING; the architecture below follows the authors' code:

* ImageNet VGG16 up to ``block4_pool`` (torchvision ``vgg16().features[:24]``: the first 10 of
  its 13 conv layers, 512 channels, 1/16 of the input size);
* a naive Inception module on it: parallel 1x1 conv (64), 3x3 conv (128), 5x5 conv (32),
  each with ReLU and "same" padding, and a 3x3 stride-1 max pool (the 512 input channels
  pass through), concatenated: 64 + 128 + 32 + 512 = 736 channels;
* BatchNorm, flatten, dropout 0.4, ``Linear(736 * h * w, 2 or 8)``.

Differences, stated: the head's input size follows the search's image size (h = w =
image_size // 16; 14x14 at 224 px as in the authors' code); the VGG part trains with the
rest (the authors report a frozen and a fine-tuned variant; our torchvision baselines all
train every layer); torchvision's ImageNet normalisation replaces Keras's caffe-style
``preprocess_input`` (the torchvision weights expect it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# torchvision vgg16().features: index 23 is the fourth max pool (Keras's block4_pool).
VGG16_BLOCK4_END = 24
VGG16_BLOCK4_CHANNELS = 512
VGG16_BLOCK4_STRIDE = 16

# VGGIN-Net's naive_inception_module(layer_in, f1=64, f2=128, f3=32).
INCEPTION_1X1, INCEPTION_3X3, INCEPTION_5X5 = 64, 128, 32
HEAD_DROPOUT = 0.4


class NaiveInception(nn.Module):
    """Parallel 1x1, 3x3 and 5x5 convolutions (ReLU) and a 3x3 max pool, concatenated.

    The "naive" Inception module of Szegedy et al. 2015 (Fig. 2a): no 1x1 reductions before
    the 3x3/5x5 convolutions and none after the pool, so the pool branch keeps all input
    channels. Spatial size is preserved (padding "same", pool stride 1).
    """

    def __init__(self, in_channels: int, c1: int, c3: int, c5: int) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(nn.Conv2d(in_channels, c1, 1), nn.ReLU(inplace=True))
        self.branch3 = nn.Sequential(
            nn.Conv2d(in_channels, c3, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.branch5 = nn.Sequential(
            nn.Conv2d(in_channels, c5, 5, padding=2), nn.ReLU(inplace=True)
        )
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.out_channels = c1 + c3 + c5 + in_channels

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.pool(x)], 1)


class VGG16Inception(nn.Module):
    """VGGIN-Net: ``features`` (VGG16 blocks 1-4), ``NaiveInception``, BN-flatten-dropout-linear.

    ``features`` is torchvision ``vgg16(...).features[:24]`` (random or ImageNet weights:
    the baselines registry decides). ``image_size`` fixes the head's input size.
    """

    def __init__(self, features: nn.Module, image_size: int, num_classes: int) -> None:
        super().__init__()
        side = image_size // VGG16_BLOCK4_STRIDE
        if side < 1:
            raise ValueError(
                f"vgg16_inception needs images of at least {VGG16_BLOCK4_STRIDE} px, "
                f"got {image_size}"
            )
        self.name = "vgg16_inception"
        self.features = features
        self.inception = NaiveInception(
            VGG16_BLOCK4_CHANNELS, INCEPTION_1X1, INCEPTION_3X3, INCEPTION_5X5
        )
        channels = self.inception.out_channels
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Flatten(),
            nn.Dropout(HEAD_DROPOUT),
            nn.Linear(channels * side * side, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inception(self.features(x)))

    def parameter_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """Decay on conv kernels and the linear weight; biases and BN scales (ndim 1) none."""
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
