"""Dissection of hand-made awkward models: residual, Inception-like, dense, depthwise, ViT, shared, functional."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reassembly.errors import ReassemblyError
from reassembly.graph import (
    DissectionError,
    NodeChain,
    RecompositionError,
    UntraceableModelError,
    dissect,
    verify,
)


def conv_bn(c_in: int, c_out: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x, return_features: bool = False):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        if return_features:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Inception(nn.Module):
    def __init__(self, c_in: int, width: int):
        super().__init__()
        self.branch1 = conv_bn(c_in, width, kernel=1)
        self.branch3 = nn.Sequential(conv_bn(c_in, width, kernel=1), conv_bn(width, width))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(c_in, width, kernel=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(x)], dim=1)


class InceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.mixed = nn.Sequential(Inception(12, 4), Inception(12, 8), nn.MaxPool2d(2), Inception(24, 8))
        self.classifier = nn.Linear(24, 10)

    def forward(self, x):
        return self.classifier(self.mixed(self.stem(x)).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(F.relu(self.norm(torch.cat(features, 1))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, c_in: int, growth: int, layers: int):
        super().__init__({f"layer{i}": DenseLayer(c_in + i * growth, growth) for i in range(layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, 1, 1, bias=False))
        self.features.add_module("block1", DenseBlock(8, 4, 3))
        self.features.add_module(
            "transition1", nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1), nn.AvgPool2d(2))
        )
        self.features.add_module("block2", DenseBlock(10, 4, 2))
        self.features.add_module("norm", nn.BatchNorm2d(18))
        self.classifier = nn.Linear(18, 10)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(channels // 4, 1), 1)
        self.expand = nn.Conv2d(max(channels // 4, 1), channels, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4, groups: int = 2):
        super().__init__()
        hidden = c_in * expand
        self.expand = conv_bn(c_in, hidden, kernel=1, groups=groups)
        self.depthwise = conv_bn(hidden, hidden, stride=stride, groups=hidden)
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, stride=2),
            InvertedResidual(8, 8, 1),
            InvertedResidual(8, 12, 2),
            InvertedResidual(12, 12, 1),
            conv_bn(12, 32, kernel=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3, patch: int = 8, image: int = 32):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, 2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class SharedNet(nn.Module):
    """The same block is applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.shared = BasicBlock(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.shared(self.shared(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class FunctionalNet(nn.Module):
    """Functional calls and in-place operations outside any submodule."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        y = self.conv2(x)
        y.relu_()
        x = torch.cat([x, y], 1)
        z = self.conv3(x)
        z += 1.0
        z = F.max_pool2d(z, 2)
        return self.fc(z.mean(dim=(2, 3)))


class PlainVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(True), nn.Linear(32, 10))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class Fire(nn.Module):
    """SqueezeNet's module: its own layers (squeeze, then two expands) form one node, although a cut is legal inside."""

    def __init__(self, c_in: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(2), Fire(8, 4, 8), Fire(16, 4, 8)
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Conv2d(16, 10, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return self.conv(-x)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(8, 8), Gate(8), BasicBlock(8, 8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


class BranchingNet(GatedNet):
    """The top-level forward branches on a shape, so even with opaque submodules fx cannot trace it."""

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] >= 8:
            x = self.blocks(x)
        return self.head(self.pool(x).flatten(1))


class ScaledBranchingNet(GatedNet):
    """Untraceable, and the forward does arithmetic between module calls that no chain of calls can replay."""

    def forward(self, x):
        x = self.stem(x) * 2
        if x.shape[-1] >= 8:
            x = self.blocks(x)
        return self.head(self.pool(x).flatten(1))


MODELS = {
    "resnet": ResNet,
    "inception": InceptionNet,
    "densenet": DenseNet,
    "mobilenet": MobileNet,
    "vit": TinyViT,
    "shared": SharedNet,
    "functional": FunctionalNet,
    "vgg": PlainVGG,
    "squeezenet": SqueezeNet,
}



def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that eval-mode batch norm is not the identity."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def _model(key: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_norms(MODELS[key]())


def _used_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_macs(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // (2 * x.shape[0])


@pytest.fixture(scope="module")
def chains() -> dict[tuple[str, str], tuple[nn.Module, NodeChain]]:
    result = {}
    for key in MODELS:
        model = _model(key)
        for granularity in ("block", "stage", "fine"):
            result[key, granularity] = model, dissect(model, (3, 32, 32), granularity, name=key)
    return result


@pytest.mark.parametrize("granularity", ["block", "stage", "fine"])
@pytest.mark.parametrize("key", list(MODELS))
def test_blocks_recompose_the_model_and_account_for_all_of_it(chains, key, granularity):
    model, chain = chains[key, granularity]
    x = torch.randn(3, 3, 32, 32)
    assert verify(chain, model, x) < 1e-5
    assert chain.params == _used_params(model)
    assert chain.macs == _model_macs(model, x)
    assert chain[0].kind == "stem" and chain[-1].kind == "head"
    assert all(node.kind == "body" for node in chain.nodes[1:-1])
    assert len(chain) >= 3
    for previous, node in zip(chain.nodes, chain.nodes[1:]):
        assert previous.out_shape == node.in_shape
    json.dumps(chain.to_dict())


def test_granularities_nest(chains):
    for key in MODELS:
        fine, block, stage = (len(chains[key, g][1]) for g in ("fine", "block", "stage"))
        assert fine >= block >= stage, key


def test_resnet_nodes_are_residual_blocks(chains):
    _, chain = chains["resnet", "block"]
    assert [node.name for node in chain] == [
        "conv1..relu", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "avgpool..fc"
    ]  # fmt: skip
    assert [node.kind for node in chain] == ["stem", "body", "body", "body", "body", "head"]
    layer2 = chain[3]
    assert (layer2.in_shape, layer2.out_shape) == ((8, 32, 32), (16, 16, 16))
    assert (layer2.in_channels, layer2.channels, layer2.in_reduction, layer2.reduction) == (8, 16, 1, 2)
    assert (layer2.in_grid, layer2.grid, layer2.prefix_tokens) == ((32, 32), (16, 16), 0)
    assert layer2.params == sum(p.numel() for p in chains["resnet", "block"][0].layer2[0].parameters())
    conv_macs = 8 * 16 * 9 * 16 * 16 + 16 * 16 * 9 * 16 * 16 + 8 * 16 * 16 * 16  # conv1, conv2, shortcut
    assert layer2.macs == conv_macs
    assert chain[-1].out_shape == (10,) and chain[-1].format == "vector" and chain[-1].reduction is None


def test_resnet_stages_follow_resolution(chains):
    _, chain = chains["resnet", "stage"]
    assert [node.name for node in chain] == ["conv1..relu", "layer1", "layer2", "avgpool..fc"]


def test_inception_concat_stays_inside_its_node(chains):
    _, chain = chains["inception", "block"]
    assert [node.name for node in chain][1:4] == ["mixed.0", "mixed.1..mixed.2", "mixed.3"]
    assert chain[1].out_shape == (12, 32, 32)
    _, fine = chains["inception", "fine"]
    assert not any(".branch" in node.name for node in fine)  # no cut between the branches


def test_dense_block_is_cut_only_at_transitions(chains):
    _, chain = chains["densenet", "block"]
    names = [node.name for node in chain]
    assert names[1:4] == ["features.block1", "features.transition1", "features.block2..features.norm"]
    _, fine = chains["densenet", "fine"]
    assert all(".layer" not in node.name for node in fine)  # no cut between the layers of a dense block
    _, stage = chains["densenet", "stage"]
    assert [node.name for node in stage][1:3] == [
        "features.block1..features.transition1",
        "features.block2..features.norm",
    ]


def test_depthwise_and_grouped_blocks(chains):
    _, chain = chains["mobilenet", "block"]
    assert [node.name for node in chain] == [
        "features.0", "features.1", "features.2", "features.3", "features.4", "pool..classifier"
    ]  # fmt: skip
    block = chain[2]
    hidden = 8 * 4
    expected = 8 * hidden // 2 * 16 * 16 + hidden * 9 * 8 * 8 + hidden * 12 * 8 * 8  # grouped, depthwise, project
    expected += hidden * (hidden // 4) * 2  # squeeze-excite on the pooled vector
    assert block.macs == expected
    assert block.reduction == 4


def test_vit_stem_owns_class_token_and_position_embedding(chains):
    model, chain = chains["vit", "block"]
    assert [node.kind for node in chain] == ["stem", "body", "body", "body", "head"]
    stem = chain[0]
    assert {"patch_embed", "cls_token", "pos_embed"} <= set(stem.modules)
    assert stem.params == sum(p.numel() for p in model.patch_embed.parameters()) + 16 + 17 * 16
    assert stem.out_shape == (17, 16) and stem.format == "tokens" and stem.reduction == 8
    assert (stem.in_grid, stem.in_prefix_tokens, stem.grid, stem.prefix_tokens) == ((32, 32), 0, (4, 4), 1)
    assert [node.name for node in chain][1:4] == ["blocks.0", "blocks.1", "blocks.2"]
    assert chain[-1].name == "norm..head"  # the final norm feeds the token selection: it opens the head
    assert (chain[-1].in_shape, chain[-1].in_grid, chain[-1].in_prefix_tokens) == ((17, 16), (4, 4), 1)
    assert (chain[-1].grid, chain[-1].prefix_tokens) == (None, 0)
    assert chain.to_dict()["nodes"][1]["grid"] == [4, 4]


def test_shared_module_params_are_counted_once(chains):
    model, chain = chains["shared", "block"]
    names = [node.name for node in chain]
    assert names[1:3] == ["shared", "shared@1"]
    shared = sum(p.numel() for p in model.shared.parameters())
    assert (chain[1].params, chain[2].params) == (shared, 0)
    assert chain[1].macs == chain[2].macs > 0


def test_plain_chain_has_one_node_per_weighted_layer(chains):
    _, chain = chains["vgg", "block"]
    assert [node.modules for node in chain][:4] == [
        ("features.0", "features.1", "features.2"),
        ("features.3", "features.4", "features.5", "features.6"),
        ("features.7", "features.8", "features.9", "features.10"),
        ("features.11", "features.12", "features.13", "features.14"),
    ]
    assert chain[-1].kind == "head" and chain[-1].modules[-1] == "classifier"
    _, stage = chains["vgg", "stage"]
    assert len(stage) == 5  # pooling closes each stage: [conv] [conv pool] [conv pool] [conv pool] head


def test_custom_module_layers_stay_together(chains):
    _, chain = chains["squeezenet", "block"]
    assert [node.name for node in chain] == [
        "features.0..features.2", "features.3", "features.4", "classifier.0..classifier.1", "classifier.2"
    ]  # fmt: skip
    _, fine = chains["squeezenet", "fine"]
    assert "features.3.squeeze" in [node.name for node in fine]


@pytest.mark.parametrize("key", ["functional", "vgg", "densenet"])
def test_blocks_never_modify_their_input(chains, key):
    """Fine cuts put in-place activations (ReLU(inplace=True), F.relu(inplace=True)) at the start of blocks."""
    model, chain = chains[key, "fine"]
    x = torch.randn(2, 3, 32, 32)
    value = x
    for index in range(len(chain)):
        before = value.clone()
        out = chain[index : index + 1](value)
        assert torch.equal(value, before), f"block {chain[index].name} modified its input in place"
        value = out
    assert torch.allclose(value, model(x), atol=1e-6)


def test_blocks_share_the_model_parameters():
    model = _model("resnet")
    chain = dissect(model, (3, 32, 32))
    block = chain[1:3]
    assert set(block.state_dict()) == {f"layer1.{k}" for k in model.layer1.state_dict()}
    assert block.get_parameter("layer1.0.conv1.weight") is model.layer1[0].conv1.weight
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    before = model.layer1[0].conv1.weight.detach().clone()
    block.train()
    block(torch.randn(2, 8, 32, 32)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.layer1[0].conv1.weight)


def test_slicing_and_split():
    model = _model("resnet")
    chain = dissect(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    front, back = chain[:3], chain[3:]
    assert torch.allclose(back(front(x)), model(x), atol=1e-6)
    blocks = chain.split([1, 5])
    assert len(blocks) == 3 and torch.allclose(blocks[2](blocks[1](blocks[0](x))), model(x), atol=1e-6)
    assert chain[chain.index("layer2.0")].name == "layer2.0"
    with pytest.raises(ValueError):
        chain[0:4:2]
    with pytest.raises(IndexError):
        chain[3:3]


def test_dissection_restores_training_mode():
    model = _model("resnet").train()
    model.layer1.eval()
    dissect(model, (3, 32, 32))
    assert model.training and not model.layer1.training and model.layer2.training


def test_untraceable_submodule_is_kept_whole():
    model = _randomise_norms(GatedNet())
    chain = dissect(model, (3, 16, 16))
    assert chain.opaque == ("blocks.1",) and chain.to_dict()["opaque"] == ["blocks.1"]
    assert [node.name for node in chain] == ["stem", "blocks.0", "blocks.1", "blocks.2", "pool..head"]
    assert chain[2].macs == 8 * 8 * 9 * 16 * 16
    assert verify(chain, model, torch.randn(2, 3, 16, 16)) < 1e-5
    assert verify(chain, model, -torch.randn(2, 3, 16, 16).abs() * 10) < 1e-5  # the other branch, too


def test_strict_dissection_names_the_untraceable_module():
    with pytest.raises(UntraceableModelError) as caught:
        dissect(GatedNet(), (3, 16, 16), strict=True)
    assert isinstance(caught.value, ReassemblyError)
    assert caught.value.module_path == "blocks.1"
    assert "`blocks.1` (Gate)" in str(caught.value) and "cuts=" in str(caught.value)


def test_untraceable_top_level_forward_is_an_error():
    with pytest.raises(UntraceableModelError, match="top-level forward of BranchingNet.*cuts=") as caught:
        dissect(BranchingNet(), (3, 16, 16))
    assert caught.value.module_path == ""


def test_cuts_by_module_name_without_tracing():
    model = _randomise_norms(BranchingNet())
    chain = dissect(model, (3, 16, 16), cuts=["stem", "blocks.0", "blocks.1", "blocks.2"])
    assert chain.method == "module-calls"
    assert [node.name for node in chain] == ["stem", "blocks.0", "blocks.1", "blocks.2", "pool..head"]
    assert [node.kind for node in chain] == ["stem", "body", "body", "body", "head"]
    assert chain.params == _used_params(model)
    assert chain[1].macs == 2 * 8 * 8 * 9 * 16 * 16
    assert verify(chain, model, torch.randn(2, 3, 16, 16)) < 1e-5


def test_cuts_by_module_name_on_a_traceable_model():
    model = _model("resnet")
    chain = dissect(model, (3, 32, 32), cuts=["relu", "layer1", "layer2"])
    assert chain.method == "fx" and chain.granularity == "cuts"
    assert [node.name for node in chain] == ["conv1..relu", "layer1", "layer2", "avgpool..fc"]
    assert verify(chain, model, torch.randn(2, 3, 32, 32)) < 1e-5


def test_cut_errors_say_what_to_do():
    model = _model("resnet")
    with pytest.raises(DissectionError, match="not legal"):
        dissect(model, (3, 32, 32), cuts=["layer1.0.conv1"])
    with pytest.raises(DissectionError, match="no such submodule"):
        dissect(model, (3, 32, 32), cuts=["layer9"])
    model.unused = nn.Linear(2, 2)
    with pytest.raises(DissectionError, match="no operation"):
        dissect(model, (3, 32, 32), cuts=["unused"])
    with pytest.raises(DissectionError, match="granularity"):
        dissect(model, (3, 32, 32), granularity="layer")
    with pytest.raises(DissectionError, match="no such submodule"):
        dissect(BranchingNet(), (3, 16, 16), cuts=["blocks.7"])
    with pytest.raises(DissectionError, match="does more"):
        dissect(ScaledBranchingNet(), (3, 16, 16), cuts=["stem", "blocks.1"])


def test_verify_reports_the_node_whose_shape_differs():
    model = _model("resnet")
    chain = dissect(model, (3, 32, 32))
    with pytest.raises(RecompositionError, match=r"node `conv1..relu` input has shape \(3, 16, 16\)"):
        verify(chain, model, torch.randn(2, 3, 16, 16))


def test_verify_catches_a_wrong_chain():
    model = _model("resnet")
    chain = dissect(model, (3, 32, 32))
    model.fc = nn.Linear(16, 10)  # the chain still runs the old classifier
    with pytest.raises(RecompositionError, match="relative error"):
        chain.verify(torch.randn(2, 3, 32, 32))


class CheckedPair(nn.Module):
    """Untraceable (it checks its input), yet a plain sequence of two module calls."""

    def __init__(self, channels: int):
        super().__init__()
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        self.second = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        return self.second(self.first(x))


def test_cuts_inside_an_untraceable_module_use_its_recorded_calls():
    model = _randomise_norms(GatedNet())
    model.blocks[1] = CheckedPair(8)
    whole = dissect(model, (3, 16, 16))
    assert whole.method == "fx" and whole.opaque == ("blocks.1",)
    chain = dissect(model, (3, 16, 16), cuts=["stem", "blocks.0", "blocks.1.first", "blocks.1.second"])
    assert chain.method == "module-calls"
    assert [node.name for node in chain][2:4] == ["blocks.1.first", "blocks.1.second"]
    assert verify(chain, model, torch.randn(2, 3, 16, 16)) < 1e-5


class UpsamplingNet(nn.Module):
    """A decoder-like step: the map is upsampled past the input resolution before the classifier pools it."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), conv_bn(8, 8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(self.up(self.stem(x))).flatten(1))


def test_an_upsampled_map_is_a_feature_map_with_a_fractional_reduction():
    model = _randomise_norms(UpsamplingNet())
    chain = dissect(model, (3, 16, 16))
    assert [node.name for node in chain] == ["stem..up.0", "up.1", "pool..fc"]  # the upsampling trails the stem
    stem, up = chain[0], chain[1]
    assert (stem.out_shape, stem.format, stem.reduction) == ((8, 32, 32), "nchw", 0.5)
    assert (up.in_format, up.format, up.in_reduction, up.reduction, up.channels) == ("nchw", "nchw", 0.5, 0.5, 8)
    assert verify(chain, model, torch.randn(2, 3, 16, 16)) < 1e-5


class VarArgsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, *inputs):
        return self.fc(self.conv(inputs[0]).mean((2, 3)))


def test_a_forward_taking_varargs_is_a_dissection_error():
    with pytest.raises(DissectionError, match=r"VarArgsNet: forward takes no single input tensor.*\(\*inputs\)"):
        dissect(VarArgsNet(), (3, 16, 16))


class LogitsAndFeatures(ResNet):
    """Returns the logits with the pooled features, as a tuple or as a dict."""

    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        features = torch.flatten(self.avgpool(x), 1)
        if self.as_dict:
            return {"logits": self.fc(features), "features": [features, features.sum(1)]}
        return self.fc(features), features


@pytest.mark.parametrize("as_dict", [False, True])
def test_verify_compares_tuple_and_dict_outputs_element_by_element(as_dict):
    model = _randomise_norms(LogitsAndFeatures(as_dict))
    chain = dissect(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert verify(chain, model, x) < 1e-5
    model.fc = nn.Linear(16, 10)  # the chain still runs the old classifier
    with pytest.raises(RecompositionError, match="relative error"):
        verify(chain, model, x)


class SharedSkipNet(SharedNet):
    """A shared block whose second call ends while a skip connection is open: a cut after it is not legal."""

    def forward(self, x):
        x = self.shared(self.stem(x))
        return self.fc((x + self.shared(x)).mean((2, 3)))


def test_an_illegal_cut_error_suggests_only_module_names_that_cuts_accepts():
    model = _randomise_norms(SharedSkipNet())
    with pytest.raises(DissectionError, match="not legal") as caught:
        dissect(model, (3, 16, 16), cuts=["shared"])
    suggested = str(caught.value).split("modules a cut may follow: ")[1].split(", ")
    assert suggested == ["stem.0", "stem.1", "stem"]  # not `shared.relu` (its last call is in the skip), nor `add_2`
    for name in suggested:
        assert verify(dissect(model, (3, 16, 16), cuts=[name]), model, torch.randn(2, 3, 16, 16)) < 1e-5
    resnet = _model("resnet")
    with pytest.raises(DissectionError) as caught:
        dissect(resnet, (3, 32, 32), cuts=["layer1.0.conv1"])
    suggested = str(caught.value).split("modules a cut may follow: ")[1].split(", ")
    assert suggested == ["conv1", "bn1", "relu", "layer1.0", "layer1", "layer2.0", "layer2"]  # avgpool: the head
    for name in suggested:
        dissect(resnet, (3, 32, 32), cuts=[name])


class TimmLikeViT(nn.Module):
    """Laid out like timm's VisionTransformer: the features end in the final norm; the head pools the class token or
    averages the patch tokens (dropping the class and register tokens), then applies fc_norm and the classifier."""

    def __init__(self, global_pool: str, registers: int = 0, dim: int = 16, patch: int = 8, image: int = 32):
        super().__init__()
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 + registers
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, registers, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + self.num_prefix_tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, 2) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.fc_norm = nn.LayerNorm(dim) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(dim, 10)

    def forward_features(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1), self.reg_token.expand(x.shape[0], -1, -1)]
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward_head(self, x):
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return self.head(self.fc_norm(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize(("global_pool", "registers"), [("token", 0), ("avg", 4)])
def test_token_nodes_record_their_grid_and_prefix_tokens_and_the_final_norm_opens_the_head(global_pool, registers):
    model = TimmLikeViT(global_pool, registers).eval()
    chain = dissect(model, (3, 32, 32))
    assert [node.name for node in chain] == ["patch_embed..pos_embed", "blocks.0", "blocks.1", "norm..head"]
    assert "fc_norm" in chain[-1].modules or global_pool == "token"
    for node in chain.nodes[:3]:
        assert (node.format, node.grid, node.prefix_tokens) == ("tokens", (4, 4), 1 + registers)
    head = chain[-1]
    assert (head.in_format, head.in_grid, head.in_prefix_tokens, head.format, head.grid) == (
        "tokens", (4, 4), 1 + registers, "vector", None
    )  # fmt: skip
    assert verify(chain, model, torch.randn(2, 3, 32, 32)) < 1e-5


class ConvNormHead(nn.Module):
    """The last conv's batch norm feeds the pooling directly: it is the conv's own norm, not a final norm."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(self.stem(x))).mean((2, 3)))


def test_a_conv_keeps_its_norm_when_the_norm_feeds_the_pooling():
    chain = dissect(_randomise_norms(ConvNormHead()), (3, 16, 16))
    assert [node.name for node in chain] == ["stem", "conv..bn", "fc"]


def test_a_block_follows_the_model_training_mode():
    model = _model("resnet")
    chain = dissect(model, (3, 32, 32))
    block = chain[1:3]  # layer1.0, layer1.1
    assert not block.training
    model.train()
    assert block.training
    model.eval()
    assert not block.training
    block.train()  # what model.train() does to layer1
    assert block.training and model.layer1[0].training and model.layer1[1].bn2.training
    assert not model.layer2[0].training and not model.training
    block.eval()
    assert not block.training and not model.layer1[0].training and not model.layer1[1].bn2.training


class DropoutBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + F.dropout(F.relu(self.conv(x)), 0.5, self.training)


class DropoutNet(nn.Module):
    """Functional dropout that reads ``self.training``, inside blocks and in the top-level forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(DropoutBlock(8), DropoutBlock(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x)).mean((2, 3))
        return self.fc(F.dropout(x, p=0.5, training=self.training))


def _run_chain(chain: NodeChain, x: torch.Tensor) -> torch.Tensor:
    for index in range(len(chain)):
        x = chain[index : index + 1](x)
    return x


def test_traced_dropout_follows_the_training_mode():
    model = DropoutNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every training-dependent call is followed: nothing to warn about
        chain = dissect(model, (3, 16, 16))
    assert [node.name for node in chain] == ["stem", "blocks.0", "blocks.1", "fc"]
    x = torch.randn(2, 3, 16, 16)
    assert verify(chain, model, x) < 1e-5
    model.train()
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(_run_chain(chain, x), expected)  # the same dropout masks as the model's
    model.eval()
    assert not torch.allclose(expected, model(x))
    block, value = chain[1:2], chain[0:1](x)
    assert torch.equal(block(value), block(value))  # eval: deterministic
    block.train()
    assert not torch.equal(block(value), block(value))
    assert model.blocks[0].training and not model.blocks[1].training


class DropPath(nn.Module):
    """Skips itself in eval mode: a traced graph keeps no operation of it."""

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.9
        return x * keep / 0.9


class DropPathBlock(DropoutBlock):
    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop_path = DropPath()

    def forward(self, x):
        return x + self.drop_path(F.relu(self.conv(x)))


def test_training_code_the_graph_cannot_follow_is_named_in_a_warning():
    model = DropoutNet().eval()
    model.blocks[1] = DropPathBlock(8)
    with pytest.warns(UserWarning, match=r"DropoutNet: `blocks.1.drop_path` behave differently in training mode"):
        chain = dissect(model, (3, 16, 16))
    assert verify(chain, model, torch.randn(2, 3, 16, 16)) < 1e-5


class EarlyBatchResNet(ResNet):
    """Reads the batch size first and uses it before the classifier."""

    def forward(self, x):
        batch = x.shape[0]
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.avgpool(x).reshape(batch, -1))


class GridBlock(nn.Module):
    """A Swin-like block: tokens in and out, the grid size passed in to see them as a map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, height, width):
        batch, tokens, dim = x.shape
        grid = self.norm(x).view(batch, height, width, dim).permute(0, 3, 1, 2)
        return x + self.fc(self.mix(grid).permute(0, 2, 3, 1).reshape(batch, tokens, dim))


class GridNet(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList([GridBlock(dim) for _ in range(3)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x)
        height, width = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, height, width)
        return self.head(self.norm(x).mean(1))


class FoldedSizeNet(SharedNet):
    """Reads a size from a tensor whose batch axis is folded into its rows, and uses it in the head."""

    def forward(self, x):
        x = self.stem(x)
        rows = x.flatten(2).transpose(1, 2).reshape(-1, 8).shape[0]
        x = self.shared(self.shared(x))
        return self.fc(x.mean((2, 3))) * rows


def test_sizes_read_from_shapes_are_recomputed_in_each_block():
    model = _model("resnet")
    model.__class__ = EarlyBatchResNet
    chain = dissect(model, (3, 32, 32))
    assert [node.name for node in chain] == [node.name for node in dissect(_model("resnet"), (3, 32, 32))]
    assert chain[-1].kind == "head" and chain[-1].name == "avgpool..fc"
    assert verify(chain, model, torch.randn(3, 3, 32, 32)) < 1e-5  # another batch size than the probe's

    model = GridNet().eval()
    chain = dissect(model, (3, 32, 32))
    assert [node.name for node in chain] == ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "norm..head"]
    assert [node.kind for node in chain] == ["stem", "body", "body", "body", "head"]
    assert verify(chain, model, torch.randn(3, 3, 32, 32)) < 1e-5
    with pytest.raises(RecompositionError, match=r"block \[1:2\] takes sizes .* input must have shape \(64, 16\)"):
        chain[1:2](torch.randn(2, 16, 16))  # the grid size (8, 8) holds for 32x32 images only


def test_a_size_no_block_can_recompute_is_an_error_naming_it():
    with pytest.raises(DissectionError, match=r"size `getitem` = 512 \(at .*test_graph.py:\d+: rows = x.flatten"):
        dissect(_randomise_norms(FoldedSizeNet()), (3, 16, 16))
