import math

import numpy as np
import pytest
import torch

from fixtures import synthetic_omniglot
from omnivae import augment, distributed
from omnivae.config import ConfigError, make_config
from omnivae.train import build_parts, epoch_plan, lr_schedule, train_epoch


def drawings(n=4, side=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, side, side)
    x[:, :, 8:20, 12:15] = torch.rand(n, 1, 12, 3, generator=g)  # a grey vertical stroke, away from the border
    return x


def test_middle_draws_leave_drawings_unchanged():
    x = drawings()
    assert torch.allclose(augment.distort(x, torch.full((4, 6), 0.5)), x, atol=1e-6)
    assert augment.distort(x, torch.rand(4, 6), strength=0.0) is x


def test_affine_quarter_turn_and_shift_are_exact():
    x = drawings()
    zero, one = torch.zeros(4), torch.ones(4)
    turned = augment.affine(x, torch.full((4,), math.pi / 2), one, zero, torch.zeros(4, 2))
    assert any(torch.allclose(turned, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))
    assert not torch.allclose(turned, x, atol=1e-3)
    shifted = augment.affine(x, zero, one, zero, torch.tensor([[2 * 2 / 28, 0.0]] * 4))  # 2 pixels along the width
    assert torch.allclose(shifted[..., :-2], x[..., 2:], atol=1e-5) or torch.allclose(shifted[..., 2:], x[..., :-2], atol=1e-5)


def test_stroke_width_ends_are_dilation_and_erosion():
    x = drawings()
    thick = augment.stroke_width(x, torch.ones(4))
    thin = augment.stroke_width(x, -torch.ones(4))
    assert torch.equal(thick, torch.nn.functional.max_pool2d(x, 3, 1, 1))
    assert torch.equal(thin, -torch.nn.functional.max_pool2d(-x, 3, 1, 1))
    assert thick.sum() > x.sum() > thin.sum()


def test_distortions_stay_within_their_ranges():
    x = drawings(64)
    out = augment.distort(x, torch.rand(64, 6, generator=torch.Generator().manual_seed(1)), strength=1.0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    moved = (out - x).abs().flatten(1).sum(1)
    assert (moved > 0).all()  # every drawing gets its own change
    # the ink's centre moves by at most the shift and the scaled turn of a stroke near the centre: a few pixels
    cols = torch.arange(28.0)
    centre = lambda im: (im.sum((1, 2)) * cols).sum(-1) / im.sum((1, 2, 3)).clamp_min(1e-6)  # noqa: E731
    assert (centre(out) - centre(x)).abs().max() < 4


def test_dynamic_binarisation_is_a_fresh_bernoulli_draw():
    x = torch.full((1, 1, 28, 28), 0.3)
    x[..., :14] = 0.8
    assert torch.equal(augment.binarize(x, torch.full_like(x, 0.5)), (x > 0.5).float())
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([augment.binarize(x, torch.rand(x.shape, generator=g)) for _ in range(2000)])
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(draws.mean(0), x, atol=0.06)


@pytest.mark.parametrize("overrides", [dict(augment=1.0), dict(binarize=True),
                                       dict(binarize=True, binarize_encoder=False)])
def test_training_sees_the_changed_drawings(overrides, monkeypatch):
    """train_epoch hands `update` distorted or binarised drawings, not the stored ones."""
    synthetic = synthetic_omniglot()
    cfg = make_config("quick", dict(channels=4, hidden=32, content_dim=4, style_dim=2, groups=4, group_size=4,
                                    epochs=1, rotations=False, device="cpu", **overrides))
    _, label = np.unique(synthetic.character, return_inverse=True)
    images, label = 0.2 + 0.6 * synthetic.tensors(), torch.as_tensor(label)  # grey levels, so binarising changes them
    parts = build_parts(cfg, 32, torch.device("cpu"))
    plan = epoch_plan(cfg, synthetic.character, 0, distributed.Process())[:2]
    seen, inputs = [], []  # what the decoder models, what the encoder sees

    def update(parts, cfg, x, y, ramp=1.0, target=None):
        seen.append((x if target is None else target).clone())
        inputs.append(x.clone())
        return {"loss": torch.zeros(())}

    monkeypatch.setattr("omnivae.train.update", update)
    train_epoch(parts, cfg, images, label, plan, 0, lr_schedule(cfg, parts.optimizer, 10), progress=False)
    stored = [images[idx] for idx in plan]
    assert len(seen) == 2 and all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(seen, stored))
    if cfg.binarize:
        assert all(set(x.unique().tolist()) <= {0.0, 1.0} for x in seen)
        grey = [torch.equal(a, b) for a, b in zip(inputs, stored)]
        assert grey == [not cfg.binarize_encoder] * 2  # the encoder sees the grey drawing only when asked


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_encoder_binary_share(share, monkeypatch):
    """encoder_binary: the decoder models the stored grey drawing; the encoder reads that share
    of the drawings as binary draws (each one binary or untouched, never anything else)."""
    synthetic = synthetic_omniglot()
    cfg = make_config("quick", dict(channels=4, hidden=32, content_dim=4, style_dim=2, groups=8, group_size=4,
                                    epochs=1, rotations=False, device="cpu", encoder_binary=share))
    _, label = np.unique(synthetic.character, return_inverse=True)
    images, label = 0.2 + 0.6 * synthetic.tensors(), torch.as_tensor(label)  # grey levels everywhere
    parts = build_parts(cfg, 32, torch.device("cpu"))
    plan = epoch_plan(cfg, synthetic.character, 0, distributed.Process())
    binary = []

    def update(parts, cfg, x, y, ramp=1.0, target=None):
        stored = images[plan[len(binary)]]
        assert torch.equal(stored if target is None else target, stored)  # the decoder's target: the grey drawing
        flat = x.flatten(1)
        is_binary = ((flat == 0) | (flat == 1)).all(1)  # (B,)
        assert torch.equal(x[~is_binary], stored[~is_binary])
        binary.append(is_binary.float().mean().item())
        return {"loss": torch.zeros(())}

    monkeypatch.setattr("omnivae.train.update", update)
    train_epoch(parts, cfg, images, label, plan, 0, lr_schedule(cfg, parts.optimizer, 10), progress=False)
    assert len(binary) == len(plan) >= 2
    assert abs(np.mean(binary) - share) < 0.15


def test_encoder_binary_is_checked():
    with pytest.raises(ConfigError, match="encoder_binary must be between 0 and 1"):
        make_config("quick", dict(encoder_binary=1.5))
    with pytest.raises(ConfigError, match="binarize_encoder"):
        make_config("quick", dict(encoder_binary=0.5, binarize=True))


def test_paired_groups_share_their_draws():
    u = torch.arange(4 * 3 * 2, dtype=torch.float32).view(12, 2)  # 4 groups of 3 drawings, 2 draws each
    shared = augment.paired(u, 3)
    assert torch.equal(shared[:3], u[:3]) and torch.equal(shared[3:6], u[:3])  # groups 0 and 1: group 0's draws
    assert torch.equal(shared[6:9], u[6:9]) and torch.equal(shared[9:], u[6:9])  # groups 2 and 3: group 2's
    with pytest.raises(ValueError, match="pairs of groups"):
        augment.paired(u[:9], 3)


def test_transfer_pairs_share_each_drawings_distortion(monkeypatch):
    """With transfer_weight, drawing m of groups 2i and 2i + 1 get the same distortion amounts."""
    synthetic = synthetic_omniglot()
    cfg = make_config("quick", dict(channels=4, hidden=32, content_dim=4, style_dim=2, groups=4, group_size=4,
                                    epochs=1, rotations=False, device="cpu", augment=1.0, transfer_weight=1.0))
    _, label = np.unique(synthetic.character, return_inverse=True)
    parts = build_parts(cfg, 32, torch.device("cpu"))
    plan = epoch_plan(cfg, synthetic.character, 0, distributed.Process())[:1]
    amounts = []
    distort = augment.distort
    monkeypatch.setattr(augment, "distort", lambda x, u, s: (amounts.append(u.clone()), distort(x, u, s))[1])
    monkeypatch.setattr("omnivae.train.update", lambda *args, **kwargs: {"loss": torch.zeros(())})
    train_epoch(parts, cfg, synthetic.tensors(), torch.as_tensor(label), plan, 0,
                lr_schedule(cfg, parts.optimizer, 10), progress=False)
    (u,) = amounts
    groups = u.view(2, 2, 4, 6)  # (pairs, 2 groups, M drawings, draws)
    assert torch.equal(groups[:, 0], groups[:, 1]) and not torch.equal(groups[0, 0], groups[1, 0])
    assert len(torch.unique(groups[0, 0, :, 0])) == 4  # the drawings of a group differ


@pytest.mark.parametrize("kinds", [1, 2, 4, 8])
def test_turned_views_are_the_turns_and_mirrors_training_names_as_characters(kinds):
    from omnivae.train import rotate_as_new_characters

    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 1] = 1.0  # a mark near the top-left corner shows the turn and the mirror
    views = augment.turned_views(x, kinds)
    assert len(views) == kinds
    marks = {tuple(torch.nonzero(v[0, 0])[0].tolist()) for v in views}
    assert len(marks) == kinds  # every view a different drawing
    quarter = 4 if kinds >= 4 else 1
    for k, view in enumerate(views):
        expected = torch.rot90(x, k % quarter, dims=(2, 3))
        torch.testing.assert_close(view, expected.flip(3) if k >= quarter else expected)
        # The view of label k is the drawing training names character * kinds + k.
        turned, label = rotate_as_new_characters(x, torch.tensor([3]), 1, torch.tensor([k]), kinds)
        torch.testing.assert_close(turned, view)
        assert label.item() == 3 * kinds + k
    with pytest.raises(ValueError, match="kinds"):
        augment.turned_views(x, 3)
