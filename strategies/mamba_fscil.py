"""Mamba-FSCIL (Li et al., 2024): a dual selective-SSM projector on a backbone's last feature map, a fixed ETF
classifier trained by dot regression, and class-sensitive losses on the new branch's selective-scan inputs.

Follows the official code (``xiaojieli0903/Mamba-FSCIL``, an mmcls fork); ``docs/methods/mamba_fscil.md`` sections are
cited below. Sessions:

- **Base session** (session 0): backbone + base branch of :class:`cil.layers.ssm.DualSelectiveProjector` train with the
  dot-regression loss toward the fixed :class:`cil.layers.etf.EtfClassifier` (SGD 0.9, warm-up + cosine-with-cooldown or
  step schedule, per iteration), optionally with image-level mixup / cutmix (CIFAR). At its end the backbone is
  frozen (kept in eval mode for good), the per-class mean feature map of every base class is stored, and the new
  branch is attached with its gate projection at zero (it adds exactly nothing until trained).
- **Incremental sessions**: the backbone is not run during training: the session trains on cached feature maps
  (evaluation transforms) — the session's shots, plus the mean map of every earlier novel class ``copies[i]``
  times and of every base class ``base_copies[i]`` times — for ``inc_steps[i]`` iterations of ``inc_batch_size``
  maps, with a new SGD per session, the base branch at ``base_branch_lr_scale`` x lr (0: frozen and detached),
  feature mixup at the fixed lambda 0.5 with probability ``feat_mixup_prob``, and the class-sensitive losses
  (§1): suppression of the new branch's gate on base samples, enhancement on novel ones, and separation of the
  base/novel means of its dt, B, C.

``faithful_quirks`` (default on) reproduces three things the code does that look unintended: the gate map flips the
reversed directions along the channel axis (see :class:`cil.layers.ssm.FourDirectionSSM`); with image-level mixing
the unmixed loss of the first labels is added again on mixup/cutmix batches (``λ L(y_a) + (1 - λ) L(y_b) + L(y_a)``;
the identity branch, which mmcls' ``IdentityTwoLabel`` gives no second label, is ``L(y)`` once); and the incremental
sessions' learning-rate schedule runs one step ahead (the code's loop advances its runner before the LR hook reads
it, so step i trains at the rate of step i + 1 and the warm-up starts at 0.28 x the rate, not 0.1 x).

Differences from the code: the "cycled" incremental loader is a shuffled multiset in which every cached map appears
equally often (``inc_steps[i] x inc_batch_size`` draws), and the base session runs ``base_epochs`` over the stream
(the code's ``RepeatDataset`` x epochs), and the incremental sessions start from the base session's last epoch, where
the code loads its ``best.pth`` (the base epoch with the best *test* accuracy: a choice on the test split that a
class-incremental protocol should not make). One device reproduces the code's 8 GPUs with ``loss_group_size: 8``
(the class-sensitive losses and the feature-mixup pairing per group of 8 maps, averaged; the dot-regression loss
is a per-sample mean, equal either way); feature mixup is decided once per step for all groups, as on the code's
GPUs (its scripts seed every rank alike: no ``--diff-seed``). ``backbone.bn_group_size: 64`` gives the base
session's BatchNorm the code's per-GPU statistics (8 GPUs x 64 images, plain BatchNorm); the base session's image
mixup / cutmix still pairs images across the whole batch, where each GPU pairs its own 64. Needs from the user: a
backbone with ``forward_features`` returning the last feature map (timm models, ``resnet12``), ``feat_size`` matching
it, and ``Session.loader_fn``.

The losses work without a process group; under DDP the presence checks take the minimum over processes (the
code's ``all_reduce(MIN)``) and the dot-regression class counts use the labels gathered from every process.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cil.config import ConfigError
from cil.distributed import all_reduce_min, gather_cat
from cil.layers.etf import EtfClassifier, dot_regression_loss
from cil.layers.prototypes import ClassMeans
from cil.layers.ssm import DualSelectiveProjector
from cil.module import CILModule, Session
from cil.progress import progress
from cil.strategies.configs import MambaFSCILConfig


def suppression_loss(gate: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``‖G[rows]‖_F / numel(G[rows])``: a plain (not squared) Frobenius norm over the element count."""
    selected = gate[rows]
    return torch.linalg.vector_norm(selected) / selected.numel()


def separation_loss(param: torch.Tensor, base: torch.Tensor, novel: torch.Tensor) -> torch.Tensor:
    """``mean |I - S|`` with S the 2x2 cosine matrix of the base and novel means of ``param`` over every axis
    but its feature axis (samples, directions, tokens): ``|cos(p_b, p_n)| / 2``."""
    dims = [d for d in range(param.dim()) if d != param.dim() - 2]  # (B, K, R|N, L): keep the feature axis
    means = torch.stack([param[base].mean(dims), param[novel].mean(dims)])
    unit = F.normalize(means, dim=-1)
    return torch.mean(torch.abs(torch.eye(2, device=param.device) - unit @ unit.T))


def class_sensitive_losses(
    gate: torch.Tensor,
    params_new: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_base_classes: int,
    w_supp: float,
    w_novel: float,
    w_sep_new: float,
    w_sep: float = 0.0,
    params_base: dict[str, torch.Tensor] | None = None,
    group_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The incremental-session losses of the code's ``calculate_class_sensitive_losses``, by name.

    Base samples are those with a label below ``num_base_classes`` (replayed means of earlier novel classes count as
    novel). Suppression of the new branch's gate on base samples, enhancement (negative) on novel ones, and
    separation of the base/novel means of dt, B, C, each only when every group's batch has such samples.

    The code computes them on each GPU's 8 maps and DDP averages the gradients; the norms and means are not linear
    in the batch, so ``group_size`` (e.g. 8) computes each loss on consecutive groups of that many samples and
    averages over groups, as 8 GPUs would; the presence checks take the minimum over groups and processes (the
    code's ``all_reduce(MIN)``). ``None``: one group, the whole batch.
    """
    size = group_size or len(labels)
    groups = [slice(start, start + size) for start in range(0, len(labels), size)]
    base, novel = labels < num_base_classes, labels >= num_base_classes
    has_base = all_reduce_min(min(int(base[g].sum()) for g in groups), labels.device) > 0
    has_novel = all_reduce_min(min(int(novel[g].sum()) for g in groups), labels.device) > 0

    def over_groups(loss, value: torch.Tensor) -> torch.Tensor:
        return torch.stack([loss(value[g], base[g], novel[g]) for g in groups]).mean()

    losses: dict[str, torch.Tensor] = {}
    if has_base and w_supp > 0:
        losses["supp_base"] = w_supp * over_groups(lambda v, b, n: suppression_loss(v, b), gate)
    if has_novel and w_novel > 0:
        losses["supp_novel"] = -w_novel * over_groups(lambda v, b, n: suppression_loss(v, n), gate)
    if has_base and has_novel:
        for prefix, weight, params in (("sep_new", w_sep_new, params_new), ("sep_base", w_sep, params_base)):
            if weight > 0 and params:
                for key, value in params.items():
                    losses[f"{prefix}_{key}"] = weight * over_groups(separation_loss, _with_directions(value))
    return losses


def grouped_permutation(n: int, group_size: int | None, device=None) -> torch.Tensor:
    """A random permutation of ``range(n)`` that stays within consecutive groups of ``group_size`` (each GPU of
    the code mixes features only with its own batch); ``None``: one group."""
    size = group_size or n
    return (
        torch.cat([start + torch.randperm(min(size, n - start), device=device) for start in range(0, n, size)])
        if n
        else torch.zeros(0, dtype=torch.long, device=device)
    )


def _with_directions(param: torch.Tensor) -> torch.Tensor:
    """(B, R, L) parameters of the h-direction call as (B, 1, R, L), the code's layout for 'ssm'."""
    return param.unsqueeze(1) if param.dim() == 3 else param


# ---- schedules and mixing (§1 "Base session", "Incremental sessions") -------------------------------------------
def cosine_cooldown(step: int, total: int, warmup: int, warmup_ratio: float, min_ratio: float, cooldown: int):
    """LR factor of the code's ``CosineAnnealingCooldown`` with mmcv's linear warm-up, per iteration: cosine from 1
    to ``min_ratio`` over ``total - cooldown`` iterations, then ``min_ratio * 0.1`` for the last ``cooldown``."""
    if step > total - cooldown:
        factor = min_ratio * 0.1
    else:
        progress = step / max(total - cooldown, 1)
        factor = min_ratio + (1 - min_ratio) * (math.cos(math.pi * progress) + 1) / 2
    if step < warmup:  # mmcv's linear warm-up scales the regular value
        factor *= 1 - (1 - step / warmup) * (1 - warmup_ratio)
    return factor


def step_decay(step: int, milestones: list[int], gamma: float, warmup: int, warmup_ratio: float) -> float:
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup:
        factor *= 1 - (1 - step / warmup) * (1 - warmup_ratio)
    return factor


def mix_images(x: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, probs: tuple[float, float, float]):
    """mmcls' batch mixup / cutmix / identity, chosen with ``probs``: (images, permutation, lambda); the permutation
    is None for the identity branch (mmcls' ``IdentityTwoLabel`` gives no second label)."""
    choice = int(torch.multinomial(torch.tensor(probs), 1))
    index = torch.randperm(len(x), device=x.device)
    if choice == 2:
        return x, None, 1.0
    alpha = mixup_alpha if choice == 0 else cutmix_alpha
    lam = float(np.random.beta(alpha, alpha))
    if choice == 0:
        return lam * x + (1 - lam) * x[index], index, lam
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = np.random.randint(h), np.random.randint(w)
    y0, y1 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    x0, x1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x[index][..., y0:y1, x0:x1]
    return mixed, index, 1 - (y1 - y0) * (x1 - x0) / (h * w)  # lambda from the pasted area, as cutmix does


# ---- the strategy ------------------------------------------------------------------------------------------------


def _per_session(values: list[int], i: int) -> int:
    return int(values[min(i, len(values) - 1)])


class MambaFSCIL(CILModule):
    def __init__(self, backbone: nn.Module, num_features: Optional[int] = None, **settings: Any):
        super().__init__(backbone, num_features)
        hp = self.save_settings(MambaFSCILConfig, settings)  # defaults and choices: MambaFSCILConfig
        if hp.loss_group_size is not None and hp.inc_batch_size % hp.loss_group_size:
            raise ConfigError(
                f"strategy.loss_group_size={hp.loss_group_size} must divide strategy.inc_batch_size="
                f"{hp.inc_batch_size} (the code: 8 maps per GPU x 8 GPUs = 64)"
            )
        if not hasattr(backbone, "forward_features"):
            raise ConfigError("mamba_fscil needs a backbone with forward_features (any timm model, resnet12)")
        self.projector = DualSelectiveProjector(
            self.num_features,
            hp.out_channels,
            (hp.feat_size, hp.feat_size),
            layers=hp.layers,
            layers_new=hp.layers_new,
            d_state=hp.d_state,
            dt_rank=hp.dt_rank,
            residual_proj=hp.residual_proj,
            detach_base=hp.base_branch_lr_scale == 0,
            faithful_quirks=hp.faithful_quirks,
            version=hp.version,
        )
        modules = dict(backbone.named_modules())
        missing = [name for name in hp.frozen_modules if name not in modules]
        if missing:
            raise ConfigError(f"strategy.frozen_modules {missing} are not modules of the backbone")
        for name in hp.frozen_modules:
            modules[name].requires_grad_(False)
        try:
            self.etf = EtfClassifier(hp.out_channels, hp.num_classes, hp.etf_seed)
        except ValueError as e:
            raise ConfigError(f"mamba_fscil: {e} (strategy.out_channels)") from None
        del self.classifier  # the ETF is the classifier
        self.map_means = ClassMeans(self.num_features * hp.feat_size**2)  # class mean feature maps (flattened)
        self.register_buffer("base_done", torch.tensor(False))

    # ---- the frozen-after-base backbone --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MambaFSCIL:
        super().train(mode)
        if bool(self.base_done):
            self.backbone.eval()
        modules = dict(self.backbone.named_modules())
        for name in self.hparams.frozen_modules:  # frozen stages keep their BatchNorm statistics (mmcls)
            modules[name].eval()
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x)

    @property
    def features_frozen(self) -> bool:
        return bool(self.base_done)  # after the base session: evaluation reuses each test image's feature map

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.etf(self.projector(features).features).float()

    # ---- session hooks -------------------------------------------------------------------------------------------
    def begin_session(self, session: Session) -> None:
        self.session_index = session.index
        self.etf.grow(session.num_seen)
        self.map_means.grow(session.num_seen)
        if session.index > 0:
            self._freeze_base()
            self._session_data = self.incremental_data(session)

    def _freeze_base(self) -> None:
        """After the base session: backbone frozen in eval mode, the new branch attached (zero gate)."""
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.base_done.fill_(True)
        if self.projector.new is None:
            self.projector.add_new_branch()
        if self.hparams.base_branch_lr_scale == 0:
            self.projector.base.requires_grad_(False)
            self.projector.residual.requires_grad_(False)

    def epochs_for(self, session: Session) -> int:
        return int(self.hparams.base_epochs) if session.index == 0 else 1

    def batch_size_for(self, session: Session) -> Optional[int]:
        return None if session.index == 0 else int(self.hparams.inc_batch_size)

    def train_data(self, session: Session) -> Dataset:
        return session.train_data if session.index == 0 else self._session_data

    @torch.no_grad()
    def end_session(self, session: Session) -> None:
        """Store the mean feature map of the session's classes (evaluation transforms, every process's share)."""
        self.to(session.device)
        self.backbone.eval()
        fresh = ClassMeans(self.map_means.sums.shape[1]).to(session.device)
        fresh.grow(session.num_seen)
        for x, y in self._session_maps(session):
            fresh.update(x.flatten(1), y)
        self.map_means.adopt(fresh.all_reduce(), session.new_classes)
        if session.index == 0:
            self._freeze_base()

    def _session_maps(self, session: Session):
        desc = f"feature maps s{session.index}"
        for batch in progress(session.train_loader(), desc=desc):
            x, y = batch[0].to(session.device), batch[1].to(session.device)
            yield self.feature_map(x), y

    @torch.no_grad()
    def incremental_data(self, session: Session) -> TensorDataset:
        """§1 "Incremental sessions": the session's maps, the mean maps of earlier novel classes x copies and of the
        base classes x base copies, as a multiset of ``steps x batch`` draws (every item equally often)."""
        self.to(session.device)
        self.backbone.eval()
        maps, labels = zip(*self._session_maps(session))
        maps, labels = gather_cat(torch.cat(maps)), gather_cat(torch.cat(labels))
        i, hp = session.index - 1, self.hparams
        shape = maps.shape[1:]
        means = self.map_means.means().to(maps.dtype).view(-1, *shape)
        base = torch.arange(hp.num_base_classes, device=maps.device)
        earlier = torch.arange(hp.num_base_classes, session.num_seen - len(session.new_classes), device=maps.device)
        parts = [
            (maps, labels),
            (means[earlier].repeat(_per_session(hp.copies, i), 1, 1, 1), earlier.repeat(_per_session(hp.copies, i))),
            (
                means[base].repeat(_per_session(hp.base_copies, i), 1, 1, 1),
                base.repeat(_per_session(hp.base_copies, i)),
            ),
        ]
        pool_x, pool_y = torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()
        draws = _per_session(hp.inc_steps, i) * hp.inc_batch_size
        repeats = math.ceil(draws / len(pool_y))
        order = torch.arange(len(pool_y)).repeat(repeats)[:draws]
        self.session_pool = (pool_x, pool_y)  # what the session trains on, before repetition (for inspection)
        # the loader draws pool indices (the pool stays on the device once, not steps x batch copies of maps)
        self._pool = pool_x.to(session.device)
        self._kept = self.frozen_base_output(self._pool)
        return TensorDataset(order, pool_y[order])

    @torch.no_grad()
    def frozen_base_output(self, maps: torch.Tensor, chunk: int = 256) -> Optional[torch.Tensor]:
        """The detached base branch + residual on every pooled map, once per session: with the base branch frozen
        and detached (CIFAR, miniImageNet) its output on a cached map is the same at every step, so each step
        scans the new branch only (about half the scans). None where the base branch trains or its dt/B/C are
        needed (``w_sep > 0``)."""
        if not (self.projector.detach_base and self.hparams.w_sep == 0):
            return None
        was_training = self.projector.training
        self.projector.eval()
        kept = torch.cat([self.projector.kept(maps[i : i + chunk]) for i in range(0, len(maps), chunk)])
        self.projector.train(was_training)
        return kept

    # ---- training ------------------------------------------------------------------------------------------------
    def dr(self, features: torch.Tensor, labels: torch.Tensor, with_length: bool) -> torch.Tensor:
        return dot_regression_loss(
            features, labels, self.etf, with_length, self.hparams.dr_weight, all_labels=gather_cat(labels)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if self.session_index == 0:
            loss = self.base_loss(x, y)
        else:  # x: indices into the session's pool of maps
            kept = None if self._kept is None else self._kept[x]
            loss = self.incremental_loss(self._pool[x], y, kept)
        if self.logs_this_step():
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def base_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        if not hp.image_mix:
            return self.dr(self.projector(self.feature_map(images)).features, labels, hp.base_with_length)
        mixed, index, lam = mix_images(images, 0.8, 1.0, (0.4, 0.4, 0.2))
        features = self.projector(self.feature_map(mixed)).features
        if index is None:  # the identity branch: one label, its loss once (no re-added term)
            return self.dr(features, labels, hp.base_with_length)
        loss = lam * self.dr(features, labels, hp.base_with_length)
        loss = loss + (1 - lam) * self.dr(features, labels[index], hp.base_with_length)
        if hp.faithful_quirks:  # the code adds the unmixed-label loss once more
            loss = loss + self.dr(features, labels, hp.base_with_length)
        return loss

    def incremental_loss(
        self, maps: torch.Tensor, labels: torch.Tensor, kept: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``kept``: the frozen base branch's output on ``maps``, when computed ahead (``frozen_base_output``)."""
        hp = self.hparams
        out = self.projector(maps, kept=kept)
        losses = class_sensitive_losses(
            out.gate,
            out.params,
            labels,
            hp.num_base_classes,
            hp.w_supp,
            hp.w_novel,
            hp.w_sep_new,
            hp.w_sep,
            out.base_params,
            hp.loss_group_size,
        )
        if self.logs_this_step():
            for name, value in losses.items():
                self.log(f"train/{name}", value)
        if hp.feat_mixup_prob > 0 and float(torch.rand(())) < hp.feat_mixup_prob:
            index = grouped_permutation(len(labels), hp.loss_group_size, labels.device)
            lam = hp.feat_mixup
            mixed = lam * out.features + (1 - lam) * out.features[index]
            dr = lam * self.dr(mixed, labels, hp.inc_with_length)
            dr = dr + (1 - lam) * self.dr(mixed, labels[index], hp.inc_with_length)
        else:
            dr = self.dr(out.features, labels, hp.inc_with_length)
        return dr + sum(losses.values())

    def configure_optimizers(self):
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.session_index == 0:
            groups = [
                {
                    "params": [p for p in self.backbone.parameters() if p.requires_grad],
                    "lr": hp.base_lr * hp.backbone_lr_scale,
                },
                {
                    "params": [*self.projector.base.parameters(), *self.projector.residual.parameters()],
                    "lr": hp.base_lr,
                },
            ]
            if hp.base_schedule == "cosine":

                def factor(step):
                    return cosine_cooldown(
                        step, total, hp.base_warmup, hp.base_warmup_ratio, hp.base_min_ratio, hp.base_cooldown
                    )
            else:
                per_epoch = max(1, total // max(1, hp.base_epochs))
                milestones = [m * per_epoch for m in hp.base_milestones]

                def factor(step):
                    return step_decay(step, milestones, hp.base_gamma, hp.base_warmup, hp.base_warmup_ratio)
        else:
            groups = [{"params": list(self.projector.new.parameters()), "lr": hp.inc_lr}]
            if hp.base_branch_lr_scale > 0:
                base = [*self.projector.base.parameters(), *self.projector.residual.parameters()]
                groups.append({"params": base, "lr": hp.inc_lr * hp.base_branch_lr_scale})

            # the code's incremental schedule: warm-up 5, cosine to 0.01, cool-down 5; its loop advances the runner's
            # iteration before the LR hook reads it (mmfscil/apis/fscil.py, `runner.step()` then
            # `lr_scheduler.before_train_iter`), so step i trains at the rate of step i + 1 (a faithful quirk)
            ahead = 1 if hp.faithful_quirks else 0

            def factor(step):
                return cosine_cooldown(step + ahead, total, 5, 0.1, 0.01, 5)

        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=hp.momentum, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["MambaFSCIL", "MambaFSCILConfig", "class_sensitive_losses", "separation_loss", "suppression_loss"]
