"""DKVB: the discrete key-value bottleneck (Träuble et al., ICML 2023), from the official code.

``docs/methods/dkvb.md`` section numbers are cited below (official: ftraeuble/discrete_key_value_bottleneck and
ftraeuble/experiments_discrete_key_value_bottleneck). A frozen pre-trained encoder feeds a bottleneck of C codebooks:

1. **split** (§1): fixed random projections ``x_c = zᵀ P_c`` (P ∈ R^{C×d×k}, each column unit-norm), or contiguous
   chunks of z, or a bias-free linear layer (PyTorch's init, frozen with the keys as the code freezes its splitter);
2. **snap**: in each codebook the nearest of P frozen keys (squared Euclidean, top-1);
3. **fetch**: that key's learned value, a vector of one entry per class;
4. **decode**: no parameters — the mean of the C fetched values is the logits.

Before training, the keys are fitted once (§2) by EMA k-means (decay 0.95, Laplace smoothing, dead keys re-seeded
from the batch) over an **unlabelled** data set for ``init_epochs`` epochs — another data set as in the paper
(``stream.unlabelled``) or the training stream with its labels dropped — then frozen for good; the values start at
zero. Training (§3) updates the values only, with plain SGD (lr 0.3, no momentum, no weight decay), gradient-norm
clipping 1.0 and label-smoothed CE: each example's gradient reaches exactly the C values it fetched, so every
other value stays bit-identical — the locality the method's forgetting resistance rests on. Momentum, weight decay
or Adam would move values no example selected; they are refused unless ``allow_nonlocal_updates``.
A counter of how often each key was selected in training masks the never-selected keys at evaluation.

Task-free: ``begin_session``/``end_session`` change no model state (the only thing ``begin_session`` may do is
size the values from the stream's class count, once, when ``num_classes`` is not given), and ``stream.online``
presents the whole stream as one sequence of mini-batches. The encoder is frozen, so its features are computed
once per data set and cached (:class:`cil.features.FeatureCache`), which makes the paper's many epochs per task cheap.

Differences from the code, all documented choices: the nearest-key search is chunked over codebooks so memory
stays bounded at the official sizes; the dead-key test runs on every key-init batch with the code's threshold
``0.1 · batch / P`` (the experiments' setting; the module's own default is off); evaluation masks never-selected
keys with an infinite distance where the code uses the smallest distance of the batch (the same choice of key).

Needs from the user: a frozen feature extractor as ``backbone`` (any timm model or an open_clip CLIP), the
unlabelled data as ``Session.unlabelled_data`` for the key initialisation, and a plain-SGD trainer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cil.config import ConfigError
from cil.distributed import all_reduce_sum
from cil.features import FeatureCache
from cil.layers.growing import Growing
from cil.module import CILModule, Session
from cil.progress import progress
from cil.strategies.configs import SPLITTINGS, DKVBConfig


class KeyValueBottleneck(Growing):
    """C codebooks of P (key, value) pairs: ``logits = mean_c values[c, nearest key of x_c]``.

    ``keys`` (C×P×k), ``keys_avg`` and ``ema_size`` (the EMA k-means state), ``counter`` (selections in training)
    and the projection are buffers; ``values`` (C×P×classes) is the only parameter.
    """

    def __init__(
        self,
        in_features: int,
        num_codebooks: int = 256,
        keys_per_codebook: int = 4096,
        key_dim: int = 14,
        num_classes: int = 0,
        splitting: str = "random_projection",
        decay: float = 0.95,
        eps: float = 1e-5,
        chunk_elements: int = 2**24,
    ):
        super().__init__()
        C, P, k = num_codebooks, keys_per_codebook, key_dim
        if splitting not in SPLITTINGS:
            raise ConfigError(f"strategy.splitting={splitting!r} is not valid; choose one of {list(SPLITTINGS)}")
        self.num_codebooks, self.keys_per_codebook, self.key_dim = C, P, k
        self.splitting, self.decay, self.eps, self.chunk_elements = splitting, decay, eps, chunk_elements
        if splitting == "random_projection":  # the code's RandomDownProjection: unit-norm columns over the input
            self.register_buffer("projection", F.normalize(torch.randn(C, in_features, k), dim=1))
        elif splitting == "chunk":
            if in_features != C * k:
                raise ConfigError(
                    f"strategy.splitting=chunk needs num_codebooks x key_dim = feature size: {C} x {k} != {in_features}"
                )
        else:
            self.linear = nn.Linear(in_features, C * k, bias=False).requires_grad_(False)
        keys = torch.randn(C, P, k)  # the code's init_mode="random"
        self.register_buffer("keys", keys)
        self.register_buffer("keys_avg", keys.clone())
        self.register_buffer("ema_size", torch.zeros(C, P))
        self.register_buffer("counter", torch.zeros(C, P, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(False))
        self.values = nn.Parameter(torch.zeros(C, P, num_classes))

    @property
    def num_classes(self) -> int:
        return self.values.shape[-1]

    def allocate(self, num_classes: int) -> None:
        """Zero values for ``num_classes`` classes (the code's ``values_init=zeros`` after key init)."""
        self.values = nn.Parameter(torch.zeros(self.num_codebooks, self.keys_per_codebook, num_classes).to(self.keys))

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) features → (B, C, k) queries, one per codebook."""
        if self.splitting == "random_projection":
            return torch.einsum("bd,cdk->bck", z, self.projection)
        if self.splitting == "chunk":
            return z.reshape(len(z), self.num_codebooks, self.key_dim)
        return self.linear(z).reshape(len(z), self.num_codebooks, self.key_dim)

    @torch.no_grad()
    def nearest(self, x: torch.Tensor, mask_unused: bool = False) -> torch.Tensor:
        """(B, C) index of each query's nearest key by squared Euclidean distance, in chunks of codebooks so that at
        most ``chunk_elements`` distances exist at once. ``‖x‖²`` is the same for every key of a codebook, so the
        search ranks ``‖K‖² - 2 x·K`` (one batched matrix product per chunk). ``mask_unused`` skips keys never
        selected in training."""
        B, C, P = len(x), self.num_codebooks, self.keys_per_codebook
        step = max(1, self.chunk_elements // max(B * P, 1))
        queries = x.transpose(0, 1)  # (C, B, k)
        out = torch.empty(B, C, dtype=torch.long, device=x.device)
        for c0 in range(0, C, step):
            K = self.keys[c0 : c0 + step]
            dist = torch.baddbmm(K.pow(2).sum(-1)[:, None, :], queries[c0 : c0 + step], K.transpose(1, 2), alpha=-2)
            if mask_unused:
                dist.masked_fill_(self.counter[c0 : c0 + step][:, None, :] == 0, float("inf"))
            out[:, c0 : c0 + step] = dist.argmin(-1).T
        return out

    def fetch(self, index: torch.Tensor) -> torch.Tensor:
        """(B, C, classes): the value of each codebook's selected key (gradients reach those rows only)."""
        return self.values[torch.arange(self.num_codebooks, device=index.device)[None, :], index]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits: the mean over codebooks of the fetched values. Training counts the selections; evaluation
        snaps only to keys that training selected."""
        with torch.no_grad():
            index = self.nearest(self.split(z), mask_unused=not self.training)
            if self.training:  # per codebook, selections of each key; summed over processes under DDP
                counts = torch.zeros_like(self.counter).scatter_add_(1, index.T, torch.ones_like(index.T))
                self.counter += all_reduce_sum(counts)
        return self.fetch(index).mean(1)

    # ---- key initialisation (§2) --------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_step(self, z: torch.Tensor, dead_threshold: float) -> None:
        """One EMA k-means step on a batch of features (no labels), then dead-key re-seeding (the code's forward
        with ``update_keys`` on)."""
        x = self.split(z).transpose(0, 1)  # (C, B, k)
        index = self.nearest(x.transpose(0, 1))  # (B, C), unmasked
        C, P = self.num_codebooks, self.keys_per_codebook
        counts = torch.zeros(C, P, device=z.device).scatter_add_(1, index.T, torch.ones_like(index.T, dtype=z.dtype))
        sums = torch.zeros_like(self.keys).scatter_add_(1, index.T[..., None].expand_as(x), x)
        self.ema_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.keys_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_size.sum(-1, keepdim=True)
        smoothed = (self.ema_size + self.eps) / (n + P * self.eps) * n  # Laplace smoothing, rescaled to n
        self.keys.copy_(self.keys_avg / smoothed[..., None])
        dead = self.ema_size < dead_threshold
        if dead.any():  # re-seed from random queries of this batch (the code's expire_codes_)
            pick = torch.randint(0, x.shape[1], (C, P), device=z.device)
            samples = torch.gather(x, 1, pick[..., None].expand(C, P, self.key_dim))
            self.keys.copy_(torch.where(dead[..., None], samples, self.keys))

    @torch.no_grad()
    def finish_init(self) -> None:
        """Freeze the keys for good, reset the selection counter, zero the values (§2 steps 4-5)."""
        self.initialised.fill_(True)
        self.counter.zero_()
        self.values.zero_()


class DKVB(CILModule):
    def __init__(self, backbone: nn.Module, num_features: int | None = None, **settings: Any):
        super().__init__(backbone, num_features)
        hp = self.save_settings(DKVBConfig, settings)  # defaults and choices: DKVBConfig
        nonlocal_settings = [
            s
            for s, bad in (
                (f"strategy.optimizer={hp.optimizer}", hp.optimizer != "sgd"),
                (f"strategy.momentum={hp.momentum}", hp.momentum != 0),
                (f"strategy.weight_decay={hp.weight_decay}", hp.weight_decay != 0),
            )
            if bad
        ]
        if nonlocal_settings and not hp.allow_nonlocal_updates:
            raise ConfigError(
                f"{', '.join(nonlocal_settings)} would change values no example selected and break DKVB's local "
                "updates; use plain SGD (optimizer=sgd, momentum=0, weight_decay=0) or set "
                "strategy.allow_nonlocal_updates=true"
            )
        self.backbone.requires_grad_(False).eval()
        del self.classifier  # the decoder has no parameters: the bottleneck's mean value is the logits
        self.bottleneck = KeyValueBottleneck(
            self.num_features,
            hp.num_codebooks,
            hp.keys_per_codebook,
            hp.key_dim,
            hp.num_classes or 0,
            hp.splitting,
            hp.decay,
            hp.eps,
        )
        self.cache = FeatureCache(hp.feature_cache, hp.feature_batch_size, hp.feature_num_workers)
        self._unlabelled: Dataset | None = None
        self._device = torch.device("cpu")

    def rebuildable_prefixes(self) -> tuple[str, ...]:
        return ("backbone.",)  # the frozen encoder: checkpoints leave it out (the config rebuilds it)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen encoder
        return self

    # ---- session hooks: no model state changes -----------------------------------------------------------
    def begin_session(self, session: Session) -> None:
        self.session_index = session.index
        self._unlabelled = session.unlabelled_data
        self._device = session.device
        if self.bottleneck.num_classes == 0:  # sized once from the stream (num_classes not given)
            self.bottleneck.allocate(len(session.class_names) or sum(map(len, session.session_classes)))

    def end_session(self, session: Session) -> None:
        """Nothing: DKVB uses no task boundary."""

    # ---- data: cached features of the frozen encoder -----------------------------------------------------
    def encode(self, data: Dataset, desc: str, labelled: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        self.backbone.to(self._device)
        return self.cache.features(self.backbone, data, self._device, labelled, desc)

    def train_data(self, session: Session) -> Dataset:
        features, labels = self.encode(session.train_data, f"features s{session.index}")
        return TensorDataset(features, labels)

    def init_keys(self, unlabelled: Dataset) -> None:
        """EMA k-means over the unlabelled data's features (labels are never read), then the keys are frozen."""
        hp, kvb = self.hparams, self.bottleneck
        features, _ = self.encode(unlabelled, "features (key init)", labelled=False)
        features = features.to(self.device)
        threshold = hp.dead_key_factor * hp.init_batch_size / hp.keys_per_codebook
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        for _ in progress(range(hp.init_epochs), desc="key init", leave=False):
            order = torch.randperm(len(features), generator=generator).to(features.device)
            for i in range(0, len(order), hp.init_batch_size):
                kvb.ema_step(features[order[i : i + hp.init_batch_size]], threshold)
        kvb.finish_init()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not bool(self.bottleneck.initialised):
            if self._unlabelled is None:
                raise ConfigError(
                    "dkvb initialises its keys on unlabelled data: set stream.unlabelled (another registered stream, "
                    "or 'self' for this stream's training images) or pass Session(unlabelled_data=...)"
                )
            self.init_keys(self._unlabelled)

    # ---- training: values only ------------------------------------------------------------------------------
    @property
    def features_frozen(self) -> bool:
        return True  # the frozen encoder: evaluation reuses each test image's features

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(features)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features, y = batch[0], batch[1]
        logits = self.bottleneck(features)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if self.logs_this_step():  # DKVB's step on cached features is cheap: the logging was a real part of it
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val or self.hparams.clip_grad_norm
        if clip:
            torch.nn.utils.clip_grad_norm_([self.bottleneck.values], clip)

    def configure_optimizers(self):
        hp, params = self.hparams, [self.bottleneck.values]
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=hp.lr, weight_decay=hp.weight_decay)


__all__ = ["DKVB", "DKVBConfig", "FeatureCache", "KeyValueBottleneck"]
