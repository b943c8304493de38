import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from omnivae import losses


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 7), torch.randn(5, 7)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(losses.gaussian_kl(mean, logvar), expected)


def test_gaussian_kl_is_zero_at_the_prior():
    assert losses.gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


def test_free_bits_kl_known_answers():
    # Per-image KLs per dimension (logvar 0): 1/2 mean^2, i.e. [0.5, 0] and [0, 0]; batch means [0.25, 0].
    mean = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    logvar = torch.zeros(2, 2)
    assert losses.free_bits_kl(mean, logvar, 0.0).item() == pytest.approx(0.25)  # the plain KL, batch mean
    assert losses.free_bits_kl(mean, logvar, 0.0).item() == pytest.approx(losses.gaussian_kl(mean, logvar).mean().item())
    assert losses.free_bits_kl(mean, logvar, 0.1).item() == pytest.approx(0.25 + 0.1)  # dimension 2 floored
    assert losses.free_bits_kl(mean, logvar, 0.5).item() == pytest.approx(0.5 + 0.5)  # both floored
    # A floored dimension gives no gradient; one above its floor the KL's: d(1/2 * 1/2 m^2)/dm = m / 2.
    losses.free_bits_kl(mean, logvar, 0.1).backward()
    torch.testing.assert_close(mean.grad, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    mean.grad = None
    losses.free_bits_kl(mean, logvar, 0.5).backward()
    assert mean.grad.abs().max() == 0
    # With a log-variance: KL_j = 1/2 (exp(lv) - lv - 1) = 1/2 (e - 2) at lv = 1, above a floor of 0.3.
    value = losses.free_bits_kl(torch.zeros(3, 1), torch.ones(3, 1), 0.3).item()
    assert value == pytest.approx(0.5 * (math.e - 2))
    # The KL regulariser takes the floor as an option.
    assert losses.kl_regularizer(mean, logvar, None, free_bits=0.1).item() == pytest.approx(0.35)
    assert losses.kl_regularizer(mean, logvar, None).item() == pytest.approx(0.25)


def test_bernoulli_nll_of_zero_logits_is_log2_per_pixel():
    x = (torch.rand(4, 1, 28, 28) > 0.5).float()
    assert losses.bernoulli_nll(torch.zeros_like(x), x).item() == pytest.approx(784 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_kernel_of_a_point_with_itself_is_number_of_scales(kernel):
    x = torch.randn(3, 5)
    k = losses.KERNELS[kernel](x, x)
    torch.testing.assert_close(k.diagonal(), torch.full((3,), float(len(losses.DEFAULT_SCALES))))
    assert (k <= len(losses.DEFAULT_SCALES) + 1e-5).all() and (k > 0).all()


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_same_distribution_near_zero_different_distributions_positive(kernel):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    same = losses.mmd(x, y, kernel).item()
    shifted = losses.mmd(x, y + 1.0, kernel).item()
    assert abs(same) < 0.01
    assert shifted > 0.1
    assert shifted > 20 * abs(same)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_mmd_in_blocks_equals_the_whole_matrices(kernel, block):
    """Summing the kernel matrices a block of rows at a time gives the same estimate, for blocks
    that divide the sizes, that do not, and that exceed them; n and m differ."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 6, generator=g, dtype=torch.float64), 0.5 + torch.randn(37, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(losses.mmd(x, y, kernel, block=block), losses.mmd(x, y, kernel), rtol=1e-10, atol=1e-12)


def test_mmd_is_unbiased_on_average():
    # The unbiased estimator averages to 0 (not a positive bias ~1/n) between equal distributions.
    g = torch.Generator().manual_seed(1)
    values = [losses.mmd(torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)).item() for _ in range(300)]
    biased_scale = 2 * len(losses.DEFAULT_SCALES) / 20  # what the diagonal terms would add
    assert abs(sum(values) / len(values)) < 0.05 * biased_scale


def test_mmd_of_collapsed_codes_is_large():
    codes = torch.zeros(128, 8)
    assert losses.mmd(codes, torch.randn(128, 8)).item() > 0.5


def test_mmd_regularizer_sees_collapse_only_through_means():
    # Every posterior equal to the prior: sampled codes look like N(0, I), the means do not.
    torch.manual_seed(0)
    mean, logvar = torch.zeros(256, 8), torch.zeros(256, 8)
    code = losses.reparameterize(mean, logvar)
    assert losses.mmd_regularizer(mean, logvar, code).item() < 0.02  # the seed design: blind to collapse
    assert losses.mmd_regularizer(mean, logvar, mean).item() > 0.5  # aggregate of means: sees it


def test_product_of_two_gaussians_known_answer():
    # N(0, 1) * N(2, 1) -> N(1, 1/2); N(0, 1) * N(3, 1/2) -> precision 3, mean 2.
    mean = torch.tensor([[0.0, 0.0], [2.0, 3.0]])
    logvar = torch.log(torch.tensor([[1.0, 1.0], [1.0, 0.5]]))
    group_mean, group_logvar = losses.product_of_gaussians(mean, logvar, 2)
    torch.testing.assert_close(group_mean, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(group_logvar.exp(), torch.tensor([[0.5, 1 / 3]]))


def test_product_of_gaussians_groups_are_consecutive_rows():
    mean = torch.arange(6.0)[:, None]  # groups {0,1,2}, {3,4,5}
    group_mean, group_logvar = losses.product_of_gaussians(mean, torch.zeros(6, 1), 3)
    torch.testing.assert_close(group_mean, torch.tensor([[1.0], [4.0]]))
    torch.testing.assert_close(group_logvar.exp(), torch.full((2, 1), 1 / 3))


def test_average_gaussians():
    mean = torch.tensor([[0.0], [2.0]])
    logvar = torch.log(torch.tensor([[1.0], [3.0]]))
    group_mean, group_logvar = losses.average_gaussians(mean, logvar, 2)
    torch.testing.assert_close(group_mean, torch.tensor([[1.0]]))
    torch.testing.assert_close(group_logvar.exp(), torch.tensor([[2.0]]))


def test_supervised_contrastive_known_answers():
    labels = torch.tensor([0, 0, 1, 1])
    # All embeddings equal: every other row is equally likely, loss = log(B - 1).
    same = losses.supervised_contrastive(torch.ones(4, 3), labels)
    assert same.item() == pytest.approx(math.log(3), rel=1e-5)
    # Classes on orthogonal axes at a low temperature: positives win, loss -> 0.
    separated = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    assert losses.supervised_contrastive(separated, labels, temperature=0.05).item() < 1e-6
    # Swapped: positives are orthogonal, negatives aligned -> large loss.
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    assert losses.supervised_contrastive(mixed, labels, temperature=0.05).item() > 10


def test_prototypical_known_answer_by_hand():
    # G = 2 characters x M = 2 drawings, 1-D codes: group 0 = {0, 1}, group 1 = {1, 2}.
    codes = torch.tensor([[0.0], [1.0], [1.0], [2.0]])

    def row(own, other):  # -log softmax at the own prototype, from squared distances
        return -math.log(math.exp(-own) / (math.exp(-own) + math.exp(-other)))

    expected = (
        row(own=(0 - 1) ** 2, other=(0 - 1.5) ** 2)  # 0: own prototype is the other drawing, 1; group 1's mean 1.5
        + row(own=(1 - 0) ** 2, other=(1 - 1.5) ** 2)  # 1: own prototype 0
        + row(own=(1 - 2) ** 2, other=(1 - 0.5) ** 2)  # 2: own prototype 2; group 0's mean 0.5
        + row(own=(2 - 1) ** 2, other=(2 - 0.5) ** 2)  # 3: own prototype 1
    ) / 4
    assert losses.prototypical(codes, 2).item() == pytest.approx(expected, rel=1e-6)
    # The temperature divides the squared distances.
    halved = (row(1 / 2, 2.25 / 2) + row(1 / 2, 0.25 / 2)) / 2
    assert losses.prototypical(codes, 2, temperature=2.0).item() == pytest.approx(halved, rel=1e-6)


def test_prototypical_equal_codes_give_log_g_and_far_groups_give_zero():
    assert losses.prototypical(torch.ones(12, 5), 3).item() == pytest.approx(math.log(4), rel=1e-6)
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]]).repeat_interleave(4, 0)  # (12, 2)
    assert losses.prototypical(centres + 0.1 * torch.randn(12, 2), 4).item() < 1e-6


def test_prototypical_leaves_each_drawing_out_of_its_own_prototype():
    # Group 0's two drawings lie far apart around group 1's: with itself in its prototype a drawing
    # would tie (own mean 5 and group 1's mean 5 are equally far: log 2); left out, its own prototype
    # is the other drawing, 100 away, and the other group's mean 25 away: a loss of about 75.
    codes = torch.tensor([[0.0], [10.0], [4.9], [5.1]])
    loss = losses.prototypical(codes, 2).item()
    assert loss > 30
    # Rows of group 1 are still right (own prototype 0.2 away, group 0's mean 0.1 away -> a little loss).
    group_one = (math.log(1 + math.exp(0.2**2 - 0.1**2)) + math.log(1 + math.exp(0.2**2 - 0.1**2))) / 2
    group_zero = math.log(1 + math.exp(100 - 25))  # = 75 + log(1 + e^-75)
    assert loss == pytest.approx((group_zero + group_one) / 2, rel=1e-5)


def test_prototypical_gradient_pulls_drawings_toward_their_own_character():
    codes = torch.tensor([[0.0], [1.0], [1.0], [2.0]], requires_grad=True)
    losses.prototypical(codes, 2).backward()
    # Group 0 sits left of group 1 and they overlap: descent moves group 0 left and group 1 right.
    step = -codes.grad.squeeze(1)
    assert step[0] + step[1] < 0 < step[2] + step[3]


def test_discriminator_and_generator_losses_known_values():
    zero = torch.zeros(10)
    assert losses.discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert losses.generator_loss(zero).item() == pytest.approx(math.log(2))
    confident = losses.discriminator_loss(torch.full((10,), 20.0), torch.full((10,), -20.0))
    assert confident.item() < 1e-6
    # Label smoothing: a perfectly confident discriminator is now penalised.
    assert losses.discriminator_loss(torch.full((10,), 20.0), torch.full((10,), -20.0), smoothing=0.1).item() > 1.0


def test_r1_penalty_of_a_linear_discriminator():
    w = torch.tensor([1.0, -2.0, 2.0])
    z = torch.randn(6, 3, requires_grad=True)
    assert losses.r1_penalty(z @ w, z).item() == pytest.approx(0.5 * 9.0)


def test_style_cycle_known_answers():
    style = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert losses.style_cycle(style, style).item() == 0.0
    # Rows: 1/2 (1 + 4) = 2.5 and 1/2 (0.25) = 0.125; mean 1.3125.
    assert losses.style_cycle(torch.zeros(2, 2), style).item() == pytest.approx(1.3125)
    assert losses.style_cycle(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])).item() == pytest.approx(12.5)


def test_label_dependence_known_answers():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])
    codes, labels = torch.stack([a, a, b, b]), torch.tensor([0, 0, 1, 1])
    # Standardised over the 4 codes, each dimension is (-1, -1, 1, 1) * sqrt(3) / 2: a and b become
    # (-0.866, -0.866) and (0.866, 0.866), squared distance 6, whatever the scale of the codes.
    k_ab = sum(4.0 * s / (4.0 * s + 6.0) for s in losses.DEFAULT_SCALES)  # imq, C = 2 * dim * s
    k_aa = float(len(losses.DEFAULT_SCALES))
    # Same-label pairs (off the diagonal): both k_aa. All 12 ordered pairs: 4 of k_aa, 8 of k_ab.
    d = k_aa - (4 * k_aa + 8 * k_ab) / 12
    assert losses.label_dependence(codes, labels).item() == pytest.approx(d * d, rel=1e-5)
    assert losses.label_dependence(1e-3 * codes, labels).item() == pytest.approx(d * d, rel=1e-3)  # shrinking does not help
    # Codes that repel their own label: D < 0, still penalised.
    repel = losses.label_dependence(codes, torch.tensor([0, 1, 0, 1])).item()
    assert repel > 0
    assert losses.label_dependence(torch.ones(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])).item() == 0.0


def test_label_dependence_is_near_zero_for_independent_codes_and_large_for_gathered_ones():
    torch.manual_seed(0)
    labels = torch.arange(64).repeat_interleave(4)
    independent = losses.label_dependence(torch.randn(256, 8), labels).item()
    gathered = losses.label_dependence(torch.randn(64, 8).repeat_interleave(4, 0) + 0.1 * torch.randn(256, 8),
                                       labels).item()
    assert independent < 1e-3 < 1.0 < gathered
