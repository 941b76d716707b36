"""The run folder: everything a run produces, written atomically, and read back as pandas objects.

::

    runs/<name>/<YYYYmmdd-HHMMSS>/
      config.yaml            fully resolved config (``cil run RUN_DIR/config.yaml`` runs it again)
      env.json               package versions, git commit, seed, device, command line
      metrics.csv            tidy: session, eval_session, split, metric, value (one row per number)
      accuracy_matrix.csv    R[i, j]: accuracy on session j's test classes after training session i
      summary.json           final metrics with their definitions; per-session wall time, memory, parameters
      plots/                 accuracy_curve.png, accuracy_matrix.png, forgetting.png
      .lock                  while a process works in the folder (cil run, cil run --resume): who holds it
      checkpoints/           session_<k>.ckpt after each session (resume point); last.ckpt, Lightning's
                             mid-session resume point, at an epoch end at most every run.checkpoint_every minutes
      logs/                  Lightning's CSV and TensorBoard logs of the training steps, one version per session
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from cil import distributed
from cil import metrics as M
from cil.config import to_yaml
from cil.errors import ConfigError
from cil.io import atomic_write

PACKAGES = ["torch", "torchvision", "pytorch-lightning", "timm", "avalanche-lib", "omegaconf", "scikit-learn"]
PACKAGES += ["numpy", "pandas", "open-clip-torch"]


def environment(cfg: DictConfig) -> dict[str, Any]:
    """Versions, git commit, seed and device: what is needed to run this again."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {
        "python": sys.version.split()[0],
        "packages": versions,
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit else None,
        "seed": cfg.run.seed,
        "device": {
            "accelerator": cfg.trainer.accelerator,
            "devices": OmegaConf.to_container(cfg.trainer, resolve=True)["devices"],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "hostname": socket.gethostname(),
        },
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "slurm_job_id": distributed.slurm_job_id(),
    }


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass
class SessionRecord:
    """What the session loop measured in one session (kept in the session checkpoint for resume)."""

    session: int
    confusion: list[list[int]]
    epochs: int
    trainable_params: int
    wall_time_s: float
    eval_time_s: float
    peak_memory_mb: float  # peak resident memory of the process so far (the OS keeps no per-session peak)
    peak_gpu_memory_mb: float | None = None  # peak CUDA memory allocated during this session


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint of a run folder, read by PyTorch's safe loader (``weights_only=True``: tensors, containers,
    numbers, strings; nothing that runs code). Run folders are copied and shared, so a file holding anything else
    is refused with a :class:`ConfigError` naming it, before any of it runs; other failures (a truncated file)
    raise as they are, and the resume code sets such a file aside."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names {found.group(1)}, " if found else "it holds an object "
        raise ConfigError(
            f"{path} is refused: {what}which a cil checkpoint never holds (loaded with weights_only=True); "
            "delete it to resume from the checkpoint before it"
        ) from None


class _Hold:
    """A held run folder: ``close()`` removes ``.lock`` and lets go (a process that dies lets go too: the OS drops
    its lock, and the file it leaves names a process that no longer holds anything)."""

    def __init__(self, handle: Any, path: Path):
        self.handle, self.path = handle, path

    def close(self) -> None:
        if not self.handle.closed:
            self.path.unlink(missing_ok=True)
            self.handle.close()


class SessionCheckpoint(NamedTuple):
    """A session checkpoint as read back: the strategy's state (without the tensors the config rebuilds), the
    records of every session so far, and the digest of the rebuilt tensors."""

    state_dict: dict
    records: list[SessionRecord]
    rebuilt_digest: str | None
    stream_fingerprint: str | None = None  # the data the run was built from (checkpoints of older runs: None)


class RunFolder:
    """Writer of one run folder (only rank 0 writes; see :mod:`cil.session`). Every path of the layout above is
    named here and nowhere else."""

    CONFIG, ENV, SUMMARY = "config.yaml", "env.json", "summary.json"
    MATRIX, METRICS = "accuracy_matrix.csv", "metrics.csv"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def logs(self) -> Path:
        """Lightning's loggers write here, one version per session."""
        return self.path / "logs"

    @property
    def features(self) -> Path:
        """The feature store's folder while a run goes (``run.feature_memory_mb``)."""
        return self.path / "features"

    @property
    def skipped_files(self) -> Path:
        """``stream.skip_unreadable``: the files that could not be read, one JSON line each (``{"path": ...}``)."""
        return self.path / "skipped_files.jsonl"

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    def is_complete(self) -> bool:
        """Every session has its results (``summary.json`` says so)."""
        summary = self.path / self.SUMMARY
        return summary.is_file() and bool(json.loads(summary.read_text()).get("complete"))

    @staticmethod
    def new_path(cfg: DictConfig) -> Path:
        base = Path(cfg.run.output_dir) / str(cfg.run.name)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, k = base / stamp, 1
        while path.exists():
            path, k = base / f"{stamp}-{k}", k + 1
        return path

    def create(self, cfg: DictConfig) -> RunFolder:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for k in range(1, 1000):  # another process may take the same timestamp between new_path and here
            try:
                self.path.mkdir(exist_ok=False)
                break
            except FileExistsError:
                self.path = self.path.with_name(f"{self.path.name.split('-r')[0]}-r{k}")
        atomic_write(self.config, to_yaml(cfg))
        atomic_write(self.path / self.ENV, json.dumps(environment(cfg), indent=2))
        return self

    def note_resume(self, cfg: DictConfig) -> None:
        try:
            env = json.loads((self.path / self.ENV).read_text())
        except (OSError, ValueError):  # missing or truncated: rewritten with what is known now
            env = {"note": f"{self.ENV} was missing or unreadable when the run was resumed"}
        env.setdefault("resumed", []).append(environment(cfg))
        atomic_write(self.path / self.ENV, json.dumps(env, indent=2))

    # ---- checkpoints -----------------------------------------------------------------------------------
    def session_checkpoint(self, k: int) -> Path:
        return self.checkpoints / f"session_{k}.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def session_checkpoints(self) -> dict[int, Path]:
        """The session checkpoints by session, ours only (``session_<k>.ckpt``: a copy a user made beside them,
        ``session_0 (copy).ckpt``, is neither read nor deleted)."""
        found = {}
        for path in self.checkpoints.glob("session_*.ckpt"):
            match = re.fullmatch(r"session_(\d+)\.ckpt", path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def completed_sessions(self) -> int:
        """Sessions completed: 1 + the index of the newest session checkpoint (0 if none)."""
        return max(self.session_checkpoints(), default=-1) + 1

    def lock(self) -> Any:
        """Hold the run folder for this process (``.lock``, released when the process ends, however it ends): a
        second ``cil run --resume`` of the same folder is refused in one line naming the process that holds it."""
        import fcntl

        try:
            handle = open(self.path / ".lock", "a+")
        except OSError as e:
            raise ConfigError(
                f"run folder '{self.path}' cannot be written ({e.strerror}); resume a writable copy"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"run folder '{self.path}' is in use by {holder}; wait for it to end (or stop it) before resuming"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        return _Hold(handle, self.path / ".lock")

    def save_session(
        self,
        k: int,
        state_dict: dict,
        records: Sequence[SessionRecord],
        rebuilt_digest: str | None = None,
        stream_fingerprint: str | None = None,
    ) -> None:
        """``state_dict`` may leave out tensors the config rebuilds (``CILModule.checkpoint_state``); their digest
        goes with it, and the fingerprint of the data the run was built from (``cil.features.stream_fingerprint``)."""
        payload = {"session": k, "state_dict": state_dict, "records": [vars(r) for r in records]}
        payload["rebuilt_digest"] = rebuilt_digest
        payload["stream_fingerprint"] = stream_fingerprint
        atomic_write(self.session_checkpoint(k), lambda p: torch.save(payload, p))

    def load_session(self, k: int) -> SessionCheckpoint:
        """Session ``k``'s checkpoint, read once; complete its state with ``CILModule.complete_state(state_dict,
        rebuilt_digest)`` before loading it into a strategy."""
        payload = load_checkpoint(self.session_checkpoint(k))
        records = [SessionRecord(**r) for r in payload["records"]]
        return SessionCheckpoint(
            payload["state_dict"], records, payload.get("rebuilt_digest"), payload.get("stream_fingerprint")
        )

    # ---- results -------------------------------------------------------------------------------------
    def write_results(
        self,
        records: Sequence[SessionRecord],
        classes_per_session: Sequence[Sequence[int]],
        counts: Sequence[int],
        info: dict[str, Any],
        eval_unseen: bool = True,
        plots: bool = True,
    ) -> dict[str, Any]:
        """Tables, (``plots``) plots and summary from the sessions done so far; returns the summary."""
        R = accuracy_matrix(records, classes_per_session, eval_unseen)
        T = R.shape[1]
        done = R.shape[0]
        matrix = pd.DataFrame(R, index=pd.Index(range(done), name="after_session"), columns=range(T))
        atomic_write(self.path / self.MATRIX, matrix.to_csv())
        tidy = tidy_metrics(R, counts)
        atomic_write(self.path / self.METRICS, tidy.to_csv(index=False))
        square = R[:, :done]
        final = M.summarize(square, counts[:done]) if done else {}
        summary = {
            **info,
            "n_sessions": T,
            "completed_sessions": done,
            "complete": done == T,
            "classes_per_session": [list(map(int, c)) for c in classes_per_session],
            "test_samples_per_session": [int(c) for c in counts],
            "metrics": {k: {"value": _num(v), "definition": M.DEFINITIONS[k]} for k, v in final.items()},
            "sessions": [{k: v for k, v in vars(r).items() if k != "confusion"} for r in records],
        }
        if plots:
            plot_run(self.plots, square, counts[:done])
        # last: its "complete" is what marks a finished run, so everything it stands for is written before it
        atomic_write(self.path / self.SUMMARY, json.dumps(summary, indent=2))
        return summary


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def accuracy_matrix(
    records: Sequence[SessionRecord], classes_per_session: Sequence[Sequence[int]], eval_unseen: bool = True
) -> np.ndarray:
    """R (done × T) from the recorded confusion matrices; NaN above the diagonal unless ``eval_unseen``."""
    R = np.array([M.accuracy_row(np.array(r.confusion), classes_per_session) for r in records], dtype=float)
    R = R.reshape(len(records), len(classes_per_session))
    if not eval_unseen:
        R[np.triu_indices(R.shape[0], 1, R.shape[1])] = np.nan
    return R


def tidy_metrics(R: np.ndarray, counts: Sequence[int]) -> pd.DataFrame:
    """One row per number: accuracy per (session, eval_session), and per-session aggregates."""
    done = R.shape[0]
    rows = [(i, j, "test", "accuracy", R[i, j]) for i in range(done) for j in range(R.shape[1])]
    square = R[:, :done]
    seen = M.seen_accuracy(square, counts[:done])
    old, new, harmonic = M.old_new_accuracy(square, counts[:done])
    base, novel = M.base_novel_accuracy(square, counts[:done])
    curve = M.forgetting_curve(square)
    for i in range(done):
        for name, values in [
            ("seen_accuracy", seen),
            ("old_accuracy", old),
            ("new_accuracy", new),
            ("harmonic_mean", harmonic),
            ("base_accuracy", base),
            ("novel_accuracy", novel),
            ("forgetting", curve),
        ]:
            rows.append((i, None, "test", name, values[i]))
    frame = pd.DataFrame(rows, columns=["session", "eval_session", "split", "metric", "value"])
    frame["eval_session"] = frame["eval_session"].astype("Int64")
    return frame


def plot_run(folder: Path, R: np.ndarray, counts: Sequence[int]) -> None:
    """accuracy_curve.png, accuracy_matrix.png and forgetting.png for a (done × done) accuracy matrix."""

    done = R.shape[0]
    if done == 0:
        return
    sessions = np.arange(1, done + 1)  # numbered as the CLI prints them ("session 1/5")
    seen = M.seen_accuracy(R, counts)
    old, new, _ = M.old_new_accuracy(R, counts)

    fig, ax = _subplots(figsize=(5, 3.5))
    ax.plot(sessions, 100 * seen, "o-", label="all seen classes")
    ax.plot(sessions, 100 * old, "s--", label="old classes", alpha=0.7)
    ax.plot(sessions, 100 * new, "^--", label="new classes", alpha=0.7)
    ax.set(xlabel="session", ylabel="accuracy (%)", ylim=(0, 100), xticks=sessions, title="Accuracy per session")
    ax.legend()
    _save(fig, folder / "accuracy_curve.png")

    fig, ax = _subplots(figsize=(1.2 + 0.6 * done, 1 + 0.55 * done))
    image = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
    for i in range(done):
        for j in range(done):
            if not np.isnan(R[i, j]):
                color = "k" if R[i, j] > 0.6 else "w"  # readable on viridis' bright end
                ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(sessions - 1, labels=sessions)
    ax.set_yticks(sessions - 1, labels=sessions)
    ax.set(xlabel="evaluated on session", ylabel="after session")
    ax.set_title("Accuracy matrix R[i, j] (%)")
    fig.colorbar(image, ax=ax)
    _save(fig, folder / "accuracy_matrix.png")

    fig, (left, right) = _subplots(1, 2, figsize=(8, 3.2))
    f = M.forgetting_per_session(R) if done > 1 else np.array([])
    left.bar(np.arange(1, len(f) + 1), 100 * f)
    left.set_xticks(np.arange(1, len(f) + 1))
    left.set(xlabel="old session j", ylabel="forgetting f_j (%)", title="Forgetting after the last session")
    right.plot(sessions, 100 * M.forgetting_curve(R), "o-")
    right.set(xlabel="session k", ylabel="average forgetting F_k (%)", title="Forgetting over time", xticks=sessions)
    _save(fig, folder / "forgetting.png")


def _subplots(*args, figsize: tuple[float, float], **kwargs):
    """A figure and its axes without pyplot: no global backend switch (a notebook's inline plots keep working),
    nothing to close."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110))


# ---- reading --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run folder as data: what :func:`load_run` returns."""

    path: Path
    config: DictConfig
    env: dict
    summary: dict
    metrics: pd.DataFrame
    accuracy_matrix: pd.DataFrame

    @property
    def strategy(self) -> str:
        """The strategy as tables and plots name it; Avalanche's strategies by their class (``avalanche:Replay``)."""
        strategy = self.config.strategy
        return f"avalanche:{strategy.avalanche}" if strategy.name == "avalanche" else str(strategy.name)

    @property
    def name(self) -> str:
        return f"{self.strategy}@{self.path.name}"

    @property
    def seen_accuracy(self) -> pd.Series:
        rows = self.metrics[self.metrics.metric == "seen_accuracy"]
        return rows.set_index("session")["value"]

    def metric(self, name: str) -> float | None:
        return self.summary["metrics"].get(name, {}).get("value")


def load_run(path: str | Path) -> Run:
    """Read a run folder into pandas tables (no file parsing needed in notebooks)."""
    path = Path(path)
    if not (path / RunFolder.SUMMARY).is_file():
        raise FileNotFoundError(f"'{path}' is not a run folder with results (no summary.json)")
    matrix = pd.read_csv(path / RunFolder.MATRIX, index_col="after_session")
    matrix.columns = matrix.columns.astype(int)
    metrics_table = pd.read_csv(path / RunFolder.METRICS, dtype={"eval_session": "Int64"})
    return Run(
        path=path,
        config=OmegaConf.load(path / RunFolder.CONFIG),
        env=json.loads((path / RunFolder.ENV).read_text()) if (path / RunFolder.ENV).exists() else {},
        summary=json.loads((path / RunFolder.SUMMARY).read_text()),
        metrics=metrics_table,
        accuracy_matrix=matrix,
    )


REPORT_COLUMNS = ["avg_incremental_acc", "last_acc", "forgetting", "bwt"]
MTIL_COLUMNS = ["mtil_transfer", "mtil_avg", "mtil_last"]


def compare(runs: Sequence[Run], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run: strategy, stream, sessions and the chosen final metrics (in %).

    The default columns are :data:`REPORT_COLUMNS`, plus MTIL's Transfer / Avg / Last when a run's sessions are
    data sets (``task_names`` in its summary: the ``mtil`` stream).
    """
    if columns is None:
        mtil = any(run.summary.get("task_names") for run in runs)
        columns = REPORT_COLUMNS + (MTIL_COLUMNS if mtil else [])
    rows = []
    for run in runs:
        # the run's name and timestamp folder: short, and unique among runs of one output folder
        row = {"run": f"{run.path.parent.name}/{run.path.name}", "strategy": run.strategy}
        row["stream"] = run.config.stream.name
        row["sessions"] = f"{run.summary['completed_sessions']}/{run.summary['n_sessions']}"
        for c in columns:
            v = run.metric(c)
            row[c] = None if v is None else 100 * v
        rows.append(row)
    return pd.DataFrame(rows)


def _without_seed(config: Any) -> str:
    """A run's config as text without what differs between repeats over seeds."""
    plain = OmegaConf.to_container(config, resolve=False)
    seed = plain.get("run", {}).pop("seed", None)
    plain.get("run", {}).pop("output_dir", None)
    stream = plain.get("stream", {})
    if stream.get("seed") in (seed, "${run.seed}"):
        stream.pop("seed", None)
    return json.dumps(plain, sort_keys=True, default=str)


def _complete(run: Run) -> bool:
    return bool(run.summary.get("complete", True))


def plot_comparison(runs: Sequence[Run], path: str | Path) -> Path:
    """Accuracy on all seen classes per session, one line per run."""

    fig, ax = _subplots(figsize=(5.5, 3.8))
    for run in runs:
        seen = run.seen_accuracy
        ax.plot(np.asarray(seen.index) + 1, 100 * seen.values, "o-", label=f"{run.strategy} ({run.path.name})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # sessions 1, 2, ... as the CLI numbers them
    ax.set(xlabel="session", ylabel="accuracy on seen classes (%)", ylim=(0, 100), title="Comparison")
    ax.legend(fontsize=8)
    _save(fig, Path(path))
    return Path(path)


def over_seeds(runs: Sequence[Run], columns: Sequence[str] = ("avg_incremental_acc", "last_acc", "forgetting")):
    """Mean ± std over seeds (in %), one row per group of complete runs whose configs differ in the seed alone.

    Two runs are repeats only if everything but ``run.seed`` (and the stream seed that follows it, and the output
    folder) is the same: runs with the same name but another split or learning rate form groups of their own, and an
    incomplete run (``summary.json`` not ``complete``) is a row of its own, marked so, never averaged with finished
    ones. A row is labelled by ``run.name``, with `` #2``, `` #3``... for further groups of one name. Returns
    ``<metric>_mean`` and ``<metric>_std`` columns (population std, as numpy's default), the seeds, and a
    ``<metric>`` column formatted as "mean ± std".
    """
    groups: dict[tuple[str, str, bool], list[Run]] = {}
    for run in runs:
        groups.setdefault((str(run.config.run.name), _without_seed(run.config), _complete(run)), []).append(run)
    rows, labels = [], {}  # (name, complete): groups so far
    for (name, _, complete), members in groups.items():
        labels[name, complete] = labels.get((name, complete), 0) + 1
        label = name if labels[name, complete] == 1 else f"{name} #{labels[name, complete]}"
        label += "" if complete else " (incomplete)"
        row: dict[str, Any] = {"run": label, "seeds": sorted(int(r.config.run.seed) for r in members)}
        for c in columns:
            values = np.array([100 * (r.metric(c) if r.metric(c) is not None else np.nan) for r in members])
            row[f"{c}_mean"], row[f"{c}_std"] = float(values.mean()), float(values.std())
            row[c] = f"{values.mean():.2f} ± {values.std():.2f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
