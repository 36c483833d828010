"""Networks used by trajectory matching, in Flax linen.

The distillation network is MTT's ``ConvNet`` (Cazenavette et al., 2022): ``depth`` blocks of
[3x3 convolution with bias -> normalisation -> ReLU -> 2x2 average pooling], then one linear
layer. Parameters use PyTorch's default initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
for weights and biases, so an expert trained here starts from the same distribution as one
trained by the reference code.

The 3x3 convolution has two implementations that compute the same function:

* ``"lax"``: ``jax.lax.conv_general_dilated`` (cuDNN on GPU, the fast choice there);
* ``"patches"``: pad, stack the nine shifted views, one matmul. XLA's CPU backend is about ten
  times slow on the *second* derivative of ``conv_general_dilated`` (trajectory matching needs
  it), while the matmul form runs at PyTorch's speed.

``conv_impl="auto"`` picks ``"patches"`` on the CPU and ``"lax"`` elsewhere, at trace time.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from satm_jax import models
  >>> net = models.ConvNet(num_classes=10, width=16, depth=2)
  >>> variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  >>> net.apply(variables, jnp.zeros((4, 16, 16, 3))).shape
  (4, 10)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

NORMS = ("instancenorm", "batchnorm", "none")
CONV_IMPLS = ("auto", "patches", "lax")


# --------------------------------------------------------------------------------------------
# Initialisers and layers
# --------------------------------------------------------------------------------------------


def torch_uniform_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default init for Conv/Linear weights and biases: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def resolve_conv_impl(conv_impl: str) -> str:
    """Maps ``"auto"`` to ``"patches"`` on the CPU and ``"lax"`` on GPU/TPU."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "patches" if jax.default_backend() == "cpu" else "lax"
    return conv_impl


def per_channel(v: Array, like: Array) -> Array:
    """A per-channel vector ``v`` (``(C,)``) cast to ``like``'s dtype and shaped
    ``(1, ..., 1, C)`` to broadcast over ``like``'s last axis explicitly (the same numbers as
    NumPy's implicit rank promotion, which strict ``jax_numpy_rank_promotion`` refuses)."""
    return v.astype(like.dtype).reshape((1,) * (like.ndim - 1) + v.shape)


def conv2d(x: Array, kernel: Array, *, stride: int = 1, padding: int, impl: str) -> Array:
    """2-D convolution (NHWC input, HWIO kernel), by ``lax`` or by patches-then-matmul.

    Both implementations compute the same cross-correlation (PyTorch's ``Conv2d``): zero
    padding of ``padding`` pixels on every side, then a ``stride``-strided window sum.
    """
    kh, kw, cin, cout = kernel.shape
    if impl == "lax":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if impl != "patches":
        raise ValueError(f"unknown convolution implementation {impl!r}")
    b, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    views = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(views, axis=-1)  # (b, ho, wo, kh*kw*cin), (i, j, c) order
    return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
    """Square convolution with bias and PyTorch's default initialisation."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        fan_in = cin * self.kernel_size**2
        kernel = self.param(
            "kernel",
            torch_uniform_init(fan_in),
            (self.kernel_size, self.kernel_size, cin, self.features),
        )
        y = conv2d(
            x,
            kernel.astype(x.dtype),
            stride=self.stride,
            padding=self.padding,
            impl=resolve_conv_impl(self.conv_impl),
        )
        if self.use_bias:
            bias = self.param("bias", torch_uniform_init(fan_in), (self.features,))
            y = y + per_channel(bias, y)
        return y


class Dense(nn.Module):
    """Linear layer with PyTorch's default initialisation."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform_init(fan_in), (fan_in, self.features))
        bias = self.param("bias", torch_uniform_init(fan_in), (self.features,))
        y = x @ kernel.astype(x.dtype)
        return y + per_channel(bias, y)


class InstanceNorm(nn.Module):
    """GroupNorm with one group per channel (PyTorch ``GroupNorm(C, C, affine=True)``).

    Normalises each sample's channel over its spatial positions with the biased variance and
    ``epsilon`` 1e-5 (PyTorch's; Flax's own default is 1e-6), then applies a per-channel scale
    (init 1) and shift (init 0).
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return y * per_channel(scale, y) + per_channel(bias, y)


def make_norm(norm: str, train: bool) -> Callable[[Array], Array]:
    """Returns the normalisation layer named ``norm`` (one of ``NORMS``)."""
    if norm == "instancenorm":
        return InstanceNorm()
    if norm == "batchnorm":
        # PyTorch BatchNorm2d: momentum 0.1 (Flax: 0.9 on the running average), eps 1e-5.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    if norm == "none":
        return lambda x: x
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


def avg_pool_2x2(x: Array) -> Array:
    """2x2 average pooling with stride 2; an odd last row/column is dropped (PyTorch floor)."""
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    return x.reshape(b, h2, 2, w2, 2, c).mean(axis=(2, 4))


def default_depth(resolution: int) -> int:
    """ConvNet depth from the image side: 3 for 28-32 px, 4 for 64 px, 5 for 128 px.

    ``max(1, round(log2(resolution)) - 2)``; e.g. 8 px -> 1, 16 px -> 2.
    """
    return max(1, round(math.log2(resolution)) - 2)


class ConvNet(nn.Module):
    """MTT's ConvNet: ``depth`` x [conv3x3(width) -> norm -> ReLU -> avgpool2], then linear.

    Attributes:
      num_classes: output logits.
      width: channels of every convolution (MTT: 128).
      depth: number of blocks. ``None`` follows the input resolution (``default_depth``).
      norm: ``"instancenorm"`` (MTT's default), ``"batchnorm"`` or ``"none"``.
      conv_impl: ``"auto"``, ``"patches"`` or ``"lax"`` (see the module docstring).

      first_padding: zero padding of the first convolution. ``None`` follows the reference:
        3 pixels for single-channel inputs (28x28 MNIST-style images become 32x32 feature
        maps, so the classifier sees 4x4 after three blocks), 1 otherwise.
    """

    num_classes: int
    width: int = 128
    depth: int | None = None
    norm: str = "instancenorm"
    conv_impl: str = "auto"
    first_padding: int | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        depth = self.depth if self.depth is not None else default_depth(x.shape[1])
        for d in range(depth):
            pad = 1
            if d == 0:
                pad = (
                    self.first_padding
                    if self.first_padding is not None
                    else (3 if x.shape[-1] == 1 else 1)
                )
            x = Conv(self.width, padding=pad, conv_impl=self.conv_impl)(x)
            x = make_norm(self.norm, train)(x)
            x = nn.relu(x)
            x = avg_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        return Dense(self.num_classes)(x)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A network chosen by name, with the ConvNet's knobs.

    Attributes:
      name: registry name (``"convnet"``; see ``MODELS``).
      width: ConvNet width.
      depth: ConvNet depth; ``None`` follows the resolution.
      norm: normalisation layer (``NORMS``).
      conv_impl: convolution implementation (``CONV_IMPLS``).
      first_padding: ConvNet's first-convolution padding (``None``: the reference's rule).
    """

    name: str = "convnet"
    width: int = 128
    depth: int | None = None
    norm: str = "instancenorm"
    conv_impl: str = "auto"
    first_padding: int | None = None

    def resolved(self, resolution: int) -> ModelConfig:
        """The config with ``depth`` filled in from the resolution (for manifests)."""
        if self.depth is None and self.name == "convnet":
            return dataclasses.replace(self, depth=default_depth(resolution))
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that decide the parameter layout (``conv_impl`` does not)."""
        d = dataclasses.asdict(self)
        d.pop("conv_impl")
        return d


def _convnet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return ConvNet(
        num_classes=num_classes,
        width=cfg.width,
        depth=cfg.depth,
        norm=cfg.norm,
        conv_impl=cfg.conv_impl,
        first_padding=cfg.first_padding,
    )


MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"convnet": _convnet}


def register_model(name: str, builder: Callable[[ModelConfig, int], nn.Module]) -> None:
    """Adds a network builder ``builder(model_config, num_classes) -> nn.Module``."""
    MODELS[name] = builder


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Builds the network named by ``cfg.name``.

    Raises:
      ValueError: unknown name or norm.
    """
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}")
    if cfg.norm not in NORMS:
        raise ValueError(f"unknown norm {cfg.norm!r}; choose one of {NORMS}")
    resolve_conv_impl(cfg.conv_impl)
    return MODELS[cfg.name](cfg, num_classes)


def has_batch_stats(variables: Any) -> bool:
    """Whether a variables dict carries BatchNorm running statistics."""
    return "batch_stats" in variables and bool(jax.tree.leaves(variables["batch_stats"]))


def init_params(model: nn.Module, key: Array, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """Initialises ``model`` for images of shape ``(H, W, C)``; returns its variables dict."""
    x = jnp.zeros((2, *image_shape), jnp.float32)
    return dict(model.init(key, x, train=False))


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def make_apply_fn(model: nn.Module) -> Callable[..., Array]:
    """``apply(params, x) -> logits`` for a stateless network in training mode.

    This is the form the student unroll differentiates twice. BatchNorm, if any, normalises
    with the statistics of the batch itself (training mode) and its running averages are
    discarded, as in MTT's student.
    """

    def apply(params: Any, x: Array) -> Array:
        logits, _ = model.apply({"params": params}, x, train=True, mutable=["batch_stats"])
        return logits

    return apply


# --------------------------------------------------------------------------------------------
# Cross-architecture evaluation pool (MTT's networks.py)
# --------------------------------------------------------------------------------------------
#
# MTT evaluates synthetic sets on networks other than the ConvNet they were distilled with:
# ResNet-18 (instance or batch norm), ResNet-18 with average-pooling downsampling, VGG-11 and a
# small AlexNet, all in their CIFAR forms (no stem down-sampling). Layers use the PyTorch
# defaults of the reference (``Conv2d``/``Linear`` init and bias, ``GroupNorm(C, C)`` as
# "instancenorm", ``BatchNorm2d``), so parameter counts equal the reference ones. Where the
# reference hard-codes a 32x32 (or 28x28) feature size, the classifier here takes whatever the
# features are, so 28, 32 and 64 px inputs all work.


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


def _resnet18(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return ResNet(num_classes=num_classes, norm=cfg.norm, conv_impl=cfg.conv_impl)


def _resnet18_bn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return ResNet(num_classes=num_classes, norm="batchnorm", conv_impl=cfg.conv_impl)


def _resnet18_ap(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return ResNet(
        num_classes=num_classes,
        norm="batchnorm",
        avg_pool_downsample=True,
        conv_impl=cfg.conv_impl,
    )


def _vgg11(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return VGG(num_classes=num_classes, norm=cfg.norm, conv_impl=cfg.conv_impl)


def _vgg11_bn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return VGG(num_classes=num_classes, norm="batchnorm", conv_impl=cfg.conv_impl)


def _alexnet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return AlexNet(num_classes=num_classes, conv_impl=cfg.conv_impl)


# ``resnet18``/``vgg11`` take ``cfg.norm`` (default ``"instancenorm"``, MTT's ``ResNet18`` and
# ``VGG11``); the ``_bn`` names and ``resnet18_ap`` (MTT's ``ResNet18BN_AP``) always use batch
# norm; AlexNet has none. ``cfg.width``/``cfg.depth`` apply to the ConvNet only.
register_model("resnet18", _resnet18)
register_model("resnet18_bn", _resnet18_bn)
register_model("resnet18_ap", _resnet18_ap)
register_model("vgg11", _vgg11)
register_model("vgg11_bn", _vgg11_bn)
register_model("alexnet", _alexnet)
