"""data.decode=device on the CPU device: the workers ship files and drawn crops, the rank decodes and crops. Same
batches as the CPU pipeline (bit for bit: the same kernels run), the same stream and bad-sample counts, exact
resume, and training through it equal to training through the CPU pipeline."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from gpd_ds.config import Augment, ConfigError, DataConfig, TrainConfig
from gpd_ds.data.decode import BadSample, DataError, decode
from gpd_ds.data.device_decode import DeviceDecoder, EncodedImages, PlanOnCpu, device_ops, draw_params
from gpd_ds.data.loader import TrainLoader, resolve_shards
from gpd_ds.data.shards import jpeg_frame, make_shards
from gpd_ds.data.transforms import DeviceTransform, train_transform
from gpd_ds.train.components import decode_on
from tests.data_helpers import jpeg_bytes, synthetic_shards, write_index, write_shard
from tests.integration.launch_helpers import check, overrides, single, train_losses, workspace_with_data

AUGMENTS = {"crop_flip_jitter": Augment(color_jitter=0.4), "pad_crop": Augment(pad_crop=4),
            "no_flip_narrow_scale": Augment(hflip=0.0, scale=(0.5, 0.9))}


def _gif(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    frames = [Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3))) for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 images of random sizes: RGB, grayscale and CMYK JPEGs, a PNG and a GIF (the last two and CMYK are
    decoded by the rank's CPU in device mode)."""
    tmp = tmp_path_factory.mktemp("odd")
    rng = random.Random(0)
    for c in range(3):
        (tmp / "src" / f"c{c}").mkdir(parents=True)
        for i in range(20):
            w, h, seed = rng.randint(40, 120), rng.randint(40, 120), 100 * c + i
            data = (jpeg_bytes(w, h, seed, fmt="PNG") if i == 7 else _gif(w, h, seed) if i == 8
                    else jpeg_bytes(w, h, seed, mode=("RGB", "L", "CMYK")[i % 3]))
            (tmp / "src" / f"c{c}" / f"{i:02d}.img.jpg").write_bytes(data)
    make_shards(tmp / "src", tmp / "out", "train", shard_size=10, progress=False)
    return tmp / "out"


def _loaders(shards_dir: Path, augment: Augment, **kw: object) -> tuple[TrainLoader, TrainLoader, DeviceDecoder]:
    shards = resolve_shards(str(shards_dir), "train")
    transform = train_transform(32, augment)
    args = {"batch_size": 4, "rank": 0, "world_size": 1, "transform": transform, "num_workers": 2, "seed": 3, **kw}
    return TrainLoader(shards, **args), TrainLoader(shards, **args, decode="device"), DeviceDecoder(transform, "cpu")


@pytest.mark.parametrize("augment", AUGMENTS.values(), ids=AUGMENTS.keys())
def test_device_batches_equal_the_cpu_pipeline_bit_for_bit(odd_shards: Path, augment: Augment) -> None:
    on_cpu, on_device, decoder = _loaders(odd_shards, augment)
    batches, to_device = 0, 0
    for epoch in (0, 1):
        on_cpu.set_epoch(epoch)
        on_device.set_epoch(epoch)
        for a, b in zip(on_cpu, on_device, strict=True):
            assert isinstance(b.images, EncodedImages)
            images, labels = decoder(b.images, b.labels)
            assert torch.equal(images, a.images)
            assert torch.equal(labels, a.labels)
            assert (b.keys, b.worker, b.position, b.bad_samples) == (a.keys, a.worker, a.position, a.bad_samples)
            batches, to_device = batches + 1, to_device + sum(b.images.on_device)
    assert batches == 2 * len(on_cpu) == 28
    assert 0 < to_device < batches * 4  # some for the device's JPEG decoder, the rest (PNG, GIF, CMYK) on the CPU


def test_device_loader_resumes_exactly(odd_shards: Path) -> None:
    _, reference, decoder = _loaders(odd_shards, AUGMENTS["crop_flip_jitter"])
    expected = [decoder(b.images, b.labels)[0] for b in reference]
    _, first, _ = _loaders(odd_shards, AUGMENTS["crop_flip_jitter"])
    got = []
    for batch in first:
        got.append(decoder(batch.images, batch.labels)[0])
        if len(got) == 5:
            break
    _, resumed, _ = _loaders(odd_shards, AUGMENTS["crop_flip_jitter"])
    resumed.load_state_dict(first.state_dict())
    got += [decoder(b.images, b.labels)[0] for b in resumed]
    assert len(got) == len(expected) == 14
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_the_worker_draws_what_the_cpu_pipeline_draws() -> None:
    """The drawn crop of each op is the one v2.Compose draws for the same seed (checked by cropping a tensor whose
    pixels are their own coordinates: the crop's corner pixels give the box)."""
    transform = train_transform(16, Augment(scale=(0.2, 1.0)))
    ops = device_ops(transform)
    ys, xs = torch.meshgrid(torch.arange(90), torch.arange(120), indexing="ij")
    coords = torch.stack([ys, xs, torch.zeros_like(ys)]).to(torch.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        params = draw_params(ops, 90, 120)
        torch.manual_seed(seed)
        crop = ops[0].make_params([coords])
        assert params[0] == crop
        flipped = params[1] is not None
        torch.manual_seed(seed)
        ops[0].make_params([coords])
        assert flipped == bool(torch.rand(1) < 0.5)


def test_a_truncated_jpeg_is_a_bad_sample_in_the_worker_as_on_the_cpu(tmp_path: Path) -> None:
    good = [{"__key__": f"g{i}", "jpg": jpeg_bytes(40, 30, seed=i), "cls": b"1"} for i in range(9)]
    full = jpeg_bytes(60, 50, seed=99)
    truncated = {"__key__": "cut", "jpg": full[:len(full) // 2], "cls": b"0"}
    write_shard(tmp_path / "a.tar", [*good[:4], truncated, *good[4:]])
    write_shard(tmp_path / "b.tar", good)
    write_index(tmp_path, "train", {"a.tar": 10, "b.tar": 9}, ["x", "y"])
    frame = jpeg_frame(truncated["jpg"])
    assert frame is not None
    assert frame.scan > 0  # its header is intact: only the end-of-image check can tell
    on_cpu, on_device, decoder = _loaders(tmp_path, Augment(), num_workers=1, batch_size=3, max_bad_fraction=0.2)
    a, b = list(on_cpu), list(on_device)
    assert [x.keys for x in a] == [x.keys for x in b]
    assert "cut" not in {key for x in b for key in x.keys}
    assert on_cpu.bad_samples == on_device.bad_samples == 1
    for x, y in zip(a, b, strict=True):
        assert torch.equal(decoder(y.images, y.labels)[0], x.images)


def test_a_file_that_fails_on_the_rank_is_counted_and_replaced_by_its_predecessor(tmp_path: Path) -> None:
    """A PNG whose header is fine but whose compressed data fails its checksum: the worker cannot tell without
    decoding; the rank counts it and fills its place with the batch's previous image and label. (torchvision's
    PNG decoder crashed the process on this file; PIL reads PNGs now, here and in the CPU pipeline.)"""
    png = bytearray(jpeg_bytes(30, 20, seed=5, fmt="PNG"))
    png[60:90] = bytes(30)  # damage the compressed data, keep the header
    samples = [{"__key__": "a", "jpg": jpeg_bytes(30, 20, seed=1), "cls": b"0"},
               {"__key__": "bad", "jpg": bytes(png), "cls": b"1"},
               {"__key__": "c", "jpg": jpeg_bytes(30, 20, seed=3), "cls": b"2"}]
    planner = PlanOnCpu(train_transform(16, Augment()), num_classes=3)
    planned = [planner(s, seed=i) for i, s in enumerate(samples)]
    batch = planner.collate([p for p, _ in planned])
    decoder = DeviceDecoder(train_transform(16, Augment()), "cpu", max_bad_fraction=0.5)
    images, labels = decoder(batch, torch.tensor([label for _, label in planned]))
    assert labels.tolist() == [0, 0, 2]
    assert torch.equal(images[1], images[0])
    assert (decoder.bad.seen, decoder.bad.bad) == (3, 1)
    with pytest.raises(DataError, match="no image of a batch could be decoded"):
        decoder(planner.collate([planned[1][0]]), torch.tensor([1]))
    with pytest.raises(BadSample, match=r"cannot decode \.jpg: broken data stream"):
        decode(samples[1], num_classes=3)  # the CPU pipeline: a bad sample, skipped and counted


def test_decode_modes_and_their_rules() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode_on(DataConfig(), cpu)[0] == "cpu"
    assert decode_on(DataConfig(), cuda)[0] == "device"
    assert decode_on(DataConfig(decode="device"), cpu)[0] == "device"
    rand = DataConfig(augment=Augment(auto_augment="rand-m9-mstd0.5-inc1"))
    assert decode_on(rand, cuda) == ("cpu", "data.decode=auto: timm's rand-m9-mstd0.5-inc1 policy works on PIL "
                                            "images in the loader workers")
    assert decode_on(DataConfig(in_memory=True), cuda)[0] == "cpu"
    for data, match in ((DataConfig(decode="device", augment=Augment(auto_augment="rand-m9-mstd0.5-inc1")),
                         "policy runs on PIL images"),
                        (DataConfig(decode="device", in_memory=True), "decodes the split once"),
                        (DataConfig(decode="gpu"), "use auto")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(data=data).validate()
    with pytest.raises(DataError, match="this transform has ToPILImage"):
        device_ops(train_transform(32, Augment(auto_augment="rand-m9-mstd0.5-inc1")))
    planner = PlanOnCpu(train_transform(16, Augment()), 2)
    encoded = planner.collate([planner({"__key__": "k", "jpg": jpeg_bytes(20, 20, 1), "cls": b"1"}, 0)[0]])
    with pytest.raises(ValueError, match="needs a DeviceTransform built with a decoder"):
        DeviceTransform(2)(encoded, torch.tensor([1]))


def test_jpeg_frame_reads_components_and_the_scan_start() -> None:
    for mode, components in (("RGB", 3), ("L", 1), ("CMYK", 4)):
        data = jpeg_bytes(33, 21, seed=1, mode=mode)
        frame = jpeg_frame(data)
        assert (frame.width, frame.height, frame.components) == (33, 21, components)
        assert data[frame.scan:frame.scan + 2] == b"\xff\xda"
    assert jpeg_frame(jpeg_bytes(8, 8, seed=1, fmt="PNG")) is None


def test_training_through_device_decoding_equals_the_cpu_pipeline_and_resumes_bitwise(tmp_path: Path) -> None:
    """One process with a loader worker: the same losses, step by step, from decode=cpu, and from decode=device
    stopped at step 7 and resumed."""
    workspace = workspace_with_data(tmp_path)
    args = overrides(workspace / "data", **{"model.static_teacher_checkpoint": workspace / "teacher.safetensors",
                                            "data.workers": 1, "data.augment.color_jitter": 0.3})
    cpu, device = workspace / "cpu", workspace / "device"
    check(single(workspace, ["--run-dir", str(cpu), *args, "--set", "data.decode=cpu"]))
    part = single(workspace, ["--run-dir", str(device), *args, "--set", "data.decode=device", "--set",
                              "run.max_steps=7"])
    check(part)
    log = part.stdout + part.stderr
    assert "train images are decoded on the rank's cpu device (data.decode=device)" in log
    assert "torch.compile off: run.compile=auto: off on a cpu device" in log  # the default, and why
    check(single(workspace, ["--run-dir", str(device), *args, "--set", "data.decode=device", "--resume", "auto"]))
    expected = train_losses(cpu)
    assert len(expected) == 20
    assert train_losses(device) == expected


def test_synthetic_shards_plan_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's reader never decodes pixels (that is the point): decoding is forbidden while it runs."""
    synthetic_shards(tmp_path, "train", [8, 8], num_classes=2, size=24)
    shards = resolve_shards(str(tmp_path), "train")
    import gpd_ds.data.decode as decode_mod

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the worker decoded an image")

    monkeypatch.setattr(decode_mod, "decode_image", forbidden)
    loader = TrainLoader(shards, batch_size=4, rank=0, world_size=1, transform=train_transform(16, Augment()),
                         num_workers=0, seed=1, decode="device")
    assert sum(len(b.keys) for b in loader) == 16
