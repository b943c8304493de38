"""`omnivae demo RUN_DIR`: a local web page to draw a character and see what a trained model makes of it.

The page (demo_page.html, served by the package itself, nothing loaded from the network) sends
a drawing, or picks an evaluation-set drawing, and shows: the model's input and reconstruction,
the 5 nearest characters of the evaluation set by content code (a gallery of one drawing per
character, as a one-shot classifier answers; the codes read in the turned views the model was
trained on, `metrics.view_codes`, as `evaluate`'s `content_views_*`), the drawing redrawn in 8
sampled styles and in the styles of 4 example drawings, and sliders along the main directions
of the style codes.

Everything that does not depend on the input is computed once at start-up (`Demo.build`), so a
request costs one encode and a few decodes. The server is the standard library's
ThreadingHTTPServer with a small JSON API; images travel as PNG data URIs.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import ipaddress
import json
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import data as omni_data
from . import generate
from .metrics import against_groups, encode_images, stroke_measures, unit_rows, view_codes
from .rundir import load, read_config

MAX_BODY = 2 * 1024 * 1024  # bytes a request may carry: a drawing as a PNG data URI is ~10-50 kB
# A larger body is read and dropped up to this size, so the client gets the error instead of a
# reset connection; beyond it the connection is closed unread.
DRAIN_LIMIT = 16 * 1024 * 1024
MAX_SIDE = 2048  # largest accepted image side, checked on the header before decoding pixels
MIN_SIDE = 16  # smallest: anything less cannot hold a drawing
NEIGHBOURS = 5  # nearest gallery characters shown
SAMPLED_STYLES = 8  # styles drawn from the prior, the same for every input
STYLE_SEED = 0  # seed of those styles
SLIDERS = 4  # principal directions of the style codes offered as sliders
SLIDER_RANGE = 3.0  # sliders run over +-3 standard deviations of their direction
# The longer side of Omniglot's ink box spans 43 to 86 of the 105 pixels (5th to 95th
# percentile over the evaluation set; median 65) and its centre sits near the middle.
INK_SIDE_RANGE = (43, 86)
INK_THRESHOLD = 128  # grey level below which a pixel counts as ink (ink is dark)
IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # what a browser or an editor writes as PNG


class DemoError(Exception):
    """Bad input or a server that cannot start: one line for the page or the command line."""


# ---------------------------------------------------------------------------------------------
# Turning any drawing into an upstream Omniglot image


def read_png(payload: bytes) -> Image.Image:
    """PNG bytes -> an opened (not yet decoded) image, after checking format, size and mode."""
    try:
        image = Image.open(io.BytesIO(payload))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise DemoError("the image is not a readable PNG") from None
    if image.format != "PNG":
        raise DemoError(f"the image is a {image.format or 'unknown'} file; send a PNG")
    width, height = image.size
    if max(width, height) > MAX_SIDE or min(width, height) < MIN_SIDE:
        raise DemoError(f"the image is {width}x{height} pixels; each side must be {MIN_SIDE} to {MAX_SIDE}")
    if image.mode not in IMAGE_MODES:
        raise DemoError(f"the image has pixel mode {image.mode} (for example 16-bit grey); "
                        "send an 8-bit grey, colour or black-and-white PNG")
    return image


def _grey_on_white(image: Image.Image) -> np.ndarray:
    """Any accepted image -> (H, W) uint8 grey, transparent parts white (a canvas starts transparent)."""
    try:
        rgba = image.convert("RGBA")
    except (OSError, ValueError, SyntaxError):
        raise DemoError("the image is not a readable PNG") from None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("L"))


def to_upstream(image: Image.Image) -> Image.Image:
    """A drawing of any size, dark ink on a light background -> a 105x105 1-bit image in
    Omniglot's upstream form (black ink on white), ready for `data.prepare`.

    An image already in that form (105x105, 1-bit) is returned as it is, so an Omniglot file
    gives exactly its training pixels. Anything else is made grey on white and its ink
    (grey < 128) is boxed. The image's longer side becomes 105 pixels, as the canvas Omniglot
    was drawn on did, so a drawing keeps its size; only an ink box outside Omniglot's range of
    sizes (INK_SIDE_RANGE) is scaled to the nearest end of it. The box is centred, resized
    (box filter when shrinking) and thresholded back to 1 bit.
    """
    size = omni_data.SOURCE_SIZE
    if image.size == (size, size) and image.mode == "1":
        return image
    grey = _grey_on_white(image)  # (H, W)
    ink = grey < INK_THRESHOLD
    if not ink.any():
        raise DemoError("the drawing is empty: draw a character first")
    if ink.mean() > 0.5:
        raise DemoError("the image is mostly dark: draw dark ink on a light background")
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    ink_side = max(bottom - top, right - left)  # source pixels
    target = np.clip(ink_side * size / max(grey.shape), *INK_SIDE_RANGE)  # its side at 105 pixels
    # The square of the source that becomes the whole 105-pixel image, centred on the ink.
    # (The content code of a small model changes with a character's size, less with its place.)
    side = ink_side * size / target
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
    left, top = centre_x - side / 2, centre_y - side / 2
    # Pad with paper where the square runs past the drawing's edges, then resize the square:
    # a box filter when shrinking (it averages ink, as data.py does), bilinear when enlarging.
    pad = [max(0, int(np.ceil(-top))), max(0, int(np.ceil(top + side - grey.shape[0]))),
           max(0, int(np.ceil(-left))), max(0, int(np.ceil(left + side - grey.shape[1])))]
    padded = np.pad(grey, ((pad[0], pad[1]), (pad[2], pad[3])), constant_values=255)
    box = (left + pad[2], top + pad[0], left + pad[2] + side, top + pad[0] + side)
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
    square = Image.fromarray(padded).resize((size, size), resample, box=box)
    return square.point(lambda v: 255 if v >= INK_THRESHOLD else 0).convert("1", dither=Image.Dither.NONE)


def decode_data_uri(value) -> bytes:
    """'data:image/png;base64,...' (or bare base64) -> bytes."""
    if not isinstance(value, str) or not value:
        raise DemoError("no image in the request")
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise DemoError("the image must be a base64 data URI")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DemoError("the image is not valid base64") from None


def png_uri(probabilities) -> str:
    """(S, S) or (1, S, S) ink in [0, 1] -> a PNG data URI of dark ink on white."""
    ink = np.asarray(probabilities, dtype=np.float32)
    ink = ink.reshape(ink.shape[-2:])  # (S, S)
    pixels = np.round(255 * (1 - np.clip(ink, 0, 1))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Start-up computations on plain arrays


@dataclass
class Example:
    name: str  # thick, thin, slanted, upright
    row: int  # row of the evaluation set
    why: str  # one sentence for the page


def choose_examples(images: np.ndarray, character: np.ndarray) -> list[Example]:
    """Four drawings of four different characters whose hands differ clearly: the thickest and
    thinnest strokes, the most slanted, the most upright. images (N, S, S), ink in [0, 1];
    character (N,) labels.

    Each measure is taken relative to the other drawings of the same character, so that a
    character with a diagonal stroke does not count as a slanted hand. Only drawings with an
    ordinary amount of ink (between its 10th and 90th percentiles) compete, which keeps out
    stray dots and scribbles; for slant, only those at least of median height, since the shear
    of a flat drawing is mostly noise.
    """
    thickness, slant, height = stroke_measures(images)
    relative = against_groups({"thickness": thickness, "slant": slant}, character)  # against the character's drawings
    thick_rel, slant_rel = relative["thickness"], relative["slant"]
    characters = len(np.unique(character))
    amount = images.reshape(len(images), -1).sum(1)
    low, high = np.percentile(amount, [10, 90])
    ordinary = (amount >= low) & (amount <= high)
    tall = ordinary & (height >= np.median(height[ordinary] if ordinary.any() else height))
    taken: set = set()

    def pick(score, allowed):
        allowed = allowed & ~np.isin(character, list(taken))
        if not allowed.any():  # tiny data sets: relax the filters rather than fail
            allowed = ~np.isin(character, list(taken)) if len(taken) < characters else np.ones_like(allowed)
        rows = np.flatnonzero(allowed)
        row = int(rows[np.argmax(score[rows])])
        taken.add(character[row])
        return row

    thick = pick(thick_rel, ordinary)
    thin = pick(-thick_rel, ordinary)
    slanted = pick(slant_rel, tall)
    # Upright: nearly vertical itself (|shear| in the lowest tenth), yet straighter than others
    # drew the character.
    straight = tall & (np.abs(slant) <= np.percentile(np.abs(slant[tall]) if tall.any() else np.abs(slant), 10))
    upright = pick(-slant_rel, straight)
    mean_thickness, mean_slant = thickness - thick_rel, slant - slant_rel  # each row's character mean
    return [
        Example("thick", thick, f"thickest strokes: ink covers {thickness[thick]:.0%} of the pixels it touches "
                f"(all drawings of this character: {mean_thickness[thick]:.0%})"),
        Example("thin", thin, f"thinnest strokes: ink covers {thickness[thin]:.0%} of the pixels it touches "
                f"(all drawings of this character: {mean_thickness[thin]:.0%})"),
        Example("slanted", slanted, f"leans right the most: shear {slant[slanted]:+.2f} "
                f"(all drawings of this character: {mean_slant[slanted]:+.2f})"),
        Example("upright", upright, f"upright where others lean: shear {slant[upright]:+.2f} "
                f"(all drawings of this character: {mean_slant[upright]:+.2f})"),
    ]


def principal_directions(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PCA of codes (N, D) by SVD: mean (D,), the top k directions (k, D), their standard
    deviations (k,) and the fraction of the variance each explains (k,)."""
    mean = codes.mean(0)
    _, singular, directions = np.linalg.svd(codes - mean, full_matrices=False)
    variance = singular**2 / max(len(codes) - 1, 1)
    k = min(k, len(variance))
    explained = variance / max(variance.sum(), 1e-12)
    return mean, directions[:k], np.sqrt(variance[:k]), explained[:k]


def move_style(style: np.ndarray, coordinates: np.ndarray, mean: np.ndarray, directions: np.ndarray,
               sd: np.ndarray) -> np.ndarray:
    """The style code (D,) with its coordinates along the principal directions (K, D) set to
    coordinates (K,), in standard deviations sd (K,); the rest of the code is kept."""
    current = directions @ (style - mean) / sd  # (K,)
    return style + ((coordinates - current) * sd) @ directions  # (D,)


def nearest(code: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the k gallery codes (G, D) most similar to code (D,) by cosine, and the similarities."""
    similarity = unit_rows(gallery) @ unit_rows(code)  # (G,)
    order = np.argsort(-similarity, kind="stable")[:k]
    return order, similarity[order]


# ---------------------------------------------------------------------------------------------
# The demo: start-up state and the answer to one input


class Demo:
    """A trained model with everything the page needs that does not depend on the input."""

    def __init__(self, model, evaluation: omni_data.Omniglot, run_name: str = "", views: int = 1):
        """views: how many turned views the neighbours read each drawing in (`metrics.view_codes`;
        `train.new_character_kinds` of the run's config, 1 for a run trained without turns)."""
        self.model, self.evaluation, self.run_name, self.views = model, evaluation, run_name, views
        self.lock = threading.Lock()  # one model call at a time: 2 cores gain nothing from more
        images = evaluation.tensors()  # (N, 1, S, S)
        content, style = (c.astype(np.float64) for c in encode_images(model, images))  # (N, Dc), (N, Ds)

        # Gallery: each character's drawing by its lowest-numbered drawer (drawer 1 in Omniglot).
        order = np.lexsort((evaluation.drawer, evaluation.character))
        first = np.r_[True, evaluation.character[order][1:] != evaluation.character[order][:-1]]
        self.gallery_rows = order[first]  # (G,)
        self.gallery_codes = view_codes(model, images[self.gallery_rows], views,
                                        content=content[self.gallery_rows])  # (G, views * Dc), unit rows
        self.gallery_drawers = sorted(set(evaluation.drawer[self.gallery_rows].tolist()))

        self.style_mean, self.style_directions, self.style_sd, self.style_explained = \
            principal_directions(style, SLIDERS)
        self.examples = choose_examples(evaluation.images.astype(np.float32) / 255.0, evaluation.character)
        self.example_images = images[[e.row for e in self.examples]]  # (4, 1, S, S)

        # Position of each character within its alphabet (the upstream characterNN), for labels.
        self.number = {}
        for a in range(len(evaluation.alphabet_names)):
            for n, c in enumerate(np.unique(evaluation.character[evaluation.alphabet == a]), 1):
                self.number[int(c)] = n
        self._row = {(int(c), int(d)): r for r, (c, d) in enumerate(zip(evaluation.character, evaluation.drawer))}
        self._info = self._describe()

    @classmethod
    def build(cls, run_dir, data_dir=None, cache_dir=None, progress: bool = False) -> "Demo":
        """Load a run's model and the drawings it is scored on (`evaluate.load_split`): the
        evaluation set, or the held-out classes of a run trained on an image folder (data_dir)."""
        from .evaluate import load_split
        from .train import new_character_kinds

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise DemoError(f"{run_dir} does not exist: give the folder of a trained run")
        model, cfg = load(run_dir), read_config(run_dir)
        evaluation = load_split(cfg, "evaluation", data_dir, cache_dir, progress=progress)
        if not evaluation.has_drawers():
            # An image folder records no drawers: number each class's drawings 1, 2, ... instead, so
            # that the page can pick any of them (the gallery holds each class's first).
            order = np.argsort(evaluation.character, kind="stable")
            _, starts, counts = np.unique(evaluation.character[order], return_index=True, return_counts=True)
            number = np.empty(len(order), dtype=np.int64)
            number[order] = np.arange(len(order)) - np.repeat(starts, counts) + 1
            evaluation = dataclasses.replace(evaluation, drawer=number)
        return cls(model, evaluation, run_dir.name, new_character_kinds(cfg))

    def info(self) -> dict:
        """What the page needs to build its chooser, sliders and example captions."""
        return self._info

    def _describe(self) -> dict:
        evaluation = self.evaluation
        alphabets = []
        for a, name in enumerate(evaluation.alphabet_names):
            ids = np.unique(evaluation.character[evaluation.alphabet == a])
            alphabets.append({"name": name, "characters": [int(c) for c in ids]})
        return {
            "run": self.run_name,
            "image_size": self.model.image_size,
            "alphabets": alphabets,
            "drawers": sorted(set(int(d) for d in evaluation.drawer)),
            "gallery_drawers": self.gallery_drawers,
            "gallery_size": len(self.gallery_rows),
            "sliders": [{"sd": float(sd), "explained": float(e)}
                        for sd, e in zip(self.style_sd, self.style_explained)],
            "slider_range": SLIDER_RANGE,
            "max_body": MAX_BODY,
            "examples": [{"name": e.name, "why": e.why, "image": png_uri(self.example_images[i]),
                          "label": self._label(e.row)} for i, e in enumerate(self.examples)],
        }

    def _label(self, row: int) -> dict:
        e = self.evaluation
        character = int(e.character[row])
        return {"alphabet": e.alphabet_names[int(e.alphabet[row])], "number": self.number[character],
                "id": character, "drawer": int(e.drawer[row])}

    def answer_drawing(self, payload: bytes) -> dict:
        """PNG bytes of a drawing -> everything the page shows."""
        image = to_upstream(read_png(payload))
        try:
            x = omni_data.prepare(image, self.model.image_size)  # (1, S, S), as training images
        except omni_data.DataError as err:
            raise DemoError(str(err)) from None
        return self.answer(x)

    def answer_pick(self, character, drawer) -> dict:
        """An evaluation-set drawing, by global character id and drawer."""
        try:
            row = self._row[(int(character), int(drawer))]
        except (KeyError, TypeError, ValueError):
            raise DemoError(f"the evaluation set has no drawing of character {character!r} by drawer {drawer!r}") from None
        result = self.answer(self.evaluation.subset([row]).tensors()[0])  # the training pixels exactly
        result["picked"] = self._label(row)
        return result

    def answer(self, x: torch.Tensor) -> dict:
        """One prepared image (1, S, S) in [0, 1], ink = 1 -> the page's answer."""
        x = x.view(1, 1, *x.shape[-2:])
        with self.lock, torch.no_grad():
            content, style = self.model.encode(x)  # (1, Dc), (1, Ds)
            reconstruction = self.model.reconstruct(x)  # (1, 1, S, S)
            sampled = generate.one_shot(self.model, x[0], SAMPLED_STYLES, STYLE_SEED)  # (8, 1, S, S)
            restyled = generate.swap(self.model, x, self.example_images)[0]  # (4, 1, S, S)
            code = view_codes(self.model, x, self.views, content=content)[0]  # (views * Dc,), as the gallery's
        content = content[0].cpu().numpy().astype(np.float64)
        style = style[0].cpu().numpy().astype(np.float64)
        rows, similarity = nearest(code, self.gallery_codes, NEIGHBOURS)
        coordinates = self.style_directions @ (style - self.style_mean) / self.style_sd  # (K,) in sds
        return {
            "input": png_uri(x[0]),
            "reconstruction": png_uri(reconstruction[0]),
            "neighbours": [dict(self._label(int(self.gallery_rows[r])), similarity=float(s),
                                image=png_uri(self.evaluation.images[self.gallery_rows[r]] / 255.0))
                           for r, s in zip(rows, similarity)],
            "sampled": [png_uri(image) for image in sampled],
            "examples": [{"name": e.name, "image": png_uri(image)} for e, image in zip(self.examples, restyled)],
            "content": content.tolist(),
            "style": style.tolist(),
            "coordinates": coordinates.tolist(),
        }

    def restyle(self, content, style, coordinates) -> dict:
        """The character `content` in the hand `style` moved to `coordinates` (standard
        deviations along the style's principal directions)."""
        content = _vector(content, self.model.content_dim, "content")
        style = _vector(style, self.model.style_dim, "style")
        coordinates = _vector(coordinates, len(self.style_sd), "coordinates")
        moved = move_style(style, coordinates, self.style_mean, self.style_directions, self.style_sd)  # (Ds,)
        with self.lock, torch.no_grad():
            image = self.model.decode(torch.as_tensor(content, dtype=torch.float32)[None],
                                      torch.as_tensor(moved, dtype=torch.float32)[None])  # (1, 1, S, S)
        return {"image": png_uri(image[0])}


def _vector(value, length: int, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a list of {length} numbers") from None
    if array.shape != (length,) or not np.isfinite(array).all():
        raise DemoError(f"{name} must be a list of {length} finite numbers")
    return array


# ---------------------------------------------------------------------------------------------
# The HTTP server


def page() -> str:
    """The demo's single HTML page (inline CSS and JavaScript)."""
    return resources.files("omnivae").joinpath("demo_page.html").read_text(encoding="utf-8")


class _Handler(BaseHTTPRequestHandler):
    server_version = "omnivae-demo"
    timeout = 30  # a client that stops sending mid-request frees its thread
    demo: Demo
    html: bytes
    allowed_hosts: frozenset | None  # Host headers accepted, None for any

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass  # quiet: the terminal shows the URL and nothing else

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: dict) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_allowed(self) -> bool:
        # A page on another site could resolve its own name to 127.0.0.1 (DNS rebinding);
        # a loopback server therefore answers only requests addressed to a loopback name.
        if self.allowed_hosts is None:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.strip("[]") in self.allowed_hosts

    def do_GET(self):
        if not self._host_allowed():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.html, "text/html; charset=utf-8")
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.demo.info())
        self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def do_POST(self):
        if not self._host_allowed():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length")
        size = int(length)
        if size > MAX_BODY:
            self.close_connection = True
            remaining = size if size <= DRAIN_LIMIT else 0
            while remaining > 0:  # read and drop, so that the client reads the answer
                chunk = self.rfile.read(min(1 << 16, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the request is {size / 2**20:.1f} MB; the demo accepts up to {MAX_BODY // 2**20} MB")
        body = self.rfile.read(size)
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            return self._error(HTTPStatus.BAD_REQUEST, "the request is not a JSON object")
        path = self.path.split("?", 1)[0]
        routes = {
            "/api/draw": lambda: self.demo.answer_drawing(decode_data_uri(request.get("image"))),
            "/api/pick": lambda: self.demo.answer_pick(request.get("character"), request.get("drawer")),
            "/api/style": lambda: self.demo.restyle(request.get("content"), request.get("style"),
                                                    request.get("coordinates")),
        }
        if path not in routes:
            return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        start = time.perf_counter()
        try:
            answer = routes[path]()
        except DemoError as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        except Exception as err:  # noqa: BLE001 (the page shows one line, never a traceback)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the server failed: {type(err).__name__}: {err}")
        answer["seconds"] = round(time.perf_counter() - start, 4)
        self._json(HTTPStatus.OK, answer)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server for demo on host:port (0: a free port), not yet serving; see `serve_forever`."""
    loopback = _is_loopback(host)
    handler = type("Handler", (_Handler,), {
        "demo": demo,
        "html": page().encode("utf-8"),
        "allowed_hosts": frozenset({"localhost", "127.0.0.1", "::1", host}) if loopback else None,
    })
    server_class = ThreadingHTTPServer
    if ":" in host:  # an IPv6 address
        server_class = type("Server6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), handler)
    except OSError as err:
        raise DemoError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(run_dir, host: str = "127.0.0.1", port: int = 0, data_dir=None, cache_dir=None,
          open_browser: bool = False, progress: bool = True) -> None:
    """Build the demo for run_dir, print its URL and serve until Ctrl-C."""
    demo = Demo.build(run_dir, data_dir, cache_dir, progress=progress)
    server = make_server(demo, host, port)
    url = url_of(server)
    print(f"omnivae demo: {url}  (Ctrl-C stops)", flush=True)
    if not _is_loopback(host):
        print(f"omnivae demo: listening on {host}, reachable from other machines", flush=True)
    if open_browser:
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("omnivae demo: stopped", flush=True)
    finally:
        server.server_close()
