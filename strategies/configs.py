"""The hyper-parameters of every built-in strategy: one dataclass each, with validation metadata and help.

They live here, apart from the strategies' torch code, so that checking a config (``cil run`` refusing a bad key
or value) and ``cil list`` answer at once, without importing torch, timm or Lightning. Each strategy file imports
its own; ``cil.registry.BUILTIN_STRATEGIES`` pairs each with its strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from cil.config import STORAGES, StrategyConfig, TrainingConfig, param

ADAPTATIONS = ("full", "film", "none")
MERGE_MODES = ("official", "per_step")
EVAL_ADAPTERS = ("merged", "stored")
SPLITTINGS = ("random_projection", "chunk", "learned_projection")


@dataclass
class SimpleCILConfig(StrategyConfig):
    name: str = "simplecil"
    metric: str = param("cosine", choices=["cosine", "euclidean"], help="cosine: SimpleCIL; euclidean: NCM")


@dataclass
class FSAConfig(StrategyConfig):
    name: str = "fsa"
    adaptation: str = param("full", choices=list(ADAPTATIONS), help="what session 1 trains: body, FiLM, nothing")
    epochs: int = param(200, ge=0, help="session-1 adaptation epochs (later sessions train none)")
    lr: float = param(5e-3, gt=0.0, help="Adam learning rate")
    milestones: list[int] = param([50, 100, 150], help="MultiStepLR epochs (few-shot+ in the paper: [25, 50, 100])")
    lr_gamma: float = param(0.7, gt=0.0, le=1.0, help="MultiStepLR factor (few-shot+ in the paper: 0.3)")
    dropout: float = param(0.5, ge=0.0, lt=1.0, help="dropout before the temporary head")
    weight_decay: float = param(0.0, ge=0.0, help="Adam weight decay (the official code passes none)")
    lda_mode: str = param("fsa", choices=["fsa", "sklearn", "slda"], help="covariance of the LDA head")
    shrinkage: Optional[float] = param(
        None, ge=0.0, le=1.0, help="identity weight in the LDA covariance; default per lda_mode (fsa 1.0)"
    )
    priors: Optional[str] = param(None, choices=["frequency", "uniform", "none"], help="LDA log-prior term")


@dataclass
class FinetuneConfig(TrainingConfig):
    name: str = "finetune"
    epochs: int = param(5, ge=0, help="epochs per session")


@dataclass
class JointConfig(TrainingConfig):
    name: str = "joint"
    epochs: int = param(5, ge=0, help="epochs per session, over all data seen so far")


@dataclass
class MOSConfig(StrategyConfig):
    name: str = "mos"
    epochs: int = param(20, ge=0, help="adapter-training epochs per session (tuned_epoch)")
    lr: float = param(0.03, gt=0.0, help="adapter learning rate (init_lr); the head uses head_lr_scale x lr")
    head_lr_scale: float = param(0.1, gt=0.0, help="head lr / adapter lr (0.1 in the code)")
    momentum: float = param(0.9, ge=0.0, lt=1.0, help="SGD momentum (adapter training and alignment)")
    weight_decay: float = param(5e-4, ge=0.0)
    min_lr: float = param(0.0, ge=0.0, help="eta_min of the cosine schedule")
    adapter_momentum: float = param(0.1, ge=0.0, le=1.0, help="m of the merge toward the earlier adapters' mean")
    merge_mode: str = param("official", choices=list(MERGE_MODES), help="official: D+1 merges per step; per_step: 1")
    eval_adapters: str = param(
        "merged",
        choices=list(EVAL_ADAPTERS),
        help="merged: adapter j >= 1 is evaluated as mean(A_0..A_j-1), where the code's in-place merges during "
        "testing converge; stored: A_j as trained",
    )
    bottleneck: int = param(16, ge=1, help="adapter width (ffn_num)")
    adapter_dropout: float = param(0.1, ge=0.0, lt=1.0)
    adapter_scale: float = param(0.1, gt=0.0, help="fixed adapter output scale")
    reg: float = param(0.1, ge=0.0, help="weight of the orthogonality loss")
    orth_temperature: float = param(0.8, gt=0.0, help="temperature of the orthogonality loss's similarities")
    ca_storage: str = param("covariance", choices=list(STORAGES), help="class statistics for classifier alignment")
    n_centroids: int = param(10, ge=1, help="k-means clusters per class (ca_storage=multi-centroid)")
    ca_epochs: int = param(30, ge=0, help="classifier-alignment epochs (crct_epochs)")
    ca_lr: float = param(0.005, gt=0.0)
    ca_samples_per_class: int = param(240, ge=1, help="features sampled per class and epoch (code: 5 x batch size)")
    max_iter: int = param(4, ge=1, help="head evaluations of the self-refined retrieval (MAX_ITER)")
    ensemble: bool = param(True, help="add softmax(T * adapter-0 cosine logits) to the refined softmax")


@dataclass
class MambaFSCILConfig(StrategyConfig):
    name: str = "mamba_fscil"
    num_classes: int = param(100, ge=2, help="ETF size: every class of the data set (100 CIFAR/mini, 200 CUB)")
    num_base_classes: int = param(60, ge=1, help="classes of the base session (60 CIFAR/mini, 100 CUB)")
    feat_size: int = param(2, ge=1, help="side of the backbone's last feature map (2 CIFAR, 5 mini, 7 CUB)")
    version: str = param("ssm", choices=["ssm", "ss2d"], help="ssm: 4 directions, one block (CIFAR/mini); ss2d: CUB")
    out_channels: int = param(640, ge=1, help="projector output width")
    residual_proj: bool = param(False, help="bias-free linear map of the pooled map when widths differ")
    d_state: int = param(256, ge=1)
    dt_rank: Optional[int] = param(None, ge=1, help="rank of dt (default: d_state, as the code)")
    layers: int = param(2, ge=2, le=3, help="MLP layers of the base branch")
    layers_new: int = param(2, ge=2, le=3, help="MLP layers of the new branch")
    faithful_quirks: bool = param(
        True, help="reproduce the code's gate flip, re-added unmixed loss and one-step-ahead incremental schedule"
    )
    dr_weight: float = param(10.0, gt=0.0)
    momentum: float = param(0.9, ge=0.0, lt=1.0)
    weight_decay: float = param(5e-4, ge=0.0)
    etf_seed: int = param(0, ge=0)
    # base session
    base_epochs: int = param(200, ge=0, help="base-session epochs over the stream (code: epochs x RepeatDataset)")
    base_lr: float = param(0.25, gt=0.0)
    backbone_lr_scale: float = param(1.0, ge=0.0, help="backbone lr / base lr in the base session (CUB 0.1)")
    frozen_modules: list[str] = param(
        [], help="backbone submodules kept frozen and in eval mode in the base session (CUB: mmcls frozen_stages=1)"
    )
    base_schedule: str = param("cosine", choices=["cosine", "step"])
    base_warmup: int = param(100, ge=0, help="warm-up iterations")
    base_warmup_ratio: float = param(0.1, gt=0.0, le=1.0)
    base_min_ratio: float = param(0.01, ge=0.0, le=1.0, help="cosine: final lr / lr")
    base_cooldown: int = param(10, ge=0, help="cosine: iterations at min_ratio x 0.1 at the end")
    base_milestones: list[int] = param([], help="step schedule: epochs where lr is multiplied by base_gamma")
    base_gamma: float = param(0.25, gt=0.0, le=1.0)
    base_with_length: bool = param(False, help="dot regression with length targets in the base session")
    image_mix: bool = param(False, help="base session: mixup (0.8, p .4) / cutmix (1.0, p .4) / none (p .2)")
    # incremental sessions
    inc_lr: float = param(0.25, gt=0.0)
    inc_steps: list[int] = param([200], help="iterations per incremental session (last value repeats)")
    inc_batch_size: int = param(64, ge=1, help="maps per step (code: 8 per GPU x 8 GPUs)")
    copies: list[int] = param([1], help="copies of each earlier novel class's mean map (last value repeats)")
    base_copies: list[int] = param([1], help="copies of each base class's mean map (last value repeats)")
    base_branch_lr_scale: float = param(0.0, ge=0.0, help="base branch lr / inc lr (0: frozen and detached)")
    inc_with_length: bool = param(True)
    feat_mixup_prob: float = param(0.75, ge=0.0, le=1.0)
    feat_mixup: float = param(0.5, gt=0.0, lt=1.0, help="the fixed mixing weight")
    w_supp: float = param(100.0, ge=0.0)
    w_novel: float = param(1e-5, ge=0.0)
    w_sep_new: float = param(1e-3, ge=0.0)
    w_sep: float = param(0.0, ge=0.0)
    loss_group_size: Optional[int] = param(
        None,
        ge=1,
        help="incremental sessions: compute the class-sensitive losses and feature mixup on groups of this many "
        "maps and average, as the code's GPUs do on 8 maps each (paper configs: 8); null: the whole batch",
    )


@dataclass
class ZSCLConfig(StrategyConfig):
    name: str = "zscl"
    iterations: Optional[int] = param(1000, ge=1, help="optimiser steps per task (runs iterations+1); null: epochs")
    epochs: int = param(1, ge=0, help="epochs per task when iterations is null (CIL: 1)")
    lr: float = param(1e-5, gt=0.0, help="AdamW base learning rate")
    lr_per_session: Optional[list[float]] = param(None, help="a learning rate per session (MTIL: 5e-5 for some)")
    weight_decay: float = param(0.0, ge=0.0, help="AdamW weight decay")
    warmup: int = param(100, ge=0, help="linear warm-up steps before the cosine decay")
    label_smoothing: float = param(0.2, ge=0.0, lt=1.0)
    temperature: float = param(2.0, gt=0.0, help="T of both distillation terms")
    image_loss_weight: float = param(1.0, ge=0.0, help="λ_img (MTIL 1, CIL 5)")
    text_loss_weight: float = param(1.0, ge=0.0, help="λ_txt (MTIL 1, CIL 5)")
    wc_weight: float = param(1.0, ge=0.0, help="weight of Σ‖θ - θ_start‖² (MTIL 1, CIL 0)")
    we_interval: int = param(100, ge=0, help="weight-ensemble interval I in steps (MTIL 100, CIL 10); 0: off")
    distill_text_features: str = param(
        "teacher", choices=["teacher", "student"], help="caption embeddings of the student logits (code: teacher)"
    )
    student_caption_batch: Optional[int] = param(
        256,
        ge=1,
        help="distill_text_features=student: captions per step, a seeded sample re-encoded by the student with "
        "gradients (all ~15.8k every step would not fit in any GPU); null: all, refused above 4,096 captions",
    )
    reference_images: Optional[str] = param(None, help="image folder (recursive) or 'digits'; labels never read")
    reference_captions: Optional[str] = param(None, help="captions: one per line, or the Conceptual Captions TSV")
    reference_batch_size: Optional[int] = param(None, ge=1, help="per process; default: the task batch size")
    reference_num_workers: int = param(0, ge=0, help="loader workers for reference images")
    templates: Optional[list[str]] = param(
        None, help="prompt templates ('a bad photo of a {}.'), first for training; default: the stream's"
    )
    task_incremental: bool = param(False, help="predict among the test sample's own task's classes (MTIL)")


@dataclass
class DKVBConfig(StrategyConfig):
    name: str = "dkvb"
    epochs: int = param(2000, ge=0, help="epochs per task (paper: 2000 on CIFAR-10, 500 on CIFAR-100)")
    num_codebooks: int = param(256, ge=1, help="C")
    keys_per_codebook: int = param(4096, ge=1, help="P")
    key_dim: int = param(14, ge=1, help="k")
    num_classes: Optional[int] = param(None, ge=1, help="value size; default: the stream's class count")
    splitting: str = param("random_projection", choices=list(SPLITTINGS))
    init_epochs: int = param(10, ge=0, help="epochs of EMA k-means over the unlabelled data")
    init_batch_size: int = param(256, ge=1)
    decay: float = param(0.95, gt=0.0, lt=1.0, help="EMA decay of the key initialisation")
    eps: float = param(1e-5, gt=0.0, help="Laplace smoothing of the key initialisation")
    dead_key_factor: float = param(0.1, ge=0.0, help="keys with EMA size < factor·batch/P are re-seeded; 0: never")
    lr: float = param(0.3, gt=0.0)
    optimizer: str = param("sgd", choices=["sgd", "adam", "adamw"])
    momentum: float = param(0.0, ge=0.0, lt=1.0)
    weight_decay: float = param(0.0, ge=0.0)
    allow_nonlocal_updates: bool = param(False, help="accept momentum, weight decay or Adam (they break locality)")
    clip_grad_norm: Optional[float] = param(1.0, gt=0.0, help="global gradient-norm clip")
    label_smoothing: float = param(0.1, ge=0.0, lt=1.0)
    feature_cache: Optional[str] = param(
        "~/.cache/cil/features", folder=True, help="folder of cached encoder features; null: off"
    )
    feature_batch_size: int = param(256, ge=1, help="images per encoder call when features are extracted")
    feature_num_workers: int = param(0, ge=0, help="loader workers when features are extracted")


@dataclass
class AvalancheConfig(TrainingConfig):
    name: str = "avalanche"
    avalanche: str = param(
        "Naive", help="a strategy class exported by avalanche.training (Naive, Replay, LwF, EWC, ICaRL, GDumb, ...)"
    )
    kwargs: dict[str, Any] = param(
        {}, help="its keyword arguments (mem_size, alpha, ...), checked against its signature before data loads"
    )
    epochs: int = param(5, ge=0, help="epochs per session (train_epochs)")
