"""MOS: the 16 faithfulness properties of ``docs/methods/mos.md`` §4 on a tiny ViT, plus runs, resume and configs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cil.backbones import create_backbone
from cil.cli import main
from cil.layers.retrieval import SelfRefinedRetrieval
from cil.module import Session
from cil.runs import load_run
from cil.session import run_experiment
from cil.strategies.mos import MOS, ensemble
from tests.helpers import CONFIGS, Fault, tiny_config

DEPTH, DIM, CLASSES_PER_SESSION, PER_CLASS, BATCH = 2, 32, 2, 12, 8


def tiny_vit():
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=2)


def make_mos(**kwargs) -> MOS:
    torch.manual_seed(0)
    settings = dict(epochs=1, lr=0.05, ca_epochs=2, ca_samples_per_class=BATCH, merge_mode="per_step")
    return MOS(tiny_vit(), **{**settings, **kwargs})


def session_data(k: int):
    """PER_CLASS images of each of session k's classes, with a class-dependent offset (learnable)."""
    g = torch.Generator().manual_seed(100 + k)
    classes = list(range(CLASSES_PER_SESSION * k, CLASSES_PER_SESSION * (k + 1)))
    y = torch.tensor(classes).repeat_interleave(PER_CLASS)
    x = torch.randn(len(y), 3, 32, 32, generator=g) * 0.5 + (y.float() / 3).view(-1, 1, 1, 1)
    return x, y


def session(k: int) -> Session:
    x, y = session_data(k)
    data = TensorDataset(x, y)
    return Session(
        index=k,
        new_classes=sorted(set(y.tolist())),
        seen_classes=list(range(CLASSES_PER_SESSION * (k + 1))),
        train_data=data,
        loader_fn=lambda: DataLoader(data, batch_size=BATCH),
    )


def fit(strategy: MOS, k: int, steps: int | None = None) -> None:
    """The three lines of the strategy contract; ``steps`` stops the fit after that many optimiser steps."""
    s = session(k)
    strategy.begin_session(s)
    trainer = pl.Trainer(
        max_epochs=strategy.hparams.epochs,
        max_steps=steps if steps is not None else -1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(strategy, DataLoader(s.train_data, batch_size=BATCH, shuffle=True))
    strategy.end_session(s)


def held_out():
    return torch.cat([session_data(k)[0] for k in range(3)]), torch.cat([session_data(k)[1] for k in range(3)])


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}


def randomise(adapters, std=0.2):
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, std)


@pytest.fixture(scope="module")
def three_sessions():
    """A per_step strategy after 3 sessions, with the state after each session."""
    strategy = make_mos()
    states = []
    for k in range(3):
        fit(strategy, k)
        states.append(state(strategy))
    return strategy, states


# ---- 1, 2: the adapter -------------------------------------------------------------------------------------
def test_1_fresh_adapters_leave_the_features_bit_identical():
    strategy = make_mos().eval()
    x = held_out()[0][:5]
    with torch.no_grad(), strategy.adapters.use(None):
        plain = strategy.features(x)
    with torch.no_grad(), strategy.current_adapter(0):
        assert torch.equal(strategy.features(x), plain)


def test_2_adapter_is_parallel_to_the_mlp_and_reads_the_post_attention_residual():
    strategy = make_mos().eval()
    randomise(strategy.adapters.current)
    block, adapter = strategy.backbone.blocks[1], strategy.adapters.current[1]
    x = torch.randn(3, 17, DIM)
    with torch.no_grad():
        h = x + block.attn(block.norm1(x))
        expected = h + block.mlp(block.norm2(h)) + 0.1 * adapter.up(torch.relu(adapter.down(h)))
        torch.testing.assert_close(block(x), expected, rtol=1e-6, atol=1e-6)
        wrong = h + block.mlp(block.norm2(h)) + 0.1 * adapter.up(torch.relu(adapter.down(block.norm2(h))))
        assert not torch.allclose(block(x), wrong)


# ---- 3: what trains -----------------------------------------------------------------------------------------
def test_3_only_the_current_adapter_and_head_train_and_alignment_trains_only_the_head():
    strategy = make_mos(epochs=2)
    fit(strategy, 0)
    s = session(1)
    strategy.begin_session(s)
    before = state(strategy)
    pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    ).fit(strategy, DataLoader(s.train_data, batch_size=BATCH, shuffle=True))
    moved = changed(before, state(strategy))
    assert moved and all(k.startswith(("adapters.current.", "classifier.")) for k in moved), moved
    assert any(k.startswith("adapters.current.") for k in moved) and "classifier.weight" in moved
    strategy.adapters.snapshot()
    strategy.store_statistics(s)
    before = state(strategy)
    strategy.align_classifier(s.num_seen)
    assert changed(before, state(strategy)) == {"classifier.weight", "classifier.bias"}


# ---- 4, 5: merging ----------------------------------------------------------------------------------------------
def test_4_merge_formula_and_running_sums_do_not_alias_the_current_adapter():
    strategy = make_mos()
    bank = strategy.adapters
    for _ in range(3):
        randomise(bank.current)
        bank.snapshot()
    randomise(bank.current)
    sums = [p.clone() for p in bank.total.parameters()]
    mean = [sum(ps) / 3 for ps in zip(*(s.parameters() for s in bank.snapshots))]
    current = [p.clone() for p in bank.current.parameters()]
    bank.merge_toward_mean(0.1)
    for p, c, m, total in zip(bank.current.parameters(), current, mean, sums):
        assert torch.equal(p, (c * 0.9).add(total, alpha=0.1 / 3))  # (1 - m) C + m S / k, bit for bit
        torch.testing.assert_close(p, 0.9 * c + 0.1 * m, rtol=0, atol=1e-6)  # = (1 - m) C + m mean(A_i)
    with torch.no_grad():  # training the current adapter in place leaves the sums and snapshots alone
        for p in bank.current.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(bank.total.parameters(), sums))
    for p, s in zip(bank.total.parameters(), zip(*(s.parameters() for s in bank.snapshots))):
        torch.testing.assert_close(p, sum(s))
    merged = [p.clone() for p in bank.current.parameters()]
    bank.merge_toward_mean(0.0)  # m = 0: identity
    assert all(torch.equal(a, b) for a, b in zip(bank.current.parameters(), merged))
    empty = make_mos().adapters
    randomise(empty.current)
    before = [p.clone() for p in empty.current.parameters()]
    empty.merge_toward_mean(0.1)  # k = 0: identity
    assert all(torch.equal(a, b) for a, b in zip(empty.current.parameters(), before))


@pytest.mark.parametrize("mode, merges", [("official", DEPTH + 1), ("per_step", 1)])
def test_5_merges_per_training_iteration(mode, merges):
    """With lr = 0 the step is a no-op, so C' - mean = (1 - m)^merges (C - mean) pins the merge count."""
    strategy = make_mos(merge_mode=mode, weight_decay=0.0)
    strategy.hparams.lr = 0.0  # after construction: a config refuses lr=0, which this test needs
    fit(strategy, 0)
    randomise(strategy.adapters.current)  # a current adapter away from the snapshot mean (= A_0 here)
    current = [p.clone() for p in strategy.adapters.current.parameters()]
    mean = [p.clone() for p in strategy.adapters.snapshots[0].parameters()]
    s = session(1)
    strategy.begin_session(s)
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        strategy, DataLoader(s.train_data, batch_size=BATCH)
    )
    for p, c, m in zip(strategy.adapters.current.parameters(), current, mean):
        torch.testing.assert_close(p - m, 0.9**merges * (c - m), rtol=1e-5, atol=1e-6)


# ---- 6, 7: snapshots and carry-over ----------------------------------------------------------------------------
def test_6_snapshots_stay_bit_identical_through_later_sessions_and_evaluation(three_sessions):
    strategy, states = three_sessions
    for k in range(3):
        for key, value in states[k].items():
            if key.startswith(f"adapters.snapshots.{k}."):
                assert torch.equal(value, states[2][key]), key
    before = state(strategy)
    with torch.no_grad():
        strategy.eval()(held_out()[0])
    assert not changed(before, state(strategy))


@pytest.mark.parametrize("mode", ["per_step", "official"])
def test_7_the_current_adapter_carries_over(mode):
    strategy = make_mos(merge_mode=mode)
    for k in range(3):
        if k > 0:  # at the start of session k the current adapter is A_{k-1} (not re-initialised)
            snap = strategy.adapters.snapshots[k - 1]
            if mode == "per_step" or k == 1:
                assert all(torch.equal(a, b) for a, b in zip(strategy.adapters.current.parameters(), snap.parameters()))
            else:  # official: the statistics pass merged D times per forward toward mean(A_0..A_{k-2})
                forwards = math.ceil(CLASSES_PER_SESSION * PER_CLASS / BATCH)
                mean = [sum(ps) / (k - 1) for ps in zip(*(s.parameters() for s in strategy.adapters.snapshots[:-1]))]
                for p, a, m in zip(strategy.adapters.current.parameters(), snap.parameters(), mean):
                    torch.testing.assert_close(p - m, 0.9 ** (DEPTH * forwards) * (a - m), rtol=1e-4, atol=1e-6)
        fit(strategy, k)
    fresh = make_mos()
    assert not torch.equal(fresh.adapters.current[0].up.weight, strategy.adapters.current[0].up.weight)


# ---- 8, 9, 10: prototypes, statistics, alignment -----------------------------------------------------------------
def adapter_features(strategy, which, x):
    strategy.eval()
    with torch.no_grad(), strategy.adapters.use(which):
        return strategy.features(x).double()


def test_8_prototypes_are_adapter_0_means_and_logits_are_cosine(three_sessions):
    strategy, states = three_sessions
    for k in range(3):
        x, y = session_data(k)
        f = adapter_features(strategy, 0, x)
        for c in y.unique().tolist():
            torch.testing.assert_close(strategy.prototypes.means()[c], f[y == c].mean(0), rtol=1e-6, atol=1e-7)
    assert torch.equal(states[0]["prototypes.sums"], states[2]["prototypes.sums"][:2])  # old rows untouched
    x = held_out()[0][:7]
    f0, z_orig = strategy.first_guess(x)
    expected = F.cosine_similarity(f0.double().unsqueeze(1), strategy.prototypes.means().unsqueeze(0), dim=2)
    torch.testing.assert_close(z_orig.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["covariance", "variance"])
def test_9_statistics_are_mean_and_cov_of_current_adapter_features(storage):
    strategy = make_mos(ca_storage=storage)
    fit(strategy, 0)
    x, y = session_data(0)
    f = adapter_features(strategy, "current", x)  # per_step: the current adapter is A_0 after session 0
    stats = strategy.statistics
    for c in (0, 1):
        torch.testing.assert_close(stats.means[c, 0], f[y == c].mean(0), rtol=1e-6, atol=1e-6)
        cov = torch.cov(f[y == c].T) + 1e-4 * torch.eye(DIM, dtype=torch.float64)
        expected = cov if storage == "covariance" else torch.diagonal(cov)
        assert stats.spread[c].squeeze(0).shape == expected.shape
        torch.testing.assert_close(stats.spread[c].squeeze(0).double(), expected, rtol=1e-5, atol=1e-6)
    old = stats.spread[:2].clone()
    fit(strategy, 1)
    assert torch.equal(strategy.statistics.spread[:2], old)


def test_10_alignment_runs_from_session_1_with_balanced_sampled_batches(monkeypatch):
    strategy = make_mos(ca_epochs=3, ca_samples_per_class=5)
    calls = []
    monkeypatch.setattr(strategy, "align_classifier", lambda n: calls.append(n))
    fit(strategy, 0)
    assert calls == []  # not in session 0
    monkeypatch.undo()
    batches, draws = [], []
    strategy.classifier.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    sample = strategy.statistics.sample

    def recording(n, generator=None):
        x, y = sample(n, generator)
        draws.append(torch.bincount(y, minlength=4).tolist())
        return x, y

    monkeypatch.setattr(strategy.statistics, "sample", recording)
    s = session(1)
    strategy.begin_session(s)
    strategy.adapters.snapshot()
    strategy.store_statistics(s)
    before = state(strategy)
    strategy.align_classifier(s.num_seen)
    assert draws == [[5, 5, 5, 5]] * 3  # every seen class equally, fresh each epoch
    assert batches == [5] * (3 * 4)  # per epoch: one batch of n per seen class
    assert changed(before, state(strategy)) == {"classifier.weight", "classifier.bias"}


# ---- 11: masked cross-entropy ------------------------------------------------------------------------------------
def test_11_old_class_rows_get_exactly_zero_gradient_from_the_cross_entropy():
    strategy = make_mos(reg=0.0)
    fit(strategy, 0)
    strategy.begin_session(session(1))
    strategy.train()
    x, y = session_data(1)
    strategy.loss(x[:8], y[:8])[0].backward()
    grad = strategy.classifier.weight.grad
    assert torch.equal(grad[:2], torch.zeros_like(grad[:2])) and grad[2:].abs().sum() > 0


# ---- 12, 13: retrieval and ensemble ------------------------------------------------------------------------------
def constructed(first_task: int, predicted: dict[int, int], max_iter: int = 4):
    """One sample; classes 0..5, class c in session c // 2; head on F_j predicts class ``predicted[j]``."""
    retrieval = SelfRefinedRetrieval(max_iter)
    for task in range(3):
        retrieval.add_task(2 * (task + 1), task)
    first = F.one_hot(torch.tensor([2 * first_task]), 6).float()
    evaluated = []

    def logits_for(j, rows):
        evaluated.append(j)
        return F.one_hot(torch.tensor([predicted[j]]), 6).float() + 0.01 * j  # tells the adapters apart

    logits, task = retrieval(first, logits_for)
    return logits, int(task), evaluated


def test_12_retrieval_constructed_cases():
    logits, task, evaluated = constructed(1, {1: 4, 2: 5})  # first guess 1 -> head says task 2 -> agrees
    assert task == 2 and evaluated == [1, 2] and torch.equal(logits, F.one_hot(torch.tensor([5]), 6) + 0.02)
    logits, task, evaluated = constructed(1, {1: 2})  # agreement at once: one evaluation
    assert task == 1 and evaluated == [1]
    cycle = {1: 4, 2: 3}  # 1 -> 2 -> 1 -> 2 -> ...: stops after exactly 4 evaluations, keeps the 4th
    logits, task, _ = constructed(1, cycle)
    assert task == 2 and torch.equal(logits, F.one_hot(torch.tensor([3]), 6) + 0.02)
    assert constructed(1, cycle, max_iter=3)[1] == 1 and constructed(1, cycle, max_iter=5)[1] == 1


def test_13_ensemble_temperature_multiplies_the_cosine_logits(three_sessions):
    z, z_orig = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.9, -0.2]])
    expected = torch.softmax(z, 1) + torch.softmax(3 * z_orig, 1)
    torch.testing.assert_close(ensemble(z, z_orig, 3), expected)
    assert not torch.allclose(ensemble(z, z_orig, 3), torch.softmax(z, 1) + torch.softmax(z_orig / 3, 1))
    strategy, _ = three_sessions
    x = held_out()[0][:9]
    with torch.no_grad():
        out = strategy.eval()(x)
        _, z_orig = strategy.first_guess(x)
        strategy.hparams.ensemble = False
        z = strategy(x)
        strategy.hparams.ensemble = True
    torch.testing.assert_close(out, torch.softmax(z, 1) + torch.softmax(3 * z_orig, 1))


# ---- 14: training-free, order-independent inference --------------------------------------------------------------
@pytest.mark.parametrize("mode, eval_adapters", [("per_step", "stored"), ("official", "merged")])
def test_14_inference_is_training_free_and_independent_of_test_order(mode, eval_adapters):
    strategy = make_mos(merge_mode=mode, eval_adapters=eval_adapters)
    for k in range(3):
        fit(strategy, k)
    strategy.eval()
    x = held_out()[0]
    before = state(strategy)
    with torch.no_grad():
        first = torch.cat([strategy(b) for b in x.split(10)]).argmax(1)
        again = torch.cat([strategy(b) for b in x.split(10)]).argmax(1)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
        permuted = torch.cat([strategy(b) for b in x[order].split(7)]).argmax(1)
    assert torch.equal(first, again) and torch.equal(permuted, first[order])
    assert not changed(before, state(strategy))


# ---- §1.4c: the code's evaluation merges the stored adapters in place --------------------------------------------
def official_test_features(strategy: MOS, adapter_list, sums, x: torch.Tensor, j: int) -> torch.Tensor:
    """The code's ``forward_features(x, adapter_id=j, train=False)`` for a stored adapter j, transcribed: before
    every block, ``reweight_adapter(adapter_list[j], j)`` moves all D layers in place toward the prefix sum / j."""
    m = strategy.hparams.adapter_momentum

    def reweight(module, inputs):
        if j == 0:
            return
        for layer, prefix in zip(adapter_list[j], sums[j - 1]):
            for p, s in zip(layer.parameters(), prefix):
                p.data = (1 - m) * p.data + m * s / j

    blocks = list(strategy.backbone.blocks)
    handles = [block.register_forward_pre_hook(reweight) for block in blocks]
    try:
        with strategy.adapters.use(adapter_list[j]):
            return strategy.features(x)
    finally:
        for handle in handles:
            handle.remove()


def code_adapter_state(strategy: MOS):
    """The code's ``adapter_list`` (deep copies) and prefix sums S_i = A_i + S_{i-1}, per layer and tensor."""
    adapter_list = [copy.deepcopy(snapshot) for snapshot in strategy.adapters.snapshots]
    sums, running = [], None
    for snapshot in strategy.adapters.snapshots:
        layers = [[p.detach().clone() for p in layer.parameters()] for layer in snapshot]
        running = layers if running is None else [[a + b for a, b in zip(r, n)] for r, n in zip(running, layers)]
        sums.append(running)
    return adapter_list, sums


@pytest.mark.parametrize("spread", [pytest.param(None, marks=pytest.mark.slow), 0.3])
def test_official_evaluation_converges_to_the_merged_mode(three_sessions, spread):
    """Run the code's test path (features of every stored adapter for each test batch, merging in place) over
    batches of held-out data: its first batch sees partly merged adapters, and from then on it converges to what
    ``eval_adapters=merged`` computes in one go; the whole prediction then equals ours. ``spread`` moves the
    snapshots apart (A_j far from the mean of the earlier ones, as after real training on ViT-B)."""
    strategy = copy.deepcopy(three_sessions[0]).eval()
    strategy.hparams.adapter_momentum = 0.1
    if spread:
        for snapshot in list(strategy.adapters.snapshots)[1:]:
            randomise(snapshot, spread)
    adapter_list, sums = code_adapter_state(strategy)
    x = held_out()[0]
    with torch.no_grad():
        first = {j: official_test_features(strategy, adapter_list, sums, x[:10], j) for j in (1, 2)}
        for batch in x.split(8) * 20:  # 20 passes over the test set, 3 stored adapters per batch
            for j in range(3):
                official_test_features(strategy, adapter_list, sums, batch, j)
        probe = x[:10]
        for j in (1, 2):
            official = official_test_features(strategy, adapter_list, sums, probe, j)
            with strategy.test_adapter(j):
                merged = strategy.features(probe)
            with strategy.adapters.use(j):
                stored = strategy.features(probe)
            torch.testing.assert_close(official, merged, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(stored, merged, atol=1e-4)  # the stored A_j is not what the code tests with
            assert not torch.allclose(first[j], merged, atol=1e-6)  # its first test batch is not converged yet
        # the whole prediction: ours in merged mode = the code's converged adapters used as stored
        ours = strategy(probe)
        code = copy.deepcopy(strategy)
        code.hparams.eval_adapters = "stored"
        for j in (1, 2):
            code.adapters.snapshots[j].load_state_dict(adapter_list[j].state_dict())
        torch.testing.assert_close(code(probe), ours, rtol=1e-5, atol=1e-6)


def test_merged_evaluation_writes_nothing_and_follows_the_device(three_sessions):
    strategy = copy.deepcopy(three_sessions[0]).eval()
    before = state(strategy)
    with torch.no_grad(), strategy.test_adapter(2):
        strategy.features(held_out()[0][:4])
    assert not changed(before, state(strategy))
    assert not any("scratch" in key for key in strategy.state_dict())
    with pytest.raises(IndexError, match="1..3"):
        with strategy.adapters.use_mean(4):
            pass


# ---- 15, 16: orthogonality loss and the first guess --------------------------------------------------------------
def test_15_orthogonality_loss_on_unnormalised_features(three_sessions):
    strategy, _ = three_sessions
    fresh = make_mos()
    f = torch.randn(5, DIM, requires_grad=True)
    # session 0: only the batch's features
    torch.testing.assert_close(fresh.orthogonality_loss(f), F.cross_entropy(f @ f.T / 0.8, torch.arange(5)))
    means = strategy.statistics.means[:, 0].float()
    m = torch.cat([means, f])
    expected = F.cross_entropy(m @ m.T / 0.8, torch.arange(len(m)))
    loss = strategy.orthogonality_loss(f)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert f.grad is not None and not strategy.statistics.means.requires_grad


def test_16_the_first_guess_uses_adapter_0_not_the_plain_model(three_sessions):
    strategy, _ = three_sessions
    strategy = copy.deepcopy(strategy).eval()
    x = held_out()[0][:6]
    with torch.no_grad():
        _, reference = strategy.first_guess(x)
        randomise(strategy.adapters.snapshots[2])
        randomise(strategy.adapters.snapshots[1])
        assert torch.equal(strategy.first_guess(x)[1], reference)
        with strategy.adapters.use(None):
            plain = strategy.features(x)
        assert not torch.allclose(strategy.first_guess(x)[0], plain)
        randomise(strategy.adapters.snapshots[0])
        assert not torch.allclose(strategy.first_guess(x)[1], reference)


# ---- end to end --------------------------------------------------------------------------------------------------
FAST = ["backbone.image_size=32", "strategy.epochs=2", "strategy.ca_epochs=2", "stream.batch_size=64"]


@pytest.mark.slow  # 37 s: the default suite keeps MOS's resume, paper-scale and unit tests
def test_digits_config_beats_the_finetune_lower_bound(tmp_path):
    run = load_run(run_experiment(tiny_config("mos", tmp_path, "backbone.image_size=32")))
    assert run.summary["complete"]
    finetune = load_run(run_experiment(tiny_config("finetune", tmp_path, "strategy.epochs=2")))
    assert run.metric("last_acc") > finetune.metric("last_acc") + 0.1, (
        run.metric("last_acc"),
        finetune.metric("last_acc"),
    )


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_resume_mid_session_gives_the_same_matrix(tmp_path):
    overrides = [*FAST, "stream.split=B4-Inc3", "trainer.deterministic=true"]
    full = run_experiment(tiny_config("mos", tmp_path / "a", *overrides))
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(tiny_config("mos", tmp_path / "b", *overrides), callbacks=[Fault(session=1, epoch=1)])
    broken = next((tmp_path / "b" / "mos-digits").iterdir())
    assert main(["run", "--resume", str(broken)]) == 0
    np.testing.assert_array_equal(
        load_run(broken).accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy()
    )


def test_non_vit_backbone_and_bad_merge_mode_are_config_errors(tmp_path, capsys):
    config = tmp_path / "mos_resnet.yaml"
    config.write_text(f"extends: {CONFIGS / 'base' / 'digits.yaml'}\nstrategy:\n  name: mos\n")  # resnet10t
    assert main(["run", str(config), f"run.output_dir={tmp_path}"]) == 2
    assert "mos needs a timm VisionTransformer backbone" in capsys.readouterr().err
    assert main(["run", str(CONFIGS / "mos" / "digits.yaml"), "strategy.merge_mode=paper"]) == 2
    assert "strategy.merge_mode='paper' is not valid" in capsys.readouterr().err


# ---- the paper configs (docs/methods/mos.md §2) ------------------------------------------------------------------
# config: (stream, split, epochs, lr, batch size, weight decay, class statistics, shuffled class order)
PAPER = {
    "cifar100_b0inc5": ("cifar100", "B0-Inc5", 20, 0.03, 48, 5e-4, "covariance", True),
    "cub200_b0inc10": ("cub200", "B0-Inc10", 10, 0.01, 32, 5e-4, "covariance", True),
    "imagenet_r_b0inc20": ("imagenet_r", "B0-Inc20", 10, 0.05, 16, 5e-3, "covariance", True),
    "imagenet_a_b0inc20": ("imagenet_a", "B0-Inc20", 10, 0.05, 32, 5e-3, "variance", True),
    "objectnet_b0inc20": ("objectnet", "B0-Inc20", 10, 0.05, 48, 5e-3, "covariance", True),
    "omnibenchmark_b0inc20": ("omnibenchmark", "B0-Inc20", 10, 0.01, 16, 5e-4, "covariance", True),
    "vtab_b0inc10": ("vtab", "B0-Inc10", 20, 0.03, 32, 5e-3, "covariance", False),
}
WEIGHTS = {"in21k": "vit_base_patch16_224.augreg_in21k", "in1k": "vit_base_patch16_224.augreg_in21k_ft_in1k"}


@pytest.mark.parametrize("tag", ["in21k", pytest.param("in1k", marks=pytest.mark.slow)])  # the same model
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_build_the_official_model(name, tag):
    """What each paper config builds, against the official json: ViT-B/16 with the json's weights, 12 adapters of
    width 16 (dropout 0.1, scale 0.1), the class statistics' storage, the retrieval's 4 head evaluations, the
    in-place-merge semantics of the code, the session layout and the optimiser groups of a session."""
    from cil.config import load_config
    from cil.module import create_strategy
    from cil.streams.common import split_sessions

    stream, split, epochs, lr, batch, weight_decay, storage, shuffle = PAPER[name]
    cfg = load_config(CONFIGS / "mos" / f"{name}_{tag}.yaml", ["backbone.pretrained=false"])
    strategy = create_strategy(cfg)
    vit, hp = strategy.backbone, strategy.hparams
    assert type(vit).__name__ == "VisionTransformer" and len(vit.blocks) == 12 and vit.embed_dim == 768
    assert vit.patch_embed.patch_size == (16, 16) and vit.pretrained_cfg["tag"] == WEIGHTS[tag].split(".")[1]
    adapters = strategy.adapters.current
    assert len(adapters) == 12 and {(a.down.out_features, a.dropout.p, a.scale) for a in adapters} == {(16, 0.1, 0.1)}
    assert strategy.statistics.storage == storage and strategy.retrieval.max_iter == 4
    assert (hp.merge_mode, hp.eval_adapters, hp.adapter_momentum, hp.ensemble) == ("official", "merged", 0.1, True)
    assert (hp.reg, hp.orth_temperature, hp.ca_epochs, hp.ca_lr) == (0.1, 0.8, 30, 0.005)
    assert hp.ca_samples_per_class == 5 * batch and cfg.stream.batch_size == batch and cfg.run.seed == 1993
    assert (cfg.stream.name, cfg.stream.split, cfg.stream.shuffle_classes) == (stream, split, shuffle)
    assert len(split_sessions(list(range(100)), split, stream)[0]) == int(split.split("Inc")[1])
    strategy.begin_session(Session(0, [0, 1], [0, 1]))

    class _Trainer:  # configure_optimizers reads the epoch count from its trainer
        max_epochs = hp.epochs

    strategy._trainer = _Trainer()
    built = strategy.configure_optimizers()
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    adapter_group, head_group = optimizer.param_groups
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert adapter_group["lr"] == lr and head_group["lr"] == pytest.approx(0.1 * lr)
    assert optimizer.defaults["weight_decay"] == weight_decay and scheduler.T_max == epochs == hp.epochs


def test_paper_configs_build_pilot_streams_and_transforms(tmp_path):
    from PIL import Image

    from cil.config import load_config
    from cil.loaders import stream_transforms
    from cil.module import create_strategy
    from cil.streams import create_stream
    from tests.writers import write_cifar100, write_image_folders

    small_vit = ["backbone.pretrained=false", "backbone.kwargs={depth: 1}", "stream.verify_checksums=false"]
    write_cifar100(tmp_path / "cifar")
    cfg = load_config(
        CONFIGS / "mos" / "cifar100_b0inc5_in21k.yaml", [f"stream.data_root={tmp_path / 'cifar'}", *small_vit]
    )
    transforms = stream_transforms(create_strategy(cfg).backbone, cfg)
    stream = create_stream(cfg.stream, lambda **kw: transforms)
    assert (
        stream.n_sessions == 20
        and stream.original_class_ids[:20] == np.random.RandomState(1993).permutation(100)[:20].tolist()
    )
    assert "scale=(0.05, 1.0)" in repr(transforms.train) and "Resize(size=256" in repr(transforms.eval)
    x = transforms.eval(Image.new("RGB", (300, 300), color=(255, 0, 0)))
    assert tuple(x.shape) == (3, 224, 224) and x[0].max() == 1.0 and x[1].max() == 0.0  # no normalisation
    write_image_folders(tmp_path / "vtab", [f"class{c:02d}" for c in range(20)], train=2, test=1)
    cfg = load_config(CONFIGS / "mos" / "vtab_b0inc10_in1k.yaml", [f"stream.data_root={tmp_path / 'vtab'}", *small_vit])
    stream = create_stream(cfg.stream, lambda **kw: transforms)
    assert stream.original_class_ids == list(range(20)) and stream.n_sessions == 2  # shuffle: false


@pytest.mark.slow
def test_two_process_ddp_statistics_and_alignment_match_one_process(tmp_path):
    """Without adapter training (epochs=0) every process streams its shard into the class statistics and the
    prototypes; the all-reduced ones, the aligned head and the accuracy matrix equal one process's."""
    import os
    import subprocess

    from cil.runs import RunFolder
    from tests.helpers import ROOT, TINY, cil_command

    extra = ["backbone.image_size=32", "strategy.epochs=0", "strategy.ca_epochs=3"]
    args = [str(CONFIGS / "mos" / "digits.yaml"), *TINY, *extra]
    single = run_experiment(tiny_config("mos", tmp_path / "one", *extra))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", f"run.output_dir={tmp_path / 'two'}"]
    out = subprocess.run([*cil_command(), "run", *args, *ddp], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (two,) = (tmp_path / "two" / "mos-digits").iterdir()
    a, b = RunFolder(two).load_session(4).state_dict, RunFolder(single).load_session(4).state_dict
    for key in ("statistics.means", "statistics.spread", "prototypes.sums", "classifier.weight"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(load_run(two).accuracy_matrix.to_numpy(), load_run(single).accuracy_matrix.to_numpy())
