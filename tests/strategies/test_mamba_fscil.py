"""Mamba-FSCIL's classifier and losses (docs/methods/mamba_fscil.md §4: 3, 4, 5, 6) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cil.backbones import create_backbone
from cil.layers.etf import EtfClassifier, dot_regression_loss
from cil.strategies.mamba_fscil import class_sensitive_losses, separation_loss, suppression_loss


def test_3_etf_geometry_is_fixed_and_untrainable():
    etf = EtfClassifier(32, 10, seed=0)
    w = etf.etf
    gram = w.T @ w
    torch.testing.assert_close(gram.diagonal(), torch.ones(10), rtol=0, atol=1e-6)
    off = gram[~torch.eye(10, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 9), rtol=0, atol=1e-6)
    assert torch.linalg.matrix_rank(w) == 9 and list(etf.parameters()) == [] and "etf" in etf.state_dict()
    x = torch.randn(5, 32, requires_grad=True)
    etf.grow(4)
    logits = etf(x)
    assert logits.shape == (5, 4)
    torch.testing.assert_close(logits, torch.nn.functional.normalize(x, dim=1) @ w[:, :4])
    assert torch.equal(EtfClassifier(32, 10, seed=0).etf, w)  # the seed fixes it (numpy generator, as the code)
    with pytest.raises(ValueError, match="num_features >= 9"):
        EtfClassifier(4, 10)


def test_4_dot_regression_loss_by_hand():
    etf = EtfClassifier(16, 6, seed=1)
    features = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 5])
    x = features / features.norm(dim=1, keepdim=True)
    plain = sum((float(x[i] @ etf.etf[:, y]) - 1.0) ** 2 for i, y in enumerate(labels.tolist())) / 7
    assert dot_regression_loss(features, labels, etf).item() == pytest.approx(10 * 0.5 * plain, rel=1e-5)
    gamma, counts = 7 / 4, {0: 3, 1: 2, 2: 1, 5: 1}  # batch / distinct classes; class counts
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        r = math.sqrt(gamma / counts[y])
        total += (r * float(x[i] @ etf.etf[:, y]) - r) ** 2
    assert dot_regression_loss(features, labels, etf, with_length=True).item() == pytest.approx(
        10 * 0.5 * total / 7, rel=1e-5
    )
    # counts from the gathered batch of every process (here: a second process that saw three more 0s)
    gathered = torch.cat([labels, torch.tensor([0, 0, 0])])
    other = dot_regression_loss(features, labels, etf, with_length=True, all_labels=gathered)
    assert other.item() != pytest.approx(dot_regression_loss(features, labels, etf, with_length=True).item())


def test_5_suppression_is_a_plain_norm_over_the_element_count_and_novel_is_negative():
    gate = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4) - 5
    labels = torch.tensor([0, 7])  # one base (< 5), one novel
    rows = labels < 5
    expected = math.sqrt(sum(v * v for v in gate[0].flatten().tolist())) / 12
    assert suppression_loss(gate, rows).item() == pytest.approx(expected)
    losses = class_sensitive_losses(gate, {}, labels, 5, w_supp=100, w_novel=0.5, w_sep_new=0)
    assert losses["supp_base"].item() == pytest.approx(100 * expected)
    novel = math.sqrt(sum(v * v for v in gate[1].flatten().tolist())) / 12
    assert losses["supp_novel"].item() == pytest.approx(-0.5 * novel)
    only_base = class_sensitive_losses(gate, {}, torch.tensor([0, 1]), 5, w_supp=100, w_novel=0.5, w_sep_new=0)
    assert set(only_base) == {"supp_base"}


def test_6_separation_is_half_the_absolute_cosine_of_base_and_novel_means():
    angle = 2.0  # cos = -0.416
    pb, pn = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(angle), math.sin(angle)])
    # (B, R, L) with R = 2 features, L = 3 tokens; base rows average to pb, novel rows to pn
    param = torch.stack([pb * 0.5, pb * 1.5, pn, pn]).unsqueeze(-1).repeat(1, 1, 3)
    labels = torch.tensor([0, 1, 8, 9])
    base, novel = labels < 5, labels >= 5
    assert separation_loss(param.unsqueeze(1), base, novel).item() == pytest.approx(abs(math.cos(angle)) / 2, rel=1e-5)
    losses = class_sensitive_losses(torch.zeros(4, 2, 3), {"dt": param}, labels, 5, 0, 0, w_sep_new=1e-3)
    assert losses["sep_new_dt"].item() == pytest.approx(1e-3 * abs(math.cos(angle)) / 2, rel=1e-5)
    assert class_sensitive_losses(torch.zeros(2, 2, 3), {"dt": param[:2]}, labels[:2], 5, 0, 0, 1e-3) == {}


def official_class_sensitive_losses(x_main, params, labels, base_classes, w_supp, w_novel, w_sep_new):
    """One GPU of the code's ``calculate_class_sensitive_losses`` + ``calculate_sep_loss``, transcribed (its
    all_reduce(MIN) is the caller's: it passes presence flags through ``labels``)."""
    indices_base, indices_novel = labels < base_classes, labels >= base_classes
    losses = {}
    if indices_base.sum() > 0:
        losses["supp_base"] = w_supp * torch.norm(x_main[indices_base]) / torch.numel(x_main[indices_base])
    if indices_novel.sum() > 0:
        losses["supp_novel"] = -w_novel * torch.norm(x_main[indices_novel]) / torch.numel(x_main[indices_novel])
    if indices_base.sum() > 0 and indices_novel.sum() > 0:
        for key, value in params.items():  # (B, K, R, L): param_avg_dim = samples, directions, tokens
            avg = torch.cat([v.mean((0, 1, 3)).reshape((1, -1)) for v in (value[indices_base], value[indices_novel])])
            unit = torch.nn.functional.normalize(avg, dim=-1)
            losses[f"sep_new_{key}"] = w_sep_new * torch.mean(torch.abs(torch.eye(2) - unit @ unit.T))
    return losses


def test_loss_groups_reproduce_eight_gpus_of_eight_maps():
    """``group_size=8`` on 64 maps = the mean over 8 slices of the code's per-GPU losses (DDP averages gradients,
    so the losses are averaged); the whole batch at once gives other values (norms are not linear in the batch)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 6, 7, 3, 8, 9] * 8)[torch.randperm(64, generator=g)]
    labels = labels.view(8, 8).sort(dim=1).values.flatten()  # every group of 8 keeps base and novel maps
    gate = torch.randn(64, 4, 6, generator=g).requires_grad_()
    params = {k: torch.randn(64, 2, 5, 6, generator=g).requires_grad_() for k in ("dt", "B", "C")}
    weights = dict(w_supp=100.0, w_novel=0.5, w_sep_new=1e-3)
    ours = class_sensitive_losses(gate, params, labels, 5, **weights, group_size=8)
    per_gpu = [
        official_class_sensitive_losses(gate[i : i + 8], {k: v[i : i + 8] for k, v in params.items()},
                                        labels[i : i + 8], 5, **weights)
        for i in range(0, 64, 8)
    ]  # fmt: skip
    assert set(ours) == set(per_gpu[0]) == {"supp_base", "supp_novel", "sep_new_dt", "sep_new_B", "sep_new_C"}
    for key, value in ours.items():
        torch.testing.assert_close(value, torch.stack([gpu[key] for gpu in per_gpu]).mean())
    whole = class_sensitive_losses(gate, params, labels, 5, **weights)
    assert abs(whole["supp_base"].item() - ours["supp_base"].item()) > 0.1 * abs(ours["supp_base"].item())
    # the gradients DDP would average
    grad_ours = torch.autograd.grad(sum(ours.values()), [gate, *params.values()])
    grad_gpus = torch.autograd.grad(sum(sum(gpu.values()) for gpu in per_gpu) / 8, [gate, *params.values()])
    for a, b in zip(grad_ours, grad_gpus):
        torch.testing.assert_close(a, b)


def test_a_group_without_novel_maps_switches_the_novel_losses_off_for_all():
    """The code's all_reduce(MIN): one GPU without novel maps means no enhancement and no separation anywhere."""
    labels = torch.tensor([0, 1, 7, 8] + [0, 1, 2, 3])
    gate, params = torch.randn(8, 3, 4), {"dt": torch.randn(8, 1, 2, 4)}
    losses = class_sensitive_losses(gate, params, labels, 5, 1.0, 1.0, 1.0, group_size=4)
    assert set(losses) == {"supp_base"}
    assert set(class_sensitive_losses(gate, params, labels, 5, 1.0, 1.0, 1.0)) == {"supp_base", "supp_novel",
                                                                                  "sep_new_dt"}  # fmt: skip


def test_grouped_feature_mixup_pairs_maps_within_their_group():
    from cil.strategies.mamba_fscil import grouped_permutation

    torch.manual_seed(0)
    index = grouped_permutation(64, 8)
    assert sorted(index.tolist()) == list(range(64))
    assert all(set(index[i : i + 8].tolist()) == set(range(i, i + 8)) for i in range(0, 64, 8))
    assert not torch.equal(index, torch.arange(64))


def test_incremental_loss_uses_the_configured_groups():
    """The strategy's incremental loss with ``loss_group_size=4``: dot regression on the whole batch plus the
    per-group class-sensitive losses (no feature mixup)."""
    from cil.config import ConfigError
    from cil.module import Session

    strategy = tiny_strategy(loss_group_size=4, inc_batch_size=8, feat_mixup_prob=0.0, w_novel=0.5)
    strategy.begin_session(Session(index=0, new_classes=[0, 1, 2, 3], seen_classes=[0, 1, 2, 3]))
    strategy._freeze_base()
    strategy.session_index = 1
    strategy.eval()
    maps, labels = torch.randn(8, 16, 2, 2), torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    loss = strategy.incremental_loss(maps, labels)
    out = strategy.projector(maps)
    hp = strategy.hparams
    per_group = [
        class_sensitive_losses(out.gate[i : i + 4], {k: v[i : i + 4] for k, v in out.params.items()},
                               labels[i : i + 4], 4, hp.w_supp, hp.w_novel, hp.w_sep_new)
        for i in (0, 4)
    ]  # fmt: skip
    expected = strategy.dr(out.features, labels, hp.inc_with_length) + sum(
        (a + b) / 2 for a, b in zip(per_group[0].values(), per_group[1].values())
    )
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="loss_group_size=3 must divide strategy.inc_batch_size=8"):
        tiny_strategy(loss_group_size=3, inc_batch_size=8)


def test_resnet12_is_a_timm_model_returning_the_last_feature_map():
    model = create_backbone("resnet12")
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 640, 2, 2)
    assert model.forward_features(torch.randn(1, 3, 84, 84)).shape == (1, 640, 5, 5)
    assert model(x).shape == (2, 640) and model.num_features == 640
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert widths == [64, 160, 320, 640]  # the shortcuts of the four stages
    acts = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.1 for a in acts)
    assert create_backbone("resnet18").forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


# ---- the strategy ---------------------------------------------------------------------------------------------
def tiny_strategy(**settings):
    from cil.strategies.mamba_fscil import MambaFSCIL

    torch.manual_seed(0)
    backbone = create_backbone("resnet12", channels=(8, 8, 16, 16))  # 32 px -> a 16 x 2 x 2 map
    defaults = dict(
        num_classes=8, num_base_classes=4, feat_size=2, out_channels=16, d_state=4, base_epochs=1, base_warmup=0
    )
    return MambaFSCIL(backbone, **{**defaults, **settings})


def tiny_session(k: int, classes: list[int], per_class: int, seen: int):
    from torch.utils.data import DataLoader, TensorDataset

    from cil.module import Session

    g = torch.Generator().manual_seed(k)
    y = torch.tensor(classes).repeat_interleave(per_class)
    x = torch.randn(len(y), 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1) / 4
    data = TensorDataset(x, y)
    return Session(k, classes, list(range(seen)), data, loader_fn=lambda: DataLoader(data, batch_size=5))


def test_10_incremental_session_data_and_evaluation_mask():
    strategy = tiny_strategy(copies=[3], base_copies=[2, 4], inc_steps=[7], inc_batch_size=5)
    base = tiny_session(0, [0, 1, 2, 3], per_class=6, seen=4)
    strategy.begin_session(base)
    strategy.end_session(base)  # base means stored; backbone frozen; new branch attached
    assert strategy.projector.new is not None and not any(p.requires_grad for p in strategy.backbone.parameters())
    first = tiny_session(1, [4, 5], per_class=5, seen=6)
    strategy.begin_session(first)
    pool_x, pool_y = strategy.session_pool
    assert torch.bincount(pool_y).tolist() == [2, 2, 2, 2, 5, 5]  # shots + base means x base_copies[0]
    with torch.no_grad():
        maps0 = strategy.feature_map(base.train_data.tensors[0][base.train_data.tensors[1] == 2])
    torch.testing.assert_close(pool_x[pool_y == 2][0], maps0.mean(0), rtol=1e-5, atol=1e-5)
    assert len(strategy.train_data(first)) == 7 * 5 and strategy.batch_size_for(first) == 5
    strategy.end_session(first)
    second = tiny_session(2, [6, 7], per_class=5, seen=8)
    strategy.begin_session(second)
    counts = torch.bincount(strategy.session_pool[1]).tolist()
    assert counts == [4, 4, 4, 4, 3, 3, 5, 5]  # base x base_copies[1], earlier novel means x copies, shots
    with torch.no_grad():
        logits = strategy.eval()(second.train_data.tensors[0][:3])
    assert logits.shape == (3, 8)  # the ETF over the classes seen so far
    assert strategy.epochs_for(base) == 1 and strategy.epochs_for(second) == 1


def test_frozen_base_branch_runs_once_per_session_with_the_same_losses():
    """CIFAR/miniImageNet (base branch frozen and detached): the base branch's output on the session's pool is
    computed once at the session start; a training step scans only the new branch, and its loss and gradients
    equal those of the full projector."""
    strategy = tiny_strategy(inc_steps=[4], inc_batch_size=6, feat_mixup_prob=0.0, w_novel=0.5)
    base = tiny_session(0, [0, 1, 2, 3], per_class=4, seen=4)
    strategy.begin_session(base)
    strategy.end_session(base)
    first = tiny_session(1, [4, 5], per_class=5, seen=6)
    strategy.begin_session(first)
    strategy.eval()
    assert strategy._kept is not None and len(strategy._kept) == len(strategy.session_pool[1])
    index, labels = strategy.train_data(first).tensors
    index, labels = index[:6], labels[:6]
    calls = []
    handle = strategy.projector.base.register_forward_hook(lambda *a: calls.append(1))
    cached = strategy.training_step((index, labels), 0)
    assert not calls  # the base branch did not run in the step
    new_params = [p for p in strategy.projector.new.parameters()]
    grads = torch.autograd.grad(cached, new_params, allow_unused=True)
    full = strategy.incremental_loss(strategy._pool[index], labels)  # the projector as a whole
    assert calls  # here it did
    handle.remove()
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(full, new_params, allow_unused=True)):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    sep = tiny_strategy(w_sep=1e-3)  # the base branch's dt/B/C are needed: no cache
    sep.begin_session(base)
    sep.end_session(base)
    sep.begin_session(first)
    assert sep._kept is None


def test_the_new_branch_starts_silent_and_checkpoints_restore_it():
    strategy = tiny_strategy()
    base = tiny_session(0, [0, 1, 2, 3], per_class=3, seen=4)
    strategy.begin_session(base)
    x = base.train_data.tensors[0]
    strategy.eval()
    with torch.no_grad():
        before = strategy(x)
        strategy.end_session(base)
        assert torch.equal(strategy.eval()(x), before)  # bitwise: the fresh new branch adds 0
    fresh = tiny_strategy()
    fresh.load_state_dict(strategy.state_dict())  # a checkpoint after the base session holds the new branch
    assert fresh.projector.new is not None and bool(fresh.base_done)
    with torch.no_grad():
        fresh.etf.grow(4)
        assert torch.equal(fresh.eval()(x), before)


def test_digits_run_reports_fscil_metrics(tmp_path):
    from cil.runs import load_run
    from cil.session import run_experiment
    from tests.helpers import tiny_config

    fast = [
        "backbone.image_size=32",
        "backbone.kwargs={channels: [16, 16, 32, 64]}",
        "strategy.out_channels=64",
        "strategy.d_state=8",
        "strategy.base_epochs=1",
        "strategy.inc_steps=[10]",
    ]
    run = load_run(run_experiment(tiny_config("mamba_fscil", tmp_path, *fast)))
    metrics = run.summary["metrics"]
    assert run.summary["complete"] and run.summary["n_sessions"] == 4
    for key in ("last_base_acc", "last_novel_acc", "performance_drop", "last_harmonic_mean"):
        assert math.isfinite(metrics[key]["value"]), key
    seen = run.metrics.query("metric == 'seen_accuracy'").value.to_numpy()
    assert metrics["performance_drop"]["value"] == pytest.approx(seen[0] - seen[-1])


# config: (split, image size, feat size, out channels, residual proj, base lr, inc lr, inc steps, copies,
#          base copies, w_supp, w_novel, w_sep_new, feature-mixup prob, length targets base/inc, image mixing)
PAPER = {
    "cifar100_fscil": (
        "B60-Inc5", 32, 2, 640, False, 0.25, 0.25, [200], [1], [1], 100, 1e-5, 1e-3, 0.75, False, True, True,
    ),
    "miniimagenet_fscil": (
        "B60-Inc5", 84, 5, 512, True, 0.25, 0.01, list(range(100, 171, 10)), [10], list(range(1, 9)),
        100, 0.0, 0.5, 0.3, True, True, False,
    ),
    "cub200_fscil": (
        "B100-Inc10", 224, 7, 1024, True, 0.2, 0.05, list(range(200, 291, 10)), [10], [1, 1, 2, 2, 3, 3, 1, 1, 1, 1],
        100, 10.0, 1e-3, 0.5, False, False, False,
    ),
}  # fmt: skip
EXTRA = {  # (num classes, base classes, version, base-branch lr scale, backbone)
    "cifar100_fscil": (100, 60, "ssm", 0.0, "resnet12"),
    "miniimagenet_fscil": (100, 60, "ssm", 0.0, "resnet12"),
    "cub200_fscil": (200, 100, "ss2d", 0.2, "resnet18.tv_in1k"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_build_the_official_model(name):
    """What each paper config builds, against the official configs: the backbone's last map at the input size
    (its size is the projector's), the projector's width, state size, residual projection and scan version, the
    ETF over every class, the loss groups of the code's GPUs, and the settings the sessions are driven with."""
    from cil.config import load_config
    from cil.layers.ssm import SS2D
    from cil.module import create_strategy
    from tests.helpers import CONFIGS

    (split, size, feat, width, residual, base_lr, inc_lr, steps, copies, base_copies,
     w_supp, w_novel, w_sep_new, mix_p, base_len, inc_len, image_mix) = PAPER[name]  # fmt: skip
    classes, base_classes, version, lr_scale, backbone = EXTRA[name]
    cfg = load_config(CONFIGS / "mamba_fscil" / f"{name}.yaml", ["backbone.pretrained=false"])
    strategy = create_strategy(cfg).eval()
    hp = strategy.hparams
    assert cfg.backbone.name == backbone and cfg.stream.split == split and cfg.stream.shots == 5
    with torch.no_grad():
        fmap = strategy.feature_map(torch.zeros(1, 3, size, size))
        assert tuple(fmap.shape[2:]) == (feat, feat)
        out = strategy.projector(fmap)
    assert out.features.shape[1] == width == strategy.etf.etf.shape[0]
    assert strategy.etf.etf.shape[1] == classes and hp.num_base_classes == base_classes
    assert isinstance(strategy.projector.residual, torch.nn.Linear) == residual
    assert any(isinstance(m, SS2D) for m in strategy.projector.modules()) == (version == "ss2d")
    assert {p.shape[-1] for n, p in strategy.projector.named_parameters() if "A_log" in n} == {256}  # d_state
    assert strategy.projector.detach_base == (lr_scale == 0) and hp.base_branch_lr_scale == lr_scale
    assert (hp.inc_batch_size, hp.loss_group_size, cfg.stream.batch_size, hp.faithful_quirks) == (64, 8, 512, True)
    settings = (
        hp.base_lr,
        hp.inc_lr,
        list(hp.inc_steps),
        list(hp.copies),
        list(hp.base_copies),
        hp.w_supp,
        hp.w_novel,
        hp.w_sep_new,
        hp.feat_mixup_prob,
        hp.base_with_length,
        hp.inc_with_length,
        hp.image_mix,
    )
    assert settings == (base_lr, inc_lr, steps, copies, base_copies, w_supp, w_novel, w_sep_new, mix_p, base_len,
                        inc_len, image_mix)  # fmt: skip


def test_cub_config_builds_the_ss2d_model_with_frozen_stem(tmp_path):
    from cil.config import load_config
    from cil.module import create_strategy
    from tests.helpers import CONFIGS

    cfg = load_config(CONFIGS / "mamba_fscil" / "cub200_fscil.yaml", ["backbone.pretrained=false"])
    strategy = create_strategy(cfg).train()
    frozen = [n for n, p in strategy.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1.", "bn1.", "layer1.")) for n in frozen)
    assert not strategy.backbone.layer1.training and strategy.backbone.layer2.training
    with torch.no_grad():
        out = strategy.projector(torch.randn(2, 512, 7, 7))
    assert out.features.shape == (2, 1024) and out.params["B"].shape == (2, 4, 256, 49)


def test_cifar_config_builds_its_few_shot_stream_and_model(tmp_path):
    from functools import partial

    from cil.config import load_config
    from cil.loaders import stream_transforms
    from cil.module import create_strategy
    from cil.streams import create_stream
    from tests.helpers import CONFIGS
    from tests.writers import write_cifar100

    write_cifar100(tmp_path, per_class_train=6, per_class_test=1)
    cfg = load_config(
        CONFIGS / "mamba_fscil" / "cifar100_fscil.yaml",
        [f"stream.data_root={tmp_path}", "stream.verify_checksums=false"],
    )
    strategy = create_strategy(cfg)
    stream = create_stream(cfg.stream, partial(stream_transforms, strategy.backbone, cfg))
    assert [len(d) for d in stream.train_data] == [60 * 6] + [25] * 8
    with torch.no_grad():
        maps = strategy.feature_map(torch.randn(2, 3, 32, 32))
        assert maps.shape == (2, 640, 2, 2) and strategy.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def _ddp_loss_worker(rank, world, port, features, labels, gate, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        etf = EtfClassifier(16, 8, seed=0)
        mine = slice(rank * 4, (rank + 1) * 4)
        from cil.distributed import gather_cat

        dr = dot_regression_loss(features[mine], labels[mine], etf, True, all_labels=gather_cat(labels[mine]))
        sensitive = class_sensitive_losses(gate[mine], {}, labels[mine], 4, w_supp=1.0, w_novel=1.0, w_sep_new=0)
        torch.save({"dr": dr, "keys": sorted(sensitive)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_losses_under_two_gloo_processes_use_the_gathered_labels_and_the_minimum_presence(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    g = torch.Generator().manual_seed(0)
    features, gate = torch.randn(8, 16, generator=g), torch.randn(8, 3, 2, generator=g)
    labels = torch.tensor([0, 0, 5, 6, 1, 1, 1, 2])  # rank 1 holds no novel sample
    mp.spawn(_ddp_loss_worker, args=(2, free_port(), features, labels, gate, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    etf = EtfClassifier(16, 8, seed=0)
    for r, result in enumerate(results):  # class counts of the whole 8-sample batch, not of the 4 local ones
        mine = slice(r * 4, (r + 1) * 4)
        expected = dot_regression_loss(features[mine], labels[mine], etf, True, all_labels=labels)
        torch.testing.assert_close(result["dr"], expected)
        assert result["keys"] == ["supp_base"]  # no novel term anywhere: rank 1's batch has no novel sample


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_resume_after_a_fault_gives_the_same_matrix(tmp_path):
    import numpy as np

    from cil.cli import main
    from cil.runs import load_run
    from cil.session import run_experiment
    from tests.helpers import Fault, tiny_config

    fast = [
        "backbone.image_size=32",
        "backbone.kwargs={channels: [16, 16, 32, 64]}",
        "strategy.out_channels=64",
        "strategy.d_state=8",
        "strategy.base_epochs=2",
        "strategy.inc_steps=[6]",
        "trainer.deterministic=true",
    ]
    full = run_experiment(tiny_config("mamba_fscil", tmp_path / "a", *fast))
    for k, (session, epoch) in enumerate([(0, 1), (2, 0)]):  # mid base session; at an incremental session's start
        out = tmp_path / f"b{k}"
        with pytest.raises(RuntimeError, match="injected fault"):
            run_experiment(tiny_config("mamba_fscil", out, *fast), callbacks=[Fault(session=session, epoch=epoch)])
        broken = next((out / "mamba_fscil-digits").iterdir())
        assert main(["run", "--resume", str(broken)]) == 0
        np.testing.assert_array_equal(
            load_run(broken).accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy()
        )


@pytest.mark.parametrize("branch", ["identity", "mixup", "cutmix"])
@pytest.mark.parametrize("quirks", [True, False])
def test_image_mixing_loss_on_a_hand_batch_counts_the_identity_branch_once(monkeypatch, branch, quirks):
    """The code's IdentityTwoLabel returns no second label: L(y) once. Mixup/cutmix: λL(y) + (1-λ)L(y[π]), plus
    L(y) again with the code's quirk."""
    import cil.strategies.mamba_fscil as mf
    from cil.module import Session

    strategy = tiny_strategy(image_mix=True, faithful_quirks=quirks)
    strategy.begin_session(Session(index=0, new_classes=[0, 1, 2, 3], seen_classes=[0, 1, 2, 3]))
    probs = {"identity": (0.0, 0.0, 1.0), "mixup": (1.0, 0.0, 0.0), "cutmix": (0.0, 1.0, 0.0)}[branch]
    seen = {}

    def forced(x, mixup_alpha, cutmix_alpha, _):
        seen["out"] = mf.mix_images.__wrapped__(x, mixup_alpha, cutmix_alpha, probs)
        return seen["out"]

    forced.__wrapped__ = mf.mix_images
    monkeypatch.setattr(mf, "mix_images", forced)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    strategy.eval()  # no dropout or BN updates: the hand computation sees the same features
    loss = strategy.base_loss(images, labels)
    mixed, index, lam = seen["out"]
    features = strategy.projector(strategy.feature_map(mixed)).features
    dr = lambda y: strategy.dr(features, y, False)  # noqa: E731
    if branch == "identity":
        assert index is None and lam == 1.0
        expected = dr(labels)
    else:
        expected = lam * dr(labels) + (1 - lam) * dr(labels[index]) + (dr(labels) if quirks else 0)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "name, resize, crop, interpolation",
    [("cifar100_fscil", 36, 32, "bicubic"), ("miniimagenet_fscil", 96, 84, "bilinear")],
)
def test_paper_configs_build_the_codes_test_pipeline(name, resize, crop, interpolation):
    """The code's test_pipeline (evaluation and the cached maps of the incremental sessions): CIFAR resizes to 36
    (bicubic) and centre-crops 32; miniImageNet resizes to int(84 * 1.15) = 96 (mmcls' bilinear) and crops 84."""
    from PIL import Image
    from torchvision import transforms as T

    from cil.backbones import backbone_from_config
    from cil.config import load_config
    from cil.loaders import stream_transforms
    from tests.helpers import CONFIGS

    cfg = load_config(CONFIGS / "mamba_fscil" / f"{name}.yaml", ["backbone.pretrained=false"])
    steps = stream_transforms(backbone_from_config(cfg.backbone), cfg).eval.transforms
    resizes = [s for s in steps if isinstance(s, T.Resize)]
    crops = [s for s in steps if isinstance(s, T.CenterCrop)]
    assert len(resizes) == 1 and resizes[0].size == resize and resizes[0].interpolation.value == interpolation
    assert len(crops) == 1 and tuple(crops[0].size) == (crop, crop)
    x = stream_transforms(backbone_from_config(cfg.backbone), cfg).eval(Image.new("RGB", (crop, crop)))
    assert tuple(x.shape) == (3, crop, crop)
    # the code's img_norm_cfg (0-255 scale): CIFAR statistics on CIFAR, ImageNet's on miniImageNet
    norm = next(s for s in steps if isinstance(s, T.Normalize))
    official = {
        "cifar100_fscil": ([129.304, 124.070, 112.434], [68.170, 65.392, 70.418]),
        "miniimagenet_fscil": ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),
    }[name]
    assert np.allclose(np.asarray(norm.mean) * 255, official[0], atol=1e-4)
    assert np.allclose(np.asarray(norm.std) * 255, official[1], atol=1e-4)


def official_incremental_lrs(base_lr: float, num_steps: int) -> list[float]:
    """The code's incremental loop (mmfscil/apis/fscil.py): ``runner.step()`` (iter += 1) and then
    ``lr_scheduler.before_train_iter(runner)`` before each step; the hook is mmcls' CosineAnnealingCooldownLrUpdaterHook
    (min_lr_ratio 0.01, cool_down_ratio 0.1, cool_down_time 5, by iteration) with mmcv's linear warm-up (5 iterations,
    ratio 0.1). Transcribed."""

    def get_lr(progress, max_progress):
        target = base_lr * 1e-2
        if progress > max_progress - 5:
            return target * 0.1
        factor = progress / (max_progress - 5)
        return target + 0.5 * (base_lr - target) * (math.cos(math.pi * factor) + 1)

    lrs, it = [], 0
    for _ in range(num_steps):
        it += 1  # runner.step()
        regular = get_lr(it, num_steps)
        lrs.append(regular if it >= 5 else regular * (1 - (1 - it / 5) * (1 - 0.1)))
    return lrs


@pytest.mark.parametrize("quirks", [True, False])
def test_incremental_schedule_is_the_codes_one_step_ahead(quirks):
    from types import SimpleNamespace

    strategy = tiny_strategy(faithful_quirks=quirks, inc_lr=0.25)
    strategy.session_index = 1
    strategy.projector.add_new_branch()
    strategy._trainer = SimpleNamespace(estimated_stepping_batches=40)
    configured = strategy.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    official = official_incremental_lrs(0.25, 40)
    if quirks:
        np.testing.assert_allclose(lrs, official, rtol=1e-12)
    else:  # the schedule as intended: step i at iteration i (warm-up from 0.1 x)
        np.testing.assert_allclose(lrs[1:], official[:-1], rtol=1e-12)
        assert lrs[0] == pytest.approx(0.025)
