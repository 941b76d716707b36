"""ZSCL: zero-shot continual learning of CLIP (Zheng et al., ICCV 2023), from the official code (Thunderbeee/ZSCL).

``docs/methods/zscl.md`` section numbers are cited below. A CLIP student (both towers train; ``logit_scale`` is frozen)
learns one task after another while a frozen **teacher — the initial CLIP, for the whole stream, never the previous
task's model** — anchors its feature space. Every iteration (§1):

1. the classifier is rebuilt from the student's text tower (with gradients): ``W = n(g(tok(template₀(c))))`` for the
   current task's classes; ``L_ce = CE(s · n(f(x)) Wᵀ, y, label_smoothing=0.2)`` with targets local to the task;
2. a reference batch ``x_r`` (any image set: ImageNet train in MTIL) is encoded by student and teacher, and scored
   against the reference captions' *teacher* embeddings ``T̄`` (computed once and cached: the teacher is frozen):
   ``Z = s · n(f_θ(x_r)) T̄ᵀ`` and ``Z̄ = s · n(f_θ0(x_r)) T̄ᵀ``;
3. ``L = L_ce + λ_img · KD(Z̄, Z) + λ_txt · KD(Z̄ᵀ, Zᵀ) + wc_weight · Σ ‖θ - θ_start‖²`` — KD with the teacher's
   probabilities as targets and T = 2; the text side is a softmax over the batch's reference images (gathered
   across processes under DDP, so it does not depend on the world size); θ_start is the task-start model;
4. one AdamW step (linear warm-up then cosine, per step), then every ``we_interval`` iterations the running uniform
   weight ensemble folds the weights in (:class:`WeightEnsemble`); at the end of the task the *ensemble* becomes the
   model: it is evaluated, saved, and is the next task's start and L_wc anchor.

Evaluation uses ``100 · cos`` against every class's template-ensemble embedding. ``task_incremental=true`` (MTIL)
scores each test image among its own data set's classes only (the task is known at test time) and, since every
class has a text embedding, also measures zero-shot accuracy on data sets not trained yet (MTIL's Transfer);
otherwise (CIL) the prediction ranges over every class seen so far.

Code, not paper: the distillation uses the **teacher's** caption embeddings on both sides, so its gradients reach
only the image tower (``distill_text_features="student"`` is the paper's notation: the student's own caption
embeddings, recomputed every step with gradients); L_wc is on in the MTIL script (``--l2 1``). Differences from
the code, all choices: the caption embeddings are computed once rather than every step; reference batches are
drawn by a seeded sampler indexed by the step (so a resumed run draws the same ones); a task with a step budget
(``iterations``) runs ``iterations + 1`` steps with the schedule's K = ``iterations``, as the code's loop does.

Needs from the user: an :class:`cil.backbones.clip.ClipBackbone` (``backbone.name: open_clip:...``);
``Session.class_names``, ``session_classes`` (and ``templates``, or ``strategy.templates``); a Trainer with
``max_steps = steps_for(session)`` when ``iterations`` is set; reference images and captions unless both
distillation weights are 0.

The building blocks are plain functions of tensors:

- :func:`distillation_loss` — ``T² · mean_rows(-Σ softmax(t/T) log_softmax(z/T))``: the teacher's probabilities as
  soft targets (§1.7); used on the image side (each reference image over the reference captions) and on the text
  side (each caption over the batch's reference images, i.e. the transposed logits);
- :func:`weight_constraint` — ``Σ ‖θ - θ_start‖²``, a sum over every parameter (§1.3);
- :class:`WeightEnsemble` — the running *uniform* mean of the weights every I iterations, started from the task-start
  weights (§1.10);
- :func:`warmup_cosine` — the per-step learning-rate factor: linear warm-up then cosine to 0 (§1.11);
- :func:`text_classifier` — class embeddings from a text encoder: ``n(g(tok(template(c))))``, averaged over the
  templates and renormalised (one template in training, the data set's list at evaluation; §1.2, §2);
- :func:`read_captions` — the reference texts: one caption per line, or the Conceptual Captions TSV (§1.5);
- :func:`reference_image_set` — the reference images: an image folder (searched recursively), the embedded digits, or
  any data set object (labels, if any, are dropped).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cil import distributed
from cil.config import ConfigError
from cil.layers.growing import Growing
from cil.module import CILModule, Session
from cil.strategies.configs import ZSCLConfig
from cil.streams.reference import read_captions, reference_image_set


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0):
    """KD(t, z; T) = T² · mean over rows of the cross-entropy of softmax(z/T) against softmax(t/T) (§1.7)."""
    targets = F.softmax(teacher_logits / temperature, dim=1)
    log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * -(targets * log_probs).sum(1).mean()


def weight_constraint(parameters: Iterable[nn.Parameter], anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``Σ_params ‖θ - θ_start‖²``: a sum, not a mean, as the code's ``--l2`` term."""
    terms = [(p - a.detach()).pow(2).sum() for p, a in zip(parameters, anchors)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class WeightEnsemble:
    """The running uniform mean of a model's parameters (ZSCL's ``--we``).

    ``start(model)`` copies the task-start weights as the mean with count 0; ``update(model)`` (the code calls it
    after the optimiser step of iterations 0, I, 2I, ...) folds the current weights in: ``n ← n + 1`` then
    ``mean ← (n · mean + θ) / (n + 1)``, so after updates at k = 0, I, ..., 10 I the mean is
    ``(θ_start + Σ_j θ^(jI)) / 12``. Buffers are not averaged (CLIP has none that train).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: list[torch.Tensor] = []

    @torch.no_grad()
    def start(self, model: nn.Module) -> None:
        self.count = 0
        self.mean = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1
        n = self.count
        for mean, p in zip(self.mean, model.parameters()):
            mean.mul_(n / (n + 1)).add_(p.detach(), alpha=1 / (n + 1))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the mean into ``model``: what is evaluated, saved and used as the next task's start."""
        for mean, p in zip(self.mean, model.parameters()):
            p.copy_(mean)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor of step k: ``(k + 1) / W`` for k < W, then ``0.5 (1 + cos(π (k - W) / (K - W)))`` (§1.11)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def text_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    chunk: int = 1024,
) -> torch.Tensor:
    """(classes, d) unit rows: per class, the normalised text embeddings of every template, averaged, renormalised.

    With one template this is the training classifier; with the data set's template list, the evaluation
    ensemble. Gradients flow into ``encode_text`` (the student's text tower trains through it). Every prompt goes
    through the text tower in batched calls of at most ``chunk`` prompts (the code makes one call per step for
    the training classifier), not one call per class.
    """
    if not templates:
        raise ValueError("text_classifier needs at least one template")
    texts = [template.format(name) for name in class_names for template in templates]
    embeddings = torch.cat(
        [F.normalize(encode_text(tokenize(texts[i : i + chunk])), dim=-1) for i in range(0, len(texts), chunk)]
    )
    return F.normalize(embeddings.view(len(class_names), len(templates), -1).mean(1), dim=-1)


class ReferenceBatches(Sampler):
    """Index batches of the reference set for steps ``start, start + 1, ...``: a pure function of (seed, step).

    The reference set is read as a concatenation of seeded permutations (a fresh one per pass, as a shuffled loader
    restarted when exhausted). Step k's global batch is positions ``[k·B·W, (k+1)·B·W)``; process r takes the r-th
    B of them, so gathering over W processes gives the single-process batch of B·W. A resumed run starts at its
    global step and draws exactly the batches the uninterrupted run drew.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        first = (step * self.world + self.rank) * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


# ----------------------------------------------------------------------------------------------- strategy


class TextHead(Growing):
    """Every class's evaluation embedding (template ensemble), its session, and which classes are predictable."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(0, dim))
        self.register_buffer("task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("visible", torch.zeros(0, dtype=torch.bool))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # zero-shot evaluation hard-codes 100 as CLIP's scale (the code's eval), on unit vectors
        logits = 100.0 * F.normalize(features, dim=-1) @ self.weight.T
        return logits.masked_fill(~self.visible, float("-inf"))


class ZSCL(CILModule):
    def __init__(self, backbone: nn.Module, num_features: int | None = None, **settings: Any):
        super().__init__(backbone, num_features)
        # defaults and choices: ZSCLConfig; reference images given as a data set are an object, not a saved value
        given = settings.get("reference_images")
        hp = self.save_settings(
            ZSCLConfig, settings, exclude=[] if given is None or isinstance(given, str) else ["reference_images"]
        )
        for key in ("encode_text", "tokenize", "logit_scale"):
            if not hasattr(backbone, key):
                raise ConfigError(
                    f"zscl needs a CLIP backbone (backbone.name: open_clip:...), not {type(backbone).__name__}"
                )
        self.backbone.logit_scale.requires_grad_(False)  # excluded from the optimiser in the code
        # the teacher is the initial model, frozen for the whole stream (never the previous task's model)
        self.teacher = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.classifier = TextHead(self.num_features)
        self.distills = hp.image_loss_weight > 0 or hp.text_loss_weight > 0
        self.captions: list[str] = []
        self.reference: Dataset | None = None
        if self.distills and (hp.reference_images is None or hp.reference_captions is None):
            missing = "strategy.reference_images" if hp.reference_images is None else "strategy.reference_captions"
            raise ConfigError(
                f"{missing} is required: ZSCL distils on reference images and captions "
                "(or set strategy.image_loss_weight=0 and strategy.text_loss_weight=0)"
            )
        self._reference_given = hp.reference_images  # a folder name, "digits" or a data set: read at the first session
        self.ensemble = WeightEnsemble()
        self.anchors: list[torch.Tensor] = []
        self._caption_embeddings: torch.Tensor | None = None
        self._reference_iter: Iterator | None = None
        self._reference_step = -1
        self._reference_seed = 0
        self._train_names: list[str] = []
        self._train_template = ""
        self._local = torch.zeros(0, dtype=torch.long)

    def rebuildable_prefixes(self) -> tuple[str, ...]:
        return ("teacher.",)  # the initial model, frozen: checkpoints leave it out (the config rebuilds it)

    # ---- Lightning plumbing ----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen, in eval mode, always
        return self

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def templates_for(self, session: Session, index: int) -> list[str]:
        if self.hparams.templates:
            return list(self.hparams.templates)
        if session.templates and session.templates[index]:
            return list(session.templates[index])
        return ["a photo of a {}."]

    # ---- session hooks ---------------------------------------------------------------------------------
    def read_reference_data(self) -> None:
        """The reference captions and images (``cil.streams.reference``), read once, when the first session begins:
        the constructor reads no file."""
        hp = self.hparams
        if hp.reference_captions is not None and not self.captions:
            self.captions = read_captions(hp.reference_captions)
        if hp.distill_text_features == "student" and hp.student_caption_batch is None and len(self.captions) > 4096:
            raise ConfigError(
                f"strategy.distill_text_features=student with strategy.student_caption_batch=null re-encodes all "
                f"{len(self.captions)} captions with gradients at every step, beyond any GPU's memory; set "
                "strategy.student_caption_batch (e.g. 256: a seeded sample per step)"
            )
        if self._reference_given is not None and self.reference is None:
            from cil.backbones import data_transforms

            self.reference = reference_image_set(self._reference_given, data_transforms(self.backbone).eval)

    def begin_session(self, session: Session) -> None:
        self.session_index = session.index
        self.read_reference_data()
        hp = self.hparams
        if not session.class_names or not session.session_classes:
            raise ConfigError("zscl needs the stream's class names: Session(class_names=..., session_classes=...)")
        if hp.lr_per_session is not None and len(hp.lr_per_session) != len(session.session_classes):
            raise ConfigError(
                f"strategy.lr_per_session has {len(hp.lr_per_session)} values for a stream of "
                f"{len(session.session_classes)} sessions; give one per session"
            )
        self._train_names = [session.class_names[c] for c in session.new_classes]
        self._train_template = self.templates_for(session, session.index)[0]
        self._local = torch.full((len(session.class_names),), -1, dtype=torch.long)
        self._local[torch.tensor(session.new_classes)] = torch.arange(len(session.new_classes))
        # the task-start weights: the ensemble's first term and the anchor of the weight constraint
        if hp.we_interval > 0:
            self.ensemble.start(self.backbone)
        self.anchors = [p.detach().clone() for p in self.trainable()] if hp.wc_weight > 0 else []
        # the seed of this task's reference batches, drawn from the generator the session loop seeds per session
        self._reference_seed = int(torch.randint(0, 2**62, ()).item())
        self._reference_iter, self._reference_step = None, -1

    def epochs_for(self, session: Session) -> int:
        return 1 if self.hparams.iterations is not None else int(self.hparams.epochs)

    def steps_for(self, session: Session) -> Optional[int]:
        # the code's loop runs k = 0..K: K + 1 steps
        return None if self.hparams.iterations is None else int(self.hparams.iterations) + 1

    @torch.no_grad()
    def end_session(self, session: Session) -> None:
        """Every class's evaluation embedding from the (averaged) student's text tower, template ensemble."""
        was_training = self.training
        self.eval()
        rows, tasks = [], []
        for j, classes in enumerate(session.session_classes):
            names = [session.class_names[c] for c in classes]
            rows.append(
                text_classifier(
                    self.backbone.encode_text, self.backbone.tokenize, names, self.templates_for(session, j)
                )
            )
            tasks += [j] * len(classes)
        order = torch.tensor([c for classes in session.session_classes for c in classes])
        weight = torch.empty(len(order), self.num_features, device=rows[0].device)
        weight[order] = torch.cat(rows)
        task = torch.empty(len(order), dtype=torch.long)
        task[order] = torch.tensor(tasks)
        visible = torch.zeros(len(order), dtype=torch.bool)
        visible[torch.tensor(session.seen_classes)] = True
        head = self.classifier
        head.weight, head.task = weight, task.to(weight.device)
        head.visible = torch.ones_like(visible) if self.hparams.task_incremental else visible
        head.visible = head.visible.to(weight.device)
        self.train(was_training)

    # ---- training ---------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        device = self.device
        self.ensemble.mean = [m.to(device) for m in self.ensemble.mean]
        self.anchors = [a.to(device) for a in self.anchors]
        self._local = self._local.to(device)

    def caption_embeddings(self) -> torch.Tensor:
        """T̄ = n(g_θ0(captions)), the teacher's, computed once per run (the teacher never changes)."""
        if self._caption_embeddings is None or self._caption_embeddings.device != self.device:
            with torch.no_grad():
                parts = [
                    F.normalize(self.teacher.encode_text(self.teacher.tokenize(self.captions[i : i + 256])), dim=-1)
                    for i in range(0, len(self.captions), 256)
                ]
            self._caption_embeddings = torch.cat(parts)
        return self._caption_embeddings

    def reference_batch(self) -> torch.Tensor:
        """This process's share of the current step's reference images (see :class:`ReferenceBatches`)."""
        step = self.global_step
        if self._reference_iter is None or step != self._reference_step:
            size = self.hparams.reference_batch_size or self._task_batch_size
            sampler = ReferenceBatches(
                len(self.reference), size, self._reference_seed, step, distributed.rank(), distributed.world_size()
            )
            workers = self.hparams.reference_num_workers
            loader = DataLoader(self.reference, batch_sampler=sampler, num_workers=workers, persistent_workers=False)
            self._reference_iter = iter(loader)
        self._reference_step = step + 1
        return next(self._reference_iter).to(self.device)

    def student_captions(self) -> torch.Tensor:
        """The caption indices of this step when the student encodes captions: a sample of
        ``student_caption_batch`` seeded by (session, step), the same on every process; all when it is None."""
        n, size = len(self.captions), self.hparams.student_caption_batch
        if size is None or size >= n:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self._reference_seed + 7919 * (self.global_step + 1))
        return torch.randperm(n, generator=generator)[:size].sort().values

    def distillation(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_img, L_txt) on a reference batch: KD over captions per image, and over the images per caption."""
        scale = self.backbone.logit_scale.exp()
        student = distributed.gather_cat_with_grad(F.normalize(self.backbone(images), dim=-1))
        with torch.no_grad():
            # equal-sized tensors: one collective on the device (gather_cat would round-trip through pickled CPU copies)
            teacher = distributed.gather_cat_with_grad(F.normalize(self.teacher(images), dim=-1))
        captions = self.caption_embeddings()
        if self.hparams.distill_text_features == "student":  # the paper's notation: the student's own captions
            chosen = self.student_captions()
            captions = captions[chosen.to(captions.device)]
            teacher_logits = scale * teacher @ captions.T
            tokens = self.backbone.tokenize([self.captions[i] for i in chosen.tolist()])
            captions = F.normalize(self.backbone.encode_text(tokens.to(self.device)), dim=-1)
        else:
            teacher_logits = scale * teacher @ captions.T
        student_logits = scale * student @ captions.T
        T = self.hparams.temperature
        image_side = distillation_loss(teacher_logits, student_logits, T)
        text_side = distillation_loss(teacher_logits.T, student_logits.T, T)
        return image_side, text_side

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``s · n(f(x)) Wᵀ`` over the current task's classes, W rebuilt now from the student's text tower (§1.2)."""
        classifier = text_classifier(
            self.backbone.encode_text, self.backbone.tokenize, self._train_names, [self._train_template]
        )
        return self.backbone.logit_scale.exp() * F.normalize(self.backbone(x), dim=-1) @ classifier.T

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x, y = batch[0], batch[1]
        self._task_batch_size = len(x)
        logits = self.train_logits(x)
        targets = self._local.to(y.device)[y]  # CE over the current task's classes only
        ce = F.cross_entropy(logits, targets, label_smoothing=hp.label_smoothing)
        loss, log = ce, self.logs_this_step()
        if self.distills:
            image_side, text_side = self.distillation(self.reference_batch())
            loss = loss + hp.image_loss_weight * image_side + hp.text_loss_weight * text_side
            if log:
                self.log_dict({"train/kd_img": image_side, "train/kd_txt": text_side})
        if hp.wc_weight > 0:
            wc = weight_constraint(self.trainable(), self.anchors)
            loss = loss + hp.wc_weight * wc
            if log:
                self.log("train/wc", wc)
        if log:
            self.log_dict({"train/ce": ce, "train/loss": loss}, prog_bar=True)
            self.log("train/acc", (logits.argmax(1) == targets).float().mean(), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step - 1  # the iteration whose optimiser step just ran
        if self.hparams.we_interval > 0 and step % self.hparams.we_interval == 0:
            self.ensemble.update(self.backbone)

    def on_train_end(self) -> None:
        # the ensemble is the task's model: evaluated, saved, the next task's start (the raw weights are dropped)
        if self.hparams.we_interval > 0:
            self.ensemble.copy_to(self.backbone)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # leaves the teacher out
        checkpoint["zscl_ensemble"] = {"count": self.ensemble.count, "mean": [m.cpu() for m in self.ensemble.mean]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # the rebuilt teacher, checked against the digest
        state = checkpoint.get("zscl_ensemble")
        if state is not None:
            self.ensemble.count, self.ensemble.mean = state["count"], [m.clone() for m in state["mean"]]

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr_per_session is None else hp.lr_per_session[self.session_index]
        optimizer = torch.optim.AdamW(self.trainable(), lr=lr, betas=(0.9, 0.999), weight_decay=hp.weight_decay)
        total = hp.iterations if hp.iterations is not None else max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: warmup_cosine(k, hp.warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- evaluation -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.hparams.task_incremental:  # the task is known at test time: its own classes only
            task = self.classifier.task
            logits = logits.masked_fill(task[None, :] != task[y][:, None], float("-inf"))
        return logits.argmax(1), y


__all__ = [
    "ZSCL",
    "ZSCLConfig",
    "ReferenceBatches",
    "WeightEnsemble",
    "reference_image_set",
    "distillation_loss",
    "read_captions",
    "text_classifier",
    "warmup_cosine",
    "weight_constraint",
]
