"""Tiny synthetic Omniglot sets in the exact upstream layout, with pixels known in advance."""
from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 105


def expected_ink(charid: int, drawer: int) -> np.ndarray:
    """(105, 105) bool: where the synthetic drawing of (charid, drawer) has ink.

    Each character is a rectangle of its own size and height; the drawer shifts it sideways.
    """
    top = 8 + (charid % 10) * 4
    height = 20 + (charid % 7) * 5
    left = 8 + drawer * 2
    width = 15 + (charid % 5) * 6
    ink = np.zeros((SIZE, SIZE), dtype=bool)
    ink[top:top + height, left:left + width] = True
    return ink


def png_bytes(ink: np.ndarray) -> bytes:
    """A 1-bit PNG with ink black (0) on white, like the upstream files."""
    image = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8), "L").convert("1", dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_tiny_omniglot(root: Path, set_name: str = "background", alphabets: int = 2, characters: int = 3,
                       drawers: int = 4, start_charid: int = 1, corrupt: str | None = None,
                       extracted: bool = False) -> Path:
    """Write images_<set_name>.zip (or, with extracted=True, the images_<set_name>/ folder) into root.

    `characters` is per alphabet; character ids run from start_charid; drawers are 1..drawers.
    corrupt breaks it in one way: "png" (garbage bytes in one PNG), "size" (one 100x100 PNG),
    "name" (one badly named member), "parent" (an extra ../evil.png member), "absolute" (an
    extra /evil.png member), "truncated" (zip cut in half). Returns the zip or folder path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    top = f"images_{set_name}"
    members: dict[str, bytes] = {}
    charid = start_charid
    for a in range(alphabets):
        for c in range(characters):
            for d in range(1, drawers + 1):
                name = f"{top}/Alphabet_{a:02d}/character{c + 1:02d}/{charid:04d}_{d:02d}.png"
                members[name] = png_bytes(expected_ink(charid, d))
            charid += 1
    names = list(members)
    if corrupt == "png":
        members[names[1]] = b"\x89PNG\r\n\x1a\nnot really a png"
    elif corrupt == "size":
        members[names[1]] = png_bytes(np.zeros((100, 100), dtype=bool))
    elif corrupt == "name":
        members[names[1].replace(".png", "_x.png")] = members.pop(names[1])
    elif corrupt == "parent":
        members["../evil.png"] = members[names[0]]
    elif corrupt == "absolute":
        members["/evil.png"] = members[names[0]]
    elif corrupt not in (None, "truncated"):
        raise ValueError(f"unknown corruption {corrupt!r}")

    if extracted:
        for name, data in members.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return root / top
    path = root / f"{top}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    if corrupt == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def synthetic_omniglot(characters: int = 8, drawers: int = 20, size: int = 28, alphabets: int = 2, seed: int = 0):
    """An in-memory Omniglot with two obvious factors: the character is a random 10x10 glyph,
    the drawer shifts it to one of 5 x 4 positions. Returns an `omnivae.data.Omniglot`."""
    from omnivae.data import Omniglot

    rng = np.random.default_rng(seed)
    glyphs = rng.random((characters, 10, 10)) < 0.4
    images, character, drawer, alphabet = [], [], [], []
    for c in range(characters):
        for d in range(1, drawers + 1):
            image = np.zeros((size, size), dtype=np.uint8)
            top, left = 2 + 3 * ((d - 1) // 5), 2 + 3 * ((d - 1) % 5)
            image[top:top + 10, left:left + 10] = glyphs[c] * 255
            images.append(image)
            character.append(c + 1)
            drawer.append(d)
            alphabet.append(c * alphabets // characters)
    return Omniglot(
        images=np.stack(images),
        character=np.array(character, dtype=np.int16),
        drawer=np.array(drawer, dtype=np.int8),
        alphabet=np.array(alphabet, dtype=np.int16),
        alphabet_names=[f"Alphabet_{a}" for a in range(alphabets)],
    )


def killed_write(path: Path) -> Path:
    """Start writing `path` through omnivae.rundir.atomic_write in another process and SIGKILL it
    mid-write; returns the temporary file it leaves behind."""
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, time\nfrom omnivae.rundir import atomic_write\n"
            "with atomic_write(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half a file')\n"
            "    print(tmp, flush=True)\n"
            "    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    tmp = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    assert tmp.exists() and tmp.parent == Path(path).parent
    return tmp


def find_chromium():
    """The system's Chromium (or Chrome) binary, or None: browser tests never download one."""
    import os
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def real_data() -> Path:
    """The real Omniglot folder named by OMNIVAE_TEST_DATA; the test is skipped when it is unset."""
    import os

    import pytest

    folder = os.environ.get("OMNIVAE_TEST_DATA")
    if not folder:
        pytest.skip("OMNIVAE_TEST_DATA is not set")
    assert Path(folder).is_dir(), f"OMNIVAE_TEST_DATA={folder} does not exist"
    return Path(folder)


@contextlib.contextmanager
def one_torch_thread():
    """torch on one CPU thread inside the block: tiny models train fastest so (and two thrash on a busy machine)."""
    import torch  # here, so that importing these helpers does not import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
