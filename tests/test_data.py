"""kdcli.data: dataset specs, their errors, batched augmentation and the loaders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision import transforms as T

from kdcli.batch import Batch
from kdcli.data import DataBundle, FolderLoader, TensorLoader, build_data, list_datasets, make_loader
from kdcli.data.augment import crop_flip, crop_flip_params, normalize, random_crop_flip
from kdcli.data.loaders import folder_transform
from kdcli.data.registry import FolderSplit, InMemorySplit
from kdcli.errors import KdError

SMALL = "synthetic:classes=4,n=100,size=16"


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_data("digits")


@pytest.fixture(scope="module")
def small() -> DataBundle:
    return build_data(SMALL)


def image_bytes(split: InMemorySplit) -> set[bytes]:
    return {img.numpy().tobytes() for img in split.images}


# --- registry ------------------------------------------------------------------------------------


def test_list_datasets_names_every_spec():
    names = list_datasets()
    assert set(names) == {"cifar10", "cifar100", "digits", "imagefolder", "synthetic"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())


def test_digits_shapes_dtypes_and_classes(digits):
    assert digits.name == "digits" and digits.num_classes == 10 and digits.input_size == (32, 32)
    assert len(digits.train) == 1437 and len(digits.val) == 360
    for split in (digits.train, digits.val):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # grey in 3 channels
    assert digits.train.images.max() > 200  # 0..16 scaled to 0..255
    # Stratified: every class in val, in about the same share.
    assert digits.val.labels.bincount(minlength=10).min() >= 34
    assert len(digits.mean) == len(digits.std) == 3
    measured = digits.train.images.double().div(255).mean().item()
    assert digits.mean[0] == pytest.approx(measured, abs=1e-3)


def test_digits_split_is_fixed_and_disjoint(digits):
    again = build_data("digits", seed=123)  # the run seed does not move the split
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.val.labels, digits.val.labels)
    train, val = image_bytes(digits.train), image_bytes(digits.val)
    assert not train & val
    assert len(train) + len(val) == 1797


def test_synthetic_defaults_and_options(small):
    default = build_data("synthetic")
    assert default.num_classes == 10 and len(default.train) == 800 and len(default.val) == 200
    assert default.name == "synthetic:classes=10,n=1000,size=32,seed=0"
    assert small.num_classes == 4 and small.input_size == (16, 16)
    assert small.train.images.shape == (80, 3, 16, 16) and small.train.images.dtype == torch.uint8
    assert small.val.labels.bincount().tolist() == [5, 5, 5, 5]
    assert small.train.labels.bincount().tolist() == [20, 20, 20, 20]
    assert build_data("Synthetic: classes = 4 , n=100, size=16 ").name == small.name


def test_synthetic_is_deterministic_in_its_seed(small):
    again = build_data(SMALL, seed=7)
    assert torch.equal(again.train.images, small.train.images)
    other = build_data(SMALL + ",seed=1")
    assert not torch.equal(other.train.images, small.train.images)
    assert not image_bytes(small.train) & image_bytes(small.val)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("synthetic:clases=3", ["clases", "classes"]),
        ("synthetic:classes=x", ["classes", "integer"]),
        ("synthetic:classes", ["classes", "integer"]),
        ("synthetic:classes=1", ["classes=1", "too small"]),
        ("synthetic:classes=10,n=20", ["n=20", "too small"]),
        ("synthetic:size=4", ["size=4"]),
        ("synthetic:size=4096", ["size=4096", "too large"]),
    ],
)
def test_synthetic_bad_options(spec, words):
    with pytest.raises(KdError) as err:
        build_data(spec)
    text = err.value.message + " " + (err.value.hint or "")
    assert all(w in text for w in words), text
    assert err.value.hint


def test_unknown_dataset_suggests_the_closest():
    with pytest.raises(KdError) as err:
        build_data("cifar1000")
    assert "cifar1000" in err.value.message
    assert "cifar100" in err.value.hint


def test_options_on_a_dataset_without_any_are_refused():
    with pytest.raises(KdError, match="takes no options"):
        build_data("digits:n=5")
    with pytest.raises(KdError, match="image size"):
        build_data("digits", image_size=64)


def test_a_small_net_learns_synthetic_in_two_epochs():
    bundle = build_data("synthetic")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, bundle.num_classes),
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train = make_loader(bundle.train, bundle, 64, train=True)
    for epoch in range(2):
        train.set_epoch(epoch)
        for batch in train:
            opt.zero_grad()
            F.cross_entropy(net(batch.x), batch.y).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        val = make_loader(bundle.val, bundle, 100, train=False)
        correct = sum((net(b.x).argmax(1) == b.y).sum().item() for b in val)
    assert correct / len(bundle.val) > 0.3  # chance is 0.1


# --- CIFAR ---------------------------------------------------------------------------------------


def test_cifar100_missing_folder_is_a_kderror(tmp_path):
    with pytest.raises(KdError) as err:
        build_data("cifar100", data_dir=tmp_path)
    assert str(tmp_path / "cifar-100-python") in err.value.message
    assert "--download" in err.value.hint and "cifar-100-python/" in err.value.hint


def test_cifar_data_dir_defaults_to_kd_data(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_DATA", str(tmp_path))
    with pytest.raises(KdError) as err:
        build_data("cifar10")
    assert str(tmp_path / "cifar-10-batches-py") in err.value.message


def test_cifar100_incomplete_folder_names_missing_files(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"")
    with pytest.raises(KdError) as err:
        build_data("cifar100", data_dir=tmp_path)
    assert "train" in err.value.message and "test" in err.value.message
    assert "meta" not in err.value.message.split("lacks")[1]


def write_fake_cifar100(root, n_train=12, n_test=6):
    """A tiny folder in torchvision's cifar-100-python layout (pickled dicts of numpy arrays)."""
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
        arrays[name] = data, labels
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)
    return arrays


def test_cifar100_loads_from_present_files(tmp_path, monkeypatch):
    arrays = write_fake_cifar100(tmp_path)
    # Our files are not the real ones, so torchvision's checksums would (rightly) reject them.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    bundle = build_data("cifar100", data_dir=tmp_path)
    assert bundle.num_classes == 100 and bundle.input_size == (32, 32)
    assert bundle.mean == (0.5071, 0.4867, 0.4408) and bundle.std == (0.2675, 0.2565, 0.2761)
    assert isinstance(bundle.train, InMemorySplit) and len(bundle.train) == 12 and len(bundle.val) == 6
    data, labels = arrays["train"]
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.images.is_contiguous()
    assert torch.equal(bundle.train.images, torch.from_numpy(data).view(-1, 3, 32, 32))
    assert bundle.train.labels.tolist() == labels


def test_cifar100_corrupted_files_are_a_kderror(tmp_path):
    write_fake_cifar100(tmp_path)
    with pytest.raises(KdError) as err:
        build_data("cifar100", data_dir=tmp_path)
    assert "corrupted" in err.value.message and "--download" in err.value.hint


# --- image folders -------------------------------------------------------------------------------


def write_image_folder(root, train=("cat", "dog"), val=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_builds_lazily_with_its_classes(tmp_path):
    bundle = build_data(f"imagefolder:{write_image_folder(tmp_path)}", image_size=16)
    assert bundle.num_classes == 2 and bundle.input_size == (16, 16)
    assert bundle.mean == (0.485, 0.456, 0.406)
    assert isinstance(bundle.train, FolderSplit) and len(bundle.train) == 6 and len(bundle.val) == 6
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_loader_batches_and_indices(tmp_path):
    bundle = build_data(f"imagefolder:{write_image_folder(tmp_path)}", image_size=16)
    val = make_loader(bundle.val, bundle, 4, train=False, num_workers=0)
    assert isinstance(val, FolderLoader) and len(val) == 2
    batches = list(val)
    assert all(isinstance(b, Batch) for b in batches)
    x, y, index, _ = batches[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert index.tolist() == [0, 1, 2, 3]
    for i in range(4):
        image, label = bundle.val.dataset[int(index[i])]
        expected = normalize(folder_transform(16, train=False)(image)[None], bundle.mean, bundle.std)[0]
        assert torch.allclose(x[i], expected) and y[i] == label


def test_imagefolder_train_order_and_augmentation_follow_seed_and_epoch(tmp_path):
    bundle = build_data(f"imagefolder:{write_image_folder(tmp_path)}", image_size=16)

    def epoch(loader, e):
        loader.set_epoch(e)
        return [b for b in loader]

    a = make_loader(bundle.train, bundle, 3, train=True, seed=1, num_workers=0)
    b = make_loader(bundle.train, bundle, 3, train=True, seed=1, num_workers=1)
    first, again, workers = epoch(a, 0), epoch(a, 0), epoch(b, 0)
    for p, q, r in zip(first, again, workers, strict=True):
        assert torch.equal(p.x, q.x) and torch.equal(p.x, r.x) and torch.equal(p.index, r.index)
    assert sorted(torch.cat([p.index for p in first]).tolist()) == list(range(6))
    later = torch.cat([p.x for p in epoch(a, 1)])
    assert not torch.equal(later, torch.cat([p.x for p in first]))
    a.set_epoch(0, start=1)
    assert len(a) == 1 and torch.equal(next(iter(a)).x, first[1].x)


def test_imagefolder_missing_path(tmp_path):
    with pytest.raises(KdError, match="does not exist") as err:
        build_data(f"imagefolder:{tmp_path / 'nope'}")
    assert "train/" in err.value.hint
    with pytest.raises(KdError, match="needs a path"):
        build_data("imagefolder:")


def test_imagefolder_missing_val(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(KdError) as err:
        build_data(f"imagefolder:{tmp_path}")
    assert "val/" in err.value.message and "train/" not in err.value.message


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(KdError, match="no usable images"):
        build_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "cat").mkdir()  # a class folder, but empty
    with pytest.raises(KdError, match="no usable images"):
        build_data(f"imagefolder:{tmp_path}")


def test_imagefolder_class_sets_must_match(tmp_path):
    write_image_folder(tmp_path, train=("cat", "dog"), val=("cat", "owl"), per_class=1)
    with pytest.raises(KdError) as err:
        build_data(f"imagefolder:{tmp_path}")
    assert "only in train: dog" in err.value.message and "only in val: owl" in err.value.message


# --- augmentation --------------------------------------------------------------------------------


def test_crop_with_known_offsets_is_a_slice_of_the_padded_image():
    images = torch.randint(0, 256, (3, 3, 8, 10), dtype=torch.uint8)
    top, left = torch.tensor([0, 3, 8]), torch.tensor([8, 0, 5])
    out = crop_flip(images, top, left, torch.zeros(3, dtype=torch.bool), padding=4)
    padded = F.pad(images, (4, 4, 4, 4))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for b in range(3):
        assert torch.equal(out[b], padded[b, :, top[b] : top[b] + 8, left[b] : left[b] + 10])
    assert (out[0, :, :4] == 0).all()  # top=0: the first rows are padding


def test_flip_mirrors_the_crop():
    images = torch.rand(2, 3, 8, 8)
    top, left = torch.tensor([2, 5]), torch.tensor([1, 7])
    plain = crop_flip(images, top, left, torch.tensor([False, False]), padding=4)
    flipped = crop_flip(images, top, left, torch.tensor([True, False]), padding=4)
    assert torch.equal(flipped[0], torch.flip(plain[0], dims=[-1]))
    assert torch.equal(flipped[1], plain[1])
    centre = torch.full((2,), 4)
    mirrored = crop_flip(images, centre, centre, torch.tensor([True, True]), padding=4)
    assert torch.equal(mirrored, torch.flip(images, dims=[-1]))


def test_crop_flip_matches_torchvision_for_the_same_draws():
    image = torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8)
    for top, left, flip in [(0, 0, False), (2, 7, True), (8, 8, True), (5, 1, False)]:
        ours = crop_flip(image, torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]), 4)[0]
        theirs = TF.crop(TF.pad(image[0], [4]), top, left, 12, 12)
        assert torch.equal(ours, TF.hflip(theirs) if flip else theirs)


def test_random_crop_flip_draws_per_sample_and_follows_the_generator():
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, -1, -1, -1)
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    assert len({o.numpy().tobytes() for o in out}) > 40  # independent offsets per sample
    again = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    top, left, flip = crop_flip_params(20000, 4, torch.Generator().manual_seed(1))
    assert top.min() == 0 and top.max() == 8 and set(left.unique().tolist()) == set(range(9))
    assert 0.48 < flip.float().mean().item() < 0.52


def test_normalize_matches_totensor_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = T.Normalize(mean, std)(x.float() / 255)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)


# --- in-memory loader ----------------------------------------------------------------------------


def test_tensor_loader_counts_batches(small):
    assert len(make_loader(small.train, small, 32, train=True)) == 3
    assert len(make_loader(small.train, small, 32, train=True, drop_last=True)) == 2
    loader = make_loader(small.train, small, 32, train=True, drop_last=True)
    assert isinstance(loader, TensorLoader) and sum(1 for _ in loader) == 2
    with pytest.raises(KdError, match="batch size"):
        make_loader(small.train, small, 0, train=True)


def test_tensor_loader_eval_serves_each_sample_at_its_index(small):
    loader = make_loader(small.val, small, 8, train=False)
    batches = list(loader)
    assert [len(b.y) for b in batches] == [8, 8, 4]
    index = torch.cat([b.index for b in batches])
    assert index.tolist() == list(range(20))
    for b in batches:
        assert b.x.dtype == torch.float32 and b.views is None
        assert torch.equal(b.x, normalize(small.val.images[b.index], small.mean, small.std))
        assert torch.equal(b.y, small.val.labels[b.index])


def test_tensor_loader_train_is_a_function_of_seed_and_epoch(small):
    def epoch(seed, e, start=0):
        loader = make_loader(small.train, small, 16, train=True, seed=seed)
        loader.set_epoch(e, start)
        return list(loader)

    first, again = epoch(0, 3), epoch(0, 3)
    for p, q in zip(first, again, strict=True):
        assert torch.equal(p.x, q.x) and torch.equal(p.index, q.index)
    order = torch.cat([b.index for b in first])
    assert sorted(order.tolist()) == list(range(80))  # every sample once
    assert not torch.equal(order, torch.cat([b.index for b in epoch(0, 4)]))
    assert not torch.equal(order, torch.cat([b.index for b in epoch(1, 3)]))
    resumed = epoch(0, 3, start=2)
    assert len(resumed) == 3 and all(torch.equal(p.x, q.x) for p, q in zip(resumed, first[2:], strict=True))
    for b in first:  # labels follow the index; images are augmented versions of the indexed ones
        assert torch.equal(b.y, small.train.labels[b.index])
    assert not torch.equal(first[0].x, normalize(small.train.images[first[0].index], small.mean, small.std))


def test_rotation_views_are_rotated_independent_crops():
    from kdcli.data.augment import rotation_views
    from kdcli.data.loaders import TensorLoader
    from kdcli.data.registry import InMemorySplit

    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    views = rotation_views(images, padding=0)  # no crop/flip offsets possible except the flip
    assert views.shape == (15, 3, 8, 8)
    for k in (1, 2, 3):
        block = views[(k - 1) * 5 : k * 5]
        unrotated = torch.rot90(block, -k, dims=(2, 3))
        # padding 0: each copy is the image or its mirror
        for i in range(5):
            assert torch.equal(unrotated[i], images[i]) or torch.equal(unrotated[i], images[i].flip(-1))

    split = InMemorySplit(images, torch.arange(5))
    loader = TensorLoader(split, 4, True, (0.5,) * 3, (0.25,) * 3, views="rotations")
    loader.set_epoch(1)
    batch = next(iter(loader))
    assert batch.views.shape == (12, 3, 8, 8) and batch.views.dtype == torch.float32
    eval_batch = next(iter(TensorLoader(split, 4, False, (0.5,) * 3, (0.25,) * 3, views="rotations")))
    assert eval_batch.views is None
