"""The input pipeline (trainers/data.py): sources, transforms, skip counts, resume, sharding."""

from __future__ import annotations

import io
import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from configs import common
from tests import messy_images
from trainers import data


def make_config(cache_dir, **fields):
    config = common.base()
    config.batch_size = 8
    config.data.cache_dir = str(cache_dir)
    config.data.num_threads = 0  # tests share two cores with others
    for key, value in fields.items():
        config.data[key] = value
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    """One embedded-MNIST build shared by the tests of this module."""
    cache_dir = tmp_path_factory.mktemp("cache")
    data.build_cache(make_config(cache_dir))
    return cache_dir


@pytest.fixture()
def messy(tmp_path):
    folder = tmp_path / "images"
    files = messy_images.write_messy_folder(str(folder))
    return folder, files


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- bad images


def test_messy_folder_is_converted_skipped_and_counted(messy, tmp_path):
    folder, _ = messy
    config = make_config(tmp_path / "cache", name="folder", folder=str(folder), num_classes=2,
                         image_size=16, channels=3, random_flip=False)
    data.validate(config, process_count=1)
    it = data.create_iterator(config, seed=0, global_batch_size=messy_images.NUM_USABLE)
    assert it.skip_counts() == {"unreadable": messy_images.NUM_UNREADABLE,
                                "too_small": messy_images.NUM_TOO_SMALL, "while_reading": 0}
    assert it.skipped_images == messy_images.NUM_UNREADABLE + messy_images.NUM_TOO_SMALL
    batch = next(it)  # exactly one epoch of the usable images
    assert batch["image"].shape == (messy_images.NUM_USABLE, 16, 16, 3)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    for name, (colour, label) in messy_images.CONVERTED_COLOURS.items():
        expected = np.asarray(colour, np.float32) / 127.5 - 1.0
        matches = [i for i in range(len(batch["label"]))
                   if batch["label"][i] == label
                   and np.abs(batch["image"][i] - expected).max() < 0.05]  # JPEG CMYK is lossy
        assert len(matches) == 1, name
    # The build's metadata names each unreadable file, for the user to fix.
    (build_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("folder-")]
    metadata = json.loads((build_dir / "metadata.json").read_text())
    assert sorted(m.split(":")[0] for m in metadata["unreadable"].values()) == [
        "cats/empty.png", "dogs/not_an_image.jpg", "dogs/truncated.jpg"]
    assert metadata["class_names"] == ["cats", "dogs"]


def test_messy_folder_in_grayscale(messy, tmp_path):
    folder, _ = messy
    config = make_config(tmp_path / "cache", name="folder", folder=str(folder), num_classes=2,
                         image_size=8, channels=1)
    batch = next(data.create_iterator(config, seed=0, global_batch_size=4))
    assert batch["image"].shape == (4, 8, 8, 1)
    assert np.isfinite(batch["image"]).all()


def test_to_channels_converts_every_mode():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(data.to_channels(cmyk, 3)).tolist()[0][0] == [255, 0, 0]
    gray = Image.new("L", (2, 2), 77)
    assert np.asarray(data.to_channels(gray, 3))[0, 0].tolist() == [77, 77, 77]
    half_transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 128))  # black at 50% over white
    assert np.asarray(data.to_channels(half_transparent, 1))[0, 0] == 127
    palette = Image.new("P", (2, 2), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert np.asarray(data.to_channels(palette, 3))[0, 0].tolist() == [10, 20, 30]
    rgb = Image.new("RGB", (2, 2), (255, 255, 255))
    assert data.to_channels(rgb, 1).mode == "L"


def test_lazily_checked_source_skips_and_counts_while_reading():
    """TFDS records are only checked while reading; bad ones are dropped and counted exactly."""
    rng = np.random.default_rng(0)
    good = [{"image": png(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)), "label": i}
            for i in range(7)]
    bad = [{"image": b"garbage", "label": 100}, {"image": good[0]["image"][:40], "label": 101},
           {"image": png(np.zeros((3, 3), np.uint8)), "label": 102}]
    config = make_config("unused", image_size=8, channels=3)
    it = data.pipeline(good + bad, config, seed=0, local_batch_size=7,
                       shard_options=grain.sharding.NoSharding(),
                       skipped_at_build={"unreadable": 0, "too_small": 0})
    batch = next(it)  # 7 good of 10: this batch consumed exactly one epoch
    assert sorted(batch["label"].tolist()) == list(range(7))
    assert it.skip_counts()["while_reading"] == 3 and it.skipped_images == 3
    state = it.get_state()
    next(it)
    assert it.skip_counts()["while_reading"] == 6
    it.set_state(state)  # the count is part of the checkpointed state
    assert it.skip_counts()["while_reading"] == 3


def test_all_images_too_small_is_a_config_error(embedded_cache):
    config = make_config(embedded_cache, image_size=256)  # threshold 32 px > MNIST's 28
    with pytest.raises(ValueError, match=r"config.data.image_size=256"):
        data.create_iterator(config, seed=0, global_batch_size=8)


# ----------------------------------------------------------------------------- building


def test_embedded_builds_once_and_is_reused(embedded_cache, monkeypatch):
    config = make_config(embedded_cache)
    directory, metadata = data.build_cache(config)
    assert metadata["num_records"] == 5000 and metadata["unreadable"] == {}
    assert os.listdir(embedded_cache) == [os.path.basename(directory)]  # no temp dirs left

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the embedded dataset was built a second time")

    monkeypatch.setattr(data, "_build_array_record", no_rebuild)
    batch = next(data.create_iterator(config, seed=0, global_batch_size=8))
    assert batch["image"].shape == (8, 32, 32, 1)
    assert set(batch["label"].tolist()) <= set(range(10))


def test_embedded_build_is_deterministic(embedded_cache, tmp_path):
    first, _ = data.build_cache(make_config(embedded_cache))
    second, _ = data.build_cache(make_config(tmp_path))
    for name in ("records.array_record", "metadata.json"):
        with open(os.path.join(first, name), "rb") as a:
            with open(os.path.join(second, name), "rb") as b:
                assert a.read() == b.read(), name


def test_crash_mid_build_leaves_nothing(messy, tmp_path, monkeypatch):
    folder, _ = messy
    config = make_config(tmp_path / "cache", name="folder", folder=str(folder), num_classes=2)
    calls = []

    def crash_on_third(image_bytes):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 32, ""

    monkeypatch.setattr(data, "_inspect", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        data.build_cache(config)
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.undo()
    directory, metadata = data.build_cache(config)  # the next run builds it completely
    assert metadata["num_records"] == 10


def test_edited_folder_is_rebuilt(messy, tmp_path):
    folder, _ = messy
    config = make_config(tmp_path / "cache", name="folder", folder=str(folder), num_classes=2)
    first, _ = data.build_cache(config)
    Image.new("RGB", (20, 20)).save(folder / "dogs" / "new.png")
    second, metadata = data.build_cache(config)
    assert first != second and metadata["num_records"] == 11


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("width,height", [(100, 60), (20, 12), (37, 64)])
def test_center_crop_matches_pil_reference(width, height):
    size = 16
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    # Reference, step by step as in guided-diffusion's center_crop_arr.
    ref = image
    while min(ref.size) >= 2 * size:
        ref = ref.resize((ref.size[0] // 2, ref.size[1] // 2), resample=Image.BOX)
    scale = size / min(ref.size)
    ref = np.asarray(ref.resize((round(ref.size[0] * scale), round(ref.size[1] * scale)),
                                resample=Image.BICUBIC))
    top, left = (ref.shape[0] - size) // 2, (ref.shape[1] - size) // 2
    expected = ref[top:top + size, left:left + size]
    if (width, height) == (100, 60):  # the geometry worked by hand: 100x60 -BOX-> 50x30 -> 27x16
        assert ref.shape == (16, 27, 3) and (top, left) == (0, 5)
    out = data.center_crop_arr(image, size)
    assert out.shape == (size, size, 3)
    np.testing.assert_array_equal(out, expected)


def test_flip_is_deterministic_per_seed(embedded_cache):
    config = make_config(embedded_cache)
    a = take(data.create_iterator(config, seed=3, global_batch_size=8), 3)
    b = take(data.create_iterator(config, seed=3, global_batch_size=8), 3)
    assert_same_batches(a, b)
    other = take(data.create_iterator(config, seed=4, global_batch_size=8), 1)
    assert not np.array_equal(a[0]["image"], other[0]["image"])
    config.data.random_flip = False
    plain = take(data.create_iterator(config, seed=3, global_batch_size=8), 3)
    flipped = 0
    for x, y in zip(a, plain):
        np.testing.assert_array_equal(x["label"], y["label"])  # the flip leaves the order alone
        for img, ref in zip(x["image"], y["image"]):
            if np.array_equal(img, ref[:, ::-1]) and not np.array_equal(img, ref):
                flipped += 1
            else:
                np.testing.assert_array_equal(img, ref)
    assert 0 < flipped < 24


# ----------------------------------------------------------------------------- resume and sharding


def test_get_state_set_state_resumes_exactly(embedded_cache):
    config = make_config(embedded_cache, num_threads=2)
    it = data.create_iterator(config, seed=0, global_batch_size=8)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    restored = data.create_iterator(config, seed=0, global_batch_size=8)
    restored.set_state(state)
    assert_same_batches(take(restored, 3), expected)


def test_orbax_save_restore_gives_identical_next_batches(embedded_cache, tmp_path):
    import orbax.checkpoint as ocp

    config = make_config(embedded_cache)
    it = data.create_iterator(config, seed=0, global_batch_size=8)
    take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 3)
    restored = data.create_iterator(config, seed=0, global_batch_size=8)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restore = grain.checkpoint.CheckpointRestore(restored)
        manager.restore(2, args=ocp.args.Composite(data=restore))
    assert_same_batches(take(restored, 3), expected)


def test_processes_read_disjoint_shards():
    records = [{"image": png(np.full((8, 8), i, np.uint8)), "label": i} for i in range(10)]
    config = make_config("unused", image_size=8, random_flip=False)
    seen = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        it = data.pipeline(records, config, seed=0, local_batch_size=5, shard_options=shard,
                           skipped_at_build={})
        epoch = next(it)["label"].tolist()
        assert len(set(epoch)) == 5  # five different records
        seen.append(set(epoch))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10))


def test_global_batches_do_not_depend_on_the_process_count():
    """Two processes' slices of a global batch, concatenated, are the one-process batch."""
    records = [{"image": png(np.full((8, 8), 10 * i, np.uint8)), "label": i} for i in range(12)]
    config = make_config("unused", image_size=8, random_flip=True)

    def batches(count, index, n):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)
        it = data.pipeline(records, config, seed=3, local_batch_size=8 // count, shard_options=shard,
                           skipped_at_build={})
        return take(it, n)

    whole = batches(1, 0, 3)
    parts = [batches(2, i, 3) for i in range(2)]
    for step in range(3):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                whole[step][key], np.concatenate([parts[0][step][key], parts[1][step][key]]))


def test_local_batch_is_global_over_process_count(embedded_cache):
    shard = grain.sharding.ShardOptions(shard_index=1, shard_count=4, drop_remainder=True)
    batch = next(data.create_iterator(make_config(embedded_cache), seed=0, global_batch_size=8,
                                      shard_options=shard))
    assert batch["image"].shape[0] == 2 and batch["label"].shape == (2,)
    with pytest.raises(ValueError, match="not divisible"):
        data.create_iterator(make_config(embedded_cache), seed=0, global_batch_size=6,
                             shard_options=shard)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(embedded_cache):
    config = make_config(embedded_cache)
    expected = take(data.create_iterator(config, seed=0, global_batch_size=8), 4)
    config.data.num_workers = 1  # one worker reads the same sequence as the main process
    it = data.create_iterator(config, seed=0, global_batch_size=8)
    assert_same_batches(take(it, 2), expected[:2])
    state = it.get_state()
    restored = data.create_iterator(config, seed=0, global_batch_size=8)
    restored.set_state(state)
    assert_same_batches(take(restored, 2), expected[2:])


# ----------------------------------------------------------------------------- validation


def test_shapes_and_classes(embedded_cache):
    config = make_config(embedded_cache, image_size=24, channels=3)
    assert data.image_shape(config) == (24, 24, 3)
    assert data.num_classes(config) == 10


@pytest.mark.parametrize("field,value,message", [
    ("name", "", "config.data.name=''"),
    ("name", "folder", "config.data.folder=''"),
    ("folder", "/nonexistent/images", "config.data.folder='/nonexistent/images'"),
    ("image_size", 4, "config.data.image_size=4"),
    ("channels", 2, "config.data.channels=2"),
    ("num_classes", 1000, "config.data.num_classes=1000"),
    ("num_workers", -1, "config.data.num_workers=-1"),
    ("cache_dir", "", "config.data.cache_dir=''"),
    ("latents", "/nonexistent/latents", "config.data.latents='/nonexistent/latents'"),
])
def test_bad_data_config_names_the_field(tmp_path, field, value, message):
    config = make_config(tmp_path)
    config.data[field] = value
    if field == "folder":
        config.data.name = "folder"
    with pytest.raises(ValueError) as e:
        data.validate(config, process_count=1)
    assert message in str(e.value)


def test_folder_without_classes_and_wrong_class_count(tmp_path, messy):
    config = make_config(tmp_path, name="folder", folder=str(tmp_path / "cache"), num_classes=2)
    os.makedirs(tmp_path / "cache")
    with pytest.raises(ValueError, match="has no class subfolders"):
        data.validate(config, process_count=1)
    config.data.folder = str(messy[0])
    config.data.num_classes = 3
    with pytest.raises(ValueError, match=r"config.data.num_classes=3 .* has 2 class subfolders"):
        data.validate(config, process_count=1)


def test_batch_not_divisible_by_process_count(tmp_path):
    config = make_config(tmp_path)
    config.batch_size = 10
    with pytest.raises(ValueError, match=r"config.batch_size=10 is not divisible .* \(4\)"):
        data.validate(config, process_count=4)
    data.validate(config, process_count=2)


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "mnist"])
def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path, name):
    config = make_config(tmp_path, name=name, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError) as e:
        data.validate(config, process_count=1)
    assert f"config.data.name={name!r}" in str(e.value)
    assert "--file_format=array_record" in str(e.value)


@pytest.mark.slow
def test_tfds_source_through_the_pipeline(tmp_path):
    """A TFDS ArrayRecord source (records mocked: the mock imports TensorFlow, data.py does not)."""
    import tensorflow_datasets as tfds

    config = make_config(tmp_path, name="mnist", image_size=8, channels=3)
    with tfds.testing.mock_data(num_examples=12):
        data.validate(config, process_count=1)  # also checks num_classes against the dataset info
        it = data.create_iterator(config, seed=0, global_batch_size=4)
        batch = next(it)
    assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].dtype == np.int32
    assert np.isfinite(batch["image"]).all() and it.skipped_images == 0
    config.data.num_classes = 7
    with tfds.testing.mock_data(num_examples=12), pytest.raises(ValueError, match="has 10 classes"):
        data.validate(config, process_count=1)
