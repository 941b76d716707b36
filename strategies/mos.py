"""MOS: Model Surgery for pre-trained-model-based class-incremental learning (Sun et al., AAAI 2025).

Follows the official code (``sun-hailong/AAAI25-MOS``, byte-identical in LAMDA-PILOT); ``docs/methods/mos.md``
section numbers are cited below. A frozen timm ViT carries one set of AdaptFormer adapters per session
(:class:`cil.layers.adapters.AdapterBank`). Per session t:

1. the current adapter set carries over from session t-1 (only session 0 starts from the zero-output init);
2. adapter + linear head train with cross-entropy over the new classes (old-class logits masked to -inf) plus
   the orthogonality loss (§1.5), SGD with momentum 0.9, a cosine schedule, the head at 0.1x the adapter lr;
   after every step the adapter is merged toward the mean of the earlier snapshots (§1.4);
3. the adapter set is frozen as snapshot A_t;
4. per-class Gaussians of the new classes' features (current adapter) are stored (§1.3 step 5);
5. from session 1 on, the head is re-trained on features sampled from every class's Gaussian (§1.6);
6. the new classes' prototypes are the mean features of adapter A_0 (§1.3 step 7).

Inference (§1.7) is training-free: a first guess from adapter 0 and the cosine prototypes picks a session, the
self-refined retrieval (:class:`cil.layers.retrieval.SelfRefinedRetrieval`) moves to the session the head predicts with
that session's adapter, at most ``max_iter`` head evaluations, and the output is
``softmax(z) + softmax(T * z_orig)`` with T the number of sessions seen.

``merge_mode`` (§5): ``"official"`` reproduces the code, which merges in place D times inside every forward of
the current adapter (once before each of the D blocks, for all blocks: block l runs after l + 1 merges) and once
more after each optimiser step, so the pull per iteration is 1 - (1 - m)^(D + 1) and depends on the depth; the
statistics pass merges D times per forward as well. ``"per_step"`` is the paper's intent: one merge after each
optimiser step and none inside forwards.

``eval_adapters`` (§1.4c): the official code merges the stored ``adapter_list[j]`` (j >= 1) in place toward
mean(A_0..A_{j-1}) D times in every test forward, so after the first few test batches (0.9^12 per batch for
ViT-B) adapter j *is* that mean, for the rest of the run; the paper's figures were produced so. ``"merged"``
(default) evaluates adapter j >= 1 as that converged mean, computed out of place: deterministic, independent of
the test order, no snapshot written. ``"stored"`` evaluates A_j as trained (the training-free reading of the
paper). Only the first test batches of each session differ from the code (they see a partly merged adapter).

Differences from the code, all documented choices: the head grows by rows as classes arrive (the code allocates
every class's row up front, so unseen rows only decay); under DDP the orthogonality loss sees each process's
batch (the code's DataParallel gathers the whole batch); the statistics pass batches the session's data as the
session loop's ``stats`` loader does (the code loads one class at a time), which changes how many in-forward
merges the official mode applies there.

Needs from the user: a timm VisionTransformer backbone (``backbone.blocks[i].norm2``), ``Session.loader_fn``
for the statistics pass, and ``ca_samples_per_class`` = 5 x the training batch size to match the code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cil.config import ConfigError
from cil.layers.adapters import AdapterBank, vit_blocks
from cil.layers.growing import GrowingClassifier
from cil.layers.prototypes import ClassMeans
from cil.layers.retrieval import SelfRefinedRetrieval
from cil.layers.statistics import ClassGaussians
from cil.module import CILModule, Session
from cil.progress import progress
from cil.strategies.configs import MOSConfig


class MOS(CILModule):
    def __init__(self, backbone: nn.Module, num_features: int | None = None, **settings: Any):
        super().__init__(backbone, num_features)
        hp = self.save_settings(MOSConfig, settings)  # defaults and choices: MOSConfig
        self.backbone.requires_grad_(False)  # the pre-trained ViT stays frozen
        try:
            self.adapters = AdapterBank(backbone, hp.bottleneck, hp.adapter_dropout, hp.adapter_scale)
        except ValueError as e:
            raise ConfigError(f"mos needs a timm VisionTransformer backbone: {e}") from None
        # `classifier` (CILModule's growing linear layer) is the code's `head`, initialised as its
        # SimpleContinualLinear (trunc_normal std 0.02, zero bias); the prototypes are its `fc`
        self.classifier = GrowingClassifier(self.num_features, init="trunc_normal")
        self.prototypes = ClassMeans(self.num_features)
        self.statistics = ClassGaussians(self.num_features, hp.ca_storage, ridge=1e-4, n_centroids=hp.n_centroids)
        self.retrieval = SelfRefinedRetrieval(hp.max_iter)
        self.known = 0  # classes of earlier sessions: masked in this session's cross-entropy
        self._merge_toward: Optional[int] = None  # official mode: merge toward mean(A_0..A_{k-1}) before each block
        self._ca_seed = 0
        for block in vit_blocks(backbone):
            block.register_forward_pre_hook(self._merge_before_block)

    def rebuildable_prefixes(self) -> tuple[str, ...]:
        return ("backbone.",)  # the pre-trained ViT never changes (adapters live in ``adapters``)

    # ---- §1.4 merging ------------------------------------------------------------------------------------
    @property
    def task(self) -> int:
        """The session being learnt: the number of frozen snapshots before ``end_session``."""
        return len(self.adapters)

    def _merge_before_block(self, module, inputs) -> None:
        if self._merge_toward is not None:
            self.adapters.merge_toward_mean(self.hparams.adapter_momentum, snapshots=self._merge_toward)

    @contextmanager
    def current_adapter(self, session: int) -> Iterator[None]:
        """Forwards through the current adapter set, as the code's ``adapter_id=session, train=True`` path: in
        official mode every block first merges all D adapters toward the mean of snapshots 0..session-1."""
        official = self.hparams.merge_mode == "official" and self.hparams.adapter_momentum > 0 and session > 0
        self._merge_toward = session if official else None
        try:
            with self.adapters.use("current"):
                yield
        finally:
            self._merge_toward = None

    def test_adapter(self, j: int):
        """The adapter set evaluation uses for session j (a context). The code merges the stored
        ``adapter_list[j]`` in place toward mean(A_0..A_{j-1}), D times in every test forward, so within the first
        test batches it *is* that mean (to (1 - m)^(D x forwards)); ``merged`` evaluates with the mean itself, the
        same for every test order and without writing any snapshot. ``stored``: A_j as trained."""
        if j > 0 and self.hparams.eval_adapters == "merged" and self.hparams.adapter_momentum > 0:
            return self.adapters.use_mean(j)
        return self.adapters.use(j)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.adapters.merge_toward_mean(self.hparams.adapter_momentum)  # after every step, in both modes

    # ---- session hooks -------------------------------------------------------------------------------------
    def begin_session(self, session: Session) -> None:
        if session.index != self.task:
            raise RuntimeError(f"mos learns sessions in order: session {session.index} after {self.task} adapters")
        self.session_index = session.index
        self.known = session.num_seen - len(session.new_classes)
        self.classifier.grow(session.num_seen)
        self.prototypes.grow(session.num_seen)
        self.retrieval.add_task(session.num_seen, session.index)
        # the current adapter is *not* re-initialised: it carries over from the previous session (§1.3 step 1).
        # Sampling seeds come from the generator the session loop seeded for this session (same on every process)
        self._ca_seed = int(torch.randint(2**62, (1,)))
        self.statistics.seed = self._ca_seed % 2**32

    def epochs_for(self, session: Session) -> int:
        return int(self.hparams.epochs)

    def end_session(self, session: Session) -> None:
        self.to(session.device)
        self.adapters.snapshot()  # A_t (§1.3 step 4)
        self.store_statistics(session)
        if session.index > 0 and self.hparams.ca_epochs > 0:
            self.align_classifier(session.num_seen)

    @torch.no_grad()
    def store_statistics(self, session: Session) -> None:
        """Class Gaussians from the current adapter (§1.3 step 5) and prototypes from adapter 0 (step 7)."""
        self.eval()
        prototypes = ClassMeans(self.num_features).to(session.device)
        prototypes.grow(session.num_seen)
        desc = f"class statistics s{session.index}"
        for batch in progress(session.train_loader(), desc=desc):
            x, y = batch[0].to(session.device), batch[1].to(session.device)
            with self.current_adapter(session.index):
                self.statistics.update(self.features(x), y)
            with self.adapters.use(0):
                prototypes.update(self.features(x), y)
        self.statistics.all_reduce().finalize()
        self.prototypes.adopt(prototypes.all_reduce(), session.new_classes)

    def align_classifier(self, num_seen: int) -> None:
        """§1.6: re-train the head on features sampled from every seen class's Gaussian."""
        hp, head = self.hparams, self.classifier
        optimizer = torch.optim.SGD(head.parameters(), lr=hp.ca_lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.ca_epochs)
        generator = torch.Generator().manual_seed(self._ca_seed)
        n = hp.ca_samples_per_class
        head.train()
        with torch.enable_grad():
            for _ in progress(range(hp.ca_epochs), desc="classifier alignment"):
                x, y = self.statistics.sample(n, generator)  # fresh samples every epoch
                order = torch.randperm(len(y), generator=generator).to(y.device)
                x, y = x[order], y[order]
                for i in range(num_seen):  # the code: one mini-batch of n samples per seen class
                    loss = F.cross_entropy(head(x[i * n : (i + 1) * n]), y[i * n : (i + 1) * n])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                scheduler.step()
        head.zero_grad(set_to_none=True)

    # ---- §1.5 the orthogonality loss -----------------------------------------------------------------------
    def orthogonality_loss(self, features: torch.Tensor) -> torch.Tensor:
        """``CE(M Mᵀ / temperature, arange)`` with M the stored class means (every centroid) over the batch's
        features; no normalisation, as in the code."""
        means = self.statistics.means[self.statistics.counts > 0].flatten(0, 1)
        if self.statistics.storage == "multi-centroid":
            means = means[means.abs().sum(1) > 0]  # centroids a small class did not fill
        m = torch.cat([means.to(features), features])
        similarity = m @ m.T / self.hparams.orth_temperature
        return F.cross_entropy(similarity, torch.arange(len(m), device=m.device))

    # ---- Lightning ---------------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, cross-entropy, logits) of a training batch: masked CE + reg * orthogonality (§1.3 step 3)."""
        with self.current_adapter(self.task):
            features = self.features(x)
        logits = self.classifier(features)
        old = torch.arange(logits.shape[1], device=logits.device) < self.known
        logits = logits.masked_fill(old, float("-inf"))  # no replay: old classes take no part
        ce = F.cross_entropy(logits, y)
        return ce + self.hparams.reg * self.orthogonality_loss(features), ce, logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss, ce, logits = self.loss(x, y)
        if self.logs_this_step():
            self.log("train/ce", ce, prog_bar=True)
            self.log("train/loss", loss)
            self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def first_guess(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter-0 features, cosine logits to the adapter-0 prototypes) (§1.7 step 1)."""
        with self.adapters.use(0):
            features = self.features(x)
        return features, self.prototypes.cosine(features).to(features.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """§1.7: first guess, self-refined retrieval, ensemble. Reads the stored adapters, never writes them."""
        sessions = len(self.adapters)
        if sessions == 0:
            raise RuntimeError("mos has no trained adapter yet: finish a session (end_session) before predicting")
        features0, z_orig = self.first_guess(x)

        def head_logits(j: int, rows: torch.Tensor) -> torch.Tensor:
            if j == 0:
                return self.classifier(features0[rows])
            with self.test_adapter(j):  # only the samples the retrieval sends to adapter j
                return self.classifier(self.features(x[rows]))

        z, _ = self.retrieval(z_orig, head_logits)
        if not self.hparams.ensemble:
            return z
        return ensemble(z, z_orig, sessions)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [
            {"params": list(self.adapters.current.parameters()), "lr": hp.lr},
            {"params": list(self.classifier.parameters()), "lr": hp.lr * hp.head_lr_scale},
        ]
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=hp.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def ensemble(z: torch.Tensor, z_orig: torch.Tensor, sessions: int) -> torch.Tensor:
    """``softmax(z) + softmax(T * z_orig)`` (§1.7 step 4; the code writes ``z_orig / (1 / T)``)."""
    return F.softmax(z, dim=1) + F.softmax(sessions * z_orig, dim=1)
