"""The run folder: every file a run holds, how each is written and read, and the package's one atomic writer.

    config.json        the training config (omnivae.Config), written when training starts
    train_state.pt     the checkpoint: everything training needs to go on, in one file (`Checkpoint`)
    model.safetensors  the VAE's own state dict in the Hugging Face Hub layout, exported from the
                       checkpoint; with config.json it is what `load` and `StructuredVAE.from_pretrained` read
    log.jsonl          one JSON record per finished epoch: loss terms, validation terms, seconds
    run.json           where and how fast the training ran
    metrics.json       what `omnivae evaluate` measured
    figures/           the evaluation's PNGs
    report.html        the page `omnivae report` writes

Every file goes through `atomic_write`, so a reader (or a resumed run) sees a whole file or none.
A checkpoint is written in this order: train_state.pt (one rename), then model.safetensors from
the same state, then the epoch's line of log.jsonl. A kill at any moment leaves the previous
checkpoint or the new one whole; `resume` brings the export and the log back in line with it.

Importing this module loads only the standard library and omnivae.config (the command line
names these files before it loads PyTorch); the functions that read or write tensors import
torch when called.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import socket
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from .config import Config, ConfigError

CONFIG_FILE = "config.json"  # the Hub's name for a model's config, too
CHECKPOINT_FILE = "train_state.pt"
WEIGHTS_FILE = "model.safetensors"  # the Hub's name for a model's weights
LOG_FILE = "log.jsonl"
RUN_INFO_FILE = "run.json"
METRICS_FILE = "metrics.json"
FIGURES_DIR = "figures"
REPORT_FILE = "report.html"

CHECKPOINT_FORMAT = 2  # 1: the first layout, with the VAE's weights only in model.safetensors
FILE_MODE = 0o644  # every file written: readable by all, whatever created it (safetensors makes 0600)

# Temporary files: hidden, beside their target, named after this host and process so that a later
# write can tell a killed writer's leftovers (process gone) from a live writer's file.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMPORARY = re.compile(r"^\..+\.([0-9a-f]{8})-(\d+)\.[0-9a-f]{8}\.tmp$")


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write, then put it in place in one step.

    On leaving the block the file is made mode 0644, flushed to disk (fsync), renamed onto `path`
    (os.replace, atomic on one file system) and the folder flushed where the system allows: readers
    see the old file or the new one, never part of one, even after a power cut. On an error the
    temporary file is removed and `path` is left as it was. The temporary name is unique, so
    concurrent writers never share one; leftovers of killed writers in the folder are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def write_text(path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, values) -> Path:
    return write_text(path, json.dumps(values, indent=2) + "\n")


def remove_stale_temporaries(folder) -> None:
    """Remove the temporary files that writers on this host left in `folder` when they were killed."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            found = _TEMPORARY.match(entry.name)
            if found and found[1] == _HOST and not _process_alive(int(found[2])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def check_writable(folder, why: str) -> None:
    """Fail now, in one line, when `folder` cannot take new files, rather than after long work."""
    probe = _temporary_name(Path(folder) / "write-check")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"cannot write into this run folder ({err.strerror}); {why}", str(folder)) from None


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) is not a probe: keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a written file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the system lets a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- small files


def _read_json(path: Path):
    """A JSON file's contents, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run_folder(run_dir) -> bool:
    """Whether `run_dir` holds a config.json (a run started there, trained or not)."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def is_trained(run_dir) -> bool:
    """Whether `run_dir` holds a checkpoint or exported weights (at least one finished epoch)."""
    return (Path(run_dir) / CHECKPOINT_FILE).exists() or (Path(run_dir) / WEIGHTS_FILE).exists()


def read_config(run_dir) -> Config:
    """The run's training config; one-line ConfigError when it is missing, empty or broken."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {CONFIG_FILE}: not a run folder")
    return Config.load(path)


def read_config_values(run_dir) -> dict | None:
    """config.json as it is, unchecked (for display); None when missing or unreadable."""
    values = _read_json(Path(run_dir) / CONFIG_FILE)
    return values if isinstance(values, dict) else None


def write_config(run_dir, cfg: Config) -> None:
    """Write config.json, unless it already holds exactly this config."""
    path, text = Path(run_dir) / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text() == text:
            return
    write_text(path, text)


def read_log(run_dir) -> list[dict]:
    """The records of log.jsonl; a missing file gives [], broken lines are skipped."""
    try:
        lines = (Path(run_dir) / LOG_FILE).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_log(run_dir, record: dict) -> None:
    """Append one record to log.jsonl and flush it to disk."""
    fd = os.open(Path(run_dir) / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        if hasattr(os, "fchmod"):  # the umask may have narrowed it
            os.fchmod(fd, FILE_MODE)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run_info(run_dir) -> dict | None:
    values = _read_json(Path(run_dir) / RUN_INFO_FILE)
    return values if isinstance(values, dict) else None


def write_run_info(run_dir, info: dict) -> None:
    write_json(Path(run_dir) / RUN_INFO_FILE, info)


def read_metrics(run_dir) -> dict | None:
    values = _read_json(Path(run_dir) / METRICS_FILE)
    return values if isinstance(values, dict) else None


def write_metrics(run_dir, values: dict) -> Path:
    return write_json(Path(run_dir) / METRICS_FILE, values)


def figures_dir(run_dir) -> Path:
    return Path(run_dir) / FIGURES_DIR


def report_path(run_dir) -> Path:
    return Path(run_dir) / REPORT_FILE


# ----------------------------------------------------------------------------- checkpoints


class NonFiniteError(ValueError):
    """A checkpoint or weights that hold NaN or infinite values: never written, never loaded."""


@dataclass
class Checkpoint:
    """What a run needs to go on, saved as one dict of tensors and plain values in train_state.pt
    (read with `torch.load(weights_only=True)`: no pickled code), under "format" = 2 and these
    keys. It holds no random-number states: training seeds every epoch afresh from the config."""

    epoch: int  # finished epochs, >= 1
    model: dict  # the VAE's state dict, as model.safetensors exports it
    modules: dict  # the helpers' state dicts: "style_adversary", "discriminator_content", ...
    optimizers: dict  # the optimisers' state dicts: "optimizer", and "disc_optimizer" with discriminators
    record: dict | None  # the epoch's log record (None only when upgraded from format 1 without one)

    def to_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}


def save(run_dir, checkpoint: Checkpoint) -> None:
    """Write a checkpoint: train_state.pt in one rename, then model.safetensors from the same
    state, then the epoch's log line. Refuses (NonFiniteError) a state with a NaN or infinity."""
    import torch

    run_dir = Path(run_dir)
    bad = nonfinite(checkpoint.to_dict())
    if bad:
        raise NonFiniteError(f"{bad} is not finite")
    with atomic_write(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save(checkpoint.to_dict(), tmp)
    _export(run_dir, checkpoint)
    append_log(run_dir, checkpoint.record)


def resume(run_dir, device="cpu") -> Checkpoint | None:
    """The run's last checkpoint, its tensors on `device`, after bringing the folder in line with
    it; None when the run has none (a new folder, or one stopped before its first checkpoint).

    Removes temporary files of killed writes; rewrites model.safetensors when it lags the
    checkpoint (a kill between the two); cuts log.jsonl back to the checkpoint's epochs, each
    once, and restores the checkpoint's own record when its line is missing. Writes nothing when
    the folder already agrees. Refuses damaged checkpoints like `read_checkpoint`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    remove_stale_temporaries(run_dir)
    checkpoint = read_checkpoint(run_dir, device)
    if checkpoint is None:
        _repair_log(run_dir, 0, None)
        return None
    if _exported_epoch(run_dir) != checkpoint.epoch:
        _export(run_dir, checkpoint)
    _repair_log(run_dir, checkpoint.epoch, checkpoint.record)
    return checkpoint


def finished_epochs(run_dir) -> int:
    """Epochs a run folder's checkpoint holds; 0 when it has none yet."""
    checkpoint = read_checkpoint(run_dir)
    return checkpoint.epoch if checkpoint else 0


def read_checkpoint(run_dir, device="cpu") -> Checkpoint | None:
    """train_state.pt, or None when there is none. One-line ConfigError when it is damaged, is
    not made of tensors and plain values (nothing in it runs), or holds non-finite values."""
    import torch

    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch warns about pickles it then refuses: one line says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # damaged, truncated, or a pickle of more than tensors and plain values
        raise ConfigError(f"cannot read {path}: it is damaged, or not a checkpoint of tensors and plain "
                          "values (nothing in it was run)") from None
    if not (isinstance(state, dict) and type(state.get("epoch")) is int and state["epoch"] >= 1):
        raise ConfigError(f"{path} is not an omnivae checkpoint (no finished epoch in it)")
    version = state.pop("format", 1)
    if version == 1:
        state = _upgrade(run_dir, state, device)
    elif version != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} has checkpoint format {version!r}; this omnivae reads {CHECKPOINT_FORMAT}")
    names = [f.name for f in fields(Checkpoint)]
    if sorted(state) != sorted(names) or not all(isinstance(state[k], dict) for k in ("model", "modules", "optimizers")):
        raise ConfigError(f"{path} is not an omnivae checkpoint (its keys: {', '.join(map(str, state))})")
    checkpoint = Checkpoint(**state)
    bad = nonfinite(checkpoint.to_dict())
    if bad:
        raise ConfigError(f"{path} holds non-finite values ({bad}); it cannot be resumed")
    return checkpoint


def _upgrade(run_dir: Path, state: dict, device) -> dict:
    """A format-1 checkpoint (the VAE's weights in model.safetensors, the rest in train_state.pt)
    as format 2, when both files are from the same epoch."""
    epoch = state["epoch"]
    if _exported_epoch(run_dir) != epoch:
        raise ConfigError(f"{run_dir / CHECKPOINT_FILE} (epoch {epoch}) and {run_dir / WEIGHTS_FILE} are not from "
                          "the same epoch: this run was stopped between two writes and cannot be resumed")
    records = [r for r in read_log(run_dir) if r.get("epoch") == epoch]
    return {"epoch": epoch, "model": _read_weights(run_dir / WEIGHTS_FILE, device), "modules": state.get("modules", {}),
            "optimizers": {k: state[k] for k in ("optimizer", "disc_optimizer") if k in state},
            "record": records[-1] if records else None}


def _export(run_dir: Path, checkpoint: Checkpoint) -> None:
    """model.safetensors from a checkpoint: the VAE's own (unprefixed) state dict, or the moving
    average of its weights when the run keeps one (`ema_decay`), its epoch in the metadata."""
    from safetensors.torch import save_file

    model = checkpoint.modules.get("ema", checkpoint.model)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.items()}
    with atomic_write(run_dir / WEIGHTS_FILE) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "epoch": str(checkpoint.epoch)})


def _exported_epoch(run_dir: Path) -> int | None:
    """The epoch model.safetensors was exported at; None when missing, unreadable or unmarked."""
    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / WEIGHTS_FILE), framework="pt") as f:
            return int((f.metadata() or {})["epoch"])
    except Exception:  # missing, damaged, or written without an epoch
        return None


def _repair_log(run_dir: Path, epoch: int, record: dict | None) -> None:
    """Keep the log's last record of each epoch before `epoch`, then `record` (that epoch's own)."""
    path = run_dir / LOG_FILE
    if not path.exists():
        current = ""
    else:
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None
    earlier = {r["epoch"]: r for r in read_log(run_dir) if isinstance(r.get("epoch"), int) and r["epoch"] < epoch}
    if record is None:  # a format-1 checkpoint without its line: keep whatever line there is
        record = next((r for r in reversed(read_log(run_dir)) if r.get("epoch") == epoch), None)
    kept = [earlier[e] for e in sorted(earlier)] + ([record] if record else [])
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text == current:
        return
    if text:
        write_text(path, text)
    else:
        path.unlink(missing_ok=True)


def nonfinite(tree, name: str = "") -> str | None:
    """The name of the first tensor (or float) in nested dicts and lists that holds a NaN or an
    infinity, as "key/key/..."; None when everything is finite."""
    import torch

    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif isinstance(tree, torch.Tensor):
        finite = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return None if finite else name
    elif isinstance(tree, float):
        return None if math.isfinite(tree) else name
    else:
        return None
    for key, value in items:
        found = nonfinite(value, f"{name}/{key}" if name else str(key))
        if found:
            return found
    return None


# ----------------------------------------------------------------------------- the trained model


def load(run_dir, device: str = "cpu"):
    """The trained VAE of a run folder on `device`, in eval mode: the model that
    `StructuredVAE.from_pretrained(run_dir)` gives, built from config.json with the weights of
    model.safetensors (weights only: no pickles). One-line ConfigError for a folder that holds
    no run, a missing, empty or broken config, weights that are damaged, do not fit the config
    or are not finite."""
    from .model import ModelConfig, StructuredVAE, resolve_device

    run_dir = Path(run_dir)
    if not is_run_folder(run_dir):
        raise ConfigError(f"{run_dir} holds no {CONFIG_FILE}: not a run folder")
    if not (run_dir / WEIGHTS_FILE).exists():
        raise ConfigError(f"{run_dir} holds no {WEIGHTS_FILE}: not a trained run folder")
    cfg = read_config(run_dir)
    model = StructuredVAE(ModelConfig.from_config(cfg))
    load_weights(model, _read_weights(run_dir / WEIGHTS_FILE), f"the model of {run_dir}")
    return model.to(resolve_device(device)).eval()


def _read_weights(path: Path, device="cpu") -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises several kinds on a damaged file
        raise ConfigError(f"cannot read {path}: {' '.join(str(err).split())}") from None


def load_weights(model, weights: dict, what: str) -> None:
    """Load a state dict into `model` after checking, for one-line errors, that its names and
    shapes are the model's and that it is finite. `what` names the weights in messages."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    problem = None
    if missing or unexpected:
        problem = "; ".join(part for part in (_names("missing", missing), _names("unexpected", unexpected)) if part)
    elif wrong:
        k = wrong[0]
        problem = (f"{k} has shape {tuple(weights[k].shape)} where the config makes {tuple(expected[k].shape)}"
                   + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problem:
        raise ConfigError(f"cannot load {what}: the weights do not fit its {CONFIG_FILE}: {problem}")
    bad = nonfinite(weights)
    if bad:
        raise ConfigError(f"cannot load {what}: {bad} is not finite (NaN or infinite weights)")
    model.load_state_dict(weights)


def _names(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
    return f"{kind} {', '.join(names[:3])}{more}"
