import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import omnivae
from fixtures import synthetic_omniglot
from omnivae.config import ConfigError, make_config
from omnivae.model import ModelConfig, StructuredVAE
from omnivae.train import average_weights, build_parts, load_state, refresh_batch_norm, train, train_step


def tiny_config(**overrides):
    values = dict(channels=4, hidden=32, content_dim=4, style_dim=2, groups=4, group_size=4, epochs=1,
                  contrastive_weight=1.0, rotations=False, device="cpu")
    values.update(overrides)
    return make_config("quick", values)


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_omniglot()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if v.dtype.is_floating_point and not torch.equal(before[k], v)]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(content_regularizer="kl", style_regularizer="kl", group_size=1, batch_size=16, contrastive_weight=0.0),
    dict(content_regularizer="adversarial", style_regularizer="adversarial"),
    dict(style_adversary_weight=1.0, cross_weight=1.0, grouping="average"),
    dict(precision="bf16", content_regularizer="adversarial", style_regularizer="adversarial", style_adversary_weight=1.0,
         cross_weight=1.0),
    dict(encoder="conv4", proto_weight=1.0, contrastive_weight=0.0),
    dict(decoder="resnet", cross_weight=1.0),
    dict(decoder="pixelcnn", cross_weight=1.0, style_free_bits=0.01),
    dict(transfer_weight=1.0, style_regularizer="kl"),
    dict(cycle_weight=1.0, group_size=1, batch_size=16, contrastive_weight=0.0),
    dict(style_dependence_weight=1.0),
    dict(decoder="pixelcnn", base_weight=1.0),
    dict(content_regularizer="kl", prior_components=8),
])
def test_one_step_changes_every_trained_weight(overrides):
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    parts = build_parts(cfg, classes=8, device=torch.device("cpu"))
    before = {name: snapshot(m) for name, m in parts.modules().items()}
    x = torch.rand(16, 1, 28, 28)
    label = torch.arange(4).repeat_interleave(4)
    terms = train_step(parts, cfg, x, label)
    assert all(np.isfinite(v) for v in terms.values())
    for name, module in parts.modules().items():
        weights = [k for k, v in module.state_dict().items() if k.endswith("weight")]
        moved = changed(before[name], module)
        assert set(weights) <= set(moved), f"{name}: unchanged {set(weights) - set(moved)}"
    if cfg.content_regularizer == "adversarial":
        assert "disc" in terms and set(parts.discriminators) == {"content", "style"}


def test_style_free_bits_floor_the_style_term():
    """With a floor above every dimension's KL, the style term is style_dim * floor, whatever the codes."""
    torch.manual_seed(0)
    cfg = tiny_config(style_regularizer="kl", style_free_bits=50.0)
    parts = build_parts(cfg, classes=8, device=torch.device("cpu"))
    x, label = torch.rand(16, 1, 28, 28), torch.arange(4).repeat_interleave(4)
    terms = train_step(parts, cfg, x, label)
    assert terms["style"] == pytest.approx(cfg.style_dim * 50.0)
    assert terms["kl_style"] < 50.0  # the KL itself is logged beside it, unfloored
    plain = train_step(parts, dataclasses.replace(cfg, style_free_bits=0.0), x, label)
    assert plain["style"] == pytest.approx(plain["kl_style"], rel=1e-5)


@pytest.mark.parametrize("decoder", ["deconv", "resnet", "pixelcnn"])
def test_every_decoder_trains_a_run_folder(tmp_path, synthetic, decoder):
    run = train(tiny_config(decoder=decoder, pixelcnn_channels=4, pixelcnn_layers=2, cross_weight=1.0),
                tmp_path / "run", dataset=synthetic, progress=False)
    record = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["recon"]) and np.isfinite(record["val_recon"]) and np.isfinite(record["cross"])
    model = omnivae.load(run)
    assert model.config.decoder == decoder and model.autoregressive == (decoder == "pixelcnn")
    x = synthetic.subset(np.arange(5)).tensors()
    drawings = model.sample(*model.encode(x), generator=torch.Generator().manual_seed(0))
    assert drawings.shape == x.shape


def test_train_writes_a_run_folder_and_load_round_trips(tmp_path, synthetic):
    run = train(tiny_config(), tmp_path / "run", dataset=synthetic, progress=False)
    for name in ("config.json", "model.safetensors", "train_state.pt", "log.jsonl", "run.json"):
        assert (run / name).exists(), name
    record = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and np.isfinite(record["recon"]) and np.isfinite(record["val_recon"])
    model = omnivae.load(run)
    assert not model.training and model.image_size == 28
    x = synthetic.subset(np.arange(5)).tensors()
    content, style = model.encode(x)
    assert content.shape == (5, 4) and style.shape == (5, 2)
    again = omnivae.load(run)
    torch.testing.assert_close(again.decode(content, style), model.decode(content, style))
    assert not list(tmp_path.glob("run/*.tmp")), "temporary files left behind"


def test_bf16_without_support_trains_in_fp32_and_says_so(tmp_path, synthetic, monkeypatch, capsys):
    import omnivae.train as train_module

    monkeypatch.setattr(train_module, "bf16_supported", lambda device: False)
    run = train(tiny_config(precision="bf16"), tmp_path / "run", dataset=synthetic, progress=False)
    assert json.loads((run / "config.json").read_text())["precision"] == "fp32"
    assert "has no bfloat16 support; training in fp32" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "bf16_supported", lambda device: True)
    run = train(tiny_config(precision="bf16"), tmp_path / "run2", dataset=synthetic, progress=False)
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    assert "bfloat16" not in capsys.readouterr().err


def test_auto_precision_is_bf16_on_a_cpu_that_has_it_and_fp32_elsewhere(tmp_path, synthetic, monkeypatch, capsys):
    import omnivae.train as train_module
    from omnivae.train import auto_precision

    monkeypatch.setattr(train_module, "bf16_supported", lambda device: True)
    assert auto_precision(torch.device("cpu")) == "bf16"
    assert auto_precision(torch.device("cuda")) == "fp32"  # a GPU: float32 is faster for this network
    run = train(tiny_config(precision="auto"), tmp_path / "run", dataset=synthetic, progress=False)
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"  # the one it trained in
    monkeypatch.setattr(train_module, "bf16_supported", lambda device: False)
    assert auto_precision(torch.device("cpu")) == "fp32"
    run = train(tiny_config(precision="auto"), tmp_path / "run2", dataset=synthetic, progress=False)
    assert json.loads((run / "config.json").read_text())["precision"] == "fp32"
    assert "bfloat16" not in capsys.readouterr().err  # auto chose fp32: nothing to warn about


def test_validation_in_bf16_is_float32_to_bf16_precision(synthetic):
    """validate runs the networks in the training precision and sums in float32: the bf16
    numbers are float32's within bf16's round-off, and they are float32 values."""
    from omnivae.train import validate

    parts = build_parts(tiny_config(), 8, torch.device("cpu"))
    x = synthetic.tensors()[:40]
    full, half = validate(parts.model, x, batch=16), validate(parts.model, x, batch=16, precision="bf16")
    assert parts.model.training  # put back in training mode
    for key in ("val_recon", "val_kl_content", "val_kl_style"):
        assert half[key] != full[key] and half[key] == pytest.approx(full[key], rel=0.02)


def test_refuses_to_overwrite_a_trained_run(tmp_path, synthetic):
    train(tiny_config(), tmp_path / "run", dataset=synthetic, progress=False)
    with pytest.raises(ConfigError, match="already holds a trained run"):
        train(tiny_config(), tmp_path / "run", dataset=synthetic, progress=False)


@pytest.mark.parametrize("overrides", [dict(), dict(content_regularizer="adversarial", style_adversary_weight=1.0),
                                       dict(ema_decay=0.9)])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, synthetic, monkeypatch, overrides):
    straight = train(tiny_config(epochs=2, **overrides), tmp_path / "straight", dataset=synthetic, progress=False)

    import omnivae.train as training
    save = training.save_checkpoint

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt  # stopped right after epoch 1 was saved

    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=2, **overrides), tmp_path / "half", dataset=synthetic, progress=False)
    monkeypatch.setattr(training, "save_checkpoint", save)
    train(None, tmp_path / "half", dataset=synthetic, progress=False, resume=True)
    a, b = omnivae.load(straight).state_dict(), omnivae.load(tmp_path / "half").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    helpers = [torch.load(run / "train_state.pt", weights_only=True)["modules"] for run in (straight, tmp_path / "half")]
    for name in helpers[0]:
        for key in helpers[0][name]:
            torch.testing.assert_close(helpers[0][name][key], helpers[1][name][key], msg=f"{name}.{key}")
    assert len((tmp_path / "half" / "log.jsonl").read_text().splitlines()) == 2


def test_average_weights_moves_each_float_tensor_a_share_of_the_way_and_copies_counters():
    torch.manual_seed(0)
    model, average = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        model.weight.fill_(1.0), average.weight.fill_(0.0)
        model.running_mean.fill_(2.0), average.running_mean.fill_(4.0)
    model.num_batches_tracked.fill_(7)
    average_weights(average, model, 0.9)
    assert torch.allclose(average.weight, torch.full((3,), 0.1))  # 0.9 * 0 + 0.1 * 1
    assert torch.allclose(average.running_mean, torch.full((3,), 3.8))  # 0.9 * 4 + 0.1 * 2
    assert int(average.num_batches_tracked) == 7 and torch.equal(model.weight, torch.ones(3))


def test_refresh_batch_norm_recomputes_the_statistics_from_the_drawings():
    """After the refresh the first batch norm's running mean is the mean of the first convolution's
    outputs over all the drawings (equal batches: the mean of the batch means), whatever it was."""
    torch.manual_seed(0)
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2))
    conv, norm = model.features[0][0], model.features[0][1]
    with torch.no_grad():
        norm.running_mean.fill_(100.0), norm.running_var.fill_(100.0)
    images = torch.rand(256, 1, 28, 28)
    refresh_batch_norm(model, images, batch=128)
    with torch.no_grad():
        expected = conv(images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(norm.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert norm.momentum == 0.1 and float(norm.running_var.max()) < 10.0


def test_ema_run_keeps_the_average_as_its_model(tmp_path, synthetic):
    """ema_decay: every step moves the average toward the trained weights; model.safetensors (what
    evaluate and omnivae.load read) is the average, the checkpoint keeps both."""
    run = train(tiny_config(epochs=2, ema_decay=0.5), tmp_path / "run", dataset=synthetic, progress=False)
    state = torch.load(run / "train_state.pt", weights_only=True)
    loaded = omnivae.load(run).state_dict()
    for key, value in state["modules"]["ema"].items():
        torch.testing.assert_close(loaded[key], value, msg=key)
    trained = state["model"]
    assert any(not torch.allclose(trained[k], loaded[k]) for k in trained if trained[k].is_floating_point())
    # Without it the run's model is the trained weights, as before.
    plain = train(tiny_config(epochs=2), tmp_path / "plain", dataset=synthetic, progress=False)
    assert "ema" not in torch.load(plain / "train_state.pt", weights_only=True)["modules"]


def test_resume_restores_optimiser_and_discriminator(tmp_path, synthetic):
    cfg = tiny_config(content_regularizer="adversarial")
    run = train(cfg, tmp_path / "run", dataset=synthetic, progress=False)
    parts = build_parts(cfg, classes=8, device=torch.device("cpu"))
    assert load_state(run, parts, "cpu") == 1
    assert parts.optimizer.state and parts.disc_optimizer.state  # Adam moments came back
    saved = torch.load(run / "train_state.pt", weights_only=True)["modules"]["discriminator_content"]
    for key, value in parts.discriminators["content"].state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_load_rejects_a_folder_without_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        omnivae.load(tmp_path)


def test_structured_training_puts_the_factors_in_the_right_halves(tmp_path, synthetic):
    """Two obvious factors (glyph = character, position = drawer): after brief grouped training
    with the contrastive term, content codes identify the character and style codes do not."""
    cfg = tiny_config(epochs=30, content_dim=8, style_dim=4, channels=8, hidden=64, lr=3e-3, contrastive_weight=20.0,
                      style_adversary_weight=1.0, val_drawers=(20,))
    run = train(cfg, tmp_path / "run", dataset=synthetic, progress=False)
    model = omnivae.load(run)
    with torch.no_grad():
        content, style = (c.numpy() for c in model.encode(synthetic.tensors()))
    char, position = synthetic.character, (synthetic.drawer - 1)

    def nearest_neighbour_accuracy(codes, labels):
        codes = codes / np.linalg.norm(codes, axis=1, keepdims=True)
        sim = codes @ codes.T
        np.fill_diagonal(sim, -np.inf)
        return float((labels[sim.argmax(1)] == labels).mean())

    assert nearest_neighbour_accuracy(content, char) > 0.95
    assert nearest_neighbour_accuracy(style, char) < 0.5  # chance is 1/8
    # The drawer's position lives in the style code: neighbours in style share the position
    # far more often than neighbours in content do.
    assert nearest_neighbour_accuracy(style, position) > 2 * nearest_neighbour_accuracy(content, position)


def test_rotations_turn_whole_groups_and_make_new_labels():
    from omnivae.train import rotate_as_new_characters

    torch.manual_seed(0)
    x = torch.zeros(8, 1, 5, 5)
    x[:, 0, 0, 1] = 1.0  # a mark near the top-left corner shows the turn
    label = torch.tensor([3, 3, 5, 5, 7, 7, 9, 9])
    turned, new_label = rotate_as_new_characters(x, label, group_size=2)
    turns = new_label - label * 4
    assert ((0 <= turns) & (turns < 4)).all() and len(set(turns.tolist())) > 1
    assert torch.equal(turns[0::2], turns[1::2])  # one turn per group
    for i in range(8):
        torch.testing.assert_close(turned[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))


@pytest.mark.parametrize("kinds", [2, 8])
def test_reflections_mirror_whole_groups_as_further_new_labels(kinds):
    from omnivae.train import rotate_as_new_characters

    x = torch.zeros(2 * kinds, 1, 5, 5)
    x[:, 0, 0, 1] = 1.0  # a mark near the top-left corner shows the turn and the mirror
    label = torch.arange(kinds).repeat_interleave(2)  # two drawings per character
    turns = torch.arange(kinds)  # every kind once
    turned, new_label = rotate_as_new_characters(x, label, group_size=2, turns=turns, kinds=kinds)
    assert new_label.tolist() == (label * kinds + turns.repeat_interleave(2)).tolist()
    quarter = 4 if kinds == 8 else 1
    for k in range(kinds):
        expected = torch.rot90(x[2 * k], k % quarter, dims=(1, 2))
        expected = expected.flip(2) if k >= quarter else expected
        torch.testing.assert_close(turned[2 * k], expected)
        torch.testing.assert_close(turned[2 * k + 1], expected)
    marks = {tuple(torch.nonzero(turned[2 * k, 0])[0].tolist()) for k in range(kinds)}
    assert len(marks) == kinds  # each kind puts the mark somewhere else: no two are the same drawing


def test_reflections_multiply_the_classifier_characters():
    from omnivae.train import new_character_kinds

    assert [new_character_kinds(tiny_config(rotations=r, reflections=f)) for r in (False, True) for f in (False, True)] == [1, 2, 4, 8]


def test_weight_decay_shrinks_every_weight_by_lr_times_decay():
    from omnivae.train import build_parts

    parts = build_parts(tiny_config(weight_decay=0.5, lr=0.1), classes=4, device=torch.device("cpu"))
    before = [p.detach().clone() for p in parts.model.parameters()]
    for p in parts.model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: Adam's own step is 0, the decay alone moves the weights
    parts.optimizer.step()
    for old, new in zip(before, parts.model.parameters()):
        torch.testing.assert_close(new.detach(), old * (1 - 0.1 * 0.5))
    plain = build_parts(tiny_config(lr=0.1), classes=4, device=torch.device("cpu"))
    assert type(plain.optimizer) is torch.optim.Adam and plain.optimizer.param_groups[0]["weight_decay"] == 0


def test_encoder_only_weight_decay_leaves_the_decoder_weights_alone():
    from omnivae.train import build_parts

    parts = build_parts(tiny_config(weight_decay=0.5, lr=0.1, decay_decoder=False), classes=4, device=torch.device("cpu"))
    decoder = {id(p) for p in parts.model.decoder_parameters()}
    assert decoder and len(decoder) < len(list(parts.model.parameters()))
    before = {id(p): p.detach().clone() for p in parts.model.parameters()}
    for p in parts.model.parameters():
        p.grad = torch.zeros_like(p)
    parts.optimizer.step()
    for p in parts.model.parameters():
        factor = 1.0 if id(p) in decoder else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[id(p)] * factor)
    # the to_logits layer is the decoder's, the content head the encoder's
    assert id(parts.model.to_logits.weight) in decoder and id(parts.model.content_head.weight) not in decoder


def test_contrastive_head_is_what_the_contrastive_term_sees_and_is_trained():
    from omnivae.losses import supervised_contrastive
    from omnivae.train import _loss, build_parts, update

    cfg = tiny_config(contrastive_head=16, contrastive_weight=1.0)
    parts = build_parts(cfg, classes=4, device=torch.device("cpu"))
    assert set(parts.helpers()) == {"projection"}
    torch.manual_seed(0)
    x, label = torch.rand(8, 1, 28, 28), torch.arange(4).repeat_interleave(2)
    parts.model.eval()  # the same forward pass twice
    out = parts.model(x, group_size=2)
    _, terms = _loss(parts, cfg, x, label, 1.0, out)
    expected = supervised_contrastive(parts.projection(out.drawing_content_mean), label, cfg.temperature)
    torch.testing.assert_close(terms["contrastive"], expected)
    on_means = supervised_contrastive(out.drawing_content_mean, label, cfg.temperature)
    assert not torch.allclose(terms["contrastive"], on_means)
    parts.model.train()
    before = [p.detach().clone() for p in parts.projection.parameters()]
    update(parts, cfg, x, label)
    assert all(not torch.equal(b, p) for b, p in zip(before, parts.projection.parameters()))


def test_prototypical_term_is_added_with_its_weight():
    from omnivae.losses import prototypical
    from omnivae.train import _loss

    torch.manual_seed(0)
    cfg = tiny_config(groups=2, proto_weight=3.0, proto_temperature=2.0)
    parts = build_parts(cfg, classes=2, device=torch.device("cpu"))
    x, label = torch.rand(8, 1, 28, 28), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        out = parts.model(x, cfg.group_size)
        torch.manual_seed(1)  # the same prior samples for the MMD in both
        loss, terms = _loss(parts, cfg, x, label, 1.0, out)
        torch.manual_seed(1)
        without, rest = _loss(parts, dataclasses.replace(cfg, proto_weight=0.0), x, label, 1.0, out)
    # Each drawing's own content mean, its group's prototype leaving it out, the cfg's temperature.
    expected = prototypical(out.drawing_content_mean, 4, temperature=2.0)
    assert "proto" not in rest and float(terms["proto"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss - without) == pytest.approx(3.0 * float(expected), abs=1e-3)  # float32 sums of ~500 nats


def test_conv4_with_the_prototypical_term_trains_and_loads(tmp_path, synthetic):
    cfg = tiny_config(encoder="conv4", proto_weight=1.0, rotations=True)
    run = train(cfg, tmp_path / "run", dataset=synthetic, progress=False)
    record = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["proto"]) and 0 < record["proto"] < 10 and np.isfinite(record["val_recon"])
    model = omnivae.load(run)
    assert model.config.encoder == "conv4" and len(model.features) == 4
    content, style = model.encode(synthetic.subset(np.arange(3)).tensors())
    assert content.shape == (3, 4) and style.shape == (3, 2)


def test_grouped_content_kl_is_a_per_image_bound():
    # Hand-computed: 2 groups of M = 4 drawings. Each group's content posterior is the product
    # of its 4 Gaussians (precisions add, means are precision-weighted); its KL to N(0, I)
    # counts once per group, so per image it is sum over groups / 8 images.
    torch.manual_seed(0)
    cfg = tiny_config(content_regularizer="kl", style_regularizer="kl", groups=2, content_weight=1.0)
    parts = build_parts(cfg, classes=2, device=torch.device("cpu"))
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        q = parts.model.posterior(x)  # train-mode batch norm, as inside train_step
    precision = (-q.content_logvar).exp().view(2, 4, -1)  # (G, M, Dc)
    group_var = 1.0 / precision.sum(1)  # (G, Dc)
    group_mean = group_var * (q.content_mean.view(2, 4, -1) * precision).sum(1)
    group_kl = 0.5 * (group_mean**2 + group_var - group_var.log() - 1).sum(1)  # (G,)
    style_kl = 0.5 * (q.style_mean**2 + q.style_logvar.exp() - q.style_logvar - 1).sum(1)  # (B,)
    terms = train_step(parts, cfg, x, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert terms["content"] == pytest.approx(float(group_kl.sum() / 8), rel=1e-5)
    assert terms["kl_content"] == pytest.approx(float(group_kl.mean()), rel=1e-5)  # logged per posterior
    assert terms["style"] == pytest.approx(float(style_kl.mean()), rel=1e-5)


def test_validation_alphabets_never_enter_training(tmp_path, synthetic, monkeypatch):
    import omnivae.train as train_module

    seen = {}
    real_split = train_module.omni_data.split_by_drawer

    def spy(dataset, drawers):
        seen["alphabets"] = {dataset.alphabet_names[a] for a in np.unique(dataset.alphabet)}
        return real_split(dataset, drawers)

    monkeypatch.setattr(train_module.omni_data, "split_by_drawer", spy)
    names = synthetic.alphabet_names
    cfg = tiny_config(val_holdout=True, val_alphabets=names[1])
    train(cfg, tmp_path / "held", dataset=synthetic, progress=False)
    assert seen["alphabets"] == {names[0]}
    train(tiny_config(), tmp_path / "all", dataset=synthetic, progress=False)
    assert seen["alphabets"] == set(names)
    with pytest.raises(omnivae.data.DataError, match="validation alphabets not in the data: Nowhere"):
        train(tiny_config(val_holdout=True, val_alphabets="Nowhere"), tmp_path / "bad", dataset=synthetic, progress=False)


def test_mmd_on_sampled_codes_collapses_where_mmd_on_means_does_not(tmp_path, synthetic):
    # MMD between *sampled* codes and the prior is zero once every q(z|x) is N(0, I), so a
    # strong weight drives the encoder there (the seed document's collapse); MMD on the
    # posterior *means* asks the means themselves to spread like N(0, I).
    spread = {}
    for match in ("sample", "mean"):
        cfg = make_config("seed", dict(channels=8, hidden=64, content_dim=4, style_dim=2, batch_size=32, epochs=15,
                                       match_codes=match, content_weight=10.0, style_weight=10.0, seed=0,
                                       device="cpu", val_drawers=(20,)))
        model = omnivae.load(train(cfg, tmp_path / match, dataset=synthetic, progress=False))
        with torch.no_grad():
            q = model.posterior(synthetic.tensors())
        spread[match] = float(q.content_mean.var(0).sum())  # total variance of the content means
        if match == "sample":
            assert float(q.content_logvar.exp().mean()) > 0.75  # posteriors close to the prior's unit variance
    assert spread["sample"] < 0.5 < 2.0 < spread["mean"]


def test_lr_schedule_is_a_per_step_cosine_and_resumes_exactly():
    import math

    from omnivae.train import lr_schedule

    cfg = tiny_config(lr=1e-2, lr_min_ratio=0.1)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = lr_schedule(cfg, optimizer, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1e-2)
    assert rates[5] == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * 0.5)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the floor after the last step
    # A schedule rebuilt after 4 steps (as on resume) gives the same rates from there on.
    fresh = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    lr_schedule(cfg, fresh, total_steps=10, done_steps=4)
    assert fresh.param_groups[0]["lr"] == rates[4]


def test_resume_with_more_epochs_and_after_the_last_epoch(tmp_path, synthetic):
    from omnivae.train import finished_epochs

    run = train(tiny_config(epochs=1), tmp_path / "run", dataset=synthetic, progress=False)
    info = (run / "run.json").read_text()
    assert finished_epochs(run) == 1
    # Finished: nothing trains and run.json keeps the timing of the training that ran.
    train(None, run, dataset=synthetic, progress=False, resume=True)
    assert (run / "run.json").read_text() == info
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    # Stopped after its last checkpoint, before the run info: the log's epoch seconds give it back.
    (run / "run.json").unlink()
    train(None, run, dataset=synthetic, progress=False, resume=True)
    logged = json.loads((run / "log.jsonl").read_text())["seconds"]
    assert json.loads((run / "run.json").read_text())["train_seconds"] == round(logged, 1)
    (run / "run.json").write_text(info)
    # More epochs: config.json records the new total and training goes on from epoch 2.
    train(None, run, dataset=synthetic, progress=False, resume=True, epochs=2)
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert finished_epochs(run) == 2
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(ConfigError, match="epochs=1 is fewer than the 2 epochs"):
        train(None, run, dataset=synthetic, progress=False, resume=True, epochs=1)


class DeviceWaits(TorchDispatchMode):
    """Records the operations that make the host wait for a CUDA device, seen on the CPU: a tensor
    read as a Python number (_local_scalar_dense: item, float, bool), outputs whose size depends on
    values (nonzero, masked_select, boolean-mask indexing) and tensors made from host data
    (lift_fresh: torch.tensor or as_tensor of a NumPy array, a copy from pageable memory on CUDA)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = [a for a in (args[1] if name in ("index", "index_put", "index_put_") else [])
                 if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        if name in ("_local_scalar_dense", "nonzero", "masked_select", "lift_fresh") or masks:
            if not _in_optimizer():  # Adam reads its step counts, which stay on the host on CUDA too
                self.found.append(name)
        return func(*args, **(kwargs or {}))


def _in_optimizer() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if os.path.join("torch", "optim") in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_a_training_epoch_never_waits_for_the_device(synthetic):
    """No step of train_epoch makes the host wait for the device: the batches' indices are on the
    device before the epoch, rotations gather, losses avoid boolean masks, the terms stay on the
    device (read once, at the end of the epoch)."""
    from omnivae import distributed
    from omnivae.train import EpochTotals, epoch_plan, lr_schedule, train_epoch

    cfg = tiny_config(rotations=True, content_regularizer="adversarial", style_adversary_weight=1.0, cross_weight=1.0,
                      contrastive_weight=1.0, augment=1.0, binarize=True)
    _, label = np.unique(synthetic.character, return_inverse=True)
    parts = build_parts(cfg, 32, torch.device("cpu"))
    plan = epoch_plan(cfg, synthetic.character, 0, distributed.Process())[:3]  # (3, 16)
    schedule = lr_schedule(cfg, parts.optimizer, 10)
    images, label = synthetic.tensors(), torch.as_tensor(label)
    reads = []
    real_means = EpochTotals.means

    def means(self, epoch):  # the end of the epoch: reading the sums is the point
        reads.extend(waits.found)
        waits.found.clear()
        return real_means(self, epoch)

    EpochTotals.means = means
    try:
        with DeviceWaits() as waits:
            terms = train_epoch(parts, cfg, images, label, plan, 0, schedule, progress=False)
    finally:
        EpochTotals.means = real_means
    assert reads == [] and np.isfinite(list(terms.values())).all()


def test_compiled_training_matches_plain_training(tmp_path, synthetic, monkeypatch):
    """compile=true trains the same weights (dynamo's eager backend: the graph capture is tested,
    not the generated code), and the checkpoint holds the module's own names."""
    import functools

    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, mode: compiled.append((module, mode)) or real(module, backend="eager"))
    plain = train(tiny_config(rotations=True), tmp_path / "plain", dataset=synthetic, progress=False)
    fast = train(tiny_config(rotations=True, compile=True, compile_mode="reduce-overhead"), tmp_path / "fast",
                 dataset=synthetic, progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0][0], omnivae.StructuredVAE)
    assert compiled[0][1] == "reduce-overhead"  # the config's mode reaches torch.compile
    a, b = omnivae.load(plain).state_dict(), omnivae.load(fast).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=key)


def test_the_decoder_models_the_target_when_one_is_given():
    """update(..., target=t) (binarize_encoder=false): the encoder reads x, the reconstruction term scores t."""
    from omnivae.losses import bernoulli_nll
    from omnivae.model import Noise
    from omnivae.train import update

    cfg = tiny_config()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, 1, 28, 28, generator=g)
    t = (torch.rand(16, 1, 28, 28, generator=g) < x).float()
    label = torch.arange(4).repeat_interleave(4)
    torch.manual_seed(0)
    parts = build_parts(cfg, classes=8, device=torch.device("cpu"))
    torch.manual_seed(1)
    terms = update(parts, cfg, x, label, target=t)
    torch.manual_seed(0)
    twin = build_parts(cfg, classes=8, device=torch.device("cpu"))
    torch.manual_seed(1)
    out = twin.model(x, 4, Noise(torch.randn(4, cfg.content_dim), torch.randn(16, cfg.style_dim)))
    assert torch.allclose(terms["recon"], bernoulli_nll(out.logits, t), rtol=1e-4)
    assert not torch.allclose(terms["recon"], bernoulli_nll(out.logits, x), rtol=1e-3)


def _grouped_forward(**overrides):
    """A tiny model's config, parts, batch of 4 groups of 4 random drawings, labels and forward pass."""
    from omnivae.model import Noise

    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    parts = build_parts(cfg, classes=8, device=torch.device("cpu"))
    x, label = torch.rand(16, 1, 28, 28), torch.arange(4).repeat_interleave(4)
    out = parts.model(x, 4, Noise(torch.randn(4, cfg.content_dim), torch.randn(16, cfg.style_dim)))
    return cfg, parts, x, label, out


def test_transfer_term_decodes_each_content_with_its_pairs_style():
    from omnivae.losses import bernoulli_nll
    from omnivae.train import _loss

    cfg, parts, x, label, out = _grouped_forward(transfer_weight=2.0)
    loss, terms = _loss(parts, cfg, x, label, 1.0, out)
    pair = torch.tensor([(r // 4 ^ 1) * 4 + r % 4 for r in range(16)])  # drawing m of the paired group
    expected = bernoulli_nll(parts.model.decode_logits(out.content, out.style[pair], x), x)
    assert torch.equal(out.content[:4], out.content[:1].expand(4, -1))  # the group's content, not the drawing's
    assert terms["transfer"].item() == pytest.approx(expected.item(), rel=1e-6)
    without, _ = _loss(parts, dataclasses.replace(cfg, transfer_weight=0.0), x, label, 1.0, out)
    assert (loss - without).item() == pytest.approx(2.0 * expected.item(), rel=1e-4)
    with pytest.raises(ConfigError, match="even number of groups"):
        tiny_config(transfer_weight=1.0, groups=3)


def test_cycle_term_reads_back_a_prior_style_drawn_with_each_groups_content():
    from omnivae.losses import style_cycle
    from omnivae.train import _loss

    cfg, parts, x, label, out = _grouped_forward(cycle_weight=3.0)
    running = snapshot(parts.model)
    torch.manual_seed(5)
    loss, terms = _loss(parts, cfg, x, label, 1.0, out)
    assert not changed(running, parts.model)  # the decodings leave batch norm's running statistics alone
    torch.manual_seed(5)
    style = torch.randn(4, cfg.style_dim)  # the term's one draw: one prior style per group
    drawn = torch.sigmoid(parts.model.decode_logits(out.content[::4], style))
    expected = style_cycle(parts.model.posterior(drawn).style_mean, style)
    assert terms["cycle"].item() == pytest.approx(expected.item(), rel=1e-5)
    without, _ = _loss(parts, dataclasses.replace(cfg, cycle_weight=0.0), x, label, 1.0, out)
    assert (loss - without).item() == pytest.approx(3.0 * expected.item(), rel=1e-4)
    # Its gradient reaches the decoder and the style head, never the content head or the content code.
    parts.model.zero_grad()
    terms["cycle"].backward()
    assert parts.model.content_head.weight.grad is None or not parts.model.content_head.weight.grad.any()
    assert parts.model.style_head.weight.grad.abs().sum() > 0
    assert parts.model.to_logits.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="not autoregressive"):
        tiny_config(cycle_weight=1.0, decoder="pixelcnn")


def test_style_dependence_term_scores_the_style_means_against_the_characters():
    from omnivae.losses import label_dependence
    from omnivae.train import _loss

    cfg, parts, x, label, out = _grouped_forward(style_dependence_weight=1000.0)
    loss, terms = _loss(parts, cfg, x, label, 1.0, out)
    expected = label_dependence(out.style_mean, label)
    assert expected.item() > 0
    assert terms["style_dependence"].item() == pytest.approx(expected.item(), rel=1e-6)
    without, _ = _loss(parts, dataclasses.replace(cfg, style_dependence_weight=0.0), x, label, 1.0, out)
    assert (loss - without).item() == pytest.approx(1000.0 * expected.item(), rel=1e-4)
    with pytest.raises(ConfigError, match="group_size >= 2"):
        tiny_config(style_dependence_weight=1.0, group_size=1)


def test_base_term_scores_the_codes_own_logits_before_the_head():
    from omnivae.losses import bernoulli_nll
    from omnivae.train import _loss

    cfg, parts, x, label, out = _grouped_forward(decoder="pixelcnn", base_weight=1000.0)
    base = parts.model.to_logits(parts.model.decode_features(out.content, out.style))  # no head, no pixels
    assert torch.allclose(out.base_logits, base, atol=1e-6)
    assert not torch.allclose(out.logits, base, atol=1e-3)  # the head adds its own
    loss, terms = _loss(parts, cfg, x, label, 1.0, out)
    assert terms["base"].item() == pytest.approx(bernoulli_nll(base, x).item(), rel=1e-6)
    without, _ = _loss(parts, dataclasses.replace(cfg, base_weight=0.0), x, label, 1.0, out)
    assert (loss - without).item() == pytest.approx(1000.0 * terms["base"].item(), rel=1e-4)
    plain = _grouped_forward()[-1]
    assert plain.base_logits is plain.logits  # no head: the same logits
    with pytest.raises(ConfigError, match="decoder=pixelcnn"):
        tiny_config(base_weight=1.0)


def test_detail_kl_is_paid_by_the_drawings_decoded_with_their_detail_code():
    from omnivae.losses import gaussian_kl
    from omnivae.model import Noise
    from omnivae.train import _loss, update

    torch.manual_seed(0)
    cfg = tiny_config(detail_dim=3, detail_weight=2.0)
    parts = build_parts(cfg, classes=8, device=torch.device("cpu"))
    x, label = torch.rand(16, 1, 28, 28), torch.arange(4).repeat_interleave(4)
    keep = torch.tensor([1.0, 0.0] * 8)
    noise = Noise(torch.randn(4, cfg.content_dim), torch.randn(16, cfg.style_dim), torch.randn(16, 3))
    out = parts.model(x, 4, noise, detail_keep=keep)
    loss, terms = _loss(parts, cfg, x, label, 1.0, out)
    kl = gaussian_kl(out.detail_mean, out.detail_logvar)  # (16,)
    assert terms["detail"].item() == pytest.approx((kl * keep).mean().item(), rel=1e-6)
    assert terms["kl_detail"].item() == pytest.approx(kl.mean().item(), rel=1e-6)
    without, _ = _loss(parts, dataclasses.replace(cfg, detail_weight=0.0), x, label, 1.0, out)
    assert (loss - without).item() == pytest.approx(2.0 * terms["detail"].item(), abs=1e-3)
    # A whole update draws which drawings keep their detail code with the share detail_drop.
    dropped = update(parts, dataclasses.replace(cfg, detail_drop=1.0), x, label)
    assert dropped["detail"].item() == 0.0 and dropped["kl_detail"].item() > 0.0
    with pytest.raises(ConfigError, match="detail_drop"):
        tiny_config(detail_drop=1.5)
