"""FSA: the body adapts in session 1 only, then stays bit-identical; the LDA head is exact without replay."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from cil.backbones import data_transforms
from cil.cli import main
from cil.config import ConfigError
from cil.module import Session, create_strategy
from cil.runs import RunFolder, load_run
from cil.session import run_experiment
from tests.helpers import CONFIGS, Fault, official_fsa_head, tiny_config

FAST = ["strategy.epochs=2", "strategy.milestones=[1]", "stream.batch_size=64", "run.keep_session_checkpoints=true"]


def initial_strategy(cfg):
    pl.seed_everything(cfg.run.seed, verbose=False)  # what run_experiment does before building the strategy
    return create_strategy(cfg)


def session_state(run, k):
    """The state after session k, with the frozen tensors the checkpoint leaves out filled in from a freshly
    built strategy; complete_state checks their digest, so a changed frozen body fails here."""
    from cil.config import load_config

    folder = RunFolder(run)
    done = folder.load_session(k)
    state, digest = done.state_dict, done.rebuilt_digest
    if digest is None:
        return state
    return initial_strategy(load_config(run / "config.yaml")).complete_state(state, digest)


def part(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    cfg = tiny_config("fsa", tmp_path_factory.mktemp("runs"), *FAST)
    return cfg, run_experiment(cfg)


def test_body_changes_in_session_1_then_stays_bit_identical(full_run):
    cfg, run = full_run
    initial = initial_strategy(cfg).state_dict()
    after_1, after_5 = session_state(run, 0), session_state(run, 4)
    body_0, body_1 = part(initial, "backbone."), part(after_1, "backbone.")
    assert any(not torch.equal(body_0[k], body_1[k]) for k in body_0)  # session 1 adapted the body (and BN stats)
    assert_bit_identical(body_1, part(after_5, "backbone."))  # sessions 2-5 trained nothing
    assert after_5["classifier.weight"].numel() == 0  # the temporary head was discarded
    records = load_run(run).summary
    assert records["complete"]


def test_the_head_equals_lda_on_all_data_seen_without_replay(full_run):
    """The streamed head after session 5 = the official FSA head fitted on every training feature at once."""
    cfg, run = full_run
    strategy = initial_strategy(cfg)
    strategy.load_state_dict(session_state(run, 4))
    strategy.begin_session(Session(index=5, new_classes=[], seen_classes=list(range(10))))  # freezes as on resume
    from cil.streams import create_stream

    stream = create_stream(cfg.stream, partial(data_transforms, strategy.backbone, cfg.backbone.image_size, False))
    xs, ys = zip(*[(x, y) for data in stream.stats_data for x, y, *_ in torch.utils.data.DataLoader(data, 256)])
    with torch.no_grad():
        features = strategy.features(torch.cat(xs)).double()
    labels = torch.cat(ys)
    assert strategy.lda.num_samples == len(labels)
    expected = official_fsa_head(features, labels, 10)(features)
    torch.testing.assert_close(strategy.lda.logits(features), expected, atol=1e-6, rtol=1e-9)


def test_frozen_body_stays_in_eval_mode_and_keeps_its_statistics(full_run):
    cfg, run = full_run
    strategy = initial_strategy(cfg)
    strategy.load_state_dict(session_state(run, 1))
    strategy.begin_session(Session(index=2, new_classes=[4, 5], seen_classes=list(range(6))))
    strategy.train()  # what Lightning does before fit
    assert not strategy.backbone.training
    assert not any(p.requires_grad for p in strategy.backbone.parameters())
    before = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
    strategy(torch.randn(8, 3, 16, 16))
    assert_bit_identical(before, strategy.backbone.state_dict())  # BN running statistics untouched
    assert strategy.epochs_for(Session(index=2, new_classes=[4, 5], seen_classes=list(range(6)))) == 0


def test_film_mode_trains_only_gamma_and_beta(tmp_path):
    cfg = tiny_config("fsa", tmp_path, *FAST, "strategy.adaptation=film", "stream.split=B4-Inc3")
    initial = initial_strategy(cfg)
    assert {n.split(".")[0] for n, p in initial.named_parameters() if p.requires_grad} == {"film", "classifier"}
    run = run_experiment(cfg)
    after_1, last = session_state(run, 0), session_state(run, 2)
    assert_bit_identical(part(initial.state_dict(), "backbone."), part(after_1, "backbone."))  # BN stats too
    film_0, film_1 = part(initial.state_dict(), "film."), part(after_1, "film.")
    assert any(not torch.equal(film_0[k], film_1[k]) for k in film_0)
    assert_bit_identical(film_1, part(last, "film."))


def test_fsa_beats_finetune_on_digits(full_run, tmp_path):
    _, run = full_run
    finetune = run_experiment(tiny_config("finetune", tmp_path, "strategy.epochs=2", "stream.batch_size=64"))
    ours, theirs = load_run(run).metric("last_acc"), load_run(finetune).metric("last_acc")
    assert ours > theirs + 0.2, (ours, theirs)


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_resume_mid_adaptation_gives_the_same_matrix(tmp_path):
    # dropout and augmentation draw random numbers: the resumed epoch must draw the same ones
    overrides = [
        *FAST,
        "strategy.epochs=3",
        "trainer.deterministic=true",
        "stream.split=B4-Inc3",
        "stream.augment=true",
    ]
    full = run_experiment(tiny_config("fsa", tmp_path / "a", *overrides))
    cfg = tiny_config("fsa", tmp_path / "b", *overrides)
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(cfg, callbacks=[Fault(session=0, epoch=2)])
    broken = next((tmp_path / "b" / "fsa-digits").iterdir())
    assert main(["run", "--resume", str(broken)]) == 0
    np.testing.assert_array_equal(
        load_run(broken).accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy()
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.shrinkage=1.5", "strategy.shrinkage=1.5 is out of range"),
        ("strategy.shrinkage=-0.1", "strategy.shrinkage=-0.1 is out of range"),
        ("strategy.adaptation=partial", "strategy.adaptation='partial' is not valid"),
        ("strategy.lda_mode=qda", "strategy.lda_mode='qda' is not valid"),
        ("strategy.lda_mode=sklearn strategy.priors=none", "priors='none' is not valid with mode='sklearn'"),
    ],
)
def test_bad_values_are_rejected_before_training(override, message, tmp_path, capsys):
    args = [str(CONFIGS / "fsa" / "digits.yaml"), f"run.output_dir={tmp_path}", *override.split()]
    assert main(["run", *args]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran, no run folder


def test_film_on_an_unsupported_backbone_is_a_config_error(tmp_path, capsys):
    args = ["strategy.adaptation=film", "backbone.name=convnext_atto", f"run.output_dir={tmp_path}"]
    assert main(["run", str(CONFIGS / "fsa" / "digits.yaml"), *args]) == 2
    assert "adaptation='film'" in capsys.readouterr().err and not any(tmp_path.iterdir())
    with pytest.raises(ConfigError):
        create_strategy(tiny_config("fsa", tmp_path, *args))


def paper_stream(config: str, root, *overrides: str):
    from cil.config import load_config
    from cil.loaders import stream_transforms
    from cil.streams import create_stream

    cfg = load_config(
        CONFIGS / "fsa" / config,
        [f"stream.data_root={root}", "stream.verify_checksums=false", "backbone.name=resnet10t", *overrides],
    )
    return cfg, create_stream(cfg.stream, partial(stream_transforms, create_strategy(cfg).backbone, cfg))


def test_paper_configs_build_the_paper_streams(tmp_path):
    from tests.writers import write_cifar100

    write_cifar100(tmp_path, per_class_train=52, per_class_test=1)
    cfg, high = paper_stream("cifar100_b10inc10.yaml", tmp_path, "backbone.pretrained=false")
    assert [len(c) for c in high.classes_per_session] == [10] * 10
    assert high.original_class_ids[:10] == list(range(10))  # natural class order
    from cil.loaders import stream_transforms

    transforms = stream_transforms(create_strategy(cfg).backbone, cfg)
    assert "RandomVerticalFlip" in repr(transforms.train)
    _, plus = paper_stream("cifar100_fewshot_plus.yaml", tmp_path, "backbone.pretrained=false")
    assert [len(c) for c in plus.classes_per_session] == [20] + [10] * 8
    assert [len(d) for d in plus.train_data] == [20 * 50] + [10 * 50] * 8  # 50 shots, base session included
    _, fscil = paper_stream("cifar100_fscil.yaml", tmp_path, "backbone.pretrained=false")
    assert [len(d) for d in fscil.train_data] == [60 * 52] + [25] * 8  # full base, then 5-way 5-shot


def test_fscil_config_runs_end_to_end_on_index_lists(tmp_path):
    """The CIFAR-100 FSCIL config on real-format files and CEC-style index lists, shrunk to run on a CPU."""
    from tests.writers import write_cifar100

    write_cifar100(tmp_path / "data", per_class_train=6, per_class_test=1)
    lists = tmp_path / "index_list"
    lists.mkdir()
    (lists / "session_1.txt").write_text("\n".join(str(i) for i in range(60 * 6)))  # base: classes 0-59
    for s in range(8):
        classes = range(60 + 5 * s, 65 + 5 * s)
        (lists / f"session_{s + 2}.txt").write_text("\n".join(str(c * 6 + k) for c in classes for k in range(5)))
    overrides = [
        f"stream.data_root={tmp_path / 'data'}",
        "stream.verify_checksums=false",
        "stream.shots=null",
        f"stream.index_dir={lists}",
        "stream.num_workers=0",
        "stream.batch_size=64",
        "backbone.name=resnet10t",
        "backbone.pretrained=false",
        "backbone.image_size=16",
        "strategy.epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run.output_dir={tmp_path / 'runs'}",
    ]
    from cil.config import load_config

    cfg = load_config(CONFIGS / "fsa" / "cifar100_fscil.yaml", overrides)
    run = load_run(run_experiment(cfg))
    assert run.summary["complete"] and run.accuracy_matrix.shape == (9, 9)
    state = session_state(run.path, 8)
    assert state["lda.counts"].sum().item() == 60 * 6 + 8 * 25  # every base sample and every shot, once
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith("gamma"))


# docs/methods/fsa.md §7 and the code's schedules: (split, shots, base_shots, adaptation, milestones, gamma)
PAPER = {
    "cifar100_b10inc10": ("B10-Inc10", None, None, "full", [50, 100, 150], 0.7),
    "svhn_b2inc2": ("B2-Inc2", None, None, "full", [50, 100, 150], 0.7),
    "fgvc_aircraft_b10inc10": ("B10-Inc10", None, None, "full", [50, 100, 150], 0.7),
    "stanford_cars_b16inc20": ("B16-Inc20", None, None, "full", [50, 100, 150], 0.7),
    "cifar100_fewshot_plus": ("B20-Inc10", 50, 50, "film", [25, 50, 100], 0.3),
    "svhn_fewshot_plus": ("B2-Inc2", 50, 50, "film", [25, 50, 100], 0.3),
    "fgvc_aircraft_fewshot_plus": ("B20-Inc10", 50, 50, "film", [25, 50, 100], 0.3),
    "cifar100_fscil": ("B60-Inc5", 5, None, "film", [50, 100, 150], 0.7),
    "cub200_fscil": ("B100-Inc10", 5, None, "film", [50, 100, 150], 0.7),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_build_the_codes_training(name, tmp_path):
    """What each paper config builds, against the code's settings (docs/methods/fsa.md §7): the session layout
    the stream cuts from its natural class order, the shots of the built loaders' data, the trained parameters (the
    whole body or only FiLM's gamma/beta), the optimiser and schedule ``configure_optimizers`` returns, the epochs of
    session 1 and none after it, the dropout before the temporary head, the LDA head's mode, and the batch sizes."""
    from cil.config import load_config
    from cil.loaders import train_loader
    from cil.streams.common import split_sessions

    split, shots, base_shots, adaptation, milestones, gamma = PAPER[name]
    cfg = load_config(CONFIGS / "fsa" / f"{name}.yaml", ["backbone.pretrained=false", "stream.num_workers=0"])
    strategy = create_strategy(cfg)
    classes = {"cifar100": 100, "svhn": 10, "fgvc_aircraft": 100, "stanford_cars": 196, "cub200": 200}
    sessions = split_sessions(list(range(classes[cfg.stream.name])), cfg.stream.split, cfg.stream.name)
    assert [len(c) for c in sessions] == [int(split[1:].split("-")[0])] + [int(split.split("Inc")[1])] * (
        len(sessions) - 1
    )  # the natural class order is checked on a built stream in test_paper_configs_build_the_paper_streams
    assert (cfg.stream.shots, cfg.stream.base_shots) == (shots, base_shots)
    first = Session(0, sessions[0], sessions[0])
    strategy.begin_session(first)
    trained = {n for n, p in strategy.named_parameters() if p.requires_grad}
    if adaptation == "film":
        assert trained and all(n.startswith(("film.", "classifier.")) for n in trained)
    else:
        assert any(n.startswith("backbone.blocks.") for n in trained)
        assert not any(n.startswith("film.") for n in trained)
    built = strategy.configure_optimizers()
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 0.005
    assert optimizer.defaults["weight_decay"] == 0.0 and optimizer.defaults["betas"] == (0.9, 0.999)
    assert dict(scheduler.milestones) == {m: 1 for m in milestones} and scheduler.gamma == gamma
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in strategy.parameters() if p.requires_grad
    }
    assert strategy.epochs_for(first) == 200 and strategy.dropout.p == 0.5 and strategy.lda.mode == "fsa"
    strategy.freeze_body()
    assert strategy.epochs_for(Session(1, sessions[1], sessions[0] + sessions[1])) == 0
    loader = train_loader(torch.utils.data.TensorDataset(torch.zeros(600, 1)), cfg, session=0)
    assert loader.batch_sampler.batch_size == 256 and cfg.stream.eval_batch_size == 128


def test_paper_backbone_is_the_codes_tf_efficientnet_b0():
    """The built network against lukemelas' EfficientNet-B0 (what the official code loads), built by the reference
    implementation: TF "same" padding, BN eps and momentum, the drop-connect rate of every block, SiLU, SE."""
    from timm.layers import Conv2dSame

    from cil.backbones import backbone_from_config
    from cil.config import load_config

    cfg = load_config(CONFIGS / "fsa" / "cifar100_b10inc10.yaml", ["backbone.pretrained=false"])
    ours = backbone_from_config(cfg.backbone)
    bns = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert isinstance(ours.conv_stem, Conv2dSame) and {b.eps for b in bns} == {1e-3}
    blocks = [b for stage in ours.blocks for b in stage]
    ours_rates = [float(getattr(b.drop_path, "drop_prob", 0.0)) for b in blocks]
    assert any(type(m).__name__ == "SqueezeExcite" for m in ours.modules())
    assert {type(m).__name__ for m in ours.modules() if isinstance(m, (torch.nn.SiLU, torch.nn.ReLU))} == {"SiLU"}
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install -e '.[real]'")
    reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-b0")
    gp = reference._global_params
    n = len(reference._blocks)  # the code's forward: drop_connect_rate * idx / len(blocks)
    assert ours_rates == pytest.approx([gp.drop_connect_rate * i / n for i in range(n)])
    ref_bns = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {b.eps for b in ref_bns} == {1e-3}
    assert [b.momentum for b in bns] == pytest.approx([b.momentum for b in ref_bns], abs=1e-12)  # TF decay 0.99
    assert len(ref_bns) == len(bns) and sum(p.numel() for p in reference.parameters()) - 1281000 == sum(
        p.numel() for p in ours.parameters()
    )  # the same network without the 1280 x 1000 (+ bias) classifier


def official_transform(name: str, train: bool = False):
    """The official code's pipelines, transcribed from ``src/dataloader``: the high-shot and few-shot+ readers
    squash to 224x224 with Lanczos and normalise with 0.5 (CIFAR-100 high-shot trains with H and V flips); the
    FSCIL CIFAR-100 reader squashes with ImageNet statistics; the CUB reader resizes 256, crops 224 (bilinear)."""
    from torchvision import transforms as T

    half = T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    imagenet = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    squash = T.Resize((224, 224), interpolation=T.InterpolationMode.LANCZOS)
    if name == "cub200_fscil":
        return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), half])
    return T.Compose([squash, T.ToTensor(), imagenet if name == "cifar100_fscil" else half])


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_build_the_codes_preprocessing(name):
    """Each paper config's built transforms against the official code's on photographs of other aspect ratios
    (Aircraft and Cars are wider than high: a centre crop would cut their ends off, the squash keeps them)."""
    from PIL import Image

    from cil.config import load_config
    from cil.loaders import stream_transforms

    cfg = load_config(CONFIGS / "fsa" / f"{name}.yaml", ["backbone.pretrained=false"])
    built = stream_transforms(create_strategy(cfg).backbone, cfg)
    rng = np.random.default_rng(0)
    for size in [(61, 37), (32, 32), (300, 190)]:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        expected = official_transform(name)(image)
        torch.testing.assert_close(built.eval(image), expected, rtol=0, atol=1e-6)
        if name != "cifar100_b10inc10":
            torch.testing.assert_close(built.train(image), expected, rtol=0, atol=1e-6)  # no augmentation
    if name == "cifar100_b10inc10":  # Resize((224, 224)), RandomHorizontalFlip, RandomVerticalFlip
        image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        base = official_transform(name)(image)
        variants = {(): base, (2,): base.flip(2), (1,): base.flip(1), (1, 2): base.flip(1, 2)}
        seen = set()
        for _ in range(40):
            out = built.train(image)
            match = [k for k, v in variants.items() if torch.allclose(out, v, rtol=0, atol=1e-6)]
            assert len(match) == 1
            seen.add(match[0])
        assert seen == set(variants)


@pytest.mark.slow
def test_two_process_ddp_head_matches_one_process(tmp_path):
    """Under 2-process gloo DDP each process streams its shard; the merged head predicts as one process's."""
    import os
    import subprocess

    from tests.helpers import ROOT, TINY, cil_command

    args = [str(CONFIGS / "fsa" / "digits.yaml"), "strategy.adaptation=none", *TINY]
    single = run_experiment(tiny_config("fsa", tmp_path / "one", "strategy.adaptation=none"))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", f"run.output_dir={tmp_path / 'two'}"]
    out = subprocess.run([*cil_command(), "run", *args, *ddp], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (two,) = (tmp_path / "two" / "fsa-digits").iterdir()
    np.testing.assert_array_equal(load_run(two).accuracy_matrix.to_numpy(), load_run(single).accuracy_matrix.to_numpy())
    a, b = session_state(two, 4), session_state(single, 4)
    torch.testing.assert_close(a["lda.scatter"], b["lda.scatter"], rtol=1e-10, atol=1e-8)
