"""Tests for omnivae.data on tiny synthetic zips with known pixels; one slow test on the real data."""
import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import expected_ink, make_tiny_omniglot
from omnivae import data
from omnivae.data import DataError, GroupBatchSampler, Omniglot, load_set, prepare, split_by_drawer


def load_tiny(data_dir, cache_dir, size=105, **kwargs):
    kwargs.setdefault("check_counts", False)
    return load_set("background", size, data_dir=data_dir, cache_dir=cache_dir, progress=False, **kwargs)


def files_under(folder: Path) -> dict[str, int]:
    """Every file below folder with its mtime, to show that nothing was written."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test unless a test installs its own fake."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)


# --- labels and pixels ----------------------------------------------------------------------


def test_labels_parsed(tiny_data_dir, tiny_cache_dir):
    d = load_tiny(tiny_data_dir, tiny_cache_dir)
    # 2 alphabets x 3 characters x 4 drawers, ids 1..6, sorted by (character, drawer).
    assert len(d) == 24
    np.testing.assert_array_equal(d.character, np.repeat(np.arange(1, 7), 4))
    np.testing.assert_array_equal(d.drawer, np.tile(np.arange(1, 5), 6))
    assert d.alphabet_names == ["Alphabet_00", "Alphabet_01"]
    np.testing.assert_array_equal(d.alphabet, [0] * 12 + [1] * 12)
    assert (d.images.dtype, d.character.dtype, d.drawer.dtype, d.alphabet.dtype) == (
        np.uint8, np.int16, np.int8, np.int16)


def test_decoded_pixels_inverted_exactly(tiny_data_dir, tiny_cache_dir):
    d = load_tiny(tiny_data_dir, tiny_cache_dir, size=105)
    assert d.images.shape == (24, 105, 105)
    for row in range(len(d)):
        expected = np.where(expected_ink(int(d.character[row]), int(d.drawer[row])), 255, 0)
        np.testing.assert_array_equal(d.images[row], expected)


def box_weights(size: int) -> np.ndarray:
    """(size, 105): each source pixel goes, whole, to the output pixel whose footprint holds its centre."""
    scale = 105 / size
    centre = np.arange(105) + 0.5
    start = np.arange(size)[:, None] * scale
    weights = ((centre > start) & (centre <= start + scale)).astype(float)
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("size", [28, 32, 64])
def test_box_resize_known_answer(tiny_data_dir, tiny_cache_dir, size):
    d = load_tiny(tiny_data_dir, tiny_cache_dir, size=size)
    assert d.images.shape == (24, size, size)
    weights = box_weights(size)
    edges = np.arange(size + 1) * 105 / size  # footprint of each output pixel in source pixels
    for row in range(len(d)):
        ink = expected_ink(int(d.character[row]), int(d.drawer[row]))
        image = d.images[row].astype(float)
        # The box filter averages each footprint (up to rounding to uint8)...
        np.testing.assert_allclose(image, weights @ (255.0 * ink) @ weights.T, atol=0.5 + 1e-9)
        # ...so the ink area is kept: footprints hold 3 or 4 source pixels, hence the tolerance.
        assert abs(image.mean() - 255 * ink.mean()) < 0.1 * 255 * ink.mean()
        # Footprints wholly inside the rectangle are full ink; wholly outside are blank.
        rows, cols = np.nonzero(ink)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        inside_r = (edges[:-1] >= top) & (edges[1:] <= bottom)
        inside_c = (edges[:-1] >= left) & (edges[1:] <= right)
        outside_r = (edges[1:] <= top) | (edges[:-1] >= bottom)
        outside_c = (edges[1:] <= left) | (edges[:-1] >= right)
        assert (image[np.ix_(inside_r, inside_c)] == 255).all()
        assert (image[outside_r] == 0).all() and (image[:, outside_c] == 0).all()


@pytest.mark.parametrize("size", [28, 105])
def test_prepare_is_bit_identical_to_cache(tiny_data_dir, tiny_cache_dir, tmp_path, size):
    d = load_tiny(tiny_data_dir, tiny_cache_dir, size=size)
    x = d.tensors()
    assert x.shape == (24, 1, size, size) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    with zipfile.ZipFile(tiny_data_dir / "images_background.zip") as z:
        png = z.read("images_background/Alphabet_01/character02/0005_03.png")
    row = int(np.flatnonzero((d.character == 5) & (d.drawer == 3))[0])
    path = tmp_path / "0005_03.png"
    path.write_bytes(png)
    from_path = prepare(path, size=size)
    assert from_path.shape == (1, size, size) and from_path.dtype == torch.float32
    assert torch.equal(from_path, x[row])
    assert torch.equal(prepare(str(path), size=size), x[row])
    assert torch.equal(prepare(Image.open(path), size=size), x[row])


def test_prepare_rejects_wrong_size_and_bad_file(tmp_path):
    with pytest.raises(DataError, match="100x100, expected 105x105"):
        prepare(Image.new("1", (100, 100)))
    with pytest.raises(DataError, match="image size 30"):
        prepare(Image.new("1", (105, 105)), size=30)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="bad.png"):
        prepare(bad)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_prepare_puts_transparent_images_on_white_paper(tmp_path, mode):
    """Transparent pixels are paper, whatever colour they store: only the opaque stroke is ink."""
    ink = expected_ink(5, 3)
    rgba = np.zeros((105, 105, 4), dtype=np.uint8)  # transparent black everywhere
    rgba[ink] = (0, 0, 0, 255)  # opaque black stroke
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    path = tmp_path / "drawn.png"
    image.save(path)
    x = prepare(path, size=105)[0]  # (105, 105)
    assert torch.equal(x, torch.from_numpy(ink).float())


def test_subset_and_tensors(tiny_data_dir, tiny_cache_dir):
    d = load_tiny(tiny_data_dir, tiny_cache_dir, size=28)
    by_mask = d.subset(d.alphabet == 1)
    by_index = d.subset(np.arange(12, 24))
    assert isinstance(by_mask, Omniglot) and len(by_mask) == 12
    for a, b in [(by_mask.images, by_index.images), (by_mask.character, by_index.character)]:
        np.testing.assert_array_equal(a, b)
    assert set(by_mask.character.tolist()) == {4, 5, 6}
    assert by_mask.alphabet_names == d.alphabet_names
    assert torch.equal(by_mask.tensors(), d.tensors()[12:])


# --- cache --------------------------------------------------------------------------------


def test_cache_is_reused_and_fast(tiny_data_dir, tiny_cache_dir, monkeypatch):
    first = load_tiny(tiny_data_dir, tiny_cache_dir, size=28)
    cached = list(tiny_cache_dir.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("omniglot_background_28_")
    assert cached[0].suffix == ".npz"
    # The cache must load without pickle (the alphabet names are a fixed-width string array).
    with np.load(cached[0], allow_pickle=False) as f:
        assert f["alphabet_names"].dtype.kind == "U"

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")
    monkeypatch.setattr(data, "_decode_bytes", no_decoding)
    start = time.perf_counter()
    second = load_tiny(tiny_data_dir, tiny_cache_dir, size=28)
    assert time.perf_counter() - start < 0.5
    for field in ("images", "character", "drawer", "alphabet"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    assert second.alphabet_names == first.alphabet_names
    # Another size is its own cache entry.
    monkeypatch.undo()
    load_tiny(tiny_data_dir, tiny_cache_dir, size=32)
    assert len(list(tiny_cache_dir.iterdir())) == 2


def test_changed_source_is_decoded_again(tiny_data_dir, tiny_cache_dir):
    assert len(load_tiny(tiny_data_dir, tiny_cache_dir)) == 24
    make_tiny_omniglot(tiny_data_dir, drawers=5)  # overwrite the zip with a different set
    d = load_tiny(tiny_data_dir, tiny_cache_dir)
    assert len(d) == 30 and d.drawer.max() == 5
    assert len(list(tiny_cache_dir.iterdir())) == 1  # the stale entry is gone


def test_unreadable_cache_is_rebuilt(tiny_data_dir, tiny_cache_dir):
    load_tiny(tiny_data_dir, tiny_cache_dir)
    (cache_file,) = tiny_cache_dir.iterdir()
    cache_file.write_bytes(b"garbage")
    assert len(load_tiny(tiny_data_dir, tiny_cache_dir)) == 24
    with np.load(cache_file, allow_pickle=False) as f:
        assert f["images"].shape == (24, 105, 105)


def test_failing_decode_writes_no_cache(tmp_path, tiny_cache_dir):
    make_tiny_omniglot(tmp_path / "data", corrupt="png")
    with pytest.raises(DataError):
        load_tiny(tmp_path / "data", tiny_cache_dir)
    assert files_under(tiny_cache_dir) == {}


def test_failing_cache_write_leaves_no_partial_file(tiny_data_dir, tiny_cache_dir, monkeypatch):
    def half_written(f, **arrays):
        f.write(b"PK partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data.np, "savez", half_written)
    with pytest.warns(UserWarning, match="could not cache"):
        d = load_tiny(tiny_data_dir, tiny_cache_dir)
    assert len(d) == 24  # the data is still returned
    assert files_under(tiny_cache_dir) == {}


def test_existing_cache_survives_bad_source(tiny_data_dir, tiny_cache_dir):
    load_tiny(tiny_data_dir, tiny_cache_dir)
    before = files_under(tiny_cache_dir)
    make_tiny_omniglot(tiny_data_dir, corrupt="size")
    with pytest.raises(DataError):
        load_tiny(tiny_data_dir, tiny_cache_dir)
    assert files_under(tiny_cache_dir) == before


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("corrupt, message", [
    ("png", r"images_background/Alphabet_00/character01/0001_02\.png is not a readable PNG"),
    ("size", r"images_background/Alphabet_00/character01/0001_02\.png is 100x100, expected 105x105"),
    ("name", r"unexpected member 'images_background/Alphabet_00/character01/0001_02_x\.png'"),
    ("truncated", r"images_background\.zip is not a readable zip"),
    ("parent", r"unsafe member name '\.\./evil\.png'"),
    ("absolute", r"unsafe member name '/evil\.png'"),
])
def test_bad_zip_raises_one_line_error(tmp_path, tiny_cache_dir, corrupt, message):
    data_dir = tmp_path / "data"
    make_tiny_omniglot(data_dir, corrupt=corrupt)
    before = files_under(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        load_tiny(data_dir, tiny_cache_dir)
    assert "\n" not in str(info.value)
    # Nothing was written anywhere: not beside the zip, not in its parent, not in the cache.
    assert files_under(tmp_path) == before
    assert not (tmp_path / "evil.png").exists() and not Path("/evil.png").exists()


def test_member_outside_set_folder_rejected(tmp_path, tiny_cache_dir):
    path = make_tiny_omniglot(tmp_path / "data")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("images_evaluation/A/character01/0001_01.png", b"")
    with pytest.raises(DataError, match="not under images_background/"):
        load_tiny(tmp_path / "data", tiny_cache_dir)


def test_macos_litter_is_ignored(tmp_path, tiny_cache_dir):
    path = make_tiny_omniglot(tmp_path / "data")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("__MACOSX/images_background/._x", b"")
        z.writestr("images_background/.DS_Store", b"")
    assert len(load_tiny(tmp_path / "data", tiny_cache_dir)) == 24


def test_count_check_fires_on_tiny_set(tiny_data_dir, tiny_cache_dir):
    expected = ("expected 30 alphabets, 964 characters, 19280 images; "
                "found 2 alphabets, 6 characters, 24 images")
    with pytest.raises(DataError, match=expected):
        load_tiny(tiny_data_dir, tiny_cache_dir, check_counts=True)
    assert files_under(tiny_cache_dir) == {}
    # A cache written without the check does not let a partial set pass the check later.
    load_tiny(tiny_data_dir, tiny_cache_dir, check_counts=False)
    with pytest.raises(DataError, match=expected):
        load_tiny(tiny_data_dir, tiny_cache_dir, check_counts=True)


def test_unknown_set_and_size(tiny_data_dir, tiny_cache_dir):
    with pytest.raises(DataError, match="unknown Omniglot set 'nope'"):
        load_set("nope", data_dir=tiny_data_dir, cache_dir=tiny_cache_dir)
    with pytest.raises(DataError, match="image size 50 is not supported"):
        load_set("background", 50, data_dir=tiny_data_dir, cache_dir=tiny_cache_dir)


# --- where the data lives -------------------------------------------------------------------


def test_extracted_folder_gives_same_data(tmp_path, tiny_data_dir, tiny_cache_dir):
    folder = make_tiny_omniglot(tmp_path / "extracted", extracted=True)
    assert folder == tmp_path / "extracted" / "images_background"
    from_zip = load_tiny(tiny_data_dir, tiny_cache_dir, size=28)
    from_folder = load_tiny(tmp_path / "extracted", tiny_cache_dir, size=28)
    for field in ("images", "character", "drawer", "alphabet"):
        np.testing.assert_array_equal(getattr(from_zip, field), getattr(from_folder, field))
    assert len(list(tiny_cache_dir.iterdir())) == 1  # same content, but a different source fingerprint
    # Adding a file to the folder changes its fingerprint.
    (folder / "Alphabet_00" / "character01" / "0001_05.png").write_bytes(
        (folder / "Alphabet_00" / "character01" / "0001_01.png").read_bytes())
    assert len(load_tiny(tmp_path / "extracted", tiny_cache_dir, size=28)) == 25


def test_extracted_folder_symlink_outside_rejected(tmp_path, tiny_cache_dir):
    folder = make_tiny_omniglot(tmp_path / "extracted", extracted=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    os.symlink(secret, folder / "Alphabet_00" / "character01" / "0001_09.png")
    with pytest.raises(DataError, match="points outside"):
        load_tiny(tmp_path / "extracted", tiny_cache_dir)


def test_extracted_folder_bad_png_named(tmp_path, tiny_cache_dir):
    make_tiny_omniglot(tmp_path / "extracted", extracted=True, corrupt="size")
    with pytest.raises(DataError, match="0001_02.png is 100x100"):
        load_tiny(tmp_path / "extracted", tiny_cache_dir)


@pytest.mark.parametrize("extracted", [False, True])
def test_read_only_data_dir(tmp_path, tiny_cache_dir, extracted):
    data_dir = tmp_path / "data"
    make_tiny_omniglot(data_dir, extracted=extracted)
    before = files_under(data_dir)
    data_dir.chmod(0o555)
    try:
        assert data.fetch(data_dir, sets=("background",), progress=False) == data_dir
        assert len(load_tiny(data_dir, tiny_cache_dir, size=28)) == 24
        assert len(load_tiny(data_dir, tiny_cache_dir, size=28)) == 24
    finally:
        data_dir.chmod(0o755)
    # Tests run as root, where chmod does not stop writes: check that none happened.
    assert files_under(data_dir) == before
    assert len(list(tiny_cache_dir.iterdir())) == 1


def test_default_dirs(monkeypatch, tmp_path):
    monkeypatch.delenv("OMNIVAE_DATA_DIR", raising=False)
    monkeypatch.delenv("OMNIVAE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "omnivae" / "data"
    assert data.default_cache_dir() == tmp_path / "xdg" / "omnivae" / "arrays"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_data_dir() == tmp_path / "home" / ".cache" / "omnivae" / "data"
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "omnivae" / "arrays"
    monkeypatch.setenv("OMNIVAE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("OMNIVAE_CACHE_DIR", str(tmp_path / "c"))
    assert data.default_data_dir() == tmp_path / "d"
    assert data.default_cache_dir() == tmp_path / "c"


def test_load_set_uses_default_dirs(monkeypatch, tiny_data_dir, tiny_cache_dir):
    monkeypatch.setenv("OMNIVAE_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("OMNIVAE_CACHE_DIR", str(tiny_cache_dir))
    assert len(load_set("background", 28, progress=False, check_counts=False)) == 24
    assert len(list(tiny_cache_dir.iterdir())) == 1


# --- fetch ----------------------------------------------------------------------------------


class FakeResponse(io.BytesIO):
    """What urlopen returns, enough for fetch: read(), headers and a context manager."""

    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def fake_urlopen(payload: bytes, calls: list):
    def urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse(payload)
    return urlopen


def test_fetch_with_local_data_does_no_network(tiny_data_dir, tmp_path):
    # The autouse no_network fixture makes any download attempt fail.
    assert data.fetch(tiny_data_dir, sets=("background",), progress=False) == tiny_data_dir
    make_tiny_omniglot(tmp_path / "x", set_name="evaluation", start_charid=965, extracted=True)
    make_tiny_omniglot(tmp_path / "x", set_name="background")
    assert data.fetch(tmp_path / "x", progress=False) == tmp_path / "x"


def test_fetch_downloads_and_checks_md5(tmp_path, monkeypatch):
    payload = make_tiny_omniglot(tmp_path / "upstream").read_bytes()
    info = data.SETS["background"]
    monkeypatch.setitem(data.SETS, "background", info._replace(md5=hashlib.md5(payload).hexdigest()))
    calls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen(payload, calls))
    data_dir = tmp_path / "new" / "data"
    assert data.fetch(data_dir, sets="background", progress=False) == data_dir
    assert calls == ["https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip"]
    assert (data_dir / "images_background.zip").read_bytes() == payload
    assert [p.name for p in data_dir.iterdir()] == ["images_background.zip"]  # no temp file left
    # Present now: a second fetch does not download.
    data.fetch(data_dir, sets="background", progress=False)
    assert len(calls) == 1


def test_fetch_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen(b"not the omniglot zip", calls))
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="corrupt: MD5 .*, expected 6b91aef0f799c5bb55b94e3f2daec811"):
        data.fetch(data_dir, sets=("evaluation",), progress=False)
    assert len(calls) == 1
    assert list(data_dir.iterdir()) == []


def test_fetch_network_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise data.urllib.error.URLError("no route to host")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download .*no route to host.*images_background.zip into .* by hand"):
        data.fetch(tmp_path, sets=("background",), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_set_fetches_missing_data(tmp_path, monkeypatch, tiny_cache_dir):
    payload = make_tiny_omniglot(tmp_path / "upstream", set_name="evaluation", start_charid=965).read_bytes()
    info = data.SETS["evaluation"]
    monkeypatch.setitem(data.SETS, "evaluation", info._replace(md5=hashlib.md5(payload).hexdigest()))
    calls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen(payload, calls))
    d = load_set("evaluation", 28, data_dir=tmp_path / "data", cache_dir=tiny_cache_dir,
                 progress=False, check_counts=False)
    assert len(calls) == 1 and len(d) == 24
    assert d.character.min() == 965 and d.character.max() == 970


# --- split and sampler ----------------------------------------------------------------------


def test_split_by_drawer(tmp_path, tiny_cache_dir):
    make_tiny_omniglot(tmp_path / "data", alphabets=1, characters=2, drawers=20)
    d = load_tiny(tmp_path / "data", tiny_cache_dir, size=28)
    train, validation = split_by_drawer(d)
    assert (len(train), len(validation)) == (36, 4)
    assert set(train.drawer.tolist()) == set(range(1, 19))
    assert set(validation.drawer.tolist()) == {19, 20}
    assert set(train.character.tolist()) == set(validation.character.tolist()) == {1, 2}
    np.testing.assert_array_equal(validation.images, d.images[np.isin(d.drawer, [19, 20])])
    train, validation = split_by_drawer(d, val_drawers=[1])
    assert (len(train), len(validation)) == (38, 2)


def test_split_by_drawer_missing_drawers(tiny_data_dir, tiny_cache_dir):
    d = load_tiny(tiny_data_dir, tiny_cache_dir, size=28)  # drawers 1..4 only
    with pytest.raises(DataError, match="0 validation images"):
        split_by_drawer(d)


def check_batch(batch, character, groups, per_group):
    assert len(batch) == groups * per_group
    assert len(set(batch)) == len(batch)  # distinct drawings
    group_chars = [set(character[batch[g * per_group:(g + 1) * per_group]].tolist()) for g in range(groups)]
    assert all(len(c) == 1 for c in group_chars)  # each group is one character
    assert len(set.union(*group_chars)) == groups  # distinct characters


def test_group_sampler_known_answer():
    # 3 characters x 4 drawings, batches of 3 characters x 2 drawings: 2 batches that hold
    # every character twice and every index once.
    character = np.repeat([7, 8, 9], 4)
    sampler = GroupBatchSampler(character, groups=3, per_group=2, seed=1)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 2
    for batch in batches:
        check_batch(batch, character, 3, 2)
    assert sorted(batches[0] + batches[1]) == list(range(12))


def test_group_sampler_epoch_and_seed():
    rng = np.random.default_rng(0)
    character = rng.permutation(np.concatenate([np.repeat(np.arange(10), 20), [99, 99]]))
    sampler = GroupBatchSampler(character, groups=3, per_group=4, seed=5)
    # 10 characters x 5 chunks of 4 = 50 chunks -> 16 full batches; character 99 is too small.
    assert len(sampler) == 16
    epoch0 = list(sampler)
    assert len(epoch0) == 16
    for batch in epoch0:
        check_batch(batch, character, 3, 4)
        assert 99 not in character[batch]
    flat = sum(epoch0, [])
    assert len(set(flat)) == len(flat) == 16 * 12  # no drawing twice in an epoch
    assert list(sampler) == epoch0  # same seed and epoch: same batches
    assert list(GroupBatchSampler(character, 3, 4, seed=5)) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    assert list(GroupBatchSampler(character, 3, 4, seed=6)) != epoch0


def test_group_sampler_keep_last():
    character = np.repeat(np.arange(10), 20)
    sampler = GroupBatchSampler(character, groups=3, per_group=4, drop_last=False)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 17
    last = batches[-1]
    assert len(last) == 8  # the 2 leftover chunks
    check_batch(last, character, 2, 4)
    flat = sum(batches, [])
    assert len(set(flat)) == len(flat) == 200


@pytest.mark.parametrize("seed", range(5))
def test_group_sampler_uneven_counts(seed):
    # Characters with very different numbers of drawings: batches must still never repeat one.
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 40, size=25)
    character = rng.permutation(np.repeat(np.arange(25), counts))
    sampler = GroupBatchSampler(character, groups=5, per_group=3, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        check_batch(batch, character, 5, 3)
    flat = sum(batches, [])
    assert len(set(flat)) == len(flat)


def test_group_sampler_with_dataloader():
    images = torch.arange(40, dtype=torch.float32)
    character = np.repeat(np.arange(4), 10)
    dataset = torch.utils.data.TensorDataset(images, torch.from_numpy(character))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=GroupBatchSampler(character, 2, 5))
    for x, c in loader:
        assert x.shape == (10,)
        assert len(set(c[:5].tolist())) == 1 and len(set(c[5:].tolist())) == 1 and c[0] != c[5]


def test_group_sampler_too_few_characters():
    with pytest.raises(DataError, match="need at least 3 characters with >= 5 drawings each, found 2"):
        GroupBatchSampler(np.repeat([1, 2, 3], [5, 6, 4]), groups=3, per_group=5)


# --- real data ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_evaluation_set(tmp_path):
    root = os.environ.get("OMNIVAE_TEST_DATA")
    if not root:
        pytest.skip("set OMNIVAE_TEST_DATA to the folder holding the Omniglot zips")
    if not Path(root).is_dir():
        pytest.fail(f"OMNIVAE_TEST_DATA={root} is not a folder")
    d = load_set("evaluation", 28, data_dir=root, cache_dir=tmp_path, progress=False)
    assert d.images.shape == (13180, 28, 28)
    assert len(np.unique(d.character)) == 659
    assert len(d.alphabet_names) == 20 and len(np.unique(d.alphabet)) == 20
    assert set(d.drawer.tolist()) == set(range(1, 21))
    assert (d.character.min(), d.character.max()) == (965, 1623)
    assert 0.03 < d.images.mean() / 255 < 0.2  # mostly background, after inversion


def test_load_digits_looks_like_omniglot():
    images, labels = data.load_digits(28)
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.unique(labels), np.arange(10)) and np.bincount(labels).min() >= 170
    # Ink = 255 on a blank background, with a 5-pixel margin on every side like Omniglot's glyphs.
    assert images[:, :5].max() == images[:, -5:].max() == images[:, :, :5].max() == images[:, :, -5:].max() == 0
    ink = images > 127
    assert 0.05 < ink.mean() < 0.25  # strokes, not a filled square or an empty page
    assert images.max() == 255
    big, _ = data.load_digits(64)
    assert big.shape == (1797, 64, 64) and big[:, :11].max() == 0
