"""Every bad input is named with its file and problem; nothing partial is left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from components.data.prepare import BadSampleError, prepare_dataset
from components.data.readers import open_dataset
from tests.data_fixtures import write_cityscapes
from tests.output_checks import project_tracebacks


def label_path(root, split="train", i=0):
    return root / "gtFine" / split / "testcity" / f"testcity_000000_{i + 10 * (split == 'val'):06d}_gtFine_labelIds.png"


def image_path(root, split="train", i=0):
    return (
        root / "leftImg8bit" / split / "testcity" / f"testcity_000000_{i + 10 * (split == 'val'):06d}_leftImg8bit.png"
    )


def corrupt_image(root):
    image_path(root).write_bytes(b"not a png at all")
    return str(image_path(root)), "unreadable image"


def wrong_size_label(root):
    Image.fromarray(np.full((10, 10), 7, np.uint8)).save(label_path(root))
    return str(label_path(root)), "label is 10x10 but image"


def unknown_label_id(root):
    label = np.array(Image.open(label_path(root)))
    label[3, 3] = 250
    Image.fromarray(label).save(label_path(root))
    return str(label_path(root)), "label ids [250] are not in the class map"


def missing_label(root):
    label_path(root).unlink()
    return str(image_path(root)), "no label file"


def duplicate_id(root):
    dup = root / "leftImg8bit" / "train" / "othercity"
    dup.mkdir()
    (dup / image_path(root).name).write_bytes(image_path(root).read_bytes())
    dup_labels = root / "gtFine" / "train" / "othercity"
    dup_labels.mkdir()
    (dup_labels / label_path(root).name).write_bytes(label_path(root).read_bytes())
    return "duplicate sample id 'testcity_000000_000000'", "duplicate"


def negative_label(root):
    label = np.array(Image.open(label_path(root))).astype(np.int32)
    label[2, 2] = -3  # a 32-bit label image (TIFF data): -3 would wrap to 253 when cast to 8 bits
    Image.fromarray(label).save(label_path(root), format="TIFF")
    return str(label_path(root)), "label values down to -3 are below 0"


def huge_declared_image(root):
    """A small PNG whose header declares 13000 x 13000 pixels: refused before decoding."""
    import struct
    import zlib

    data = bytearray(image_path(root).read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 13000, 13000)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    image_path(root).write_bytes(bytes(data))
    return str(image_path(root)), "declares 13000x13000 pixels, more than prepare.max_pixels"


def fifo_as_image(root):
    image_path(root).unlink()
    os.mkfifo(image_path(root))  # opening it to read would block for ever
    return str(image_path(root)), "image is a FIFO (named pipe), not a regular file"


def device_link_as_image(root):
    image_path(root).unlink()
    image_path(root).symlink_to("/dev/zero")  # read whole, it never ends
    return str(image_path(root)), "points outside the dataset root"


def sparse_huge_image(root):
    with open(image_path(root), "r+b") as handle:  # a valid header, then 6 GB: never read whole
        handle.truncate(6 << 30)
    return str(image_path(root)), f"image is {6 << 30} bytes, more than"


def link_loop_as_image(root):
    image_path(root).unlink()
    image_path(root).symlink_to(image_path(root))
    return str(image_path(root)), "cannot open the image: a loop of symbolic links"


def folder_as_image(root):
    image_path(root).unlink()
    image_path(root).mkdir()
    return str(image_path(root)), "image is a folder, not a regular file"


def image_mode_without_conversion(root):
    Image.fromarray(np.zeros(np.array(Image.open(label_path(root))).shape, np.float32)).save(
        image_path(root).with_suffix(".tif")
    )
    image_path(root).unlink()
    image_path(root).with_suffix(".tif").rename(image_path(root))
    return str(image_path(root)), "image mode F is not supported"


@pytest.mark.parametrize(
    "damage",
    [
        corrupt_image,
        wrong_size_label,
        unknown_label_id,
        missing_label,
        duplicate_id,
        negative_label,
        huge_declared_image,
        fifo_as_image,
        device_link_as_image,
        sparse_huge_image,
        link_loop_as_image,
        folder_as_image,
        image_mode_without_conversion,
    ],
)
def test_bad_sample_is_named_and_nothing_is_written(tmp_path, damage):
    root = write_cityscapes(tmp_path / "cs")
    where, what = damage(root)
    reader = open_dataset("cityscapes", root)
    with pytest.raises(BadSampleError) as err:
        prepare_dataset(reader, tmp_path / "out")
    assert where in str(err.value) and what in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "cs"]  # no output, no temporary directory


def test_skip_lists_every_skipped_file(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    corrupt_image(root)
    reader = open_dataset("cityscapes", root)
    manifest = prepare_dataset(reader, tmp_path / "out", on_bad_sample="skip")
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert manifest["skipped"] == 1 and len(manifest["splits"]["train"]) == 1
    assert skipped[0]["sample_id"] == "testcity_000000_000000" and "unreadable image" in skipped[0]["reason"]


def test_empty_split_is_an_error(tmp_path):
    root = write_cityscapes(tmp_path / "cs", per_split=1)
    label_path(root, "val").unlink()
    reader = open_dataset("cityscapes", root)
    with pytest.raises(ValueError, match=r"split\(s\) \['val'\] are empty"):
        prepare_dataset(reader, tmp_path / "out", on_bad_sample="skip")
    assert not (tmp_path / "out").exists()


def test_previous_output_survives_a_failed_run(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    prepare_dataset(open_dataset("cityscapes", root), tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_text()
    corrupt_image(root)
    with pytest.raises(BadSampleError):
        prepare_dataset(open_dataset("cityscapes", root), tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").read_text() == before


@pytest.mark.slow
def test_interrupted_stage_leaves_no_output(tmp_path):
    """Interrupt the prepare stage mid-way (SIGINT, SIGTERM, then SIGKILL): the output never appears.
    The stage starts with SIGINT ignored, as a shell's background job does: Ctrl-C must still work."""
    params = tmp_path / "params.yaml"
    out = tmp_path / "raw"
    params.write_text(
        f"prepare:\n  output: {out}\n  synthetic: {{train_images: 1200, val_images: 4, height: 64, width: 128}}\n"
    )
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.prepare", "--params", str(params)],
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        deadline = time.time() + 60
        # Wait until it is writing the canonical layout (its temporary directory exists); 1200 images
        # keep it writing for seconds even on a loaded machine, so the signal lands mid-write.
        while time.time() < deadline and not any(p.name.startswith(".raw.tmp-") for p in tmp_path.iterdir()):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw.tmp-")]
    assert len(leftovers) <= 1  # SIGKILL can leave a hidden temporary; the next run removes it
    # the next run (of a smaller set: what is checked is the clean-up, not the size) finishes
    params.write_text(params.read_text().replace("train_images: 1200", "train_images: 8"))
    subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params)], check=True, capture_output=True)
    assert (out / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw.tmp-")]


def test_16_bit_grayscale_images_are_converted_faithfully(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    shape = np.array(Image.open(label_path(root))).shape
    ramp = np.linspace(0, 65535, shape[0] * shape[1]).reshape(shape).astype(np.uint16)
    Image.fromarray(ramp).save(image_path(root))
    prepare_dataset(open_dataset("cityscapes", root), tmp_path / "out")
    converted = np.array(Image.open(next((tmp_path / "out" / "images" / "train").glob("*000000.png"))))
    # PIL's own conversion clips such an image to two values; here the ramp keeps its 256 levels
    assert len(np.unique(converted)) > 200 and converted.max() == 255 and converted.min() == 0
    # predict and the served model decode the same file to the same pixels
    from components.data.images import read_image

    assert np.array_equal(read_image(image_path(root)), converted)


def write_voc(root, ids):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for split, names in ids.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    for name in ["a", "b"]:
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "SegmentationClass" / f"{name}.png")


def test_ids_from_a_dataset_list_cannot_escape_the_dataset_or_the_output(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(outside / "x.jpg")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(outside / "x.png")
    write_voc(tmp_path / "voc", {"train": ["a", "../../elsewhere/x"], "val": ["b"]})
    with pytest.raises(BadSampleError, match="points outside the dataset root"):
        prepare_dataset(open_dataset("voc", tmp_path / "voc"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in outside.iterdir()) == ["x.jpg", "x.png"]
    manifest = prepare_dataset(open_dataset("voc", tmp_path / "voc"), tmp_path / "out", on_bad_sample="skip")
    assert manifest["splits"]["train"] == ["a"] and manifest["skipped"] == 1


def test_a_dataset_without_a_train_split_is_refused(tmp_path):
    write_voc(tmp_path / "voc", {"val": ["a", "b"]})
    with pytest.raises(ValueError, match="no train split"):
        prepare_dataset(open_dataset("voc", tmp_path / "voc"), tmp_path / "out")


def test_a_stray_file_where_a_split_folder_belongs_is_named(tmp_path):
    root = tmp_path / "folder"
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "notes.txt").write_text("not a split")
    (root / "classes.txt").write_text("road\ncar\n")
    with pytest.raises(ValueError, match="notes.txt is not a split folder"):
        open_dataset("folder", root)


def test_a_folder_the_pipeline_did_not_write_is_never_replaced(tmp_path):
    from components.data.pyramid import build_pyramid
    from components.storage import Storage

    root = write_cityscapes(tmp_path / "cs")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("a user's own work")
    with pytest.raises(FileExistsError, match=r"prepare.output = .*mine: holds files this pipeline did not write"):
        prepare_dataset(open_dataset("cityscapes", root), tmp_path / "mine")
    prepare_dataset(open_dataset("cityscapes", root), tmp_path / "out")
    with pytest.raises(FileExistsError, match=r"pyramid.output = .*mine: holds files"):
        build_pyramid(tmp_path / "out", [0.5, 1.0], 8, Storage(), str(tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    prepare_dataset(open_dataset("cityscapes", root), tmp_path / "out")  # its own output: replaced


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """Temporaries are named after their output, so the next run of the stage finds and removes them."""
    from components.atomic import atomic_file
    from components.data.pyramid import build_pyramid
    from components.owned_files import json_with
    from components.storage import Storage

    root = write_cityscapes(tmp_path / "cs")
    for stale in (".out.tmp-123", ".pyr.tmp-456", ".pyr.tmp-old-789"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "big.bin").write_bytes(b"x" * 1000)
    (tmp_path / ".metrics.json.tmp-abc").write_text('{"half": ')  # a file output killed mid-write
    prepare_dataset(open_dataset("cityscapes", root), tmp_path / "out")
    build_pyramid(tmp_path / "out", [0.5, 1.0], 8, Storage(), str(tmp_path / "pyr"))
    with atomic_file(tmp_path / "metrics.json", json_with()) as handle:
        handle.write("{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cs", "metrics.json", "out", "pyr"]


def test_replacing_an_output_never_leaves_the_path_empty(tmp_path):
    from components.atomic import _exchange, replace_dir

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "v").write_text("2")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "v").write_text("1")
    # One atomic exchange: no moment exists at which `out` is missing.
    assert _exchange(tmp_path / "new", tmp_path / "out")
    assert (tmp_path / "out" / "v").read_text() == "2" and (tmp_path / "new" / "v").read_text() == "1"
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "v").write_text("3")
    replace_dir(tmp_path / "newer", tmp_path / "out")
    assert (tmp_path / "out" / "v").read_text() == "3" and not (tmp_path / "newer").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (needs root, as the namespaced cluster tests do)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_clear_line_and_leaves_nothing(tmp_path, small_disk):
    (tmp_path / "params.yaml").write_text(
        f"prepare:\n  output: {small_disk}/raw\n  synthetic: {{train_images: 40, val_images: 4}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "--params", str(tmp_path / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 1 and "No space left on device" in done.stderr, done.stderr[-2000:]
    assert not project_tracebacks(done.stderr)
    assert list(small_disk.iterdir()) == []  # no partial output, no temporaries


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_outputs_follow_the_umask(tmp_path, umask):
    """Outputs are written under temporary names and renamed into place; the temporaries used to
    keep mkdtemp's 0700 and mkstemp's 0600, so a serving account, CI or a colleague could not read
    a model, a pyramid or a result whatever the umask said."""
    import stat

    from components.atomic import atomic_dir, atomic_file, current_umask
    from components.data.pyramid import build_pyramid
    from components.data.readers import read_cityscapes
    from components.data.synthetic import write_cityscapes_layout
    from components.owned_files import json_with
    from components.storage import Storage

    def mode(path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "inside.txt").write_text("x")
        with atomic_file(tmp_path / "file.json", json_with()) as handle:
            handle.write("{}")
        write_cityscapes_layout(tmp_path / "cs", {"train": 2, "val": 1}, 32, 48, seed=1)
        prepare_dataset(read_cityscapes(tmp_path / "cs"), tmp_path / "raw")
        build_pyramid(tmp_path / "raw", [0.5, 1.0], 16, Storage(), str(tmp_path / "pyramid"))
    finally:
        os.umask(previous)
    for folder in ("folder", "raw", "pyramid"):
        assert mode(tmp_path / folder) == 0o777 & ~umask, folder
    assert mode(tmp_path / "file.json") == 0o666 & ~umask
    assert mode(tmp_path / "folder" / "inside.txt") == 0o666 & ~umask
