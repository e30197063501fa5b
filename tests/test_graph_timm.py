"""Dissection of timm models (random weights); skipped where timm is not importable."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from reassembly.graph import dissect, verify  # noqa: E402

# name -> (input size, body nodes at block granularity); transformers need their native 224 grid
MODELS = {
    "resnet18": ((3, 64, 64), 8),
    "resnet50": ((3, 64, 64), 16),
    "resnext50_32x4d": ((3, 64, 64), 16),
    "regnety_002": ((3, 64, 64), 13),
    "mobilenetv2_100": ((3, 64, 64), 18),  # 17 inverted residuals and the 1x1 conv head
    "mobilenetv3_small_100": ((3, 64, 64), 12),
    "efficientnet_b0": ((3, 64, 64), 17),
    "convnext_atto": ((3, 64, 64), 15),  # 12 blocks and 3 downsampling layers
    "vit_tiny_patch16_224": ((3, 224, 224), 12),
    "deit_tiny_patch16_224": ((3, 224, 224), 12),
    "swin_tiny_patch4_window7_224": ((3, 224, 224), 15),  # 12 blocks and 3 patch mergings, as in DeRy
    "mixer_s16_224": ((3, 224, 224), 8),
    "densenet121": ((3, 64, 64), 7),  # 4 dense blocks and 3 transitions
}



@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_dissects_and_recomposes(name):
    size, body_nodes = MODELS[name]
    model = timm.create_model(name, pretrained=False).eval()
    chain = dissect(model, size, name=name)
    kinds = [node.kind for node in chain]
    assert kinds == ["stem"] + ["body"] * body_nodes + ["head"]
    assert chain.opaque == ()
    assert chain.params == sum(p.numel() for p in model.parameters())
    assert chain[-1].out_shape == (1000,)
    assert verify(chain, model, torch.randn(2, *size)) < 1e-5


def test_timm_node_names_follow_the_architecture():
    resnet = dissect(timm.create_model("resnet18").eval(), (3, 64, 64))
    assert [node.name for node in resnet][1:4] == ["layer1.0", "layer1.1", "layer2.0"]
    assert resnet[3].reduction == 8 and resnet[3].channels == 128

    vit = dissect(timm.create_model("vit_tiny_patch16_224").eval(), (3, 224, 224))
    assert {"patch_embed", "cls_token", "pos_embed"} <= set(vit[0].modules)
    assert vit[1].name == "blocks.0" and vit[1].in_shape == (197, 192) and vit[1].reduction == 16

    swin = dissect(timm.create_model("swin_tiny_patch4_window7_224").eval(), (3, 224, 224))
    merging = swin[swin.index("layers.1.downsample")]
    assert (merging.in_shape, merging.out_shape, merging.format) == ((56, 56, 96), (28, 28, 192), "nhwc")

    densenet = dissect(timm.create_model("densenet121").eval(), (3, 64, 64), granularity="stage")
    assert [node.name for node in densenet][1] == "features.denseblock1..features.transition1"
