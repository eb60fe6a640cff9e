"""Tests of calibration/manifest.py (and images.py): CSV image manifests."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fqexport.calibration.manifest import load_csv_manifest
from fqexport.calibration.readers import load_data
from fqexport.errors import DataError


def _write_png(path, array, mode):
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path)


def _manifest(tmp_path, rows, header="path,label,group"):
    path = tmp_path / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_load_csv_manifest_grayscale(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "img").mkdir()
    _write_png(tmp_path / "img" / "a.png", np.array([[0, 255], [51, 102]], np.uint8), "L")
    _write_png(tmp_path / "img" / "b.png", np.full((2, 2), 255, np.uint8), "L")
    _write_png(tmp_path / "img" / "c.png", np.zeros((2, 2), np.uint8), "L")
    path = _manifest(tmp_path, ["img/a.png,1,dark", "img/b.png,0,light", "img/c.png,2,dark"])
    data = load_csv_manifest(path)
    assert data.x.shape == (3, 1, 2, 2) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x[0, 0], [[0.0, 1.0], [0.2, 0.4]], atol=1e-6)
    assert data.y.tolist() == [1, 0, 2]
    assert data.group_names == ("dark", "light")
    assert data.group.tolist() == [0, 1, 0]


def test_load_csv_manifest_rgb_chw_and_integer_groups(tmp_path, caplog):
    pytest.importorskip("PIL")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 255  # red channel
    rgb[0, 0, 2] = 51
    _write_png(tmp_path / "r.png", rgb, "RGB")
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 7, np.uint8)], axis=2)
    _write_png(tmp_path / "q.png", rgba, "RGBA")
    with caplog.at_level("WARNING", logger="fqexport.calibration.images"):
        data = load_csv_manifest(_manifest(tmp_path, ["r.png,0,1", "q.png,1,0", "q.png,1,0"]))
    assert data.x.shape == (3, 3, 2, 3)  # CHW, alpha dropped, said once for the file
    alpha = [r.getMessage() for r in caplog.records if "alpha channel" in r.getMessage()]
    assert len(alpha) == 1 and "line 3: image" in alpha[0] and "q.png has an alpha channel (mode RGBA)" in alpha[0]
    assert data.x[0, 0].min() == 1.0 and data.x[0, 1].max() == 0.0
    assert data.x[0, 2, 0, 0] == pytest.approx(0.2)
    assert data.group.tolist() == [1, 0, 0] and data.group_names == ("group0", "group1")


def test_a_manifest_merging_spaced_group_names_says_so(tmp_path, caplog):
    """The manifest reader stripped ' leading' and 'leading ' into one group silently (survey 52)."""
    pytest.importorskip("PIL")
    _write_png(tmp_path / "r.png", np.zeros((2, 3, 3), np.uint8), "RGB")
    with caplog.at_level("WARNING", logger="fqexport.calibration.groups"):
        data = load_csv_manifest(_manifest(tmp_path, ['r.png,0,"a "', "r.png,1,a", "r.png,1,b"]))
    assert data.group_names == ("a", "b")
    assert "the group names 'a', 'a ' differ only by spaces around them" in caplog.text


def test_load_csv_manifest_errors(tmp_path):
    pytest.importorskip("PIL")
    _write_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8), "L")
    _write_png(tmp_path / "big.png", np.zeros((3, 3), np.uint8), "L")
    _write_png(tmp_path / "rgb.png", np.zeros((2, 2, 3), np.uint8), "RGB")
    with pytest.raises(DataError, match=r"line 3: image big.png is 1x3x3 \(CHW\) but a.png is 1x2x2"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,0,g", "big.png,0,g"]))
    with pytest.raises(DataError, match="image rgb.png is 3x2x2"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,0,g", "rgb.png,0,g"]))
    with pytest.raises(DataError, match="manifest.csv line 2: image file not found: .*nope.png"):
        load_csv_manifest(_manifest(tmp_path, ["nope.png,0,g"]))
    with pytest.raises(DataError, match=r"missing column 'group' in the header \['path', 'label'\]"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,0"], header="path,label"))
    with pytest.raises(DataError, match="column 'label' must be an integer class id, got 'cat'"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,cat,g"]))
    with pytest.raises(DataError, match="manifest.csv: the dataset is empty"):
        load_csv_manifest(_manifest(tmp_path, []))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="line 2: cannot read image .*junk.png"):
        load_csv_manifest(_manifest(tmp_path, ["junk.png,0,g"]))
    with pytest.raises(DataError, match="field 'y' holds the negative label -2"):
        load_csv_manifest(_manifest(tmp_path, ["a.png,-2,g"]))
    with pytest.raises(DataError, match="absent.csv: file not found"):
        load_csv_manifest(tmp_path / "absent.csv")


def test_load_csv_manifest_without_pillow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails
    path = _manifest(tmp_path, ["a.png,0,g"])
    with pytest.raises(DataError, match=r'pip install "fqexport\[images\]"'):
        load_csv_manifest(path)


def test_transform_resizes_and_normalises_each_image_before_they_are_stacked(tmp_path):
    pytest.importorskip("PIL")
    import torch

    _write_png(tmp_path / "big.png", np.full((4, 6, 3), 255, np.uint8), "RGB")
    _write_png(tmp_path / "small.png", np.zeros((2, 2, 3), np.uint8), "RGB")
    path = _manifest(tmp_path, ["big.png,0,a", "small.png,1,b"])
    with pytest.raises(DataError, match=r"all images must share one size and channel count \(resize them with transform="):
        load_csv_manifest(path)

    def transform(x):  # [1, 3, H, W] in [0, 1]
        assert x.shape[0] == 1
        return (torch.nn.functional.interpolate(x, size=(3, 3)) - 0.5) / 0.25

    data = load_csv_manifest(path, transform=transform)
    assert data.x.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(data.x[0], 2.0)  # white, normalised
    np.testing.assert_allclose(data.x[1], -2.0)  # black
    stream = load_data(path, transform=transform)  # the same images read batch by batch
    np.testing.assert_array_equal(stream.take().x, data.x)
    assert stream.y.tolist() == [0, 1] and stream.group_names == ("a", "b")


def test_a_streamed_manifest_with_integer_group_ids_reads(tmp_path):
    """load_data streams a manifest: each item's group must be the id the column's ids give."""
    pytest.importorskip("PIL")
    for i in range(6):
        _write_png(tmp_path / f"{i}.png", np.full((4, 4, 3), 40 * i, np.uint8), "RGB")
    path = _manifest(tmp_path, [f"{i}.png,{i % 3},{i % 2}" for i in range(6)])
    data = load_data(path)
    assert data.group_names == ("group0", "group1")
    full = data.take()
    assert full.x.shape == (6, 3, 4, 4) and full.group.tolist() == [0, 1, 0, 1, 0, 1]
    np.testing.assert_allclose(full.x[:, 0, 0, 0], [40 * i / 255 for i in range(6)], atol=1e-6)


def test_palette_images_keep_their_colours(tmp_path):
    """A palette PNG (mode P) is colour unless every palette entry is grey."""
    pytest.importorskip("PIL")
    from PIL import Image

    colour = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    colour.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    colour.save(tmp_path / "c.png")
    grey = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    grey.putpalette([51, 51, 51, 204, 204, 204] + [0] * 762)
    grey.save(tmp_path / "g.png")
    data = load_csv_manifest(_manifest(tmp_path, ["c.png,0,a", "c.png,1,b"]))
    assert data.x.shape == (2, 3, 2, 2)
    np.testing.assert_allclose(data.x[0, :, 0, 0], [1.0, 0.0, 0.0])  # red, not its luminance
    np.testing.assert_allclose(data.x[0, :, 0, 1], [0.0, 0.0, 1.0])
    data = load_csv_manifest(_manifest(tmp_path, ["g.png,0,a"]))
    assert data.x.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(data.x[0, 0], [[0.2, 0.8], [0.8, 0.2]], atol=1e-6)


def test_numeric_group_columns_that_are_not_ids_are_names_and_a_shape_error_names_the_image(tmp_path):
    """Years or site numbers in the group column name groups, group<N> as an npz's ids are named
    (survey 17: 2019/2020 were refused as ids with a gap); an image of another size is named with its line."""
    pytest.importorskip("PIL")
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", np.full((4, 4, 3), 40 * i, np.uint8), "RGB")
    _write_png(tmp_path / "small.png", np.zeros((2, 2, 3), np.uint8), "RGB")
    years = load_data(_manifest(tmp_path, [f"{i}.png,0,{2019 + i % 2}" for i in range(4)]))
    assert years.group_names == ("group2019", "group2020") and years.take().group.tolist() == [0, 1, 0, 1]
    # integer ids name their group group<N> whichever are present: a test CSV without group 1 is
    # group0 / group2, which a calibration's group0..group2 matches (it was '0' / '2', which none
    # matched: a gate passed without group 1, survey 45)
    gap = load_data(_manifest(tmp_path, [f"{i}.png,0,{2 * (i % 2)}" for i in range(4)]))
    assert gap.group_names == ("group0", "group2") and gap.take().group.tolist() == [0, 1, 0, 1]
    full = load_data(_manifest(tmp_path, [f"{i}.png,0,{i % 3}" for i in range(4)]))
    assert full.group_names == ("group0", "group1", "group2")
    bad = _manifest(tmp_path, ["0.png,0,a", "1.png,0,b", "small.png,0,a"])
    with pytest.raises(DataError, match=r"sample 2: field 'x' has shape \(3, 2, 2\) .* \(line 4, image .*small\.png; sample 0: line 2, image .*0\.png\)"):
        load_data(bad).take()


def test_a_32_bit_integer_image_outside_16_bits_is_refused_and_inside_is_read_as_16_bit(tmp_path):
    """Mode 'I' was divided by 65535 whatever its values: an int32 TIFF came out up to ~15 (survey 45)."""
    pytest.importorskip("PIL")
    from PIL import Image

    Image.fromarray(np.full((4, 4), 998_067, np.int32)).save(tmp_path / "big.tif")
    Image.fromarray(np.full((4, 4), 65_535, np.int32)).save(tmp_path / "ok.tif")
    assert Image.open(tmp_path / "big.tif").mode == "I"
    with pytest.raises(DataError, match=r"big\.tif has 32-bit integer mode 'I' with values 998067\.\.998067, "
                                        r"outside the 16-bit range"):
        load_data(_manifest(tmp_path, ["big.tif,0,a", "ok.tif,1,b"])).take()
    data = load_data(_manifest(tmp_path, ["ok.tif,0,a", "ok.tif,1,b"])).take()
    assert data.x.shape == (2, 1, 4, 4) and float(data.x.max()) == 1.0


def test_a_shape_error_names_the_first_image_the_shape_was_read_from(tmp_path):
    """One grayscale image first in an RGB manifest: the error said the data set was 1-channel
    and named no file (an odd image in a later row is named; survey 45)."""
    pytest.importorskip("PIL")
    import torch

    from fqexport.config import QuantConfig
    from fqexport.pipeline.compress import compress

    _write_png(tmp_path / "g.png", np.zeros((8, 8), np.uint8), "L")
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", np.zeros((8, 8, 3), np.uint8), "RGB")
    data = load_data(_manifest(tmp_path, ["g.png,0,a", "0.png,1,b", "1.png,0,a", "2.png,1,b"]))
    assert data.shape_origin == f"sample 0: line 2, image {tmp_path / 'g.png'}"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 2)).eval()
    with pytest.raises(DataError, match=r"sample 1: field 'x' has shape \(3, 8, 8\) but sample 0 has \(1, 8, 8\); "
                                        r"all samples must share a shape \(line 3, image .*0\.png; sample 0: line 2, "
                                        r"image .*g\.png\)"):
        compress(model, data, QuantConfig(num_calib=4), progress=False)
    # validate's shape check reads the stream's shape from sample 0: it names that image
    from fqexport.calibration.stream import shape_origin_note

    assert shape_origin_note(data) == f" (x's shape as read from sample 0: line 2, image {tmp_path / 'g.png'})"


def test_groups_given_to_load_data_need_no_group_cells_in_the_manifest(tmp_path):
    """`groups=` supplies groups the samples do not carry, but every row still needed a group
    ("line 2: column 'group' is empty", survey 45)."""
    pytest.importorskip("PIL")
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", np.full((4, 4, 3), 40 * i, np.uint8), "RGB")
    path = _manifest(tmp_path, [f"{i}.png,{i % 2}," for i in range(4)])
    data = load_data(path, groups=np.array([0, 1, 1, 0])).take()
    assert data.x.shape == (4, 3, 4, 4) and data.group.tolist() == [0, 1, 1, 0] and data.y.tolist() == [0, 1, 0, 1]
    with pytest.raises(DataError, match=r"line 2: column 'group' is empty"):  # without groups= they are needed
        load_data(path)


def test_a_manifest_more_than_memory_holds_is_refused_before_its_reads(tmp_path, monkeypatch):
    """survey 79: a 545-byte CSV naming one 143 KB PNG (7000x7000) 44 times read images until memory
    ran out; the first image's size times the rows is known before the second read."""
    pytest.importorskip("PIL")
    import fqexport.calibration.manifest as manifest
    import fqexport.validation.measure as measure
    from fqexport.validation.measure import Runner

    _write_png(tmp_path / "a.png", np.zeros((20, 30, 3), np.uint8), "RGB")
    path = _manifest(tmp_path, [f"a.png,0,{'ab'[i % 2]}" for i in range(10)])
    monkeypatch.setattr(manifest, "available_memory_bytes", lambda: 144_000)  # 10 images x 7200 B, read and stacked
    assert load_csv_manifest(path).x.shape == (10, 3, 20, 30)
    monkeypatch.setattr(manifest, "available_memory_bytes", lambda: 143_999)
    with pytest.raises(DataError, match=r"manifest\.csv: 10 images of 3x20x30 \(CHW float32, as the first one\) need "
                                        r"0\.0 GB in memory, more than the 0\.0 GB available"):
        load_csv_manifest(path)
    # validate's batches: one must fit (64 samples here take 0.92 MB, read and fed)
    monkeypatch.setattr(manifest, "available_memory_bytes", lambda: 10**9)
    monkeypatch.setattr(measure, "available_memory_bytes", lambda: 900_000)
    with pytest.raises(DataError, match=r"a batch of 64 samples of 3x20x30 float32 takes 0\.0 GB .*lower --batch-size"):
        Runner(batch_size=64).measure(None, load_data(path), "m.onnx")
