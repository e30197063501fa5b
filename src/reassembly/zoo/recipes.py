"""Recipes of the pretrained zoo shipped with the package: what each model is and how it is trained.

Split-CIFAR sources learn CIFAR-10 classes 0-4 (the DeRy target task is classes 5-9); the Fashion-MNIST models
are the "different source" members; the full CIFAR-10 models serve Model LEGO disassembly. MobileNeXt-32 and
MobileNetV2-32 share one recipe and seed, and are matched within 5% in parameters and MACs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..train import TrainRecipe

SPLIT_CIFAR = "cifar10[0:5]"
SGD_CIFAR = TrainRecipe(epochs=15, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=1)
ADAMW_VIT = TrainRecipe(epochs=30, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                        warmup_epochs=3, label_smoothing=0.1, grad_clip=1.0)
SGD_FASHION = TrainRecipe(epochs=4, batch_size=128, lr=0.05, weight_decay=5e-4, warmup_epochs=0.5, crop_padding=2)


@dataclass(frozen=True)
class ZooRecipe:
    name: str
    architecture: str
    data: str
    recipe: TrainRecipe
    description: str
    model_kwargs: dict = field(default_factory=dict)
    image_size: int = 32
    channels: int = 3
    seed: int = 0
    check_images: int = 500  # size of the fixed test subset whose accuracy the manifest records for re-checking
    channels_last: bool = False  # a speed setting (2x for depthwise convs on CPU), not part of the recipe's maths
    target_top1: float | None = None  # the test top-1 (%) the shipped model must reach on its source task


ZOO_RECIPES = {r.name: r for r in [
    ZooRecipe("resnet20_cifar5", "cifar_resnet20", SPLIT_CIFAR, SGD_CIFAR,
              "CIFAR ResNet-20 trained on CIFAR-10 classes 0-4 (split-CIFAR source).", target_top1=85),
    ZooRecipe("resnet32_cifar5", "cifar_resnet32", SPLIT_CIFAR, SGD_CIFAR,
              "CIFAR ResNet-32 trained on CIFAR-10 classes 0-4 (split-CIFAR source).", target_top1=85),
    ZooRecipe("vgg11_cifar5", "cifar_vgg11_bn", SPLIT_CIFAR, SGD_CIFAR,
              "VGG-11-BN at half width, one 256-wide hidden layer, trained on CIFAR-10 classes 0-4.",
              model_kwargs={"width": 0.5, "hidden": [256]}, target_top1=85),
    ZooRecipe("mobilenetv2_cifar5", "cifar_mobilenetv2_075", SPLIT_CIFAR, SGD_CIFAR,
              "MobileNetV2 x0.75, 32x32 layout, trained on CIFAR-10 classes 0-4 (the sandglass comparison arm).",
              channels_last=True, target_top1=85),
    ZooRecipe("mobilenext_cifar5", "cifar_mobilenext_075", SPLIT_CIFAR, SGD_CIFAR,
              "MobileNeXt x0.75, 32x32 layout, trained on CIFAR-10 classes 0-4 with MobileNetV2's recipe and seed.",
              channels_last=True, target_top1=85),
    ZooRecipe("vit_cifar5", "cifar_vit_tiny", SPLIT_CIFAR, ADAMW_VIT,
              "ViT (patch 4, dim 128, depth 6) trained on CIFAR-10 classes 0-4.", target_top1=75),
    ZooRecipe("resnet20_fashion", "cifar_resnet20", "fashion_mnist", SGD_FASHION,
              "CIFAR ResNet-20 trained on Fashion-MNIST at 32x32, 3 channels (different-source model).",
              target_top1=90),
    ZooRecipe("vgg11_fashion", "cifar_vgg11_bn", "fashion_mnist", SGD_FASHION,
              "VGG-11-BN at half width trained on Fashion-MNIST at 32x32, 3 channels (different-source model).",
              model_kwargs={"width": 0.5, "hidden": [256]}, target_top1=90),
    ZooRecipe("vgg16_cifar10", "cifar_vgg16_bn", "cifar10",
              SGD_CIFAR.model_copy(update={"epochs": 70, "mixed_precision": "bf16"}),
              "VGG-16-BN at half width with a 256-wide hidden layer, trained on all of CIFAR-10 (for disassembly).",
              model_kwargs={"width": 0.5, "hidden": [256]}, channels_last=True, target_top1=88),
    ZooRecipe("mobilenetv2_cifar10", "cifar_mobilenetv2_050", "cifar10", SGD_CIFAR,
              "MobileNetV2 x0.5, 32x32 layout, trained on all of CIFAR-10 (for disassembly).", channels_last=True),
]}


ZOO_SETS = {
    "split-cifar": tuple(name for name, r in ZOO_RECIPES.items() if r.data in (SPLIT_CIFAR, "fashion_mnist")),
}
"""Named groups of shipped models. ``split-cifar`` is the zoo of DESIGN.md's Split-CIFAR protocol: every model
trained on the source task (CIFAR-10 classes 0-4) or on a different source (Fashion-MNIST); the models trained on
all of CIFAR-10 have seen the target classes and are left out."""

