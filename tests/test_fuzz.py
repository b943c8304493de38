"""Fuzzing the image and zip readers: random and mutated PNG and zip bytes give a result or a
one-line DataError, never another exception, a huge allocation or a changed cache folder."""
import io
import os
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import expected_ink, make_tiny_omniglot, png_bytes
from omnivae import data
from omnivae.data import DataError, load_set, prepare

TOP = "images_background"
SIGNATURE = b"\x89PNG\r\n\x1a\n"
SENTINEL = "omniglot_background_28_000000000000.npz"  # an older cache file a failed load must keep


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)


# --- building blocks ------------------------------------------------------------------------


def encode(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def ink_image(charid: int = 5, drawer: int = 3) -> np.ndarray:
    """(105, 105) uint8 grey: black ink on white paper."""
    return np.where(expected_ink(charid, drawer), 0, 255).astype(np.uint8)


def base_pngs() -> list[bytes]:
    """Valid 105x105 PNGs in the modes a user may hand in; the first is upstream-like (1-bit)."""
    grey = Image.fromarray(ink_image(), "L")
    rgba = grey.convert("RGBA")
    return [
        png_bytes(expected_ink(5, 3)),
        encode(grey),
        encode(grey, optimize=True),
        encode(grey.convert("RGB")),
        encode(rgba),
        encode(grey.convert("LA")),
        encode(grey.convert("P")),
        encode(Image.fromarray(ink_image().astype(np.uint16) * 257)),  # 16-bit grey
        interlaced(ink_image()),
    ]


def interlaced(grey: np.ndarray) -> bytes:
    """An 8-bit grey Adam7-interlaced PNG (PIL reads these but does not write them)."""
    rows = []
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    for x0, y0, dx, dy in passes:
        sub = grey[y0::dy, x0::dx]
        if sub.size:
            rows += [b"\x00" + row.tobytes() for row in sub]
    height, width = grey.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    return join_chunks([(b"IHDR", header), (b"IDAT", zlib.compress(b"".join(rows))), (b"IEND", b"")])


def split_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk after the signature; a cut-off tail is dropped."""
    chunks, pos = [], len(SIGNATURE)
    while pos + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunks.append((kind, png[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def join_chunks(chunks, good_crc: bool = True) -> bytes:
    out = [SIGNATURE]
    for kind, body in chunks:
        crc = zlib.crc32(kind + body) if good_crc else 0x12345678
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
    return b"".join(out)


def deflate_bomb(megabytes: int) -> bytes:
    """A raw deflate stream of `megabytes` MiB of zeros, built without compressing them all."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)  # the same bytes each time now
    return block + again * (megabytes - 1) + comp.flush()


# --- PNG inputs -----------------------------------------------------------------------------

HUGE = [0, 1, 104, 106, 46341, 65535, 1 << 20, 2**31 - 1, 2**31, 2**32 - 1]


def mutate_png(rng: np.random.Generator, png: bytes) -> tuple[str, bytes]:
    """One random mutation of a valid PNG, with a label naming its kind."""
    chunks = split_chunks(png)
    kind = rng.integers(9)
    if kind == 0:  # flip a few bytes anywhere after the signature
        out = bytearray(png)
        for pos in rng.integers(len(SIGNATURE), len(png), size=rng.integers(1, 9)):
            out[pos] ^= int(rng.integers(1, 256))
        return "png-flipped", bytes(out)
    if kind == 1:
        return "png-truncated", png[:int(rng.integers(0, len(png)))]
    if kind == 2:  # duplicate or delete whole chunks, CRCs kept right
        i = int(rng.integers(len(chunks)))
        if rng.random() < 0.5:
            chunks.insert(i, chunks[i])
            return "png-chunk-duplicated", join_chunks(chunks)
        del chunks[i]
        return "png-chunk-deleted", join_chunks(chunks)
    if kind == 3:  # IHDR: huge or zero size, bad bit depth, colour type, methods
        width, height, depth, colour, comp, filt, lace = struct.unpack(">IIBBBBB", chunks[0][1])
        field = rng.integers(4)
        if field == 0:
            width, height = int(rng.choice(HUGE)), int(rng.choice(HUGE))
        elif field == 1:
            depth = int(rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 32, 255]))
        elif field == 2:
            colour = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 255]))
        else:
            comp, filt, lace = (int(v) for v in rng.choice([0, 1, 2, 255], size=3))
        chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, comp, filt, lace))
        return "png-ihdr", join_chunks(chunks, good_crc=rng.random() < 0.8)
    if kind == 4:  # IDAT replaced: garbage, too little or too much pixel data, a bomb
        body = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8)),
                zlib.compress(bytes(10)), zlib.compress(bytes(1 << 16)),
                b"\x78\x9c" + deflate_bomb(8)][int(rng.integers(4))]
        chunks = [c for c in chunks if c[0] != b"IDAT"]
        chunks.insert(len(chunks) - 1, (b"IDAT", body))
        return "png-idat", join_chunks(chunks)
    if kind == 5:  # an ancillary or animation chunk with a random body
        name = [b"tRNS", b"PLTE", b"gAMA", b"iCCP", b"zTXt", b"iTXt", b"tEXt", b"pHYs", b"sBIT", b"eXIf",
                b"acTL", b"fcTL", b"fdAT", b"bKGD", b"cHRM", b"sRGB", b"tIME"][int(rng.integers(17))]
        body = bytes(rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8))
        chunks.insert(int(rng.integers(1, len(chunks))), (name, body))
        return "png-ancillary", join_chunks(chunks)
    if kind == 6:  # a text chunk that inflates far beyond its size
        bomb = b"Comment\x00\x00\x78\x9c" + deflate_bomb(4)
        chunks.insert(1, (b"zTXt", bomb))
        return "png-text-bomb", join_chunks(chunks)
    if kind == 7:  # a chunk that declares more bytes than the file holds
        cut = join_chunks(chunks[:1])  # signature and IHDR
        return "png-long-chunk", cut + struct.pack(">I", int(rng.choice([2**31 - 1, 2**32 - 1, 10**6]))) + b"IDAT"
    # shuffle the chunk order
    order = rng.permutation(len(chunks))
    return "png-chunks-shuffled", join_chunks([chunks[i] for i in order])


def png_inputs(count: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    bases = base_pngs()
    inputs = []
    for _ in range(count):
        if rng.random() < 0.15:
            body = bytes(rng.integers(0, 256, size=int(rng.integers(0, 400)), dtype=np.uint8))
            inputs.append(("png-random", (SIGNATURE if rng.random() < 0.5 else b"") + body))
        else:
            inputs.append(mutate_png(rng, bases[int(rng.integers(len(bases)))]))
    return inputs


# --- zip inputs -----------------------------------------------------------------------------


def member_names(alphabets: int = 1, characters: int = 2, drawers: int = 2) -> list[str]:
    names, charid = [], 1
    for a in range(alphabets):
        for c in range(characters):
            names += [f"{TOP}/Alphabet_{a:02d}/character{c + 1:02d}/{charid:04d}_{d:02d}.png"
                      for d in range(1, drawers + 1)]
            charid += 1
    return names


def build_zip(members, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """members: (name or ZipInfo, bytes) pairs, written in order (duplicates allowed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as z:
        for name, body in members:
            if isinstance(name, zipfile.ZipInfo):
                name.compress_type = compression
            z.writestr(name, body)
    return buffer.getvalue()


def valid_members() -> list[tuple[str, bytes]]:
    png = png_bytes(expected_ink(5, 3))
    return [(name, png) for name in member_names()]


def central_directory(blob: bytes) -> int:
    """The offset of the central directory, read from the end record."""
    end = blob.rfind(b"PK\x05\x06")
    return struct.unpack("<I", blob[end + 16:end + 20])[0]


# (offset in a central directory entry, struct format, values to write there)
CENTRAL_FIELDS = [
    (8, "<H", [1, 8, 0x41, 0xFFFF]),  # flags: encrypted, data descriptor, strong encryption
    (10, "<H", [1, 6, 9, 12, 14, 93, 99, 0xFFFF]),  # compression method
    (16, "<I", [0, 1, 0xFFFFFFFF]),  # CRC
    (20, "<I", [0, 1, 2**31, 0xFFFFFFFF]),  # compressed size
    (24, "<I", [0, 1, 2**30, 2**31, 0xFFFFFFFF]),  # declared file size
    (28, "<H", [0, 1, 200, 0xFFFF]),  # name length
    (30, "<H", [1, 4, 0xFFFF]),  # extra field length
    (34, "<H", [1, 0xFFFF]),  # disk number
    (38, "<I", [0xA1FF0000, 0x41ED0000]),  # external attributes: symlink, folder
    (42, "<I", [1, 2**31, 0xFFFFFFFF]),  # offset of the local header
]
LOCAL_FIELDS = [
    (6, "<H", [1, 0xFFFF]), (8, "<H", [6, 99]), (14, "<I", [0, 0xFFFFFFFF]),
    (22, "<I", [0, 2**31, 0xFFFFFFFF]), (26, "<H", [0, 0xFFFF]), (28, "<H", [0xFFFF]),
]
END_FIELDS = [(8, "<H", [0, 1, 0xFFFF]), (10, "<H", [0, 1, 0xFFFF]), (12, "<I", [0, 0xFFFFFFFF]),
              (16, "<I", [0, 1, 0xFFFFFFFF]), (20, "<H", [1, 0xFFFF])]


def patch_field(rng, blob: bytes, signature: bytes, fields) -> bytes:
    starts = [i for i in range(len(blob)) if blob.startswith(signature, i)]
    start = int(rng.choice(starts))
    offset, fmt, values = fields[int(rng.integers(len(fields)))]
    out = bytearray(blob)
    struct.pack_into(fmt, out, start + offset, int(rng.choice(values)))
    return bytes(out)


ODD_NAMES = [  # character 99 is not among the valid members, so only the name itself is odd
    "/abs.png", "\\abs.png", "C:/x.png", "c:x.png", "../evil.png", f"{TOP}/../evil.png", f"{TOP}/A/../../x.png",
    f"{TOP}/A/character01/..\\..\\0099_01.png", f"{TOP}/A/B/character01/0099_01.png",
    f"{TOP}/character01/0099_01.png", f"{TOP}/A/character01/0099_01.png\n", f"{TOP}/A\nB/character01/0099_01.png",
    f"{TOP}/A\u2028B/character01/0099_01.png",
    f"{TOP}/A/character01/0099_01.png\r", f"{TOP}/A\tB/character01/0099_01.png", f"{TOP}/A/character01/0099_01.txt",
    f"{TOP}/A/character01/0099_00.png", f"{TOP}/A/character01/0000_01.png", f"{TOP}/A/character01/0099_21.png",
    f"{TOP}/\u00c4lphabet/character01/0099_01.png", f"{TOP}/A\x00B/character01/0099_01.png", f"{TOP}/A/character01/",
    "images_evaluation/A/character01/0099_01.png", f"{TOP}/" + "A" * 300 + "/character01/0099_01.png",
    f"{TOP}/__MACOSX/x.png", f"{TOP}/A/character01/.0099_01.png", f"{TOP}/A/character99/0099_01.png",
]


def zip_inputs(count: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    pngs = png_inputs(count, seed + 1)
    stored = build_zip(valid_members(), zipfile.ZIP_STORED)
    deflated = build_zip(valid_members())
    inputs = []
    for i in range(count):
        base = stored if rng.random() < 0.5 else deflated
        kind = rng.integers(12)
        if kind == 0:
            body = bytes(rng.integers(0, 256, size=int(rng.integers(0, 400)), dtype=np.uint8))
            prefix = [b"", b"PK\x03\x04", b"PK\x05\x06"][int(rng.integers(3))]
            inputs.append(("zip-random", prefix + body))
        elif kind == 1:  # flipped bytes, anywhere or in the central directory
            out = bytearray(base)
            low = central_directory(base) if rng.random() < 0.5 else 0
            for pos in rng.integers(low, len(base), size=rng.integers(1, 6)):
                out[pos] ^= int(rng.integers(1, 256))
            inputs.append(("zip-flipped", bytes(out)))
        elif kind == 2:
            inputs.append(("zip-truncated", base[:int(rng.integers(0, len(base)))]))
        elif kind == 3:  # a span of bytes duplicated or deleted
            a, b = sorted(int(v) for v in rng.integers(0, len(base), size=2))
            out = base[:b] + base[a:] if rng.random() < 0.5 else base[:a] + base[b:]
            inputs.append(("zip-span", out))
        elif kind == 4:
            inputs.append(("zip-central-field", patch_field(rng, base, b"PK\x01\x02", CENTRAL_FIELDS)))
        elif kind == 5:
            inputs.append(("zip-local-field", patch_field(rng, base, b"PK\x03\x04", LOCAL_FIELDS)))
        elif kind == 6:
            inputs.append(("zip-end-field", patch_field(rng, base, b"PK\x05\x06", END_FIELDS)))
        elif kind == 7:  # valid layout, one member a mutated or random PNG
            members = valid_members()
            j = int(rng.integers(len(members)))
            members[j] = (members[j][0], pngs[i][1])
            inputs.append((f"zip-member-{pngs[i][0]}", build_zip(members)))
        elif kind == 8:  # an odd member name added, holding a good or a mutated PNG
            body = pngs[i][1] if rng.random() < 0.5 else valid_members()[0][1]
            members = valid_members() + [(ODD_NAMES[int(rng.integers(len(ODD_NAMES)))], body)]
            inputs.append(("zip-name", build_zip(members)))
        elif kind == 9:  # a symlink, a duplicate name or a non-PNG member
            members = valid_members()
            which = rng.integers(3)
            if which == 0:
                info = zipfile.ZipInfo(members[0][0])
                info.external_attr = 0o120777 << 16
                members[0] = (info, b"../../../../etc/passwd")
                inputs.append(("zip-symlink", build_zip(members)))
            elif which == 1:
                members.append(members[int(rng.integers(len(members)))])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
                    blob = build_zip(members)
                inputs.append(("zip-duplicate", blob))
            else:
                members[0] = (members[0][0], [b"", b"GIF89a", b"hello\n", b"PK\x03\x04"][int(rng.integers(4))])
                inputs.append(("zip-not-png", build_zip(members)))
        elif kind == 10:  # other compressions, then a few flipped bytes in the data
            method = [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA][int(rng.integers(2))]
            out = bytearray(build_zip(valid_members(), method))
            for pos in rng.integers(30, central_directory(bytes(out)), size=rng.integers(1, 4)):
                out[pos] ^= int(rng.integers(1, 256))
            inputs.append(("zip-compression", bytes(out)))
        else:  # nothing usable: empty archive, folders only, litter only, garbage before the archive
            which = rng.integers(4)
            blob = [build_zip([]), build_zip([(f"{TOP}/A/character01/", b"")]),
                    build_zip([("__MACOSX/._x", b""), (f"{TOP}/.DS_Store", b"")]),
                    b"#!/bin/sh\nexit 0\n" + base][which]
            inputs.append(("zip-empty-or-prefixed", blob))
    return inputs


# --- the checks -----------------------------------------------------------------------------


def outcome(call) -> str | None:
    """None when call returns or raises a one-line DataError, else a short description."""
    try:
        call()
    except DataError as err:
        message = str(err)
        if not message or len(message.splitlines()) != 1 or "\n" in message:
            return f"DataError over several lines: {message!r}"
    except Exception as err:  # anything else is a failure of the package
        return f"{type(err).__name__}: {str(err)[:120]}"
    return None


def report(failures: list[tuple[str, str]]) -> str:
    counts = Counter((kind, problem.split(":")[0]) for kind, problem in failures)
    lines = [f"{n} x {kind}: {problem}" for (kind, problem), n in counts.most_common()]
    examples = {problem.split(":")[0]: f"{kind}: {problem}" for kind, problem in failures}
    return "\n".join(lines + ["examples:"] + list(examples.values()))


@pytest.mark.filterwarnings("ignore:Invalid APNG")
def test_png_fuzz_gives_only_data_errors(tmp_path):
    failures = []
    path = tmp_path / "fuzz.png"
    for kind, blob in png_inputs(300, seed=1):
        path.write_bytes(blob)
        for size in (28, 105):
            problem = outcome(lambda: prepare(path, size=size))
            if problem:
                failures.append((kind, problem))
        problem = outcome(lambda: data._decode_bytes(blob, 28, "fuzz.png"))
        if problem:
            failures.append((kind, problem))
        try:  # a PIL image the caller opened itself: prepare does the decoding
            image = Image.open(io.BytesIO(blob))
        except Exception:
            continue
        problem = outcome(lambda: prepare(image, size=28))
        if problem:
            failures.append((kind + " (PIL image)", problem))
    assert not failures, report(failures)


def test_zip_fuzz_gives_only_data_errors_and_keeps_the_cache(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    zip_path = data_dir / f"{TOP}.zip"
    failures = []
    loaded = 0
    for i, (kind, blob) in enumerate(zip_inputs(300, seed=2)):
        zip_path.write_bytes(blob)
        cache_dir = tmp_path / f"cache{i}"
        cache_dir.mkdir()
        (cache_dir / SENTINEL).write_bytes(b"older decode")
        result = []
        problem = outcome(lambda: result.append(load_set("background", 28, data_dir=data_dir, cache_dir=cache_dir,
                                                         progress=False, check_counts=False)))
        if problem:
            failures.append((kind, problem))
        files = sorted(p.name for p in cache_dir.iterdir())
        if result:  # a load that worked wrote its cache file and removed the older one
            loaded += 1
            assert len(files) == 1 and files[0].endswith(".npz") and files[0] != SENTINEL, (kind, files)
        elif not problem:  # a failed load left the cache folder exactly as it was
            assert files == [SENTINEL] and (cache_dir / SENTINEL).read_bytes() == b"older decode", (kind, files)
        assert sorted(p.name for p in data_dir.iterdir()) == [zip_path.name]
    assert not failures, report(failures)
    assert loaded > 0  # some mutations leave the archive readable (a flipped byte in unused space)


# --- targeted cases: modes and sizes, bombs, odd files --------------------------------------


def grey_in_mode(grey: np.ndarray, mode: str) -> Image.Image:
    """The 8-bit grey image stored losslessly in another PNG mode."""
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)
    if mode == "P":
        image = Image.fromarray(grey, "P")
        image.putpalette([v for v in range(256) for _ in range(3)])
        return image
    return Image.fromarray(grey, "L").convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16"])
def test_every_png_mode_decodes_like_its_grey_original(tmp_path, mode):
    grey = np.random.default_rng(3).integers(0, 256, size=(105, 105), dtype=np.uint8)
    grey[:20] = 0  # some pure ink and pure paper too
    grey[-20:] = 255
    reference, path = tmp_path / "grey.png", tmp_path / "other.png"
    Image.fromarray(grey, "L").save(reference)
    grey_in_mode(grey, mode).save(path)
    for size in (28, 105):
        assert torch.equal(prepare(path, size=size), prepare(reference, size=size))
    assert torch.equal(prepare(reference, size=105)[0], torch.from_numpy(255 - grey).float() / 255)
    Image.fromarray(np.zeros((60, 70), np.uint8)).convert(mode).save(path)
    with pytest.raises(DataError, match="other.png is 70x60, expected 105x105"):
        prepare(path)


def test_sixteen_bit_grey_keeps_dark_ink_and_its_transparent_value(tmp_path):
    """PIL clips 16-bit grey at 255 when converting: dark grey would become paper."""
    values = np.full((105, 105), 65535, dtype=np.uint16)
    values[10:20, 10:20] = 256  # nearly black ink
    values[30:40, 30:40] = 1000  # the transparent value: paper
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path, transparency=1000)
    x = prepare(path, size=105)[0]
    assert x[15, 15] == 254 / 255 and x[35, 35] == 0 and x[60, 60] == 0


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "JPEG"])
def test_other_image_formats_are_refused(tmp_path, fmt):
    path = tmp_path / "drawing.png"  # the name says PNG, the bytes do not
    Image.fromarray(ink_image(), "L").save(path, format=fmt)
    with pytest.raises(DataError, match="drawing.png is not a PNG"):
        prepare(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width, height", [(2**31 - 1, 2**31 - 1), (30000, 30000), (10000, 10000), (105, 10**6)])
def test_png_declaring_a_huge_size_is_refused_before_decoding(tmp_path, width, height):
    chunks = split_chunks(png_bytes(expected_ink(5, 3)))
    chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    path = tmp_path / "huge.png"
    path.write_bytes(join_chunks(chunks))
    expected = r"huge.png (is \d+x\d+, expected 105x105|is not a readable PNG .*exceeds limit)"
    with pytest.raises(DataError, match=expected):
        prepare(path)


def zip_with_raw_member(name: str, raw: bytes, declared: int, method: int = zipfile.ZIP_DEFLATED,
                        crc: int = 0) -> bytes:
    """A one-member zip whose headers declare `declared` bytes, whatever `raw` inflates to."""
    encoded = name.encode()
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(raw), declared, len(encoded), 0)
    central = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(raw), declared,
                          len(encoded), 0, 0, 0, 0, 0, 0)
    local += encoded + raw
    central += encoded
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


def load_peak(tmp_path, blob: bytes) -> tuple[str, int]:
    """The DataError message of loading blob as the background zip, and the peak traced memory."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / f"{TOP}.zip").write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_set("background", 28, data_dir=data_dir, cache_dir=tmp_path / "cache", progress=False,
                     check_counts=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    return str(info.value), peak


def test_zip_member_declaring_a_huge_size_is_refused_unread(tmp_path):
    name = member_names()[0]
    message, peak = load_peak(tmp_path, zip_with_raw_member(name, deflate_bomb(64), 2**31))
    assert message.startswith(f"{name} in ") and message.endswith(".zip is 2048.0 MB; images over 20 MB are refused")
    assert peak < 16 * 2**20


def test_zip_member_inflating_past_its_declared_size_stays_small(tmp_path):
    """256 MiB of zeros behind a header that declares 1000 bytes: the reader never holds them."""
    message, peak = load_peak(tmp_path, zip_with_raw_member(member_names()[0], deflate_bomb(256), 1000))
    assert "cannot read" in message or "not a PNG" in message
    assert peak < 16 * 2**20


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_members_without_bounded_inflation_are_refused(tmp_path, method):
    message, _ = load_peak(tmp_path, build_zip(valid_members(), method))
    assert f"uses compression method {method}; only stored and deflated members are read" in message


def test_odd_files_are_refused_in_one_line(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(data.MAX_IMAGE_BYTES + 1)  # sparse: costs no disk
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    for path, message in [(tmp_path, "is not a regular file"), (fifo, "is not a regular file"),
                          (huge, "huge.png is 20.0 MB; images over 20 MB are refused"),
                          (tmp_path / "missing.png", "cannot read .*missing.png"),
                          (str(tmp_path / "nul\0.png"), "cannot read .*nul")]:
        with pytest.raises(DataError, match=message) as info:
            prepare(path)
        assert len(str(info.value).splitlines()) == 1


def test_extracted_folder_with_odd_files(tmp_path):
    cases = {"dangling": lambda p: (p.unlink(), p.symlink_to(tmp_path / "nowhere.png")),
             "fifo": lambda p: (p.unlink(), os.mkfifo(p)),
             "huge": lambda p: os.truncate(p, data.MAX_IMAGE_BYTES + 1)}
    for case, spoil in cases.items():
        folder = make_tiny_omniglot(tmp_path / case, alphabets=1, characters=1, drawers=2, extracted=True)
        spoil(folder / "Alphabet_00" / "character01" / "0001_02.png")
        with pytest.raises(DataError) as info:
            load_set("background", 28, data_dir=tmp_path / case, cache_dir=tmp_path / f"cache_{case}",
                     progress=False, check_counts=False)
        assert len(str(info.value).splitlines()) == 1, case
        assert not (tmp_path / f"cache_{case}").exists()


def test_data_error_messages_are_one_line():
    assert str(DataError("a\nb\r\u2028c\td")) == "a\\nb\\r\\u2028c\\td"
