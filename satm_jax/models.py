"""Networks used by trajectory matching, in Flax linen.

The distillation network is MTT's ``ConvNet`` (Cazenavette et al., 2022): ``depth`` blocks of
[3x3 convolution with bias -> normalisation -> ReLU -> 2x2 average pooling], then one linear
layer. Parameters use PyTorch's default initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
for weights and biases, so an expert trained here starts from the same distribution as one
trained by the reference code.

The convolution has three implementations that compute the same function:

* ``"lax"``: ``jax.lax.conv_general_dilated`` (cuDNN on GPU, the fast choice there);
* ``"patches"``: pad, stack the nine shifted views, one matmul. XLA's CPU backend is about ten
  times slow on the *second* derivative of ``conv_general_dilated`` (trajectory matching needs
  it), and slow on the first too;
* ``"winograd"``: 3x3 stride-1 layers with at least ``WINOGRAD_MIN_CHANNELS`` input channels
  by Winograd's F(2x2, 3x3) (``satm_jax.winograd``: 2.25x fewer matmul products), every other
  layer by patches.

``conv_impl="auto"`` picks ``"winograd"`` on the CPU and ``"lax"`` elsewhere, at trace time
(docs/PERFORMANCE.md has the measurements behind the choice).

The layers here are also those of the evaluation pool (``satm_jax.model_pool``); networks are
built by name through ``satm_jax.model_registry``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from satm_jax import models
  >>> net = models.ConvNet(num_classes=10, width=16, depth=2)
  >>> variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  >>> net.apply(variables, jnp.zeros((4, 16, 16, 3))).shape
  (4, 10)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from satm_jax import winograd

Array = jax.Array

NORMS = ("instancenorm", "batchnorm", "none")
CONV_IMPLS = ("auto", "patches", "winograd", "lax")
# Layers with fewer input channels (the first layer: 1 or 3) keep the patches form under
# "winograd": their matmuls are too thin for the 16 transformed products to pay off.
WINOGRAD_MIN_CHANNELS = 8


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
    """Maps ``"auto"`` to ``"winograd"`` on the CPU and ``"lax"`` on GPU/TPU."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "lax"
    return conv_impl


def per_channel(v: Array, like: Array) -> Array:
    """A per-channel vector ``v`` (``(C,)``) cast to ``like``'s dtype and shaped
    ``(1, ..., 1, C)`` to broadcast over ``like``'s last axis explicitly (the same numbers as
    NumPy's implicit rank promotion, which strict ``jax_numpy_rank_promotion`` refuses)."""
    return v.astype(like.dtype).reshape((1,) * (like.ndim - 1) + v.shape)


def conv2d(x: Array, kernel: Array, *, stride: int = 1, padding: int, impl: str) -> Array:
    """2-D convolution (NHWC input, HWIO kernel), by ``lax``, patches-then-matmul or Winograd.

    Every implementation computes the same cross-correlation (PyTorch's ``Conv2d``): zero
    padding of ``padding`` pixels on every side, then a ``stride``-strided window sum.
    """
    kh, kw, cin, cout = kernel.shape
    if impl == "winograd":
        if (kh, kw) == (3, 3) and stride == 1 and cin >= WINOGRAD_MIN_CHANNELS:
            return winograd.conv3x3(x, kernel, padding=padding)
        impl = "patches"
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
        if x.shape[1] * x.shape[2] == 1:
            # (x - mean) is 0 at a single position: the layer would output its shift alone and
            # the network's output would not depend on its input (a silent 1/classes accuracy).
            raise ValueError(
                "instance norm over a 1x1 feature map outputs a constant (the images are too "
                "small for this network's downsampling; use a batch-norm variant or larger "
                "images)"
            )
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


def has_batch_stats(variables: Any) -> bool:
    """Whether a variables dict (concrete, or abstract from ``jax.eval_shape``) carries batch
    norm's running statistics; ``model_registry.has_running_stats`` asks it of a config."""
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
