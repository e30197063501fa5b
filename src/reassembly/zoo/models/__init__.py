"""Built-in architectures; importing this package registers every family."""

from . import cifar_resnet, mobilenetv2, mobilenext, vgg, vit, wide_resnet  # noqa: F401
