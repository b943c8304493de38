"""bench/summary.py: groups of run folders, as the shell hands them over."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_summary():
    spec = importlib.util.spec_from_file_location("summary", ROOT / "bench" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_name_given_again_adds_to_its_group():
    """NAME=runs/x_seed{0,1} expands, in the shell, to NAME=runs/x_seed0 NAME=runs/x_seed1: one group of two."""
    parse = load_summary().parse_groups
    assert parse(["a=r/x0", "a=r/x1", "b=r/y0", "r/y1"]) == {"a": ["r/x0", "r/x1"], "b": ["r/y0", "r/y1"]}
    assert parse(["a=", "r/x0", "r/x1"]) == {"a": ["r/x0", "r/x1"]}
