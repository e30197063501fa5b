"""Every built-in architecture dissects into a chain whose blocks reproduce the model at its input size."""

from __future__ import annotations

import pytest
import torch

from reassembly.graph import DissectionError, dissect, verify
from reassembly.measure import count_macs
from reassembly.zoo import registry




@pytest.mark.parametrize("name", registry.list_models())
def test_zoo_model_dissects_and_recomposes(name):
    model = registry.create_model(name).eval()
    size = registry.model_info(name).input_size
    chain = dissect(model, size, name=name)
    assert verify(chain, model, torch.randn(2, *size)) < 1e-5
    kinds = [node.kind for node in chain]
    assert kinds[0] == "stem" and kinds[-1] == "head" and set(kinds[1:-1]) == {"body"}
    assert len({node.name for node in chain}) == len(chain)
    assert chain.params == sum(p.numel() for p in model.parameters())
    assert chain.macs == count_macs(model, size)  # one MAC counter for the package, CPU attention included
    assert chain[-1].out_shape == (registry.model_info(name).default_num_classes,)


def test_resnet_nodes_are_its_residual_blocks():
    model = registry.create_model("cifar_resnet20").eval()
    chain = dissect(model, (3, 32, 32))
    body = [node.name for node in chain if node.kind == "body"]
    assert body == [f"layer{stage}.{block}" for stage in (1, 2, 3) for block in range(3)]
    stages = dissect(model, (3, 32, 32), granularity="stage")
    assert [node.name for node in stages if node.kind == "body"] == ["layer1", "layer2", "layer3"]


def test_named_cuts_keep_one_head_after_the_pooling():
    model = registry.create_model("cifar_resnet20").eval()
    chain = dissect(model, (3, 32, 32), cuts=["layer1", "layer2"])
    assert [node.name for node in chain] == ["conv1..layer1", "layer2", "layer3", "pool..linear"]
    assert [node.kind for node in chain] == ["stem", "body", "body", "head"]
    assert verify(chain, model, torch.randn(2, 3, 32, 32)) < 1e-5
    with pytest.raises(DissectionError, match="cut after `pool` falls inside the head, which starts at `pool`"):
        dissect(model, (3, 32, 32), cuts=["layer3", "pool"])


def test_vit_token_geometry_and_final_norm_in_the_head():
    chain = dissect(registry.create_model("cifar_vit_tiny").eval(), (3, 32, 32))
    body = [node for node in chain if node.kind == "body"]
    assert [node.name for node in body] == [f"blocks.{index}" for index in range(6)]
    for node in [chain[0], *body]:
        assert (node.out_shape, node.grid, node.prefix_tokens) == ((65, 128), (8, 8), 1)
    head = chain[-1]
    assert head.name == "norm..head" and head.modules == ("norm", "head")
    assert (head.in_grid, head.in_prefix_tokens, head.grid, head.prefix_tokens) == ((8, 8), 1, None, 0)
