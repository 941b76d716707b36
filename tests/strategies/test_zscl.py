"""ZSCL's building blocks (docs/methods/zscl.md §5) against hand computations and the official stored result matrix."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cil import metrics as M
from cil.backbones.clip import create_clip
from cil.cli import main
from cil.config import ConfigError, load_config
from cil.module import Session
from cil.runs import compare, load_run
from cil.session import run_experiment
from cil.strategies.zscl import (
    ZSCL,
    ReferenceBatches,
    WeightEnsemble,
    distillation_loss,
    text_classifier,
    warmup_cosine,
    weight_constraint,
)
from cil.streams.reference import read_captions, reference_image_set
from tests.helpers import CONFIGS, Fault, tiny_config

DATA = Path(__file__).resolve().parent.parent / "data" / "zscl"


def test_kd_function_by_hand_and_its_fixed_point():
    t = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    z = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        p = [math.exp(v / T) for v in t[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / T) for v in z[i].tolist()]
        logq = [math.log(v / sum(q)) for v in q]
        expected += -sum(a * b for a, b in zip(p, logq))
    assert distillation_loss(t, z, T).item() == pytest.approx(T**2 * expected / 2, rel=1e-6)
    # at the fixed point (student = teacher) the gradient vanishes: the loss is the teacher's entropy, a minimum
    s = t.clone().requires_grad_()
    distillation_loss(t, s, T).backward()
    assert s.grad.abs().max() < 1e-7
    # the text side is the same function on the transposed logits: one distribution per caption over the images
    images, captions = torch.randn(4, 6), torch.randn(4, 6)
    assert distillation_loss(images.T, captions.T).shape == ()


def test_weight_constraint_value_and_gradient():
    model = nn.Linear(3, 2)
    anchors = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(0.5)
    loss = weight_constraint(model.parameters(), anchors)
    assert loss.item() == pytest.approx(6 * 0.25)  # a sum over all 6 weights, not a mean
    loss.backward()
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), 1.0))  # 2 (θ - θ_start)
    torch.testing.assert_close(model.bias.grad, torch.zeros(2))


def test_weight_ensemble_is_the_uniform_mean_with_the_task_start():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ensemble = WeightEnsemble()
    ensemble.start(model)
    seen = [1.0]
    for k in range(0, 1001):  # the code's loop: k = 0 .. 1000, folding in at k % 100 == 0
        with torch.no_grad():
            model.weight.fill_(float(k + 2))  # "the weights after the step at iteration k"
        if k % 100 == 0:
            ensemble.update(model)
            seen.append(float(k + 2))
    assert ensemble.count == 11 and len(seen) == 12
    torch.testing.assert_close(ensemble.mean[0], torch.full((1, 2), sum(seen) / 12))  # (θ_start + Σ θ^(100j)) / 12
    ensemble.copy_to(model)
    torch.testing.assert_close(model.weight, torch.full((1, 2), sum(seen) / 12))


def test_lr_schedule_values():
    W, K = 100, 1001
    assert warmup_cosine(0, W, K) == pytest.approx(1 / W)
    assert warmup_cosine(W - 1, W, K) == pytest.approx(1.0)
    assert warmup_cosine(W, W, K) == pytest.approx(1.0)
    assert warmup_cosine((W + K) // 2, W, K) == pytest.approx(0.5 * (1 + math.cos(math.pi * 450 / 901)))
    assert warmup_cosine(K, W, K) == pytest.approx(0.0, abs=1e-12)


def test_mtil_metrics_on_a_hand_matrix_and_the_official_result_matrix():
    R = np.array([[0.5, 0.3, 0.1], [0.4, 0.8, 0.2], [0.3, 0.7, 0.9]])
    assert M.mtil_transfer(R) == pytest.approx((0.3 + (0.1 + 0.2) / 2) / 2)
    assert M.mtil_avg(R) == pytest.approx(R.mean()) and M.mtil_last(R) == pytest.approx(np.mean([0.3, 0.7, 0.9]))
    stored = np.load(DATA / "t3_7.npy").reshape(11, 12)
    order_one = np.delete(stored, 2, axis=1)  # results.ipynb drops the CIFAR10 column
    figures = (M.mtil_transfer(order_one), M.mtil_avg(order_one), M.mtil_last(order_one))
    assert [round(v, 2) for v in figures] == [68.14, 75.39, 83.62]  # the paper's ZSCL row, MTIL order I


def test_text_classifier_averages_normalised_template_embeddings():
    vocabulary = {}

    def tokenize(texts):
        return torch.tensor([vocabulary.setdefault(t, len(vocabulary)) for t in texts])

    table = torch.randn(20, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def encode_text(tokens):
        return table[tokens] * 3.0  # not unit length: the classifier normalises

    names, templates = ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    W = text_classifier(encode_text, tokenize, names, templates)
    assert W.shape == (2, 8)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(2))
    expected = torch.nn.functional.normalize(
        torch.nn.functional.normalize(
            table[[vocabulary["a photo of a cat."], vocabulary["a drawing of a cat."]]], dim=1
        ).mean(0),
        dim=0,
    )
    torch.testing.assert_close(W[0], expected)
    W.sum().backward()
    assert table.grad.abs().sum() > 0  # the text tower trains through the classifier
    one = text_classifier(encode_text, tokenize, names, templates[:1])  # training: template 0 only
    torch.testing.assert_close(one[1], torch.nn.functional.normalize(table[vocabulary["a photo of a dog."]], dim=0))


def test_text_classifier_encodes_in_batched_calls_with_the_per_class_values():
    """SUN397's 397 classes: few text-tower calls (chunks of prompts), the same rows as one call per class on a
    real (tiny) CLIP text tower, gradients included."""
    from cil.backbones.clip import create_clip

    clip = create_clip("open_clip:cil-tiny-clip")
    calls = []

    def encode_text(tokens):
        calls.append(len(tokens))
        return clip.encode_text(tokens)

    names = [f"class {i}" for i in range(397)]
    templates = ["a photo of a {}.", "itap of a {}."]
    batched = text_classifier(encode_text, clip.tokenize, names, templates, chunk=256)
    assert calls == [256, 256, 256, 26]  # 794 prompts
    per_class = torch.stack(
        [text_classifier(clip.encode_text, clip.tokenize, [n], templates)[0] for n in names[:40]]
    )  # one call per class, as before
    torch.testing.assert_close(batched[:40], per_class, rtol=1e-5, atol=1e-6)
    batched[:3].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in clip.parameters())


def test_reference_captions_from_a_text_file_or_the_cc_tsv(tmp_path):
    from cil.config import ConfigError

    plain = tmp_path / "captions.txt"
    plain.write_text("a dog on a beach\n\n  a red car  \n")
    assert read_captions(plain) == ["a dog on a beach", "a red car"]
    tsv = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    tsv.write_text("a man riding a horse\thttp://x/1.jpg\nsunset over the sea\thttp://x/2.jpg\n")
    assert read_captions(tsv) == ["a man riding a horse", "sunset over the sea"]
    with pytest.raises(ConfigError, match="not found"):
        read_captions(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no caption"):
        read_captions(empty)


def test_reference_folder_lists_what_os_walk_lists_in_the_same_order(tmp_path):
    """The lean listing (scandir, one byte array) against the former os.walk + sorted Paths: same files, same order
    (names that sort differently as strings and as paths, nested folders, non-images, a symlinked folder that
    os.walk does not enter), and the images open."""
    import os
    from pathlib import Path

    from cil.streams.reference import IMAGE_SUFFIXES, ImageFiles
    from tests.writers import image

    for rel in ["a/b.png", "a-b/c.jpg", "a/x/y/z.JPEG", "é/ü.png", "top.png", "a b/c.png"]:
        image(tmp_path / "ref" / rel, 7)
    (tmp_path / "ref" / "a" / "notes.txt").write_text("not an image")
    image(tmp_path / "elsewhere" / "linked.png", 9)
    os.symlink(tmp_path / "elsewhere", tmp_path / "ref" / "link")
    former = sorted(
        Path(d) / f for d, _, names in os.walk(tmp_path / "ref") for f in names if f.lower().endswith(IMAGE_SUFFIXES)
    )
    files = ImageFiles(tmp_path / "ref")
    assert [files.path(i) for i in range(len(files))] == former and len(files) == 6
    assert files.files.dtype.kind == "S" and files[0].size == (20, 20)


def test_an_unreadable_reference_image_is_one_line_naming_it(tmp_path):
    from cil.errors import UnreadableSample
    from cil.streams.reference import ImageFiles
    from tests.writers import image

    image(tmp_path / "ref" / "a.jpg", 7)
    (tmp_path / "ref" / "b.jpg").write_text("<html>404</html>")
    files = ImageFiles(tmp_path / "ref")
    assert files[0].size == (20, 20)
    with pytest.raises(UnreadableSample, match=r"cannot read reference image .*b\.jpg \(.*\); replace or delete"):
        files[1]


def test_captions_with_quotes_and_headers(tmp_path):
    """A caption opening with an unmatched quote stays one caption (no quote processing in TSV and plain files);
    the code's ``*_output.csv`` header (``title<TAB>filepath``) is skipped and names the column; a comma CSV with
    a header keeps CSV quoting (commas inside quoted captions)."""
    import pandas as pd

    tsv = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    tsv.write_text('"a quote that never closes\thttp://x/1\nsecond caption\thttp://x/2\nthird\thttp://x/3\n')
    assert read_captions(tsv) == ['"a quote that never closes', "second caption", "third"]
    plain = tmp_path / "captions.txt"
    plain.write_text('"unmatched\nnext line\n')
    assert read_captions(plain) == ['"unmatched', "next line"]
    output = tmp_path / "Validation_GCC-1.1.0-Validation_output.csv"
    output.write_text("title\tfilepath\na dog on a beach\tval/0/0.jpg\na red car\tval/1/1.jpg\n")
    assert read_captions(output) == ["a dog on a beach", "a red car"]
    # the code reads that file with pandas: the same captions
    assert read_captions(output) == pd.read_csv(output, sep="\t")["title"].tolist()
    swapped = tmp_path / "swapped.tsv"
    swapped.write_text("filepath\tcaption\nval/0/0.jpg\tthe caption\n")
    assert read_captions(swapped) == ["the caption"]
    comma = tmp_path / "captions.csv"
    comma.write_text('url,caption\nhttp://x/1,"a dog, a cat"\nhttp://x/2,plain\n')
    assert read_captions(comma) == ["a dog, a cat", "plain"]


# ---- the strategy on a tiny open_clip CLIP (docs/methods/zscl.md §5) ---------------------------------------------


NAMES = ["cat", "dog", "car", "tree", "boat", "house"]
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection")


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    words = ["a", "photo", "of", "dog", "cat", "on", "the", "grass", "red", "car", "tree", "sky", "boat", "sea"]
    g = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(g.choice(words, size=5)) for _ in range(7)) + "\n")
    return path


def reference_set(n: int = 24) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7)))


def make_zscl(captions_file, **kwargs) -> ZSCL:
    torch.manual_seed(0)
    settings = dict(
        iterations=3,
        lr=1e-3,
        warmup=1,
        we_interval=2,
        reference_images=reference_set(),
        reference_captions=str(captions_file),
        reference_batch_size=4,
    )
    strategy = ZSCL(create_clip("open_clip:cil-tiny-clip"), **{**settings, **kwargs})
    strategy.read_reference_data()  # as its first session's begin_session does
    return strategy


def test_the_constructor_reads_no_file(tmp_path):
    """Reference captions and images are read when the first session begins (``read_reference_data``), not when
    the strategy is built; a missing file is then one ConfigError naming it."""
    strategy = ZSCL(
        create_clip("open_clip:cil-tiny-clip"),
        reference_images=str(tmp_path / "no-images"),
        reference_captions=str(tmp_path / "no-captions.txt"),
    )
    assert strategy.captions == [] and strategy.reference is None
    with pytest.raises(ConfigError, match="no-captions.txt' not found"):
        strategy.read_reference_data()
    (tmp_path / "no-captions.txt").write_text("a caption\n")
    with pytest.raises(ConfigError, match="reference image folder .*no-images' not found"):
        strategy.read_reference_data()


def session(k: int, per_class: int = 8) -> Session:
    g = torch.Generator().manual_seed(100 + k)
    classes = [2 * k, 2 * k + 1]
    y = torch.tensor(classes).repeat_interleave(per_class)
    x = torch.randn(len(y), 3, 32, 32, generator=g) * 0.5 + (y.float() / 3).view(-1, 1, 1, 1)
    data = TensorDataset(x, y)
    return Session(
        index=k,
        new_classes=classes,
        seen_classes=list(range(2 * k + 2)),
        train_data=data,
        loader_fn=lambda: DataLoader(data, batch_size=8),
        class_names=NAMES,
        session_classes=[[0, 1], [2, 3], [4, 5]],
        templates=[["a photo of a {}.", "a picture of the {}."]] * 3,
    )


def fit(strategy: ZSCL, k: int) -> None:
    """The three lines of the strategy contract, with the step budget the strategy asks for."""
    s = session(k)
    strategy.begin_session(s)
    trainer = pl.Trainer(
        max_epochs=-1,
        max_steps=strategy.steps_for(s),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(strategy, DataLoader(s.train_data, batch_size=4, shuffle=True))
    strategy.end_session(s)


def perturb(module: nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def reference_images_batch(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def test_2_at_init_distillation_has_zero_gradient_and_the_teacher_entropy(captions_file):
    strategy = make_zscl(captions_file)
    strategy.begin_session(session(0))
    image_side, text_side = strategy.distillation(reference_images_batch())
    (image_side + text_side).backward()
    grads = [p.grad.abs().max().item() for p in strategy.backbone.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6
    # L_img is T² times the mean entropy of the teacher's distribution over the captions
    with torch.no_grad():
        u = F.normalize(strategy.teacher(reference_images_batch()), dim=-1)
        p = F.softmax(strategy.backbone.logit_scale.exp() * u @ strategy.caption_embeddings().T / 2.0, dim=1)
        entropy = -(p * p.log()).sum(1).mean()
    assert image_side.item() == pytest.approx(4 * entropy.item(), rel=1e-5)
    assert weight_constraint(strategy.trainable(), strategy.anchors).item() == 0.0


def test_3_directions_shapes_and_invariance_to_the_order_of_the_reference_batch(captions_file, monkeypatch):
    strategy = make_zscl(captions_file)
    strategy.begin_session(session(0))
    perturb(strategy.backbone)
    seen = []

    def spy(t, z, T=2.0):
        seen.append(tuple(z.shape))
        return distillation_loss(t, z, T)

    monkeypatch.setattr("cil.strategies.zscl.distillation_loss", spy)
    images = reference_images_batch(4)
    image_side, text_side = strategy.distillation(images)
    assert seen == [(4, 7), (7, 4)]  # image side: rows over the 7 captions; text side: rows over the 4 images
    permuted = strategy.distillation(images[torch.tensor([2, 0, 3, 1])])
    assert permuted[0].item() == pytest.approx(image_side.item(), rel=1e-6)
    assert permuted[1].item() == pytest.approx(text_side.item(), rel=1e-6)


def test_4_distillation_gradients_reach_only_the_image_tower(captions_file):
    strategy = make_zscl(captions_file)
    strategy.begin_session(session(0))
    perturb(strategy.backbone)
    sum(strategy.distillation(reference_images_batch())).backward()
    for name, p in strategy.backbone.model.named_parameters():
        if name.startswith(TEXT_TOWER):
            assert p.grad is None or not p.grad.any(), name
    visual = [p.grad for n, p in strategy.backbone.model.named_parameters() if n.startswith("visual.")]
    assert all(g is not None and g.abs().sum() > 0 for g in visual)
    # logit_scale is frozen and outside the optimiser; every other parameter of both towers trains
    trainable = {id(p) for p in strategy.trainable()}
    assert id(strategy.backbone.logit_scale) not in trainable
    assert len(trainable) == sum(1 for _ in strategy.backbone.parameters()) - 1
    # the paper's variant (student caption embeddings) does send gradient into the text tower
    paper = make_zscl(captions_file, distill_text_features="student")
    paper.begin_session(session(0))
    perturb(paper.backbone)
    sum(paper.distillation(reference_images_batch())).backward()
    assert paper.backbone.model.token_embedding.weight.grad.abs().sum() > 0


def test_student_caption_variant_samples_captions_per_step(captions_file, tmp_path, monkeypatch):
    """distill_text_features=student: each step re-encodes a seeded sample of the captions (the teacher's logits
    over the same sample), the same sample for the same step, another at the next; all captions with null, which
    is refused on a caption file the size of Conceptual Captions' validation set."""
    from cil.config import ConfigError
    from cil.strategies.zscl import distillation_loss

    paper = make_zscl(captions_file, distill_text_features="student", student_caption_batch=3)
    paper.begin_session(session(0))
    perturb(paper.backbone)
    chosen = paper.student_captions()
    assert len(chosen) == 3 and torch.equal(chosen, paper.student_captions())
    images = reference_images_batch()
    image_side, text_side = paper.distillation(images)
    with torch.no_grad():  # by hand over the chosen captions only
        scale = paper.backbone.logit_scale.exp()
        student = torch.nn.functional.normalize(paper.backbone(images), dim=-1)
        teacher = torch.nn.functional.normalize(paper.teacher(images), dim=-1)
        texts = [paper.captions[i] for i in chosen.tolist()]
        t_caps = torch.nn.functional.normalize(paper.teacher.encode_text(paper.teacher.tokenize(texts)), dim=-1)
        s_caps = torch.nn.functional.normalize(paper.backbone.encode_text(paper.backbone.tokenize(texts)), dim=-1)
        t_logits, s_logits = scale * teacher @ t_caps.T, scale * student @ s_caps.T
    torch.testing.assert_close(image_side.detach(), distillation_loss(t_logits, s_logits, 2.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_side.detach(), distillation_loss(t_logits.T, s_logits.T, 2.0), rtol=1e-4, atol=1e-5)
    draws = set()
    for step in range(6):
        monkeypatch.setattr(ZSCL, "global_step", property(lambda self, step=step: step))
        draws.add(tuple(paper.student_captions().tolist()))
    assert len(draws) > 1  # another sample at another step
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"caption {i}" for i in range(5000)))
    with pytest.raises(ConfigError, match="re-encodes all 5000 captions with gradients"):
        make_zscl(many, distill_text_features="student", student_caption_batch=None)


def test_5_the_teacher_is_the_initial_model_for_every_task(captions_file):
    strategy = make_zscl(captions_file)
    initial = {k: v.clone() for k, v in strategy.teacher.state_dict().items()}
    assert all(torch.equal(v, strategy.backbone.state_dict()[k]) for k, v in initial.items())
    fit(strategy, 0)
    after_task_1 = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
    fit(strategy, 1)
    assert all(torch.equal(v, strategy.teacher.state_dict()[k]) for k, v in initial.items())
    assert not all(torch.equal(v, strategy.teacher.state_dict()[k]) for k, v in after_task_1.items())
    assert not strategy.teacher.training and not any(p.requires_grad for p in strategy.teacher.parameters())


def kl_to_teacher(strategy: ZSCL, images: torch.Tensor) -> float:
    with torch.no_grad():
        captions = strategy.caption_embeddings()
        s = strategy.backbone.logit_scale.exp()
        t = s * F.normalize(strategy.teacher(images), dim=-1) @ captions.T
        z = s * F.normalize(strategy.backbone(images), dim=-1) @ captions.T
        return F.kl_div(F.log_softmax(z, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean").item()


def visual_distance(strategy: ZSCL) -> float:
    pairs = zip(strategy.backbone.model.visual.parameters(), strategy.teacher.model.visual.parameters())
    return sum((a - b).pow(2).sum().item() for a, b in pairs) ** 0.5


def test_6_stronger_distillation_keeps_the_student_nearer_the_teacher(captions_file):
    held_out = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    results = {}
    for weight in (0.0, 1e3):
        strategy = make_zscl(
            captions_file, iterations=19, we_interval=0, wc_weight=0, image_loss_weight=weight, text_loss_weight=weight
        )
        strategy.image_loss_weight = weight
        fit(strategy, 0)
        results[weight] = (kl_to_teacher(strategy, held_out), visual_distance(strategy))
    assert results[1e3][0] < results[0.0][0] and results[1e3][1] < results[0.0][1], results
    # with lr = 0 nothing moves: bit-identical raw weights; the ensemble of identical weights up to its rounding
    frozen = make_zscl(captions_file, we_interval=0)
    frozen.hparams.lr = 0.0  # set after construction: a config refuses lr=0, which this check needs
    before = copy.deepcopy(frozen.backbone.state_dict())
    fit(frozen, 0)
    assert all(torch.equal(v, frozen.backbone.state_dict()[k]) for k, v in before.items())
    averaged = make_zscl(captions_file)
    averaged.hparams.lr = 0.0
    fit(averaged, 0)
    for k, v in before.items():
        torch.testing.assert_close(averaged.backbone.state_dict()[k], v, rtol=1e-6, atol=1e-7)


class FillStep(ZSCL):
    """The optimiser step of iteration k sets every trainable weight to k + 1 (docs/methods/zscl.md §5.7)."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)  # lr 0: counts the step, moves nothing
        with torch.no_grad():
            for p in self.trainable():
                p.fill_(self.trainer.global_step + 1)  # inside the hook global_step is still k


def test_7_weight_ensemble_bookkeeping_in_the_training_loop(captions_file):
    torch.manual_seed(0)
    strategy = FillStep(
        create_clip("open_clip:cil-tiny-clip"), iterations=5, we_interval=2, warmup=1, wc_weight=1.0,
        image_loss_weight=0, text_loss_weight=0,
    )  # fmt: skip
    strategy.hparams.lr = 0.0  # after construction: a config refuses lr=0
    with torch.no_grad():
        for p in strategy.trainable():
            p.zero_()  # θ_start = 0
    fit(strategy, 0)
    # K = 5 runs k = 0..5; the mean takes k = 0, 2, 4 (weights 1, 3, 5) with θ_start: (0 + 1 + 3 + 5) / 4
    assert strategy.ensemble.count == 5 // 2 + 1
    assert all(torch.allclose(p, torch.full_like(p, 2.25)) for p in strategy.trainable())
    # the next task starts from the ensemble, which is also its L_wc anchor and its ensemble's first term
    strategy.begin_session(session(1))
    assert all(torch.allclose(a, torch.full_like(a, 2.25)) for a in strategy.anchors)
    assert strategy.ensemble.count == 0
    assert all(torch.allclose(m, p) for m, p in zip(strategy.ensemble.mean, strategy.backbone.parameters()))


def test_10_training_and_evaluation_classifiers_from_the_text_tower(captions_file):
    strategy = make_zscl(captions_file, templates=["a photo of a {}."])
    strategy.begin_session(session(1))
    x = torch.randn(5, 3, 32, 32)
    clip = strategy.backbone.model
    logits = strategy.train_logits(x)
    with torch.no_grad():
        text = F.normalize(
            clip.encode_text(strategy.backbone.tokenize(["a photo of a car.", "a photo of a tree."])), dim=-1
        )
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text.T
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()
    assert clip.token_embedding.weight.grad.abs().sum() > 0  # built from the current weights, with gradients
    strategy.end_session(session(1))
    with torch.no_grad():  # a single template: evaluation = 100 · cos against the same text embeddings
        torch.testing.assert_close(strategy(x)[:, 2:4], 100 * expected / clip.logit_scale.exp())
    # several templates: the mean of the normalised per-template embeddings, renormalised
    ensemble = make_zscl(captions_file)
    ensemble.begin_session(session(0))
    ensemble.end_session(session(0))
    with torch.no_grad():
        tok = ensemble.backbone.tokenize(["a photo of a cat.", "a picture of the cat."])
        per_template = F.normalize(ensemble.backbone.encode_text(tok), dim=-1)
    torch.testing.assert_close(ensemble.classifier.weight[0], F.normalize(per_template.mean(0), dim=-1))


def test_12_cil_ce_covers_the_current_task_and_evaluation_all_seen_classes(captions_file):
    strategy = make_zscl(captions_file)
    s = session(1)
    strategy.begin_session(s)
    x, y = s.train_data.tensors
    assert strategy.train_logits(x).shape == (len(x), 2)  # the current task's 2 classes only
    assert strategy._local[y].tolist() == (y - 2).tolist()  # targets shifted by the 2 classes of task 0
    strategy.end_session(s)
    with torch.no_grad():
        logits = strategy(x)
    assert logits.shape == (len(x), 6)
    assert torch.isfinite(logits[:, :4]).all() and torch.isinf(logits[:, 4:]).all()  # seen classes only
    # task-incremental (MTIL): every class scores (zero-shot on later tasks), each sample among its task's classes
    til = make_zscl(captions_file, task_incremental=True)
    til.begin_session(s)
    til.end_session(s)
    with torch.no_grad():
        predicted, _ = til.predict_step((x, y), 0)
    assert torch.isfinite(til(x)).all()
    assert set(predicted.tolist()) <= {2, 3}


def test_reference_batches_are_a_function_of_the_step_and_split_across_processes():
    single = ReferenceBatches(10, 4, seed=5)
    steps = [single.batch(k) for k in range(6)]
    flat = [i for b in steps for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # passes = permutations
    assert [next(iter(ReferenceBatches(10, 4, seed=5, start=k))) for k in range(6)] == steps  # resumable
    ranks = [ReferenceBatches(10, 2, seed=5, rank=r, world=2) for r in range(2)]
    assert [ranks[0].batch(k) + ranks[1].batch(k) for k in range(6)] == steps  # gathered = single process


# ---- end to end ---------------------------------------------------------------------------------------------------

FAST = ["backbone.image_size=32", "strategy.iterations=12", "strategy.warmup=2", "strategy.we_interval=4"]


def test_digits_run_reports_the_mtil_metrics_and_task_incremental_zero_shot(tmp_path):
    run = load_run(run_experiment(tiny_config("zscl", tmp_path, *FAST, "strategy.task_incremental=true")))
    assert run.summary["complete"]
    R = run.accuracy_matrix.to_numpy()
    assert R.shape == (5, 5) and not np.isnan(R).any()  # zero-shot cells above the diagonal are scored too
    assert run.metric("mtil_transfer") == pytest.approx(M.mtil_transfer(R))
    assert run.metric("mtil_last") == pytest.approx(M.mtil_last(R))
    assert run.metric("mtil_avg") == pytest.approx(M.mtil_avg(R))


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_resume_mid_session_gives_the_same_matrix(tmp_path):
    # 3 epochs per task; the fault stops task 2 after its first epoch (weight ensemble and reference batches mid-way)
    overrides = [*FAST, "stream.split=B4-Inc3", "stream.batch_size=64", "run.keep_session_checkpoints=true"]
    full = run_experiment(tiny_config("zscl", tmp_path / "a", *overrides))
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(tiny_config("zscl", tmp_path / "b", *overrides), callbacks=[Fault(session=1, epoch=1)])
    broken = next((tmp_path / "b" / "zscl-digits").iterdir())
    assert main(["run", "--resume", str(broken)]) == 0
    np.testing.assert_array_equal(
        load_run(broken).accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy()
    )
    for k in (1, 2):  # the weights themselves, bit for bit (an accuracy matrix can hide small differences)
        resumed = torch.load(broken / "checkpoints" / f"session_{k}.ckpt", weights_only=False)["state_dict"]
        uninterrupted = torch.load(full / "checkpoints" / f"session_{k}.ckpt", weights_only=False)["state_dict"]
        assert all(torch.equal(v, uninterrupted[name]) for name, v in resumed.items())


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "strategy.reference_captions=/nonexistent/captions.txt",
            "reference captions file '/nonexistent/captions.txt'",
        ),
        ("strategy.reference_images=/nonexistent/images", "reference image folder '/nonexistent/images' not found"),
        ("strategy.reference_images=null", "strategy.reference_images is required"),
        ("backbone.name=resnet10t", "zscl needs a CLIP backbone"),
        ("backbone.name=open_clip:ViT-B-99", "no open_clip model 'ViT-B-99'"),
        ("backbone.name=open_clip:ViT-B-16.nonsense", "no pretrained tag 'nonsense'"),
        ("strategy.lr_per_session=[0.1,0.2]", "strategy.lr_per_session has 2 values for a stream of 5 sessions"),
        ("strategy.distill_text_features=both", "strategy.distill_text_features='both' is not valid"),
    ],
)
def test_bad_settings_are_config_errors_before_training(tmp_path, capsys, override, message):
    config = CONFIGS / "zscl" / "digits.yaml"
    assert main(["run", str(config), f"run.output_dir={tmp_path}", *FAST, override]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*/*/checkpoints/session_*.ckpt"))


def test_an_empty_reference_folder_is_a_config_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="holds no image"):
        reference_image_set(tmp_path / "empty")


# ---- the paper's configs ------------------------------------------------------------------------------------------
def test_mtil_config_runs_on_real_format_files_and_reports_transfer_avg_last(tmp_path):
    from tests.writers import image, write_dtd, write_eurosat, write_mnist

    write_mnist(tmp_path / "data")
    write_dtd(tmp_path / "data")
    write_eurosat(tmp_path / "data")
    for i in range(6):  # any image folder, searched recursively (ImageNet's train set in the paper)
        image(tmp_path / "reference" / f"n0{i % 2}" / f"image_{i}.JPEG", 40 * i)
    captions = tmp_path / "captions.tsv"  # the Conceptual Captions TSV: caption, then URL
    captions.write_text("a dog on a beach\thttp://x/1.jpg\na red car\thttp://x/2.jpg\na tree in a field\thttp://x/3\n")
    overrides = [
        f"run.output_dir={tmp_path / 'runs'}",
        f"stream.data_root={tmp_path / 'data'}",
        "stream.datasets=[mnist,dtd,eurosat]",
        "stream.verify_checksums=false",
        "stream.num_workers=0",
        "stream.batch_size=8",
        "backbone.name=open_clip:cil-tiny-clip",
        "backbone.pretrained=false",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "strategy.iterations=4",
        "strategy.warmup=1",
        "strategy.we_interval=2",
        "strategy.lr_per_session=null",
        "strategy.reference_num_workers=0",
        f"strategy.reference_images={tmp_path / 'reference'}",
        f"strategy.reference_captions={captions}",
    ]
    cfg = load_config(CONFIGS / "zscl" / "mtil_order1.yaml", overrides)
    run = load_run(run_experiment(cfg))
    assert run.summary["complete"] and run.summary["task_names"] == ["mnist", "dtd", "eurosat"]
    R = run.accuracy_matrix.to_numpy()
    assert R.shape == (3, 3) and not np.isnan(R).any()
    for name, fn in (("mtil_transfer", M.mtil_transfer), ("mtil_avg", M.mtil_avg), ("mtil_last", M.mtil_last)):
        assert run.metric(name) == pytest.approx(fn(R))
        assert compare([run])[name].item() == pytest.approx(100 * fn(R))  # `cil report` shows them for MTIL runs


PAPER = {  # docs/methods/zscl.md §3
    "mtil": dict(iterations=1000, lr=1e-5, warmup=100, we_interval=100, wc_weight=1.0, image_loss_weight=1.0),
    "cil": dict(iterations=None, epochs=1, lr=7.1e-6, warmup=30, we_interval=10, wc_weight=0.0, image_loss_weight=5.0),
}


@pytest.mark.parametrize(
    "name",
    ["mtil_order1", "cifar100_10steps"]
    + [
        pytest.param(n, marks=pytest.mark.slow)  # the same builds with other orders and splits
        for n in [
            "mtil_order2",
            "cifar100_20steps",
            "cifar100_50steps",
            "tinyimagenet_100-5",
            "tinyimagenet_100-10",
            "tinyimagenet_100-20",
        ]
    ],
)
def test_paper_configs_build_the_official_training(name, tmp_path):
    """What each paper config builds, against the official scripts (docs/methods/zscl.md §3): a frozen teacher copy of
    the student CLIP, every CLIP weight but logit_scale trained, AdamW (betas 0.9/0.999, no weight decay) at the
    session's rate with the warm-up + cosine factor of the code, the loss weights and smoothing, the training
    transform's crop scale, the task-incremental masking (MTIL) and the session layout."""
    from torchvision import transforms as T

    from cil.backbones.clip import ClipBackbone
    from cil.loaders import stream_transforms
    from cil.module import create_strategy
    from tests.writers import image

    image(tmp_path / "reference" / "image_0.JPEG", 10)
    (tmp_path / "captions.txt").write_text("a dog on a beach\n")
    overrides = [
        "backbone.pretrained=false",
        f"strategy.reference_images={tmp_path / 'reference'}",
        f"strategy.reference_captions={tmp_path / 'captions.txt'}",
    ]
    cfg = load_config(CONFIGS / "zscl" / f"{name}.yaml", overrides)
    strategy = create_strategy(cfg)
    hp = strategy.hparams
    setting = "mtil" if name.startswith("mtil") else "cil"
    assert isinstance(strategy.backbone, ClipBackbone) and cfg.backbone.name == "open_clip:ViT-B-16.openai"
    assert not any(p.requires_grad for p in strategy.teacher.parameters())
    trained = {n for n, p in strategy.backbone.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in strategy.backbone.named_parameters()} - {"model.logit_scale"}
    expected = PAPER[setting]
    for session in range(len(hp.lr_per_session or [None])):
        strategy.session_index = session

        class _Trainer:  # the CIL scripts' schedule length is the epoch's step count
            estimated_stepping_batches = 500

        strategy._trainer = _Trainer()
        built = strategy.configure_optimizers()
        optimizer, schedule = built["optimizer"], built["lr_scheduler"]["scheduler"]
        group = optimizer.param_groups[0]
        rate = expected["lr"] if hp.lr_per_session is None else hp.lr_per_session[session]
        assert type(optimizer) is torch.optim.AdamW and group["initial_lr"] == rate
        assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.0
        total, warmup = expected["iterations"] or 500, expected["warmup"]
        factor = schedule.lr_lambdas[0]
        assert factor(0) == pytest.approx(1 / warmup) and factor(warmup) == pytest.approx(1.0)
        assert factor(total) == pytest.approx(0.0, abs=1e-12)
    if setting == "mtil":
        rates = dict(zip(cfg.stream.datasets, hp.lr_per_session))
        assert rates == {d: 5e-5 if d in ("aircraft", "mnist") else 1e-5 for d in cfg.stream.datasets}
        assert hp.task_incremental and len(cfg.stream.datasets) == 11
    else:
        assert not hp.task_incremental and list(hp.templates) == ["a bad photo of a {}."]
        assert sorted(cfg.stream.class_order) == list(range(100 if "cifar" in name else 200))
    for key in ("iterations", "we_interval", "wc_weight", "image_loss_weight"):
        assert hp[key] == expected[key], key
    assert hp.text_loss_weight == hp.image_loss_weight and (hp.label_smoothing, hp.temperature) == (0.2, 2.0)
    assert hp.distill_text_features == "teacher" and cfg.stream.batch_size == 64
    train = stream_transforms(strategy.backbone, cfg).train.transforms
    crops = [t for t in train if "RandomResizedCrop" in type(t).__name__]  # open_clip's training crop
    assert len(crops) == 1 and tuple(crops[0].scale) == (0.9, 1.0) and crops[0].size == (224, 224)
    assert tuple(crops[0].ratio) == pytest.approx((3 / 4, 4 / 3)) and not any(
        isinstance(t, T.RandomHorizontalFlip) for t in train
    )
    steps = {"cifar100_10steps": "B10-Inc10", "cifar100_20steps": "B5-Inc5", "cifar100_50steps": "B2-Inc2"}
    steps.update({"tinyimagenet_100-5": "B100-Inc5", "tinyimagenet_100-10": "B100-Inc10"})
    steps["tinyimagenet_100-20"] = "B100-Inc20"
    if name in steps:
        assert cfg.stream.split == steps[name]


# ---- DDP: the text-side softmax covers the whole gathered reference batch ----------------------------------------
def _distillation_gradients(strategy: ZSCL, rank: int, world: int, per_process: int):
    """The distillation loss on this process's share of step 0's reference batch, and gradients averaged as DDP."""
    import torch.distributed as dist

    sampler = ReferenceBatches(len(strategy.reference), per_process, seed=3, rank=rank, world=world)
    images = torch.stack([strategy.reference[i] for i in sampler.batch(0)])
    image_side, text_side = strategy.distillation(images)
    (image_side + text_side).backward()
    grads = [p.grad.clone() for p in strategy.backbone.model.visual.parameters()]
    if world > 1:
        for g in grads:
            dist.all_reduce(g)
            g /= world
    return image_side.item(), text_side.item(), grads


def _ddp_worker(rank: int, world: int, port: int, captions: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        strategy = make_zscl(Path(captions))
        strategy.begin_session(session(0))
        perturb(strategy.backbone)
        torch.save(_distillation_gradients(strategy, rank, world, per_process=2), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 10 s of gloo processes; DDP itself stays covered by test_session
def test_distillation_under_ddp_equals_one_process_on_the_global_batch(captions_file, tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(captions_file), str(tmp_path)), nprocs=2)
    strategy = make_zscl(captions_file)
    strategy.begin_session(session(0))
    perturb(strategy.backbone)
    single = _distillation_gradients(strategy, 0, 1, per_process=4)
    for r in range(2):
        image_side, text_side, grads = torch.load(tmp_path / f"rank{r}.pt")
        assert image_side == pytest.approx(single[0], rel=1e-5) and text_side == pytest.approx(single[1], rel=1e-5)
        for g, expected in zip(grads, single[2]):
            torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
