import torch

from omnivae import generate
from omnivae.config import make_config
from omnivae.model import StructuredVAE


def small_model(**overrides):
    torch.manual_seed(0)
    cfg = make_config("quick", {"channels": 4, "hidden": 16, "content_dim": 6, "style_dim": 3, **overrides})
    return StructuredVAE(cfg).eval()


def test_generation_in_batches_gives_what_one_batch_gives(monkeypatch):
    model = small_model()
    images = torch.rand(3, 1, 28, 28)
    whole = (generate.sample(model, 7, seed=1), generate.swap(model, images[:2], images),
             generate.one_shot(model, images[0], 5), generate.interpolate(model, images[0], images[1], 5, "both"))
    monkeypatch.setattr(generate, "BATCH", 2)
    batched = (generate.sample(model, 7, seed=1), generate.swap(model, images[:2], images),
               generate.one_shot(model, images[0], 5), generate.interpolate(model, images[0], images[1], 5, "both"))
    for a, b, shape in zip(whole, batched, [(7, 1, 28, 28), (2, 3, 1, 28, 28), (5, 1, 28, 28), (5, 1, 28, 28)]):
        assert b.shape == shape and b.device.type == "cpu"
        torch.testing.assert_close(a, b)
    # Interpolation starts at the first drawing's codes and ends at the second's.
    content, style = model.encode(images[:2])
    torch.testing.assert_close(batched[3][[0, -1]], model.decode(content, style))


def test_an_autoregressive_decoder_generates_seeded_binary_drawings(monkeypatch):
    model = small_model(decoder="pixelcnn", pixelcnn_layers=2, pixelcnn_channels=4)
    images = torch.rand(3, 1, 28, 28)
    assert generate.drawing_kind(model) == "binary samples, pixel by pixel"
    assert generate.drawing_kind(small_model()) == "pixel probabilities"

    def every():
        return (generate.sample(model, 5, seed=1), generate.swap(model, images[:2], images),
                generate.one_shot(model, images[0], 3), generate.interpolate(model, images[0], images[1], 3, "both"))

    whole = every()
    monkeypatch.setattr(generate, "BATCH", 2)
    for a, b in zip(whole, every()):  # one generator across the batches: the same drawings
        assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(generate.sample(model, 5, seed=2), whole[0])
