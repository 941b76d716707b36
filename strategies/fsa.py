"""FSA: First Session Adaptation (Panos, Kobe, Olmeda Reino, Aljundi, Turner; ICCV 2023).

The algorithm, as in the official code (github.com/aresPanos/fsa):

1. Session 1: adapt the pre-trained body on the first session's data — all of it (``adaptation=full``), only
   per-channel FiLM scales and shifts (``adaptation=film``; the backbone stays in eval mode), or not at all
   (``none``) — through a temporary linear head on dropout(0.5) features, cross-entropy, Adam (lr 5e-3; the
   code's weight-decay flag never reaches Adam, so 0) and MultiStepLR ([50, 100, 150], gamma 0.7 high-shot and
   FSCIL; [25, 50, 100], gamma 0.3 few-shot+), 200 epochs.
2. Discard the temporary head; freeze the body for good and keep it in eval mode for every later feature pass.
3. Every session, the first included: one pass over the session's training data adds its frozen features to a
   :class:`~cil.layers.lda.StreamingLDA` head. No replay: the head keeps counts, class means and one scatter matrix,
   and equals the LDA fitted on all data seen so far. ``lda_mode=fsa`` (default) is the code's head: total
   covariance of the seen features + 1.0 * I, no prior.

Needs from the user: ``Session.loader_fn`` (evaluation transforms, no shuffle) for step 3, and ``fit`` for
session 1 only (``epochs_for`` is 0 afterwards). Under DDP each process feeds its shard to a fresh head, and the
heads are merged across processes (``StreamingLDA.all_reduce``) before joining the model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cil.config import ConfigError
from cil.layers.film import FiLMAdapters
from cil.layers.growing import GrowingClassifier
from cil.layers.lda import StreamingLDA
from cil.module import CILModule, Session
from cil.progress import progress
from cil.strategies.configs import FSAConfig


class FSA(CILModule):
    def __init__(self, backbone: nn.Module, num_features: int | None = None, **settings: Any):
        super().__init__(backbone, num_features)
        hp = self.save_settings(FSAConfig, settings)  # defaults and choices: FSAConfig
        # FiLM lives outside the backbone (hooks), so the backbone's weights and state-dict keys stay as timm's
        self.film = None
        if hp.adaptation == "film":
            try:
                self.film = FiLMAdapters(backbone)
            except ValueError as e:  # an unsupported backbone family: refused before any training
                raise ConfigError(f"adaptation='film': {e}") from None
        if hp.adaptation != "full":
            self.backbone.requires_grad_(False)
        self.dropout = nn.Dropout(hp.dropout)
        try:
            self.lda = StreamingLDA(self.num_features, mode=hp.lda_mode, shrinkage=hp.shrinkage, priors=hp.priors)
        except ValueError as e:  # e.g. priors='none' with lda_mode='sklearn': refused before any training
            raise ConfigError(f"LDA head: {e}") from None
        self.register_buffer("adapted", torch.tensor(False))  # set once session 1 is over: the body is frozen
        self.train()

    def rebuildable_prefixes(self) -> tuple[str, ...]:
        # FiLM and none leave the pre-trained body as built (frozen, eval mode); full adaptation changes it
        return () if self.hparams.adaptation == "full" else ("backbone.",)

    # ---- the body: adapted once, then frozen in eval mode ----------------------------------------------
    @property
    def body_frozen(self) -> bool:
        return bool(self.adapted) or self.hparams.adaptation != "full"

    def train(self, mode: bool = True) -> FSA:
        super().train(mode)
        if self.body_frozen:  # FiLM mode trains gamma/beta on a backbone in eval mode (frozen BN statistics)
            self.backbone.eval()
        return self

    def freeze_body(self) -> None:
        """Step 2: drop the temporary head, freeze body and FiLM for every later session."""
        self.backbone.requires_grad_(False)
        if self.film is not None:
            self.film.requires_grad_(False)
        self.classifier = GrowingClassifier(self.num_features)  # discarded; never used for evaluation
        self.adapted.fill_(True)
        self.backbone.eval()

    # ---- session hooks -----------------------------------------------------------------------------------
    def epochs_for(self, session: Session) -> int:
        if self.adapted or self.hparams.adaptation == "none":
            return 0
        return int(self.hparams.epochs)

    def begin_session(self, session: Session) -> None:
        self.session_index = session.index
        if self.adapted:  # also after loading a checkpoint into a fresh strategy
            self.freeze_body()
        if self.epochs_for(session) > 0:
            self.classifier.grow(session.num_seen)  # step 1's temporary head over the first session's classes

    @torch.no_grad()
    def end_session(self, session: Session) -> None:
        if not self.adapted:
            self.freeze_body()
        self.to(session.device).eval()
        head = StreamingLDA(self.num_features, self.lda.mode, self.lda.shrinkage, self.lda.priors).to(session.device)
        for batch in progress(session.train_loader(), desc=f"LDA statistics s{session.index}"):
            head.update(self.features(batch[0].to(session.device)), batch[1])
        self.lda.merge(head.all_reduce())  # step 3: exact, no replay

    @property
    def features_frozen(self) -> bool:
        return bool(self.adapted)  # step 2 done: every later pass reuses each test image's features

    def feature_prefixes(self) -> tuple[str, ...]:
        return ("backbone.", "film.")

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.lda.logits(features).float()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self.classifier(self.dropout(self.features(x)))  # step 1: the temporary head
        loss = F.cross_entropy(logits, y)
        if self.logs_this_step():
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
