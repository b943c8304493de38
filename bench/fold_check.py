"""The likelihood with batch norms folded into the convolutions, against the model as trained.

    python bench/fold_check.py RUN_DIR [--images 60] [--k 200]

Scores the same binarised evaluation drawings with the same noise twice: the run's model with
1,000 decodings per pass (how the likelihoods ran before `fold_batch_norm`), and the folded copy
with `metrics.DECODES_PER_PASS` per pass (how `omnivae evaluate` runs them), and prints each NLL,
-ELBO and time. The data come from $OMNIVAE_DATA_DIR / $OMNIVAE_CACHE_DIR, as for `omnivae`.
"""

import argparse
import time

from omnivae import data, metrics
from omnivae.model import StructuredVAE, fold_batch_norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained run folder")
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--k", type=int, default=200)
    args = p.parse_args()
    model = StructuredVAE.from_pretrained(args.run).eval()
    test = data.load_set("evaluation", model.image_size, progress=False)
    x = metrics.binarize(test.tensors()[: args.images], seed=3)
    for name, scorer, chunk in (("as trained, 1,000 per pass", model, 1000 // 10),
                                (f"folded, {metrics.DECODES_PER_PASS} per pass", fold_batch_norm(model), None)):
        start = time.perf_counter()
        result = metrics.iwae_nll(scorer, x, k=args.k, batch_size=10, chunk=chunk, seed=0, blur=0.7)
        print(f"{name:28s}: NLL {result['nll']:.7f}, -ELBO {result['elbo_nll']:.7f} nats, "
              f"{time.perf_counter() - start:5.1f} s ({args.images} drawings, k = {args.k})")


if __name__ == "__main__":
    main()
