"""omnivae: variational autoencoders with a content/style latent space on Omniglot.

    import omnivae
    model = omnivae.load("runs/default")          # trained model, eval mode
    content, style = model.encode(images)         # images: (N, 1, S, S) in [0, 1], ink = 1
    drawings = model.decode(content, style)       # pixel probabilities (samples for decoder=pixelcnn)

    model = omnivae.StructuredVAE.from_pretrained("runs/default")   # the Hub layout; save_pretrained too
"""
from .config import Config, make_config

__version__ = "0.1.0"
__all__ = ["Config", "ModelConfig", "StructuredVAE", "make_config", "load", "__version__"]


def __getattr__(name: str):
    # These need torch; importing them on first use keeps `import omnivae` (and the CLI's --help) light.
    if name == "load":
        from .rundir import load

        return load
    if name in ("ModelConfig", "StructuredVAE"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
