import numpy as np
import pytest
import torch

from reassembly.data import DatasetSpec, load_dataset, normalize, random_crop_flip
from reassembly.data import sources
from reassembly.errors import DatasetError

from .conftest import needs_cifar

HAS_FASHION = sources.FASHION_MNIST_SYSTEM_DIR.is_dir()


def test_spec_parsing():
    assert DatasetSpec.parse("cifar10[5:10]").classes == (5, 6, 7, 8, 9)
    assert DatasetSpec.parse("cifar10[:3]").classes == (0, 1, 2)
    assert DatasetSpec.parse("cifar10[7,2]").classes == (7, 2)
    assert str(DatasetSpec.parse("cifar10[5:10]")) == "cifar10[5:10]"
    for bad in ("cifar10[a:b]", "cifar10[1,1]", "imagenet", "cifar10[", "cifar10[]"):
        with pytest.raises(DatasetError):
            DatasetSpec.parse(bad)


@needs_cifar
def test_cifar_subset_remaps_labels_and_caps_classes():
    full = load_dataset("cifar10", "test")
    assert len(full) == 10_000 and full.image_size == (3, 32, 32)
    assert full.labels.bincount().tolist() == [1000] * 10
    part = load_dataset("cifar10[5:10]", "test")
    assert part.classes == ("dog", "frog", "horse", "ship", "truck")
    assert sorted(part.labels.unique().tolist()) == [0, 1, 2, 3, 4]
    dogs = full.images[full.labels == 5]
    assert torch.equal(part.images[part.labels == 0], dogs)
    capped = load_dataset("cifar10[5:10]", "train", max_per_class=100, seed=1)
    assert capped.labels.bincount().tolist() == [100] * 5
    again = load_dataset("cifar10[5:10]", "train", max_per_class=100, seed=1)
    assert torch.equal(capped.images, again.images)
    reordered = load_dataset("cifar10[9,0]", "test")
    assert reordered.classes == ("truck", "airplane")


@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_as_32px_rgb():
    data = load_dataset("fashion_mnist", "test", image_size=32, channels=3)
    assert len(data) == 10_000 and data.image_size == (3, 32, 32)
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    native = load_dataset("fashion_mnist", "train")
    assert len(native) == 60_000 and native.image_size == (1, 28, 28)


def test_digits_split_is_disjoint_and_stratified():
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    per_class = train.labels.bincount() + test.labels.bincount()
    assert torch.equal(test.labels.bincount(), per_class // 5)  # a fifth of every class is held out
    flat = {tuple(x.flatten().tolist()) for x in test.images}
    assert sum(tuple(x.flatten().tolist()) in flat for x in train.images) < 20  # only duplicate images coincide


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 10), colour).save(tmp_path / split / c / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    assert data.classes == ("cats", "dogs") and data.image_size == (3, 8, 8)
    assert data.images[data.labels == 0][:, 0].float().mean() > 250


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match=rf"looked in {tmp_path}.*--data-root"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_augmentation_is_seeded_and_shape_preserving():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(images, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == images.shape and a.dtype == torch.uint8
    assert not torch.equal(a, images)
    # a zero-offset crop with no flip is the identity: padding 0 and no flip returns the input
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_parts_of_a_batch_are_augmented_as_the_whole_batch():
    """Each process of a distributed run augments its part of the global batch as one process would the whole."""
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    whole = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(5))
    parts = [random_crop_flip(images[4 * i:4 * (i + 1)], padding=2, generator=torch.Generator().manual_seed(5),
                              part=(i, 3)) for i in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_normalize_per_channel():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(images, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    assert np.allclose(out[:, 0].numpy(), 1.0) and np.allclose(out[:, 1].numpy(), 2.0)
