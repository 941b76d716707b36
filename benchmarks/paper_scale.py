"""What every shipped paper config costs in checkpoints, disk writes and bookkeeping memory: its footprint at the
protocol's scale, and a short rehearsal of it at the real architecture and input size.

**Footprint** (every paper config, no training): the strategy is built from the config (random weights, the real
architecture) and grown to the protocol's classes and sessions (heads, class statistics, DKVB's values, MOS's
adapter snapshots); then

- ``session ckpt``: the bytes of a session checkpoint as the session loop writes it now (``torch.save`` of
  ``checkpoint_state()``: without the frozen tensors the config rebuilds), next to the whole state (before);
- ``resume point``: that plus the optimiser's state (SGD with momentum: 1 x the trained parameters, Adam/AdamW: 2 x,
  ZSCL's weight ensemble: 1 x more), written at most every ``run.checkpoint_every`` = 30 minutes;
- ``writes / session``: one session checkpoint plus at most 2 resume points per hour of training, whatever the
  number of epochs; ``before``: the former ``last.ckpt`` of the whole state at every epoch end, over the protocol;
- ``bookkeeping``: the strategy's buffers (statistics, prototypes, LDA, values, means) in host memory.

**Rehearsal** (``--rehearse``; every paper config, each in a fresh process): the config itself, with its own split,
on synthetic images written in the data set's real on-disk format at the paper's number of classes (a few images
per class: enough that each rehearsed session that trains fills one batch), with the real backbone at its real
input size (random weights). The stream is cut to its first 2 sessions, each training on one batch per epoch:
2 epochs in the first session (1,001 steps become 2 for ZSCL's MTIL), 1 after; ``run.checkpoint_every=0``, so
every epoch end but a fit's last writes a resume point. Recorded: peak RSS, seconds per training step at the
paper's per-device batch or, where that does not fit this machine, at the batch of ``REHEARSAL_BATCH`` (the table
gives both), every checkpoint written (count and bytes), bytes written by the process (``/proc/self/io`` wchar), the
run folder's size at the end and at its peak; then the full protocol is projected from the config's sessions and
the footprint's checkpoint sizes.

    python benchmarks/paper_scale.py                    # footprint table (README)
    python benchmarks/paper_scale.py --rehearse --rehearsal-log rehearsals.jsonl --write-readme
                                                        # + every rehearsal (about an hour and a half on 2 cores;
                                                        #   an interrupted run continues from the log)
    python benchmarks/paper_scale.py --rehearse mos fsa/svhn_b2inc2   # some strategies or configs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._machine import machine  # noqa: E402
from benchmarks._readme import write_block  # noqa: E402
from cil.config import load_config, split_sizes  # noqa: E402
from cil.module import create_strategy  # noqa: E402

CONFIGS = ROOT / "configs"
PAPER = {
    "fsa": ["cifar100_b10inc10", "svhn_b2inc2", "fgvc_aircraft_b10inc10", "stanford_cars_b16inc20",
            "cifar100_fewshot_plus", "svhn_fewshot_plus", "fgvc_aircraft_fewshot_plus", "cifar100_fscil",
            "cub200_fscil"],
    "mamba_fscil": ["cifar100_fscil", "miniimagenet_fscil", "cub200_fscil"],
    "mos": [f"{d}_{w}" for d in ("cifar100_b0inc5", "cub200_b0inc10", "imagenet_r_b0inc20", "imagenet_a_b0inc20",
                                 "objectnet_b0inc20", "omnibenchmark_b0inc20", "vtab_b0inc10")
            for w in ("in21k", "in1k")],
    "zscl": ["mtil_order1", "mtil_order2", "cifar100_10steps", "cifar100_20steps", "cifar100_50steps",
             "tinyimagenet_100-20", "tinyimagenet_100-10", "tinyimagenet_100-5"],
    "dkvb": ["cifar10_clip_vitb32", "cifar10_resnet50", "cifar100_clip_vitb32", "cifar100_resnet50",
             "cifar10_clip_vitb32_online"],
}  # fmt: skip
CLASSES = {
    "cifar100": 100, "cifar10": 10, "svhn": 10, "fgvc_aircraft": 100, "stanford_cars": 196, "cub200": 200,
    "miniimagenet": 100, "imagenet_r": 200, "imagenet_a": 200, "objectnet": 200, "omnibenchmark": 300, "vtab": 50,
    "tinyimagenet": 200,
}  # fmt: skip
MTIL_CLASSES = 100 + 101 + 100 + 47 + 10 + 102 + 101 + 10 + 37 + 196 + 397  # the 11 data sets of MTIL
MTIL_TRAIN = {  # training images per MTIL data set (the code's splits; approximate): how often 1,000 steps cycle
    "aircraft": 3334, "caltech101": 6941, "cifar100": 50000, "dtd": 1880, "eurosat": 21600, "flowers": 1020,
    "food": 75750, "mnist": 60000, "oxford_pet": 3680, "stanford_cars": 8144, "sun397": 69603,
}  # fmt: skip


def reference_files(folder: Path) -> list[str]:
    """ZSCL's reference set, tiny (the footprint does not depend on it)."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32)).save(folder / "images" / "0.png")
    (folder / "captions.txt").write_text("a photo\n")
    return [f"strategy.reference_images={folder / 'images'}", f"strategy.reference_captions={folder / 'captions.txt'}"]


def protocol(cfg) -> tuple[int, int]:
    """(classes, sessions) of the config's stream."""
    if cfg.stream.name == "mtil":
        return MTIL_CLASSES, len(cfg.stream.datasets)
    classes = CLASSES[cfg.stream.name]
    if cfg.stream.online:  # the whole stream as one sequence
        return classes, 1
    base, inc = split_sizes(cfg.stream.split)
    return classes, (1 if base else 0) + -(-(classes - base) // inc)


def epochs_over_protocol(strategy, cfg, sessions: int) -> tuple[int, str]:
    """(epochs the former code wrote last.ckpt after, how they were counted)."""
    hp, name = strategy.hparams, cfg.strategy.name
    if name == "fsa":
        return (0, "no adaptation") if hp.adaptation == "none" else (int(hp.epochs), "session 1 only")
    if name == "mamba_fscil":
        return int(hp.base_epochs) + sessions - 1, "base epochs + 1 per session"
    if name == "zscl" and hp.iterations and cfg.stream.name == "mtil":
        draws = (int(hp.iterations) + 1) * int(cfg.stream.batch_size)
        return sum(-(-draws // MTIL_TRAIN[d]) for d in cfg.stream.datasets), "epochs in 1,001 steps per data set"
    return int(hp.get("epochs", 1)) * sessions, "epochs x sessions"


def optimizer_copies(strategy, cfg) -> float:
    hp, name = strategy.hparams, cfg.strategy.name
    if name in ("fsa", "zscl"):  # Adam / AdamW: two moments; ZSCL also keeps its weight ensemble
        return 2.0 + (1.0 if name == "zscl" else 0.0)
    if name == "dkvb":
        return 0.0 if hp.momentum == 0 and hp.optimizer == "sgd" else 2.0
    return 1.0  # SGD with momentum (MOS, Mamba-FSCIL)


def saved_bytes(state: dict, folder: Path) -> int:
    path = folder / "state.pt"
    torch.save(state, path)
    size = path.stat().st_size
    path.unlink()
    return size


def footprint(strategy_name: str, config: str, work: Path) -> dict:
    overrides = ["backbone.pretrained=false"]
    if strategy_name == "zscl":
        overrides += reference_files(work / "reference")
    cfg = load_config(CONFIGS / strategy_name / f"{config}.yaml", overrides)
    torch.manual_seed(0)
    strategy = create_strategy(cfg)
    classes, sessions = protocol(cfg)
    for module in strategy.modules():  # grow every class-sized tensor to the protocol's classes
        if module is not strategy and hasattr(module, "grow"):
            module.grow(classes)
    if hasattr(strategy, "bottleneck"):
        strategy.bottleneck.allocate(classes)
    if hasattr(strategy, "adapters"):
        for _ in range(sessions):
            strategy.adapters.snapshot()
    trained = sum(p.numel() * p.element_size() for p in strategy.parameters() if p.requires_grad)
    if strategy_name == "fsa" and strategy.hparams.adaptation == "full":
        trained = sum(p.numel() * p.element_size() for p in strategy.parameters())  # the body adapts
    now, _ = strategy.checkpoint_state()
    session_now = saved_bytes(now, work)
    session_before = saved_bytes(strategy.state_dict(), work)
    opt = optimizer_copies(strategy, cfg) * trained
    epochs, counted = epochs_over_protocol(strategy, cfg, sessions)
    buffers = sum(
        b.numel() * b.element_size() for n, b in strategy.named_buffers() if not n.startswith(("backbone.", "teacher."))
    )
    return {
        "config": f"{strategy_name}/{config}",
        "classes": classes,
        "sessions": sessions,
        "params_m": sum(p.numel() for p in strategy.parameters()) / 1e6,
        "session_ckpt_mb": session_now / 2**20,
        "session_ckpt_before_mb": session_before / 2**20,
        "resume_mb": (session_now + opt) / 2**20,
        "resume_before_mb": (session_before + opt) / 2**20,
        "epochs": epochs,
        "epochs_counted": counted,
        "before_total_gb": epochs * (session_before + opt) / 2**30,
        "bookkeeping_mb": buffers / 2**20,
    }


# ---- rehearsals --------------------------------------------------------------------------------------------------
REHEARSAL_BATCH = {  # where the paper's per-device batch does not fit this 24 GB CPU machine: the batch rehearsed
    "fsa": 64,  # EfficientNet-B0 at 224 px trained at batch 256: about 22 GB of activations (7 GB at 64)
    "zscl": 16,  # ViT-B/16 student and teacher plus 16 reference images: 10 GB at 16 (the paper: 64)
    "mamba_fscil/miniimagenet_fscil": 256,  # ResNet-12 at 84 px trained in the base session: 11.7 GB at 256
}  # fmt: skip
REHEARSED_SESSIONS = 2


def rehearsal_batch(strategy_name: str, config: str, cfg) -> int:
    name = f"{strategy_name}/{config}"
    return REHEARSAL_BATCH.get(name, REHEARSAL_BATCH.get(strategy_name, int(cfg.stream.batch_size)))


def rehearsal_sizes(strategy_name: str, config: str, cfg) -> tuple[int, int]:
    """(batch, training images per class): enough that every rehearsed session that trains fills one batch."""
    batch = rehearsal_batch(strategy_name, config, cfg)
    shots = max(cfg.stream.shots or 0, cfg.stream.base_shots or 0)
    return batch, max(-(-batch // trained_classes(strategy_name, cfg)), shots, 2)


def trained_classes(strategy_name: str, cfg) -> int:
    """The fewest classes of a rehearsed session that trains (FSA adapts in session 1 only)."""
    if cfg.stream.name == "mtil":
        return 100  # Aircraft (order I) and Food-101 (order II) are the smaller of each order's first two
    classes = CLASSES[cfg.stream.name]
    if cfg.stream.online:
        return classes
    base, inc = split_sizes(cfg.stream.split)
    return (base or inc) if strategy_name == "fsa" else min(base or inc, inc)


def epoch_overrides(strategy_name: str, cfg) -> list[str]:
    """2 epochs in the first session (so an epoch end writes a resume point), cut from the config's."""
    return {
        "fsa": ["strategy.epochs=2", "strategy.milestones=[1]"],
        "mamba_fscil": ["strategy.base_epochs=2", "strategy.inc_steps=[2]", "strategy.base_warmup=0"],
        "mos": ["strategy.epochs=2", "strategy.ca_epochs=1"],
        "zscl": ["strategy.iterations=1"] if cfg.strategy.get("iterations") else ["strategy.epochs=2"],
        "dkvb": ["strategy.epochs=2", "strategy.init_epochs=1"],
    }[strategy_name]


def write_data(cfg, root: Path, per_class: int) -> None:
    """The config's data set in its real on-disk format at the paper's number of classes: ``per_class`` training
    and 1 test image per class (tiny images: the transforms resize them to the real input size)."""
    from tests import writers as W

    name, classes = cfg.stream.name, CLASSES.get(cfg.stream.name, 0)
    wnids = [f"n{10000000 + k:08d}" for k in range(classes)]
    if name == "cifar100":
        W.write_cifar100(root, per_class, 1)
    elif name == "cifar10":
        W.write_cifar10(root, per_class, 1)
    elif name == "svhn":
        W.write_svhn(root, per_class)
    elif name == "fgvc_aircraft":
        W.write_aircraft(root, [f"variant-{k}" for k in range(classes)], per_class, 1)
    elif name == "stanford_cars":
        W.write_cars(root, [f"Car {k} 2012" for k in range(classes)], per_class, 1)
    elif name == "miniimagenet":
        W.write_miniimagenet(root, wnids, per_class, 1)
    elif name == "tinyimagenet":
        W.write_tinyimagenet(root, wnids, per_class, 1)
    elif name == "mtil":  # the first two data sets of each order at their real class counts, the rest tiny
        W.write_all(root)
        import shutil

        for folder in ("fgvc-aircraft-2013b", "stanford_cars", "food-101"):
            shutil.rmtree(root / folder)
        W.write_aircraft(root, [f"variant-{k}" for k in range(100)], per_class, 1)
        train_list = root / "fgvc-aircraft-2013b" / "data" / "images_variant_trainval.txt"
        (train_list.parent / "images_variant_train.txt").write_text(train_list.read_text())
        W.write_cars(root, [f"Car {k} 2012" for k in range(196)], per_class, 1)
        write_food(root, 101, per_class)
    else:  # PILOT's train/ and test/ class folders (CUB, ImageNet-R/A, ObjectNet, OmniBenchmark, VTAB)
        W.write_image_folders(root, [f"{k + 1:03d}.class_{k}" for k in range(classes)], per_class, 1)


def write_food(root: Path, classes: int, per_class: int) -> None:
    from tests.writers import small_image as _image

    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    names = [f"dish_{k}" for k in range(classes)]
    for split, n in (("train", per_class), ("test", 1)):
        meta = {c: [f"{c}/{split}{i}" for i in range(n)] for c in names}
        for k, c in enumerate(names):
            for item in meta[c]:
                _image(base / "images" / f"{item}.jpg", k)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def cut_stream(stream, batch: int, seed: int = 0):
    """The stream's first sessions, each training on one batch of its samples (one step per epoch)."""
    import dataclasses

    import numpy as np

    from cil.streams.common import ClassSubset

    def one_batch(ds):
        if len(ds) <= batch:
            return ds
        return ClassSubset(ds, sorted(np.random.RandomState(seed).choice(len(ds), batch, replace=False).tolist()))

    n = REHEARSED_SESSIONS
    return dataclasses.replace(
        stream,
        classes_per_session=stream.classes_per_session[:n],
        train_data=[one_batch(ds) for ds in stream.train_data[:n]],
        eval_data=stream.eval_data[:n],
        stats_data=stream.stats_data[:n],
        templates=stream.templates[:n] if stream.templates else stream.templates,
        task_names=stream.task_names[:n] if stream.task_names else stream.task_names,
    )


def rehearse(config_name: str, work: Path) -> dict:
    """One paper config, cut to its first 2 sessions (one batch per epoch; 2 epochs in the first, 1 after)."""
    from pytorch_lightning.callbacks import Callback

    import cil.session as S
    import cil.streams
    from cil.runs import RunFolder
    from cil.trainers import AtomicCheckpointIO

    strategy_name, config = config_name.split("/")
    path = CONFIGS / strategy_name / f"{config}.yaml"
    reference = reference_files(work / "reference") if strategy_name == "zscl" else []
    cfg = load_config(path, ["backbone.pretrained=false", *reference])
    batch, per_class = rehearsal_sizes(strategy_name, config, cfg)
    paper_batch = int(cfg.stream.batch_size)
    data = work / "data"
    write_data(cfg, data / "main", per_class)
    overrides = [
        f"stream.data_root={data / 'main'}",
        "stream.verify_checksums=false",
        "stream.num_workers=0",
        f"stream.batch_size={batch}",
        "backbone.pretrained=false",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "run.checkpoint_every=0",
        f"run.output_dir={work / 'runs'}",
        *epoch_overrides(strategy_name, cfg),
    ]
    if cfg.stream.unlabelled:  # DKVB's key initialisation: the other CIFAR's training images
        unlabelled = cfg.stream.unlabelled
        other = load_config(path, [f"stream.name={unlabelled}", "stream.unlabelled=null"])
        write_data(other, data / "unlabelled", 6 if unlabelled == "cifar10" else 1)
        overrides += [f"stream.unlabelled_root={data / 'unlabelled'}"]
    if strategy_name == "zscl":
        overrides += ["strategy.reference_batch_size=16", "strategy.reference_num_workers=0", *reference]
        if cfg.strategy.get("lr_per_session"):  # one rate per rehearsed session
            rates = list(cfg.strategy.lr_per_session)[:REHEARSED_SESSIONS]
            overrides += [f"strategy.lr_per_session=[{','.join(map(str, rates))}]"]
    if strategy_name == "dkvb":
        overrides += [f"strategy.feature_cache={work / 'cache'}"]
    cfg = load_config(path, overrides)
    writes: list[tuple[str, int]] = []
    peak_folder = [0]
    save_resume, save_session = AtomicCheckpointIO.save_checkpoint, RunFolder.save_session
    create_stream, create_strategy_ = cil.streams.create_stream, S.create_strategy

    def folder_size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    def resume_point(self, checkpoint, path, storage_options=None):
        save_resume(self, checkpoint, path, storage_options)
        writes.append(("resume", Path(path).stat().st_size))
        peak_folder[0] = max(peak_folder[0], folder_size(Path(path).parent.parent))

    def session_checkpoint(self, k, *args, **kwargs):  # whatever RunFolder.save_session takes after k
        save_session(self, k, *args, **kwargs)
        writes.append(("session", self.session_checkpoint(k).stat().st_size))
        peak_folder[0] = max(peak_folder[0], folder_size(self.path))

    def strategy_cut(cfg_):  # 1 epoch after the first session: a session boundary costs the same either way
        strategy = create_strategy_(cfg_)
        epochs_for = strategy.epochs_for
        strategy.epochs_for = lambda session: epochs_for(session) if session.index == 0 else min(epochs_for(session), 1)
        return strategy

    class StepTimer(Callback):
        def __init__(self):
            self.times, self.batches, self.fit, self.began = [], [], -1, 0.0

        def on_fit_start(self, trainer, pl_module):
            self.fit += 1  # one fit per session that trains
            self.times.append([])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.began = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times[self.fit].append(time.perf_counter() - self.began)
            self.batches.append(len(batch[1]))

    timer = StepTimer()
    AtomicCheckpointIO.save_checkpoint, RunFolder.save_session = resume_point, session_checkpoint
    cil.streams.create_stream = lambda *a, **k: cut_stream(create_stream(*a, **k), batch)
    S.create_strategy = strategy_cut
    try:
        before, began = wchar(), time.perf_counter()
        run = S.run_experiment(cfg, callbacks=[timer])
        written, wall = wchar() - before, time.perf_counter() - began
    finally:
        AtomicCheckpointIO.save_checkpoint, RunFolder.save_session = save_resume, save_session
        cil.streams.create_stream, S.create_strategy = create_stream, create_strategy_
    resumes = [size for kind_, size in writes if kind_ == "resume"]
    sessions = [size for kind_, size in writes if kind_ == "session"]
    # the first session's steps at the rehearsed batch, after the first (warm-up); later sessions apart (Mamba-FSCIL
    # trains its projector alone on cached maps there)
    first = timer.times[0] if timer.times else []
    steady, later = first[1:] or first, [t for fit in timer.times[1:] for t in fit]
    return {
        "config": config_name,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "s_per_step": sum(steady) / max(len(steady), 1),
        "step_batch": max(timer.batches) if timer.batches else 0,
        "paper_batch": paper_batch,
        "s_per_step_later": sum(later) / len(later) if later else None,
        "steps": len(timer.batches),
        "resume_points": len(resumes),
        "resume_mb": max(resumes, default=0) / 2**20,
        "session_ckpt_mb": max(sessions, default=0) / 2**20,
        "written_mb": written / 2**20,
        "run_folder_mb": folder_size(run) / 2**20,
        "peak_folder_mb": peak_folder[0] / 2**20,
        "wall_s": wall,
    }


def footprint_table(rows: list[dict]) -> str:
    lines = [
        "| config | classes × sessions | params (M) | session ckpt (MB), before → now | resume point (MB), "
        "before → now | former last.ckpt writes over the protocol | writes / session now | bookkeeping (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before = f"{r['epochs']:,} × {r['resume_before_mb']:,.0f} MB = {r['before_total_gb']:,.0f} GB"
        before += f" ({r['epochs_counted']})"
        lines.append(
            f"| `{r['config']}` | {r['classes']} × {r['sessions']} | {r['params_m']:.1f} | "
            f"{r['session_ckpt_before_mb']:,.0f} → {r['session_ckpt_mb']:,.0f} | "
            f"{r['resume_before_mb']:,.0f} → {r['resume_mb']:,.0f} | {before} | "
            f"{r['session_ckpt_mb']:,.0f} MB + ≤ 2 × {r['resume_mb']:,.0f} MB per hour of training | "
            f"{r['bookkeeping_mb']:,.0f} |"
        )
    return "\n".join(lines)


def rehearsal_table(rows: list[dict], footprints: list[dict]) -> str:
    """The rehearsals, with the full protocol projected from the config's sessions and its checkpoints' sizes at
    the protocol's classes (the footprint rows)."""
    full = {r["config"]: r for r in footprints}
    lines = [
        "| config | s / step (batch; paper's) | later sessions' s / step | peak RSS (GB) | resume points (MB each) | "
        "session ckpt (MB) | "
        "written (MB) | run folder (MB), peak | protocol: checkpoint writes | protocol: on disk at most |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = full.get(r["config"])
        if f is None:
            projected = on_disk = "(no footprint row)"
        else:
            s, session, resume = f["sessions"], f["session_ckpt_mb"], f["resume_mb"]
            projected = f"{s} × {session:,.0f} MB = {s * session / 1024:,.1f} GB + {resume:,.0f} MB per 30 min"
            on_disk = f"{(2 * session + resume) / 1024:,.1f} GB"  # old + new session ckpt (atomic) + resume point
        later = "–" if r.get("s_per_step_later") is None else f"{r['s_per_step_later']:.1f}"
        lines.append(
            f"| `{r['config']}` | {r['s_per_step']:.1f} ({r['step_batch']}; {r['paper_batch']}) | {later} | "
            f"{r['peak_rss_gb']:.1f} | {r['resume_points']} ({r['resume_mb']:,.0f}) | {r['session_ckpt_mb']:,.0f} | "
            f"{r['written_mb']:,.0f} | {r['run_folder_mb']:,.0f}, {r['peak_folder_mb']:,.0f} | {projected} | "
            f"{on_disk} |"
        )
    return "\n".join(lines)


def rehearsal_names(asked: list[str]) -> list[str]:
    """strategy or strategy/config names -> strategy/config names, in the PAPER table's order."""
    every = [f"{name}/{config}" for name, configs in PAPER.items() for config in configs]
    unknown = [a for a in asked if a not in PAPER and a not in every]
    if unknown:
        raise SystemExit(f"--rehearse: unknown {unknown}; give strategies ({list(PAPER)}) or strategy/config names")
    return [c for c in every if not asked or c in asked or c.split("/")[0] in asked]


def rehearse_all(names: list[str], log: Path) -> list[dict]:
    """Each config in a fresh process (its own peak RSS); rows go to ``log`` (JSON lines) as they finish, and
    configs already there are not rehearsed again: an interrupted benchmark continues where it stopped."""
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    seen = {r["config"] for r in done}
    for name in names:
        if name in seen:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = Path(tmp) / "row.json"
            command = [sys.executable, __file__, "--rehearse-one", name, "--json", str(row)]
            finished = subprocess.run(command, env={**os.environ, "CIL_QUIET": "1"})
            if finished.returncode != 0:  # the others still run; this one is missing from the table
                print(f"[paper_scale] {name}: rehearsal failed (exit {finished.returncode})", flush=True)
                continue
            result = json.loads(row.read_text())
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        done.append(result)
        print(json.dumps(result), flush=True)
    order = {name: k for k, name in enumerate(names)}
    return sorted((r for r in done if r["config"] in order), key=lambda r: order[r["config"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearse", nargs="*", help="strategies or strategy/config names to rehearse (none: all)")
    parser.add_argument("--rehearsal-log", type=Path, help="JSON lines of finished rehearsals (resumable)")
    parser.add_argument("--only", nargs="*", help="footprint of these strategies only")
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--rehearse-one", help=argparse.SUPPRESS)
    parser.add_argument("--from-json", type=Path, help="only print (and --write-readme) an earlier --json file")
    args = parser.parse_args()
    os.environ.setdefault("CIL_QUIET", "1")
    if args.rehearse_one:
        with tempfile.TemporaryDirectory() as tmp:
            args.json.write_text(json.dumps(rehearse(args.rehearse_one, Path(tmp))))
        return
    out: dict = {"machine": machine()}
    if args.from_json:
        out = json.loads(args.from_json.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        if args.rehearse is not None:  # first, while this process is still small
            log = args.rehearsal_log or Path(tmp) / "rehearsals.jsonl"
            out["rehearsal"] = rehearse_all(rehearsal_names(args.rehearse), log)
        rows = out.get("footprint", [])
        for name, configs in [] if args.from_json else PAPER.items():
            if args.only and name not in args.only:
                continue
            for config in configs:
                rows.append(footprint(name, config, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
        out["footprint"] = rows
    text = f"Machine: {out['machine']}.\n\n" + footprint_table(out["footprint"])
    if out.get("rehearsal"):
        text += "\n\nRehearsals:\n\n" + rehearsal_table(out["rehearsal"], out["footprint"])
    print(text)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if args.write_readme:
        write_block("paper-scale", text)


if __name__ == "__main__":
    main()
