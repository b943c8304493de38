"""Loss functions, each pure: tensors in, tensor out.

Reduction convention, used everywhere: sum over pixels and latent dimensions, mean over
the batch. So a reconstruction term is "nats per image" and a KL term is "nats per code".
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# Scales of the multi-scale kernels, relative to the latent dimension (see `imq_kernel`).
DEFAULT_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) under independent Bernoulli pixels with the given logits.

    Sum over pixels, mean over the batch. `x` may be grey levels in [0, 1] (the
    cross-entropy with soft targets) or binarised images (the exact log-likelihood).
    """
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")  # (B, 1, S, S)
    return nll.flatten(1).sum(1).mean()


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per row, summed over dimensions.

    KL = 1/2 * sum_j (mean_j^2 + exp(logvar_j) - logvar_j - 1)
    (Kingma and Welling 2014, "Auto-Encoding Variational Bayes", Appendix B).
    Returns shape (B,): callers choose the reduction.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0).sum(-1)


def free_bits_kl(mean: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) with a floor of `free_bits` nats on each dimension's batch mean.

    L = sum_j max(lambda, mean_batch KL_j), KL_j = 1/2 (mean_j^2 + exp(logvar_j) - logvar_j - 1)
    (Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow",
    "free bits", with one group per dimension). A dimension whose average KL is below lambda adds
    lambda and no gradient, so the optimiser has no reason to push it further toward the prior:
    each dimension may carry up to lambda nats for free. With lambda = 0 it is the plain KL
    averaged over the batch. mean, logvar: (B, D); returns a scalar.
    """
    per_dim = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0).mean(0)  # (D,) batch mean of each dimension's KL
    return per_dim.clamp_min(free_bits).sum()


LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))) = -1/2 sum_j ((z_j - mean_j)^2 / sigma_j^2 + log sigma_j^2 + log 2 pi).

    Summed over the last dimension; the arguments broadcast against each other.
    """
    return -0.5 * ((z - mean).pow(2) * (-logvar).exp() + logvar + LOG_2PI).sum(-1)


def mixture_log_density(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor,
                        logits: torch.Tensor | None = None) -> torch.Tensor:
    """log p(z) under a mixture of K diagonal Gaussians, the learned prior of the content code.

    log p(z) = logsumexp_k [log pi_k + log N(z; mu_k, sigma_k^2)], pi = softmax(logits)
    (equal weights pi_k = 1/K when logits is None; the mixture-of-Gaussians prior that Tomczak and
    Welling 2018, "VAE with a VampPrior", compare against). z: (..., D); means, logvars: (K, D);
    logits: (K,); returns (...).
    """
    per_component = gaussian_log_density(z[..., None, :], means, logvars)  # (..., K)
    if logits is None:
        return per_component.logsumexp(-1) - math.log(means.shape[0])
    return (per_component + torch.log_softmax(logits, 0)).logsumexp(-1)


def sampled_kl(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, log_prior: Callable) -> torch.Tensor:
    """One-sample Monte Carlo estimate of KL(q(z|x) || p(z)) per row: log q(z|x) - log p(z), z ~ q.

    For a prior with no closed-form KL (a mixture); z must be the reparameterised sample of
    q = N(mean, exp(logvar)) so that gradients reach the encoder (Kingma and Welling 2014, eq. 6,
    the generic SGVB estimator). Unbiased; its expectation over z is the KL. z, mean, logvar: (B, D);
    log_prior maps (B, D) to (B,). Returns (B,).
    """
    return gaussian_log_density(z, mean, logvar) - log_prior(z)


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mean + sigma * eps with eps ~ N(0, I): a sample that keeps gradients to mean and logvar.
    `eps` (mean's shape) is drawn here when None."""
    eps = torch.randn_like(mean) if eps is None else eps
    return mean + eps * (0.5 * logvar).exp()


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # ||x_i - y_j||^2 via the expansion, clamped against tiny negative round-off.
    d = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2.0 * x @ y.T  # (n, m)
    return d.clamp_min(0.0)


def imq_kernel(x: torch.Tensor, y: torch.Tensor, scales=DEFAULT_SCALES) -> torch.Tensor:
    """Multi-scale inverse multiquadric kernel, k(x, y) = sum_s C_s / (C_s + ||x - y||^2).

    C_s = 2 * d * s with d the dimension, so C = 2d at s = 1 is the expected squared
    distance between two N(0, I) samples (Tolstikhin et al. 2018, "Wasserstein
    Auto-Encoders", section 4). Heavy tails keep gradients alive for far-away codes.
    """
    d2 = _squared_distances(x, y)
    dim = x.shape[1]
    return sum(2.0 * dim * s / (2.0 * dim * s + d2) for s in scales)


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, scales=DEFAULT_SCALES) -> torch.Tensor:
    """Multi-scale Gaussian (RBF) kernel, k(x, y) = sum_s exp(-||x - y||^2 / (2 d s)).

    (Gretton et al. 2012, "A Kernel Two-Sample Test"; bandwidths relative to the dimension d.)
    """
    d2 = _squared_distances(x, y)
    dim = x.shape[1]
    return sum(torch.exp(-d2 / (2.0 * dim * s)) for s in scales)


KERNELS: dict[str, Callable] = {"imq": imq_kernel, "rbf": rbf_kernel}


def mmd(x: torch.Tensor, y: torch.Tensor, kernel: str = "imq", scales=DEFAULT_SCALES, block: int | None = None) -> torch.Tensor:
    """Unbiased estimate of the squared maximum mean discrepancy between samples x and y.

    MMD^2 = E[k(x, x')] + E[k(y, y')] - 2 E[k(x, y)]
    with the diagonal (i = j) terms left out of the first two expectations
    (Gretton et al. 2012, Lemma 6). Can be slightly negative when the two
    distributions are equal. x: (n, d), y: (m, d), n, m >= 2.
    The kernel matrices are summed `block` rows at a time (None: whole, as for training batches),
    in float64, so memory stays at block x max(n, m) values (for thousands of codes: about 2.7x
    faster on a CPU at 5,000 codes than whole matrices).
    """
    k = KERNELS[kernel]
    n, m = x.shape[0], y.shape[0]
    block = block or max(n, m)

    def total(a, b):  # sum over all pairs of k(a_i, b_j)
        return sum(k(a[i : i + block], b, scales).sum(dtype=torch.float64) for i in range(0, len(a), block))

    def trace(a):  # sum of k(a_i, a_i)
        return sum(k(a[i : i + block], a[i : i + block], scales).diagonal().sum(dtype=torch.float64)
                   for i in range(0, len(a), block))

    estimate = ((total(x, x) - trace(x)) / (n * (n - 1)) + (total(y, y) - trace(y)) / (m * (m - 1))
                - 2.0 * total(x, y) / (n * m))
    return estimate.to(x.dtype)


# ---- regularisers toward the prior N(0, I), chosen by name --------------------------------
# Each takes the posterior (mean, logvar) of one latent part, the codes to match to the prior
# (posterior means or samples, see Config.match_codes) and returns a scalar for the batch.
# The trainer multiplies it by the part's weight. The adversarial regulariser needs a
# discriminator with its own optimiser, so it lives in train.py, built from the functions below.


def kl_regularizer(mean, logvar, codes, kernel="imq", sample_kl=0.0, group_size=1, prior=None, free_bits=0.0):
    """Closed-form KL(q(z|x) || N(0, I)) per image: the ELBO's term.

    Each row stands for `group_size` images that share it (a grouped content posterior), so
    the rows' KLs are summed and divided by the number of images, rows * group_size, as the
    reconstruction term is: the per-image bound of the multi-level VAE (Bouchacourt et al.
    2018, "Multi-Level Variational Autoencoder", eq. 4, averaged over the batch's images).
    With weight beta the grouped content KL thus weighs beta / M per image. free_bits > 0
    floors each dimension's batch-mean KL at that many nats (`free_bits_kl`).
    """
    if free_bits > 0:
        return free_bits_kl(mean, logvar, free_bits) / group_size
    return gaussian_kl(mean, logvar).mean() / group_size


def mmd_regularizer(mean, logvar, codes, kernel="imq", sample_kl=0.0, group_size=1, prior=None):
    """MMD^2 between the codes and as many N(0, I) samples, plus a small per-sample KL.

    When `codes` are the posterior *means* this matches the aggregate posterior to the
    prior, as Wasserstein autoencoders do (Tolstikhin et al. 2018): the means must spread
    out like N(0, I), so every image cannot get the same code. When they are *sampled*
    codes (the seed design) the MMD is zero once every q(z|x) equals the prior, which lets
    the encoder collapse. `sample_kl` weighs a per-sample KL that keeps each q(z|x) a
    proper Gaussian rather than a point; like `kl_regularizer` it is per image (divided by
    `group_size`). The MMD compares two distributions, not a sum over images, so it keeps
    its scale whatever the grouping. `prior`: the N(0, I) samples (codes' shape), drawn here when None.
    """
    loss = mmd(codes, torch.randn_like(codes) if prior is None else prior, kernel)
    if sample_kl:
        loss = loss + sample_kl * gaussian_kl(mean, logvar).mean() / group_size
    return loss


def no_regularizer(mean, logvar, codes, **_):
    return mean.new_zeros(())


REGULARIZERS: dict[str, Callable] = {
    "kl": kl_regularizer,
    "mmd": mmd_regularizer,
    "none": no_regularizer,
}


def discriminator_loss(prior_logits: torch.Tensor, code_logits: torch.Tensor, smoothing: float = 0.0):
    """Binary cross-entropy of a discriminator that calls prior samples 1 and encoder codes 0.

    L_D = -E_p[log D(z)] - E_q[log(1 - D(z))] (Makhzani et al. 2016, "Adversarial
    Autoencoders", section 2), with one-sided label smoothing of the prior target to
    1 - smoothing (Salimans et al. 2016). Mean over each batch.
    """
    real = F.binary_cross_entropy_with_logits(prior_logits, torch.full_like(prior_logits, 1.0 - smoothing))
    fake = F.binary_cross_entropy_with_logits(code_logits, torch.zeros_like(code_logits))
    return real + fake


def generator_loss(code_logits: torch.Tensor) -> torch.Tensor:
    """The encoder's side of the game, non-saturating form: -E_q[log D(z)] (Goodfellow et al. 2014)."""
    return F.binary_cross_entropy_with_logits(code_logits, torch.ones_like(code_logits))


def r1_penalty(prior_logits: torch.Tensor, prior_codes: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty, E_p[||grad_z D(z)||^2] / 2 on prior samples (Mescheder et al. 2018).

    `prior_codes` must have requires_grad=True and `prior_logits` must come from them.
    """
    (grad,) = torch.autograd.grad(prior_logits.sum(), prior_codes, create_graph=True)
    return 0.5 * grad.pow(2).sum(1).mean()


# ---- structure: grouping and content-level supervision -------------------------------------


def product_of_gaussians(mean: torch.Tensor, logvar: torch.Tensor, group_size: int):
    """Combine the posteriors of each group of `group_size` consecutive rows into one Gaussian.

    The product of M Gaussians N(mu_i, s_i^2) is, up to normalisation, N(mu, s^2) with
    1/s^2 = sum_i 1/s_i^2 and mu = s^2 * sum_i mu_i / s_i^2
    (Bouchacourt et al. 2018, "Multi-Level Variational Autoencoder", eq. 5).
    mean, logvar: (B, D) with B = G * M, group-major. Returns two (G, D) tensors.
    """
    g = mean.shape[0] // group_size
    mean = mean.view(g, group_size, -1)  # (G, M, D)
    precision = (-logvar).exp().view(g, group_size, -1)  # (G, M, D)
    total = precision.sum(1)  # (G, D)
    return (mean * precision).sum(1) / total, -total.log()


def average_gaussians(mean: torch.Tensor, logvar: torch.Tensor, group_size: int):
    """Group posterior as the average of the M means and variances (an alternative to the product)."""
    g = mean.shape[0] // group_size
    avg_mean = mean.view(g, group_size, -1).mean(1)  # (G, D)
    avg_var = logvar.exp().view(g, group_size, -1).mean(1)  # (G, D)
    return avg_mean, avg_var.log()


GROUPINGS: dict[str, Callable] = {"product": product_of_gaussians, "average": average_gaussians}


def supervised_contrastive(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1):
    """Supervised contrastive loss on L2-normalised embeddings.

    L = mean_i  -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) )
    with s the cosine similarity and P(i) the other rows with i's label
    (Khosla et al. 2020, "Supervised Contrastive Learning", eq. 2, L_out). Rows with no
    positive are left out of the mean.
    """
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.T / temperature  # (B, B)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, -math.inf)
    log_prob = sim - sim.logsumexp(1, keepdim=True)  # (B, B), -inf on the diagonal
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    per_row = -log_prob.masked_fill(~positives, 0.0).sum(1) / count.clamp_min(1)  # (B,), 0 without positives
    has = count > 0  # a weighted mean rather than per_row[has]: boolean indexing would wait for the device
    return (per_row * has).sum() / has.sum()


def style_cycle(style_mean: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Reverse-cycle loss: how far the style read back from a drawing is from the style it was drawn with.

    L = mean_i 1/2 ||mu_s(D(c_i, s_i)) - s_i||^2, with s_i ~ N(0, I) drawn for the purpose, c_i a
    content code of the batch, D the decoder and mu_s the encoder's style mean: `style_mean` holds
    the mu_s rows, `style` the s_i. The decoding and the encoding happen in the caller; this is
    the distance (Jha et al. 2018, "Disentangling Factors of Variation with Cycle-Consistent
    Variational Auto-Encoders", the reverse cycle, there an L1 distance between two re-encodings
    of one style; here the squared distance to the style itself, as the latent regression of
    BicycleGAN, Zhu et al. 2017). Sum over dimensions, mean over rows: 0 when every style is read
    back exactly, D/2 when the encoder answers 0 to every drawing.
    """
    return 0.5 * (style_mean - style).pow(2).sum(1).mean()


def label_dependence(codes: torch.Tensor, labels: torch.Tensor, kernel: str = "imq",
                     scales=DEFAULT_SCALES) -> torch.Tensor:
    """How much more alike the codes of one label are than codes in general, squared.

    D = mean_{i != j, y_i = y_j} k(u_i, u_j) - mean_{i != j} k(u_i, u_j),   L = D^2

    with k a `KERNELS` kernel and u the codes standardised over the batch, each dimension to
    mean 0 and standard deviation 1: so D does not fall when the codes shrink. (On raw codes it
    does, and a penalty on it squeezes the codes to nothing instead of making them independent.)
    D is, up to the normalisation, the Hilbert-Schmidt independence criterion of the codes and
    the labels under the delta kernel on labels, 1/n^2 tr(K H L H)
    (Gretton et al. 2005, "Measuring Statistical Dependence with Hilbert-Schmidt Norms"), with
    the diagonal left out: its i = j terms grow with how spread out the codes are, which is not
    dependence. D is 0 in expectation when the codes do not depend on the labels, positive when
    each label's codes gather (what nearest-neighbour style leakage reads), negative when they
    repel; squaring penalises both, so the minimum is independence rather than codes that avoid
    their own label. codes: (n, d); labels: (n,) with at least one repeated label.
    """
    u = (codes - codes.mean(0)) / (codes.std(0) + 1e-6)  # (n, d) standardised over the batch
    k = KERNELS[kernel](u, u, scales)  # (n, n)
    off = ~torch.eye(len(codes), dtype=torch.bool, device=codes.device)
    same = (labels[:, None] == labels[None, :]) & off
    d = (k * same).sum() / same.sum() - (k * off).sum() / off.sum()
    return d.pow(2)


def prototypical(embeddings: torch.Tensor, group_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Episodic prototypical loss inside a grouped batch, with leave-one-out prototypes.

    Rows come in G consecutive groups of M = `group_size` drawings of one character each. For
    drawing i of group g, its own character's prototype leaves it out, c_g^(-i) = 1/(M-1)
    sum_{j != i} z_gj, and every other character's is the mean of all its drawings,
    c_h = 1/M sum_j z_hj. With d(i, h) = ||z_gi - c_h||^2 (c_g^(-i) for h = g):

    L = mean_{g, i}  -log( exp(-d(i, g) / t) / sum_h exp(-d(i, h) / t) )

    (Snell et al. 2017, "Prototypical Networks for Few-shot Learning", eq. 1-2, squared
    Euclidean distance; the batch is the episode and each drawing is a query against the other
    drawings as support, so its own character has M-1 supports and a drawing is never its own
    support.) Mean over the batch's drawings. log(G) when every code is the same; 0 when the
    characters lie far apart. embeddings: (G * M, D), group-major, M >= 2.
    """
    g = embeddings.shape[0] // group_size
    z = embeddings.view(g, group_size, -1)  # (G, M, D)
    sums = z.sum(1)  # (G, D)
    distances = (z[:, :, None, :] - (sums / group_size)[None, None]).pow(2).sum(-1)  # (G, M, G) to every mean
    own = (z - (sums[:, None] - z) / (group_size - 1)).pow(2).sum(-1)  # (G, M) to the leave-one-out prototype
    is_own = torch.eye(g, dtype=torch.bool, device=z.device)[:, None, :]  # (G, 1, G)
    distances = torch.where(is_own, own[:, :, None], distances)  # (G, M, G)
    target = torch.arange(g, device=z.device).repeat_interleave(group_size)  # (G * M,) each row's own group
    return F.cross_entropy(-distances.reshape(g * group_size, g) / temperature, target)
