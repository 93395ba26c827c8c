import json

import numpy as np
import pytest
from PIL import Image

from synthmed.data.decode import DecodeOptions, decode_files
from synthmed.data.imagefolder import read_imageclef, read_imagefolder
from synthmed.data.manifest import build_manifest, check_pixels_not_shared
from synthmed.data.problems import Problems
from synthmed.core.errors import PipelineError
from tests.helpers import write_imagefolder

OPTS = DecodeOptions(resolution=16)


def read(root, on_error="fail", opts=OPTS):
    problems = Problems(on_error)
    return read_imagefolder(root, opts, problems, workers=1), problems


def test_reads_resizes_and_merges_captions(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one"), ("a.png", "two"), ("b.png", "three")],
                             label=["x", "x", "y"], group=["p1", "p1", "p2"])
    samples, _ = read(root)
    assert [s.file_name for s in samples] == ["a.png", "b.png"]
    assert samples[0].captions == ["one", "two"] and samples[0].group == "p1" and samples[1].label == "y"
    assert samples[0].array().shape == (16, 16) and len(samples[0].source_sha256) == 64


def test_jsonl_with_caption_lists_and_subfolders(tmp_path):
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(root / "sub" / "a.jpg")
    lines = [{"file_name": "sub/a.jpg", "text": ["first", "second"], "label": "polyp"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    samples, _ = read(root, opts=DecodeOptions(resolution=16, channels=3, crop="crop"))
    (s,) = samples
    assert s.file_name == "sub__a.png" and s.captions == ["first", "second"] and s.label == "polyp"
    assert s.group == "sub/a.jpg" and s.array().shape == (16, 16, 3)


def test_group_defaults_to_image(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one")])
    assert read(root)[0][0].group == "a.png"


def _bomb(root):
    Image.new("L", (9000, 9000)).save(root / "b.png")


BAD_INPUT = [
    (lambda r: (r / "b.png").unlink(), "missing_image", "row 3: image 'b.png': file not found"),
    (lambda r: (r / "b.png").write_bytes(b""), "corrupt_image", "row 3: image 'b.png': zero-byte file"),
    (lambda r: (r / "b.png").write_bytes(b"\x89PNG garbage"), "corrupt_image", "row 3: image 'b.png': cannot decode"),
    (lambda r: (r / "metadata.csv").write_text("file_name,text\na.png,one\nb.png,  \n"), "empty_caption",
     "row 3: empty caption for 'b.png'"),
    (lambda r: (r / "metadata.csv").write_text("file_name,text\na.png,one\nb.gif,two\n"), "unsupported_extension",
     "row 3: image 'b.gif': use one of"),
    (lambda r: (r / "metadata.csv").write_text("file_name,text\na.png,one\na.png,one\n"), "duplicate_row",
     "row 3: duplicate of row 2"),
    (lambda r: (r / "metadata.csv").write_text("file_name,text,label\na.png,one,x\na.png,two,y\n"),
     "conflicting_rows", "row 3: 'a.png' has label/group/split"),
    (lambda r: (r / "metadata.csv").write_text("file_name,text\na.png,one\n../b.png,two\n"), "bad_file_name",
     "row 3: file_name '../b.png' must be a path inside"),
    (lambda r: ((r / "b.png").unlink(), (r / "b.png").mkdir()), "unreadable_image",
     "row 3: image 'b.png': cannot read"),
    (_bomb, "image_too_large", "row 3: image 'b.png': 9000x9000 pixels exceeds ingest.max_image_pixels"),
]


@pytest.mark.parametrize("mutate, reason, expected", BAD_INPUT, ids=[b[1] + str(i) for i, b in enumerate(BAD_INPUT)])
def test_bad_rows_fail_naming_file_row_and_fix_or_are_skipped(tmp_path, mutate, reason, expected):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one"), ("b.png", "two")])
    mutate(root)
    opts = DecodeOptions(resolution=16, max_image_pixels=10_000_000)
    with pytest.raises(PipelineError) as err:
        read(root, opts=opts)
    assert expected in str(err.value) and str(root / "metadata.csv") in str(err.value)
    samples, problems = read(root, "skip", opts=opts)
    assert [p.reason for p in problems.items] == [reason] and problems.items[0].row == 3
    assert [s.file_name for s in samples] == ["a.png"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("name,text\na.png,x\n", "row 1: missing column(s) file_name (found: name, text)"),
        ("file_name;text\na.png;x\n", "row 1: the file is semicolon-separated (';')"),
        ("file_name\ttext\na.png\tx\n", "row 1: the file is tab-separated"),
        ("file_name,text\n", "no rows; the dataset is empty"),
    ],
)
def test_unusable_metadata_stops_whatever_on_error(tmp_path, content, expected):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one")])
    (root / "metadata.csv").write_text(content)
    for mode in ("fail", "skip"):
        with pytest.raises(PipelineError, match="metadata.csv") as err:
            read(root, mode)
        assert expected in str(err.value)


def test_non_utf8_names_the_row(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one")])
    (root / "metadata.csv").write_bytes(b"file_name,text\na.png,caf\xe9\n")
    with pytest.raises(PipelineError, match=r"metadata.csv, row 2: not UTF-8 \(byte 0xe9\); re-save"):
        read(root)


def test_missing_metadata(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(PipelineError, match="metadata.csv: not found"):
        read(tmp_path / "ds")


def test_imageclef_layout_resolves_extensions_and_keeps_prompts_of_an_image_together(tmp_path):
    root = tmp_path / "clef"
    (root / "images").mkdir(parents=True)
    for name in ("cl8k_1", "cl8k_2"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.jpg")
    rows = ["Filename;Prompt", "cl8k_1;generate an image with one polyp", "cl8k_1.jpg;an image of a polyp",
            "cl8k_2;an image with no polyps; colon"]
    (root / "prompt-gt.csv").write_text("\n".join(rows[:3]) + '\ncl8k_2;"an image with no polyps; colon"\n')
    samples = read_imageclef(root, DecodeOptions(resolution=16, channels=3), Problems("fail"), workers=1)
    assert [s.file_name for s in samples] == ["cl8k_1.png", "cl8k_2.png"]
    assert samples[0].captions == ["generate an image with one polyp", "an image of a polyp"]
    assert samples[0].group == "cl8k_1.jpg" and samples[1].captions == ["an image with no polyps; colon"]


def test_imageclef_comma_file_is_reported_as_wrong_delimiter(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "prompt-gt.csv").write_text("Filename,Prompt\na,b\n")
    with pytest.raises(PipelineError, match=r"prompt-gt.csv, row 1: the file is comma-separated"):
        read_imageclef(tmp_path, OPTS, Problems("fail"))


def test_parallel_decode_matches_serial(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [(f"{i}.png", "c") for i in range(70)])
    paths = [root / f"{i}.png" for i in range(70)]
    serial, parallel = list(decode_files(paths, OPTS, workers=1)), list(decode_files(paths, OPTS, workers=2))
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(serial, parallel))


def test_identical_pixels_in_two_splits_are_rejected(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one"), ("b.png", "two")])
    (root / "b.png").write_bytes((root / "a.png").read_bytes())
    samples, _ = read(root)
    samples[0].split, samples[1].split = "train", "test"
    with pytest.raises(PipelineError, match="identical images in different splits: a.png"):
        check_pixels_not_shared(build_manifest(samples))


def test_a_large_dataset_is_written_in_subfolders_and_read_back(tmp_path, monkeypatch):
    import synthmed.data.imagefolder as imagefolder
    from synthmed.data.imagefolder import load_images, read_metadata, shard_file_names, write_imagefolder
    from synthmed.data.pixels import pixel_stack
    from synthmed.data.sample import Sample
    from synthmed.core.io import manifest_hash

    monkeypatch.chdir(tmp_path)  # the pixel store
    monkeypatch.setattr(imagefolder, "SHARD_ABOVE", 2)
    rng = np.random.default_rng(0)

    def samples(suffix, shape):
        return [Sample(f"img{i}{suffix}", rng.integers(0, 256, shape, dtype=np.uint8), [f"c{i}", f"d{i}"], f"g{i}")
                for i in range(3)]

    flat = samples(".png", (8, 8))[:2]
    shard_file_names(flat)  # at the threshold: names unchanged
    assert [s.file_name for s in flat] == ["img0.png", "img1.png"]
    images = samples(".png", (8, 8))
    shard_file_names(images)
    names = [s.file_name for s in images]
    assert all(n.count("/") == 1 and len(n.split("/")[0]) == 2 and n.endswith(f"/img{i}.png")
               for i, n in enumerate(names))
    write_imagefolder(tmp_path / "ds", images)
    assert sorted(p.relative_to(tmp_path / "ds").as_posix() for p in (tmp_path / "ds").rglob("*.png")) == sorted(names)
    meta = read_metadata(tmp_path / "ds")
    assert meta["file_name"].tolist() == [n for n in names for _ in range(2)]
    stack = pixel_stack(tmp_path / "ds", names, workers=1)
    assert np.array_equal(np.asarray(stack[:]), np.stack([s.array()[None] for s in images]))
    assert manifest_hash(tmp_path / "ds") is not None
    again, _ = read(tmp_path / "ds", opts=DecodeOptions(resolution=8))  # a written dataset is valid input
    assert [s.captions for s in again] == [s.captions for s in images]
    assert all(np.array_equal(a.array(), b.array()) for a, b in zip(again, images))

    volumes = samples(".npy", (4, 4, 4))  # 3-D: the same writer
    shard_file_names(volumes)
    write_imagefolder(tmp_path / "vols", volumes)
    loaded = load_images(tmp_path / "vols", read_metadata(tmp_path / "vols")["file_name"].unique().tolist())
    assert np.array_equal(loaded[:, 0], np.stack([s.array() for s in volumes]))


def test_masks_are_resized_as_their_images_by_nearest_neighbour_and_written_beside_them(tmp_path, monkeypatch):
    from synthmed.data.imagefolder import read_metadata, write_imagefolder as write

    root = write_imagefolder(tmp_path / "ds", [("a.png", "one"), ("b.png", "two")], size=32,
                             masks=["m/a.png", "m/b.png"])
    (root / "m").mkdir()
    labels = np.zeros((32, 32), np.uint8)
    labels[8:24, 8:24], labels[12:20, 12:20] = 1, 2
    Image.fromarray(labels).save(root / "m/a.png")
    Image.fromarray(labels[:, ::-1].copy()).save(root / "m/b.png")
    samples, _ = read(root)
    mask = samples[0].mask_array()
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 1, 2}  # no blended class in between
    assert np.array_equal(mask, labels[::2, ::2])
    monkeypatch.chdir(tmp_path)
    meta = write(tmp_path / "out", samples)
    assert meta["masks"].tolist() == ["masks/a.png", "masks/b.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out/masks/a.png")), mask)
    assert "masks" in read_metadata(tmp_path / "out").columns
    assert "masks" not in write(tmp_path / "plain", read(write_imagefolder(tmp_path / "p", [("c.png", "x")]))[0]).columns


@pytest.mark.parametrize("mask, fragment", [
    (np.zeros((16, 32), np.uint8), "32x16 pixels, its image 32x32; a mask must have its image's size"),
    (np.zeros((32, 32, 3), np.uint8), "mode RGB; a mask is one channel of class indices"),
])
def test_a_mask_that_cannot_belong_to_its_image_names_the_row_and_stops(tmp_path, mask, fragment):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one")], size=32, masks=["a_mask.png"])
    Image.fromarray(mask).save(root / "a_mask.png")
    with pytest.raises(PipelineError) as exc:
        read(root)
    message = str(exc.value)
    assert "metadata.csv, row 2" in message and "a_mask.png" in message and fragment in message and "\n" not in message
    samples, problems = read(root, on_error="skip")
    assert samples == [] and problems.items
