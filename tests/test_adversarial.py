"""The adversarial regulariser (Makhzani et al. 2016): discriminator, both updates, prior match."""
import numpy as np
import torch

import omnivae
from fixtures import synthetic_omniglot
from omnivae import losses, metrics
from omnivae.config import make_config
from omnivae.model import Discriminator
from omnivae.train import build_parts, discriminator_step, train, train_step


def test_discriminator_alone_learns_to_separate_prior_from_shifted_codes():
    torch.manual_seed(0)
    disc = Discriminator(4, 32)
    optimizer = torch.optim.Adam(disc.parameters(), lr=1e-3)
    codes = torch.randn(512, 4) + 3.0  # encoder codes far from the prior
    history = []
    for step in range(150):
        prior = torch.randn(512, 4)
        loss = losses.discriminator_loss(disc(prior), disc(codes))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[0] > 1.0  # near 2 log 2 at the start
    assert np.mean(history[-10:]) < 0.1 * history[0]


def test_discriminator_step_leaves_the_encoder_alone():
    torch.manual_seed(0)
    cfg = make_config("quick", dict(channels=4, hidden=16, content_dim=4, style_dim=2, group_size=1, batch_size=8,
                                    content_regularizer="adversarial", style_regularizer="adversarial",
                                    contrastive_weight=0.0, device="cpu"))
    parts = build_parts(cfg, classes=4, device=torch.device("cpu"))
    out = parts.model(torch.rand(8, 1, 28, 28))
    encoder = {k: v.clone() for k, v in parts.model.state_dict().items()}
    disc = {k: v.clone() for k, v in parts.discriminators["content"].state_dict().items()}
    discriminator_step(parts, cfg, out)
    assert all(torch.equal(encoder[k], v) for k, v in parts.model.state_dict().items())
    assert any(not torch.equal(disc[k], v) for k, v in parts.discriminators["content"].state_dict().items())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in parts.model.parameters())


def test_short_adversarial_run_moves_the_aggregate_posterior_toward_the_prior(tmp_path):
    data = synthetic_omniglot()
    base = dict(channels=8, hidden=32, content_dim=4, style_dim=2, group_size=1, batch_size=32, contrastive_weight=0.0,
                style_regularizer="none", lr=2e-3, device="cpu", disc_lr=1e-3, rotations=False)
    images = data.tensors()

    def content_mmd(run):
        with torch.no_grad():
            content, _ = omnivae.load(run).encode(images)
        return metrics.prior_match(content.numpy(), seed=0)["mmd2"]

    free = train(make_config("quick", dict(base, content_regularizer="none", epochs=15)), tmp_path / "free", dataset=data,
                 progress=False)
    matched = train(make_config("quick", dict(base, content_regularizer="adversarial", content_weight=5.0, epochs=15)),
                    tmp_path / "adv", dataset=data, progress=False)
    assert content_mmd(matched) < 0.5 * content_mmd(free)
