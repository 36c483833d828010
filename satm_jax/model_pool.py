"""The cross-architecture evaluation pool (MTT's ``networks.py``), in Flax linen.

MTT evaluates synthetic sets on networks other than the ConvNet they were distilled with:
ResNet-18 (instance or batch norm), ResNet-18 with average-pooling downsampling, VGG-11 and a
small AlexNet, all in their CIFAR forms (no stem down-sampling). Layers are the ConvNet's
(``satm_jax.models``: ``Conv``/``Dense`` with PyTorch's init and bias, ``GroupNorm(C, C)`` as
"instancenorm", ``BatchNorm2d``), so parameter counts equal the reference ones. Where the
reference hard-codes a 32x32 (or 28x28) feature size, the classifier here takes whatever the
features are, so 28, 32 and 64 px inputs all work.

The networks are built by name (``resnet18``, ``vgg11``, ...) through
``satm_jax.model_registry.build_model``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from satm_jax.models import Conv, Dense, avg_pool_2x2, make_norm

Array = jax.Array


def max_pool_2x2(x: Array) -> Array:
    """2x2 max pooling with stride 2; an odd last row/column is dropped (PyTorch floor)."""
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    return x.reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


def _first_padding(x: Array, default: int, extra: int) -> int:
    """The reference pads its first convolution more on 28x28 (MNIST-like) inputs.

    MTT keys this on ``channel == 1``, which in its datasets means 28x28; keying it on the
    size instead keeps the 32-px feature geometry for any 28-px input (3-channel ones too).
    """
    return default + extra if x.shape[1] == 28 else default


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-norm-ReLU-conv3x3-norm, plus shortcut, then ReLU.

    Convolutions have no bias. A projection shortcut (1x1 conv + norm) is used when the block
    changes the stride or the width.

    Attributes:
      planes: output channels.
      stride: 1, or 2 to halve the resolution.
      norm: ``NORMS`` entry.
      avg_pool_downsample: MTT's ``BasicBlock_AP``: instead of stride-2 convolutions, the first
        conv has stride 1 and is followed (after norm and ReLU) by 2x2 average pooling, and the
        shortcut is 1x1 conv (stride 1) -> 2x2 average pooling -> norm.
      conv_impl: see ``CONV_IMPLS``.
    """

    planes: int
    stride: int = 1
    norm: str = "instancenorm"
    avg_pool_downsample: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        ap = self.avg_pool_downsample
        conv_stride = 1 if ap else self.stride
        out = Conv(self.planes, 3, conv_stride, 1, use_bias=False, conv_impl=self.conv_impl)(x)
        out = nn.relu(make_norm(self.norm, train)(out))
        if ap and self.stride != 1:
            out = avg_pool_2x2(out)
        out = Conv(self.planes, 3, 1, 1, use_bias=False, conv_impl=self.conv_impl)(out)
        out = make_norm(self.norm, train)(out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = Conv(
                self.planes, 1, conv_stride, 0, use_bias=False, conv_impl=self.conv_impl
            )(x)
            if ap and self.stride != 1:
                shortcut = avg_pool_2x2(shortcut)
            shortcut = make_norm(self.norm, train)(shortcut)
        return nn.relu(out + shortcut)


class ResNet(nn.Module):
    """MTT's CIFAR ResNet: 3x3 stem (stride 1, no max-pool), four stages of basic blocks.

    Attributes:
      num_classes: output logits.
      stages: blocks per stage (ResNet-18: ``(2, 2, 2, 2)``); widths 64-128-256-512, stages
        2-4 start with a stride-2 block.
      norm: ``"instancenorm"`` (MTT's ``ResNet18``), ``"batchnorm"`` (``ResNet18BN``) or
        ``"none"``.
      avg_pool_downsample: MTT's ``ResNet_AP`` (``ResNet18BN_AP`` with batch norm): blocks
        down-sample by average pooling (see ``BasicBlock``) and the classifier reads the
        flattened final feature map (512 x 4 x 4 at 32 px, 512 x 3 x 3 at 28 px) instead of
        its global average.
      conv_impl: see ``CONV_IMPLS``.

    The plain ResNet averages the final map globally (the reference's ``avg_pool2d(out, 4)``
    on its 4x4 map at 28 and 32 px), so it also takes 64-px inputs.
    """

    num_classes: int
    stages: tuple[int, ...] = (2, 2, 2, 2)
    norm: str = "instancenorm"
    avg_pool_downsample: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        x = Conv(64, 3, 1, 1, use_bias=False, conv_impl=self.conv_impl)(x)
        x = nn.relu(make_norm(self.norm, train)(x))
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                x = BasicBlock(
                    planes=64 * 2**i,
                    stride=2 if (i > 0 and j == 0) else 1,
                    norm=self.norm,
                    avg_pool_downsample=self.avg_pool_downsample,
                    conv_impl=self.conv_impl,
                )(x, train)
        if self.avg_pool_downsample:
            x = x.reshape(x.shape[0], -1)
        else:
            x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes)(x)


VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """MTT's VGG: [conv3x3 (bias) -> norm -> ReLU] and 2x2 max-pools per ``cfg``, then linear.

    The first convolution pads by 3 on 28-px inputs (32-px geometry, as the reference does for
    MNIST). The classifier reads the flattened final map: 512 x 1 x 1 at 28 and 32 px (the
    reference's ``Linear(512, classes)``), 512 x 2 x 2 at 64 px.

    Attributes:
      num_classes: output logits.
      cfg: channels, or ``"M"`` for max-pooling (``VGG11_CFG``).
      norm: ``"instancenorm"`` (MTT's ``VGG11``), ``"batchnorm"`` (``VGG11BN``) or ``"none"``.
      conv_impl: see ``CONV_IMPLS``.
    """

    num_classes: int
    cfg: tuple[int | str, ...] = VGG11_CFG
    norm: str = "instancenorm"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        first_pad = _first_padding(x, 1, 2)
        for i, v in enumerate(self.cfg):
            if v == "M":
                x = max_pool_2x2(x)
                continue
            pad = first_pad if i == 0 else 1
            x = Conv(int(v), 3, 1, pad, conv_impl=self.conv_impl)(x)
            x = nn.relu(make_norm(self.norm, train)(x))
        x = x.reshape(x.shape[0], -1)
        return Dense(self.num_classes)(x)


class AlexNet(nn.Module):
    """MTT's small AlexNet for 32-px images (no normalisation).

    conv5x5(128) -> ReLU -> maxpool2 -> conv5x5(192) -> ReLU -> maxpool2 -> conv3x3(256) ->
    ReLU -> conv3x3(192) -> ReLU -> conv3x3(192) -> ReLU -> maxpool2 -> linear. The first
    convolution pads by 4 on 28-px inputs (2 otherwise), so the classifier reads 192 x 4 x 4
    at 28 and 32 px (the reference's ``Linear(192 * 4 * 4, classes)``) and 192 x 8 x 8 at
    64 px.

    Attributes:
      num_classes: output logits.
      conv_impl: see ``CONV_IMPLS``.
    """

    num_classes: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        del train  # no normalisation or dropout
        ci = self.conv_impl
        x = max_pool_2x2(nn.relu(Conv(128, 5, 1, _first_padding(x, 2, 2), conv_impl=ci)(x)))
        x = max_pool_2x2(nn.relu(Conv(192, 5, 1, 2, conv_impl=ci)(x)))
        x = nn.relu(Conv(256, 3, 1, 1, conv_impl=ci)(x))
        x = nn.relu(Conv(192, 3, 1, 1, conv_impl=ci)(x))
        x = max_pool_2x2(nn.relu(Conv(192, 3, 1, 1, conv_impl=ci)(x)))
        x = x.reshape(x.shape[0], -1)
        return Dense(self.num_classes)(x)
