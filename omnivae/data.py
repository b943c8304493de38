"""Omniglot or your own image folder: download, check, decode once into a cache, and sample
batches by character.

The data set (Lake, Salakhutdinov and Tenenbaum, "Human-level concept learning through
probabilistic program induction", Science 2015) comes as zips of 105x105 1-bit PNGs laid out
as `images_<set>/<Alphabet>/characterNN/<charid>_<drawer>.png`, ink black on white.

A data folder holds either the zips or the extracted `images_<set>/` folders; it is only ever
read, never written (except by `fetch` when it downloads a missing zip). Decoded arrays live in
a separate cache folder as one `.npz` per (set, image size, source fingerprint).

A data folder may instead be an image folder of your own (`load_folder`): one sub-folder of PNGs
per class, optionally inside one folder per group; each class is a character, its images are the
drawings and a group is an alphabet.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .rundir import atomic_write


class DataError(Exception):
    """One-line, user-facing error (the CLI prints it without traceback)."""

    def __init__(self, message: str):
        # Member names and other libraries' messages may hold line breaks or other control
        # characters: escape them, so that the message stays one line.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


class SetInfo(NamedTuple):
    folder: str  # top folder inside the zip, and the zip's stem
    alphabets: int
    characters: int
    images: int
    md5: str  # of the upstream zip; checked only on download


SETS = {
    "background": SetInfo("images_background", 30, 964, 19280, "68d2efa1b9178cc56df9314c21c6e718"),
    "evaluation": SetInfo("images_evaluation", 20, 659, 13180, "6b91aef0f799c5bb55b94e3f2daec811"),
    "background_small1": SetInfo("images_background_small1", 5, 136, 2720, "e704a628b5459e08445c13499850abc4"),
    "background_small2": SetInfo("images_background_small2", 5, 156, 3120, "b75a71a51d3b13f821f212756fe481fd"),
}
SIZES = (28, 32, 64, 105)
SOURCE_SIZE = 105  # every upstream image is 105x105
MAX_IMAGE_BYTES = 20 * 2**20  # an upstream PNG is about 1 kB; larger files and zip members are refused unread
MAX_SIDE = 4096  # largest side of an image-folder PNG, checked on its header before any pixel is decoded
FOLDER_LAYOUT = "<class>/<image>.png or <group>/<class>/<image>.png"
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{folder}.zip"

_CACHE_VERSION = 2  # bump when decoding changes, so old cache files are not reused
_MEMBER = re.compile(r"(?P<top>[^/]+)/(?P<alphabet>[^/]+)/character\d+/(?P<charid>\d{4})_(?P<drawer>\d{2})\.png")
_INVERT = [255 - v for v in range(256)]  # lookup table: ink 0 -> 255


# ---------------------------------------------------------------------------------------------
# Folders


def _user_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg else Path.home() / ".cache"


def default_data_dir() -> Path:
    """Where the Omniglot zips live: $OMNIVAE_DATA_DIR, else <user cache>/omnivae/data."""
    env = os.environ.get("OMNIVAE_DATA_DIR")
    return Path(env).expanduser() if env else _user_cache_root() / "omnivae" / "data"


def default_cache_dir() -> Path:
    """Where decoded arrays live: $OMNIVAE_CACHE_DIR, else <user cache>/omnivae/arrays.

    Kept apart from the data folder, which may be read-only or shared.
    """
    env = os.environ.get("OMNIVAE_CACHE_DIR")
    return Path(env).expanduser() if env else _user_cache_root() / "omnivae" / "arrays"


def _check_set_name(name: str) -> SetInfo:
    if name not in SETS:
        raise DataError(f"unknown Omniglot set {name!r}; choose one of {', '.join(SETS)}")
    return SETS[name]


def _find_source(data_dir: Path, info: SetInfo) -> Path | None:
    """The zip or the extracted folder of one set in data_dir, or None."""
    zip_path = data_dir / f"{info.folder}.zip"
    if zip_path.is_file():
        return zip_path
    folder = data_dir / info.folder
    if folder.is_dir():
        return folder
    return None


# ---------------------------------------------------------------------------------------------
# Download


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, md5: str, progress: bool) -> None:
    """Download url to target through a temporary file beside it; keep it only if the MD5 matches."""
    try:
        with atomic_write(target) as tmp:
            try:
                out = open(tmp, "xb")
            except OSError as err:
                raise DataError(f"cannot write to {target.parent} ({err.strerror}); is the data folder writable?") from err
            with out, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}",
                          disable=not progress) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
            found = _md5(tmp)
            if found != md5:
                raise DataError(f"download of {url} is corrupt: MD5 {found}, expected {md5}; try again")
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"could not download {url} ({err}); copy {target.name} into {target.parent} by hand") from err


def fetch(data_dir: str | Path | None = None, sets=("background", "evaluation"), progress: bool = True) -> Path:
    """Make sure each named set is in data_dir, downloading the upstream zip if it is missing.

    A zip or extracted folder already in data_dir is used as it is (its content is checked
    when loaded); only downloads are checked against the upstream MD5. Returns data_dir.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if isinstance(sets, str):
        sets = (sets,)
    for name in sets:
        info = _check_set_name(name)
        if _find_source(data_dir, info) is not None:
            continue
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create data folder {data_dir} ({err.strerror})") from err
        _download(URL.format(folder=info.folder), data_dir / f"{info.folder}.zip", info.md5, progress)
    return data_dir


# ---------------------------------------------------------------------------------------------
# Reading a source (zip or extracted folder) without ever touching paths outside it


def _is_unsafe(name: str) -> bool:
    parts = re.split(r"[\\/]", name)
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None or ".." in parts


def _is_litter(name: str) -> bool:
    # Folders zipped or copied on macOS carry these; they are not images.
    return any(part == "__MACOSX" or part.startswith(".") for part in name.split("/"))


def _why(err: Exception) -> str:
    return str(err) or type(err).__name__


def _too_large(name: str, size: int) -> DataError:
    return DataError(f"{name} is {size / 2**20:.1f} MB; images over {MAX_IMAGE_BYTES // 2**20} MB are refused")


def _read_file(path: Path, name: str) -> bytes:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES, checked before reading it."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a folder, or a pipe or device that could block or never end
            raise DataError(f"{name} is not a regular file")
        if st.st_size > MAX_IMAGE_BYTES:
            raise _too_large(name, st.st_size)
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError) as err:  # ValueError: a path with a NUL character
        raise DataError(f"cannot read {name} ({getattr(err, 'strerror', None) or _why(err)})") from err
    if len(data) > MAX_IMAGE_BYTES:  # grew since stat
        raise _too_large(name, len(data))
    return data


def _files(root: Path) -> list[str]:
    """Every file under the folder root, as a '/'-separated path relative to it."""
    resolved = root.resolve()
    names = []
    for folder, _, files in os.walk(root):
        for file in files:
            full = Path(folder) / file
            if not full.resolve().is_relative_to(resolved):  # a symlink pointing elsewhere
                raise DataError(f"{full} points outside {root}; refusing to read it")
            names.append(full.relative_to(root).as_posix())
    return names


class _Source:
    """Member names (relative, '/'-separated, starting with the set folder) and their bytes.

    zipfile raises many types on a damaged archive (BadZipFile, EOFError, zlib.error,
    LZMAError, NotImplementedError for an unknown method, RuntimeError for encryption,
    UnicodeDecodeError for a name...): every one of them, when opening or reading, becomes a
    DataError that names the archive.
    """

    def __init__(self, path: Path, info: SetInfo):
        self.path, self.info = path, info
        self.zip: zipfile.ZipFile | None = None

    def __enter__(self) -> "_Source":
        if self.path.is_file():
            try:
                self.zip = zipfile.ZipFile(self.path)
            except Exception as err:
                raise DataError(f"{self.path} is not a readable zip ({_why(err)}); delete it and fetch again") from err
        return self

    def __exit__(self, *exc) -> None:
        if self.zip is not None:
            self.zip.close()

    def names(self) -> list[str]:
        if self.zip is not None:
            return [i.filename for i in self.zip.infolist() if not i.is_dir()]
        return [f"{self.info.folder}/{name}" for name in _files(self.path)]

    def read(self, name: str) -> bytes:
        if self.zip is None:
            return _read_file(self.path.parent / name, str(self.path.parent / name))
        info = self.zip.getinfo(name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 and LZMA members are inflated without a bound on the output: a few bytes can
            # stand for gigabytes. The upstream zips, like most, are deflated.
            raise DataError(f"{name} in {self.path} uses compression method {info.compress_type}; "
                            "only stored and deflated members are read")
        if info.file_size > MAX_IMAGE_BYTES:  # the declared size, checked before inflating anything
            raise _too_large(f"{name} in {self.path}", info.file_size)
        try:
            with self.zip.open(info) as member:
                # Asking for the declared size bounds what each inflate step may produce (read()
                # with no size inflates a whole compressed block however large it gets).
                return member.read(info.file_size)
        except Exception as err:
            raise DataError(f"cannot read {name} from {self.path} ({_why(err)})") from err


def _fingerprint(path: Path) -> str:
    """A short hash that changes when the source changes (zip: size and mtime; folder: its files)."""
    digest = hashlib.sha1(f"v{_CACHE_VERSION}".encode())
    try:
        if path.is_file():
            st = path.stat()
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            entries = []
            for folder, _, files in os.walk(path):
                for file in files:
                    st = os.stat(os.path.join(folder, file))  # a dangling symlink fails here
                    entries.append(f"{os.path.relpath(os.path.join(folder, file), path)}:{st.st_size}:{st.st_mtime_ns}")
            digest.update("\n".join(sorted(entries)).encode())
    except OSError as err:
        raise DataError(f"cannot read {err.filename or path} ({err.strerror or _why(err)})") from err
    return digest.hexdigest()[:12]


class _Member(NamedTuple):
    name: str
    alphabet: str
    character: int
    drawer: int


def _parse_members(names: list[str], source: Path, info: SetInfo) -> list[_Member]:
    """Check every member name and parse its labels; sorted by (character, drawer)."""
    members = []
    where: dict[int, tuple[str, str]] = {}  # charid -> its folder, to catch one id in two places
    seen: set[tuple[int, int]] = set()
    for name in names:
        if _is_unsafe(name):
            raise DataError(f"{source} holds an unsafe member name {name!r} (absolute or '..'); refusing to use it")
        if _is_litter(name):
            continue
        match = _MEMBER.fullmatch(name)  # a "$" would also match before a trailing line break
        if match is None:
            raise DataError(f"unexpected member {name!r} in {source}: expected "
                            f"{info.folder}/<Alphabet>/characterNN/<charid>_<drawer>.png")
        if match["top"] != info.folder:
            raise DataError(f"member {name!r} in {source} is not under {info.folder}/")
        character, drawer = int(match["charid"]), int(match["drawer"])
        if not (1 <= character and 1 <= drawer <= 20):
            raise DataError(f"member {name!r} in {source}: character id must be >= 1 and drawer 01..20")
        folder = name.rsplit("/", 1)[0]
        if where.setdefault(character, (folder, name))[0] != folder:
            raise DataError(f"character {character:04d} appears in two folders of {source}: "
                            f"{where[character][1]!r} and {name!r}")
        if (character, drawer) in seen:
            raise DataError(f"duplicate image {name!r} in {source}")
        seen.add((character, drawer))
        members.append(_Member(name, match["alphabet"], character, drawer))
    if not members:
        raise DataError(f"no images found in {source}")
    members.sort(key=lambda m: (m.character, m.drawer))
    return members


def _check_counts(source: Path, info: SetInfo, alphabets: int, characters: int, images: int) -> None:
    expected = (info.alphabets, info.characters, info.images)
    found = (alphabets, characters, images)
    if found != expected:
        raise DataError(f"{source} is incomplete or not the Omniglot {info.folder} set: expected "
                        f"{expected[0]} alphabets, {expected[1]} characters, {expected[2]} images; "
                        f"found {found[0]} alphabets, {found[1]} characters, {found[2]} images")


# ---------------------------------------------------------------------------------------------
# Decoding: the one function that turns an upstream PNG into training pixels


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grey image ("I;16*", or "I" from Pillow < 10) scaled to "L"; other modes as they are.

    PIL's own conversion clips these at 255 rather than scaling, which would turn dark grey
    ink into paper. A transparent grey value becomes an alpha band.
    """
    if not image.mode.startswith("I"):
        return image
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)  # (H, W)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, int):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    return Image.fromarray(gray, "L")


def _to_gray(image: Image.Image, name: str) -> Image.Image:
    """An opened PNG of any mode -> its grey levels ("L"), transparent pixels as white paper."""
    try:  # PIL reports damaged data with many exception types; each one is a bad image here
        image = _to_8_bit(image)
        if "A" in image.getbands() or "transparency" in image.info:
            # Transparent pixels are paper: put the image on white before the alpha is dropped.
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
        return image.convert("L")  # decodes the pixels
    except Exception as err:
        raise DataError(f"{name} is not a readable PNG ({_why(err)})") from err


def _decode(image: Image.Image, size: int, name: str) -> np.ndarray:
    """An opened upstream image -> (size, size) uint8, ink = 255, box-filtered."""
    if image.size != (SOURCE_SIZE, SOURCE_SIZE):  # checked on the header, before decoding pixels
        raise DataError(f"{name} is {image.size[0]}x{image.size[1]}, expected {SOURCE_SIZE}x{SOURCE_SIZE}")
    gray = _to_gray(image, name).point(_INVERT)  # 1-bit -> 0/255, then ink = 255
    if size != SOURCE_SIZE:
        # The box filter averages ink over each output pixel's footprint, so stroke area is kept.
        gray = gray.resize((size, size), Image.BOX)
    return np.array(gray, dtype=np.uint8)  # a writable copy (PIL gives a read-only view)


def _open_png(data: bytes, name: str) -> Image.Image:
    # Only the PNG reader is tried: the others (some of which run external programs) never see
    # these bytes. Opening reads the header only; PIL's MAX_IMAGE_PIXELS and then the callers'
    # size checks refuse a huge declared size before any pixel is decoded.
    try:
        return Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.UnidentifiedImageError as err:
        raise DataError(f"{name} is not a PNG, or its header is damaged") from err
    except Exception as err:
        raise DataError(f"{name} is not a readable PNG ({_why(err)})") from err


def _decode_bytes(data: bytes, size: int, name: str) -> np.ndarray:
    return _decode(_open_png(data, name), size, name)


def _decode_any(data: bytes, size: int, name: str) -> np.ndarray:
    """A PNG of any size and mode (an image-folder image) -> (size, size) uint8, ink = 255.

    Grey levels with transparency on white (as `_decode`); inverted when the background is light,
    judged by the median of the border pixels, so that ink is bright whichever way it was drawn;
    levels stretched so that this background is 0, like Omniglot's paper; padded to a square
    with it, centred, so nothing is cropped or stretched; then resized with the box filter
    Omniglot's images go through.
    """
    image = _open_png(data, name)
    if max(image.size) > MAX_SIDE:  # checked on the header, before decoding pixels
        raise DataError(f"{name} is {image.size[0]}x{image.size[1]}; images over {MAX_SIDE} pixels a side "
                        "are refused")
    gray = _to_gray(image, name)
    pixels = np.asarray(gray)  # (H, W)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = int(round(float(np.median(border))))
    if background > 127:  # light paper, dark ink
        gray, background = gray.point(_INVERT), 255 - background
    if background > 0:  # grey paper becomes 0, as Omniglot's; 255 stays 255
        gray = gray.point([max(v - background, 0) * 255 // (255 - background) for v in range(256)])
    width, height = gray.size
    side = max(width, height)
    if width != height:
        square = Image.new("L", (side, side), 0)
        square.paste(gray, ((side - width) // 2, (side - height) // 2))
        gray = square
    if side != size:
        gray = gray.resize((size, size), Image.BOX)
    return np.array(gray, dtype=np.uint8)  # a writable copy


def _check_size(size: int) -> None:
    if size not in SIZES:
        raise DataError(f"image size {size} is not supported; choose one of {', '.join(map(str, SIZES))}")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    # Shared by prepare() and Omniglot.tensors() so both give bit-identical floats.
    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)


def prepare(image, size: int = 28) -> torch.Tensor:
    """One upstream 105x105 PNG (a path or a PIL image) -> (1, size, size) float32 in [0, 1], ink = 1.

    Uses the same decoder as the cache, so the result equals the matching row of
    `load_set(..., size=size).tensors()` exactly.
    """
    _check_size(size)
    if isinstance(image, Image.Image):
        return _to_tensor(_decode(image, size, "image"))[None]  # (1, S, S)
    path = Path(image)
    return _to_tensor(_decode_bytes(_read_file(path, str(path)), size, str(path)))[None]  # (1, S, S)


# ---------------------------------------------------------------------------------------------
# The data set


@dataclass
class Omniglot:
    """Decoded Omniglot images with their labels; rows sorted by (character, drawer)."""

    images: np.ndarray  # (N, S, S) uint8, ink = 255
    character: np.ndarray  # (N,) int16, the global character id 1..1623 (an image folder: its class, 1..C)
    drawer: np.ndarray  # (N,) int8, who drew it, 1..20; 0: unknown (an image folder)
    alphabet: np.ndarray  # (N,) int16, index into alphabet_names
    alphabet_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask_or_index) -> "Omniglot":
        """The rows picked by a boolean mask or an index array (labels and names kept)."""
        index = np.asarray(mask_or_index)
        return Omniglot(self.images[index], self.character[index], self.drawer[index],
                        self.alphabet[index], list(self.alphabet_names))

    def tensors(self) -> torch.Tensor:
        """Images as (N, 1, S, S) float32 in [0, 1], ink = 1."""
        return _to_tensor(self.images)[:, None]  # (N, 1, S, S)

    def has_drawers(self) -> bool:
        """Whether every drawing says who drew it (Omniglot does; an image folder does not)."""
        return bool((self.drawer > 0).all())


def _decode_set(source: Path, info: SetInfo, size: int, check_counts: bool, progress: bool) -> Omniglot:
    with _Source(source, info) as reader:
        members = _parse_members(reader.names(), source, info)
        alphabet_names = sorted({m.alphabet for m in members})
        if check_counts:  # fail on names before spending time on pixels
            _check_counts(source, info, len(alphabet_names), len({m.character for m in members}), len(members))
        images = np.empty((len(members), size, size), dtype=np.uint8)  # (N, S, S)
        desc = f"decoding {info.folder} at {size}px"
        for row, member in enumerate(tqdm(members, desc=desc, unit="img", disable=not progress)):
            images[row] = _decode_bytes(reader.read(member.name), size, member.name)
    index = {name: i for i, name in enumerate(alphabet_names)}
    return Omniglot(
        images=images,
        character=np.array([m.character for m in members], dtype=np.int16),
        drawer=np.array([m.drawer for m in members], dtype=np.int8),
        alphabet=np.array([index[m.alphabet] for m in members], dtype=np.int16),
        alphabet_names=alphabet_names,
    )


def _read_cache(path: Path) -> Omniglot | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return Omniglot(f["images"], f["character"], f["drawer"], f["alphabet"],
                            [str(n) for n in f["alphabet_names"]])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None  # unreadable cache: decode again and overwrite it


def _write_cache(path: Path, data: Omniglot) -> None:
    """Write the arrays to path atomically (rundir.atomic_write)."""
    with atomic_write(path) as tmp, open(tmp, "xb") as f:
        np.savez(f, images=data.images, character=data.character, drawer=data.drawer,
                 alphabet=data.alphabet, alphabet_names=np.array(data.alphabet_names, dtype=str))


def _cache(path: Path, prefix: str, data: Omniglot) -> None:
    """Write a fresh decode to path and remove older decodes of the same source (same prefix);
    only warns when the cache folder cannot be written."""
    try:
        _write_cache(path, data)
    except OSError as err:
        warnings.warn(f"could not cache decoded images in {path.parent} ({err}); "
                      "set OMNIVAE_CACHE_DIR to a writable folder to avoid decoding every time")
    else:
        for stale in path.parent.glob(f"{prefix}*.npz"):  # older decodes of a source that changed
            if stale != path:
                stale.unlink(missing_ok=True)


def load_set(name: str = "background", size: int = 28, data_dir: str | Path | None = None,
             cache_dir: str | Path | None = None, progress: bool = True, check_counts: bool = True) -> Omniglot:
    """Load one Omniglot set at size x size pixels, decoding it on first use and caching the arrays.

    name is a key of SETS; size one of SIZES. Missing data is fetched. The cache file name holds
    the set, the size and a fingerprint of the source, so a changed zip is decoded again.
    check_counts=False skips the alphabet/character/image count check (for small test sets).
    Any problem with the data raises DataError and leaves the cache as it was.
    """
    info = _check_set_name(name)
    _check_size(size)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    source = _find_source(data_dir, info)
    if source is None:
        fetch(data_dir, sets=(name,), progress=progress)
        source = _find_source(data_dir, info)
    prefix = f"omniglot_{name}_{size}_"
    cache_path = cache_dir / f"{prefix}{_fingerprint(source)}.npz"

    data = _read_cache(cache_path)
    if data is None:
        data = _decode_set(source, info, size, check_counts, progress)
        _cache(cache_path, prefix, data)
    elif check_counts:  # a cache written with check_counts=False may hold a partial set
        _check_counts(source, info, len(data.alphabet_names), len(np.unique(data.character)), len(data))
    return data


def split_by_drawer(data: Omniglot, val_drawers=(19, 20)) -> tuple[Omniglot, Omniglot]:
    """Split into (train, validation): the same characters, with the drawings of val_drawers held out."""
    held_out = np.isin(data.drawer, np.asarray(val_drawers, dtype=np.int64))
    train, validation = data.subset(~held_out), data.subset(held_out)
    if len(train) == 0 or (len(val_drawers) > 0 and len(validation) == 0):
        raise DataError(f"splitting by drawers {tuple(val_drawers)} leaves {len(train)} training and "
                        f"{len(validation)} validation images; pick drawers present in the data (1..20)")
    return train, validation


def split_by_alphabet(data: Omniglot, alphabets) -> tuple[Omniglot, Omniglot]:
    """Split into (rest, held_out): held_out holds every drawing of the named alphabets.

    Whole alphabets are held out, so the held-out characters are as unseen as those of the
    evaluation set; every choice (sweeps, ablations, presets) is scored on them.
    """
    names = list(data.alphabet_names)
    missing = [a for a in alphabets if a not in names]
    if missing:
        raise DataError(f"validation alphabets not in the data: {', '.join(missing)}")
    chosen = np.isin(data.alphabet, [names.index(a) for a in alphabets])
    rest, held_out = data.subset(~chosen), data.subset(chosen)
    if len(rest) == 0:
        raise DataError("holding out the validation alphabets leaves no training images")
    return rest, held_out


# ---------------------------------------------------------------------------------------------
# Your own data: an image folder


def is_image_folder(data_dir) -> bool:
    """Whether data_dir is an image folder of your own rather than an Omniglot data folder: a
    folder with sub-folders and none of the Omniglot zips or their extracted folders."""
    if data_dir is None or not Path(data_dir).is_dir():
        return False
    path = Path(data_dir)
    if any(_find_source(path, info) is not None for info in SETS.values()):
        return False
    return any(child.is_dir() and not _is_litter(child.name) for child in path.iterdir())


def _folder_classes(folder: Path, names: list[str], min_images: int) -> dict[tuple[str, str], list[str]]:
    """Check an image folder's file names: {(group, class): its image names}, both sorted.

    Hidden files (and macOS litter) are skipped, and so are files other than PNGs at the top,
    such as a README; anything else out of place is a DataError naming it.
    """
    flat, grouped = [], []  # '/'-separated names of <class>/<image> and <group>/<class>/<image>
    for name in sorted(names):
        if _is_litter(name):
            continue
        depth = name.count("/") + 1
        if not name.lower().endswith(".png"):
            if depth == 1:
                continue
            raise DataError(f"{folder / name} is not a PNG; an image folder holds PNG images only ({FOLDER_LAYOUT})")
        if depth not in (2, 3):
            raise DataError(f"{folder / name} is not where an image belongs: expected {FOLDER_LAYOUT}")
        (flat if depth == 2 else grouped).append(name)
    if flat and grouped:
        raise DataError(f"{folder} mixes two layouts: {flat[0]} is <class>/<image> but {grouped[0]} is "
                        "<group>/<class>/<image>; use one of them for every image")
    if not flat and not grouped:
        raise DataError(f"no PNG images found in {folder}: expected {FOLDER_LAYOUT}")
    group = folder.resolve().name or "images"  # the one group of the flat layout
    classes: dict[tuple[str, str], list[str]] = {}
    for name in flat or grouped:
        parts = name.split("/")
        key = (group, parts[0]) if flat else (parts[0], parts[1])
        classes.setdefault(key, []).append(name)
    if len(classes) < 2:
        raise DataError(f"{folder} holds 1 class; it needs at least 2 (one sub-folder of images per class)")
    if len(classes) > np.iinfo(np.int16).max:
        raise DataError(f"{folder} holds {len(classes)} classes; at most {np.iinfo(np.int16).max} are supported")
    short = [(key, len(images)) for key, images in classes.items() if len(images) < min_images]
    if short:
        (g, c), count = short[0]
        label = c if flat else f"{g}/{c}"
        more = f" ({len(short)} classes are short)" if len(short) > 1 else ""
        why = "the group size" if min_images > 2 else "one drawing to learn it from, another to recognise"
        raise DataError(f"class {label} in {folder} has {count} image{'s' * (count != 1)}; every class needs at "
                        f"least {min_images} ({why}){more}")
    return dict(sorted(classes.items()))


def load_folder(folder, size: int = 28, cache_dir: str | Path | None = None, min_images: int = 2,
                progress: bool = True) -> Omniglot:
    """Your own images as an `Omniglot`: FOLDER/<class>/<image>.png, or FOLDER/<group>/<class>/<image>.png.

    Each class is a character (ids 1..C in the order of group, then class name), its images are
    its drawings (rows in file-name order) and each group an alphabet (the flat layout is one
    group, named after the folder). Nobody recorded who drew what: `drawer` is 0 (unknown)
    everywhere. PNGs of any size and mode are turned into training pixels by `_decode_any`
    (grey, ink bright, padded square, box-filtered to size x size). Every class needs at least
    max(2, min_images) images (pass the group size): one drawing to show a character and another
    to recognise it by. Names are checked before any pixel is read; the arrays are cached like
    Omniglot's, keyed by the folder, the size and a fingerprint of its files. Any problem (too
    few classes or images, an unreadable image, a mixed layout) raises a one-line DataError.
    """
    if folder is None:
        raise DataError(f"no image folder given: pass it as the data folder (--data-dir), laid out as {FOLDER_LAYOUT}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    _check_size(size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    classes = _folder_classes(folder, _files(folder), max(2, min_images))
    prefix = f"folder_{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]}_{size}_"
    cache_path = cache_dir / f"{prefix}{_fingerprint(folder)}.npz"
    data = _read_cache(cache_path)
    if data is None:
        group_names = sorted({group for group, _ in classes})
        rows = [(c + 1, group_names.index(key[0]), name) for c, (key, names) in enumerate(classes.items())
                for name in names]  # (character, group, file name), one per image
        images = np.empty((len(rows), size, size), dtype=np.uint8)  # (N, S, S)
        for row, (_, _, name) in enumerate(tqdm(rows, desc=f"decoding {folder.name} at {size}px", unit="img",
                                                disable=not progress)):
            path = folder / name
            images[row] = _decode_any(_read_file(path, str(path)), size, str(path))
        data = Omniglot(images, np.array([r[0] for r in rows], dtype=np.int16), np.zeros(len(rows), dtype=np.int8),
                        np.array([r[1] for r in rows], dtype=np.int16), group_names)
        _cache(cache_path, prefix, data)
    return data


def split_by_class(data: Omniglot, fraction: float, seed: int = 0) -> tuple[Omniglot, Omniglot]:
    """Split into (rest, held_out): held_out holds every drawing of round(fraction * C) of the C
    characters (at least 1, at most C - 1), drawn with numpy default_rng(seed).

    The draw depends only on the character ids and the seed, so every run on the same image
    folder holds out the same classes, whatever its training seed; they are as unseen as the
    evaluation set's characters, and `evaluate` scores image-folder runs on them.
    """
    ids = np.unique(data.character)
    if len(ids) < 2:
        raise DataError(f"holding out classes needs at least 2, found {len(ids)}")
    count = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    held_out = np.isin(data.character, np.random.default_rng(seed).choice(ids, count, replace=False))
    return data.subset(~held_out), data.subset(held_out)


# ---------------------------------------------------------------------------------------------
# Batches grouped by character


class GroupBatchSampler(torch.utils.data.Sampler):
    """Batches of `groups` distinct characters x `per_group` distinct drawings of each.

    Indices come group-major: batch[g * per_group:(g + 1) * per_group] are drawings of one
    character. Each epoch every character's drawings are shuffled and cut into chunks of
    per_group; the chunks are dealt into batches so that no batch repeats a character, which
    uses each drawing at most once and nearly all of them once per epoch. Characters with
    fewer than per_group drawings are skipped. The order depends only on (seed, epoch): call
    set_epoch(epoch) before each epoch, as with DistributedSampler.
    """

    def __init__(self, character: np.ndarray, groups: int, per_group: int, seed: int = 0, drop_last: bool = True):
        super().__init__()
        if groups < 1 or per_group < 1:
            raise DataError(f"groups and per_group must be >= 1, got {groups} and {per_group}")
        self.groups, self.per_group, self.seed, self.drop_last = groups, per_group, seed, drop_last
        self.epoch = 0
        character = np.asarray(character)
        ids, inverse = np.unique(character, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        splits = np.cumsum(np.bincount(inverse, minlength=len(ids)))[:-1]
        # One index array per character that has enough drawings.
        self.members = [m for m in np.split(order, splits) if len(m) >= per_group]
        if len(self.members) < groups:
            raise DataError(f"need at least {groups} characters with >= {per_group} drawings each, "
                            f"found {len(self.members)}")
        self.chunks, self.full_batches = self._plan()

    def _plan(self) -> tuple[np.ndarray, int]:
        """Chunks per character and number of full batches; depends only on the counts."""
        chunks = np.array([len(m) // self.per_group for m in self.members])
        while True:  # a character cannot fill more chunks than there are batches (no repeats)
            batches = int(chunks.sum()) // self.groups
            capped = np.minimum(chunks, batches)
            if (capped == chunks).all():
                return chunks, batches
            chunks = capped

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        leftover = int(self.chunks.sum()) - self.full_batches * self.groups
        return self.full_batches + (0 if self.drop_last or leftover == 0 else 1)

    def _largest(self, remaining: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        # Characters with the most chunks left, ties broken at random.
        key = remaining + rng.random(len(remaining))
        return np.argsort(-key, kind="stable")[:count]

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        drawings = [rng.permutation(m) for m in self.members]
        remaining = self.chunks.copy()
        used = np.zeros_like(remaining)
        leftover = int(remaining.sum()) - self.full_batches * self.groups
        # Set the extra chunks aside first, so that the full batches total exactly
        # full_batches * groups chunks with at most full_batches per character: then taking
        # the characters with the most chunks left never runs short of distinct characters.
        extra = np.zeros_like(remaining)
        for _ in range(leftover):
            c = self._largest(remaining, 1, rng)[0]
            remaining[c] -= 1
            extra[c] += 1
        for _ in range(self.full_batches):
            picked = rng.permutation(self._largest(remaining, self.groups, rng))
            remaining[picked] -= 1
            yield self._batch(picked, drawings, used)
        if not self.drop_last and leftover:
            picked = rng.permutation(np.flatnonzero(extra))  # distinct characters only
            yield self._batch(picked, drawings, used)

    def _batch(self, picked: np.ndarray, drawings: list[np.ndarray], used: np.ndarray) -> list[int]:
        batch = []
        for c in picked:
            start = used[c] * self.per_group
            batch.extend(drawings[c][start:start + self.per_group].tolist())
            used[c] += 1
        return batch


# ---------------------------------------------------------------------------------------------
# A second handwriting set, for transfer


DIGIT_FILL = 18 / 28  # side of the upsampled 8x8 digit as a fraction of the image: Omniglot's typical glyph height


def load_digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as Omniglot-like images: (images, labels).

    images: (1797, size, size) uint8 with ink = 255, like `Omniglot.images`; labels: (1797,).

    The 8x8 digits of the UCI "Optical Recognition of Handwritten Digits" set (Alpaydin and
    Kaynak 1998), shipped inside scikit-learn (`sklearn.datasets.load_digits`), so no download:
    1,797 images of 10 classes, grey levels 0..16 with the ink high. Each is scaled to ink in
    [0, 1], upsampled (bilinear) to a square of DIGIT_FILL * size and centred in a size x size
    blank image: an 8x8 digit fills its box from top to bottom, while Omniglot glyphs at 28 px
    span about 17 of 28 pixels (median height) with margins of 5 to 7, so this keeps a margin
    like theirs. The strokes stay thicker than Omniglot's: the mean grey level is about 0.13
    at 28 px, against Omniglot's 0.08. Labels are the digits 0..9.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_size(size)
    digits = sklearn_digits()
    ink = torch.from_numpy(digits.images / 16.0).float()[:, None]  # (N, 1, 8, 8) in [0, 1], ink = 1
    inner = round(DIGIT_FILL * size)
    glyphs = F.interpolate(ink, size=(inner, inner), mode="bilinear", align_corners=False)  # (N, 1, inner, inner)
    before = (size - inner) // 2
    images = F.pad(glyphs, (before, size - inner - before, before, size - inner - before))  # (N, 1, size, size)
    images = (images[:, 0].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()  # (N, size, size)
    return images, digits.target.astype(np.int64)
