"""omnivae: variational autoencoders with a content/style latent space on Omniglot.

    import omnivae
    model = omnivae.load("runs/default")          # trained model, eval mode
    content, style = model.encode(images)         # images: (N, 1, S, S) in [0, 1], ink = 1
    drawings = model.decode(content, style)       # pixel probabilities; both keep gradients
"""
from .config import Config, make_config
from .train import load

__version__ = "0.1.0"
__all__ = ["Config", "make_config", "load", "__version__"]
