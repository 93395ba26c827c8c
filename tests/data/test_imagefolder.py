import pytest

from synthmed.data.imagefolder import read_imagefolder
from synthmed.data.manifest import build_manifest, check_pixels_not_shared
from synthmed.errors import PipelineError
from tests.helpers import write_imagefolder


def test_reads_resizes_and_merges_captions(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one"), ("a.png", "two"), ("b.png", "three")],
                             label=["x", "x", "y"], group=["p1", "p1", "p2"])
    samples = read_imagefolder(root, resolution=16)
    assert [s.file_name for s in samples] == ["a.png", "b.png"]
    assert samples[0].captions == ["one", "two"] and samples[0].group == "p1" and samples[1].label == "y"
    assert samples[0].pixels.shape == (16, 16) and len(samples[0].source_sha256) == 64


def test_group_defaults_to_image(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one")])
    assert read_imagefolder(root, resolution=8)[0].group == "a.png"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: (r / "b.png").unlink(), "row 3: image 'b.png' not found"),
        (lambda r: (r / "b.png").write_bytes(b""), "row 3: cannot decode image 'b.png'"),
        (lambda r: (r / "metadata.csv").write_text("file_name,text\na.png,one\nb.png,  \n"), "row 3: empty caption"),
        (lambda r: (r / "metadata.csv").write_text("name,text\na.png,x\n"), "missing column(s) file_name"),
        (lambda r: (r / "metadata.csv").write_bytes(b"file_name,text\na.png,caf\xe9\n"), "not UTF-8"),
        (lambda r: (r / "metadata.csv").write_text("file_name,text\na.gif,x\n"), "unsupported extension"),
        (lambda r: (r / "metadata.csv").unlink(), "metadata.csv: not found"),
    ],
)
def test_bad_input_names_file_and_row(tmp_path, mutate, expected):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one"), ("b.png", "two")])
    mutate(root)
    with pytest.raises(PipelineError) as err:
        read_imagefolder(root, resolution=8)
    assert expected in str(err.value) and "metadata.csv" in str(err.value)


def test_identical_pixels_in_two_splits_are_rejected(tmp_path):
    root = write_imagefolder(tmp_path / "ds", [("a.png", "one"), ("b.png", "two")])
    (root / "b.png").write_bytes((root / "a.png").read_bytes())
    samples = read_imagefolder(root, resolution=8)
    samples[0].split, samples[1].split = "train", "test"
    with pytest.raises(PipelineError, match="identical images in different splits: a.png"):
        check_pixels_not_shared(build_manifest(samples))
