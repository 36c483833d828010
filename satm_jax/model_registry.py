"""Networks by name: ``ModelConfig``, the registry ``MODELS`` and ``build_model``.

``convnet`` is MTT's ConvNet (``satm_jax.models``); the cross-architecture evaluation pool
(``satm_jax.model_pool``) adds ``resnet18``, ``resnet18_bn``, ``resnet18_ap``, ``vgg11``,
``vgg11_bn`` and ``alexnet``. This module imports both, so every name is registered wherever
``build_model`` is called.

Example:
  >>> from satm_jax import model_registry
  >>> sorted(model_registry.MODELS)
  ['alexnet', 'convnet', 'resnet18', 'resnet18_ap', 'resnet18_bn', 'vgg11', 'vgg11_bn']
  >>> net = model_registry.build_model(model_registry.ModelConfig(width=16, depth=2), 10)
  >>> type(net).__name__, net.width
  ('ConvNet', 16)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from satm_jax.model_pool import VGG, AlexNet, ResNet
from satm_jax.models import (
    NORMS,
    ConvNet,
    default_depth,
    has_batch_stats,
    init_params,
    resolve_conv_impl,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A network chosen by name, with the ConvNet's knobs.

    Attributes:
      name: registry name (``"convnet"``; see ``MODELS``).
      width: ConvNet width.
      depth: ConvNet depth; ``None`` follows the resolution.
      norm: normalisation layer (``models.NORMS``).
      conv_impl: convolution implementation (``models.CONV_IMPLS``).
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


def has_running_stats(cfg: ModelConfig, image_shape: tuple[int, ...] = (32, 32, 3)) -> bool:
    """Whether the network of ``cfg`` keeps state besides its parameters (batch norm's running
    statistics): the one test of it, from an abstract initialisation (``jax.eval_shape``, no
    compute), so every registered network answers for itself, whatever its ``norm`` field says.

    Raises:
      ValueError: unknown name or norm.
    """
    return has_batch_stats(abstract_variables(build_model(cfg, num_classes=10), image_shape))


def abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> Any:
    """``model``'s variables for images of shape ``(H, W, C)`` as shapes and dtypes only
    (``jax.eval_shape`` of ``init_params``: traced, not computed).

    Raises:
      ValueError, TypeError: the network cannot take images of that shape (too small for its
        poolings or kernels).
    """
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), image_shape))


# --------------------------------------------------------------------------------------------
# The evaluation pool (``satm_jax.model_pool``)
# --------------------------------------------------------------------------------------------


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
