"""Command line: ``cil run CONFIG [key=value ...]``, ``cil run --resume RUN_DIR``, ``cil report RUN_DIR ...``,
``cil list``. CONFIG is a YAML path or a packaged config's name (``simplecil/digits``).

Configuration problems print one line on stderr and exit with status 2, before any data is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from cil.errors import ConfigError, DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cil", description="Class-incremental learning experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment from a YAML config (or resume one)")
    run.add_argument(
        "config", nargs="?", help="YAML file or packaged config name, e.g. simplecil/digits or my/run.yaml"
    )
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.seed=1 trainer.devices=2")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its folder")
    run.add_argument(
        "--seeds", type=int, nargs="+", metavar="SEED", help="one run per seed (run.seed); cil report groups them"
    )
    report = sub.add_parser("report", help="compare finished runs: a table and a plot")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument(
        "--plot", default=None, help="where to write the comparison plot (default: cil_report.png beside the first run)"
    )
    sub.add_parser("list", help="registered strategies and streams, and the packaged configs")
    return parser


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (device lines, tips, worker hints) out of experiment output."""
    import pytorch_lightning  # noqa: F401  (first: importing it sets its loggers' level to INFO)

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|GPU available but not used).*")
    warnings.filterwarnings(
        "ignore",
        message=".*(Checkpoint directory .* exists and is not empty|num_workers|smaller than the logging interval).*",
    )
    # a frozen body is in eval mode on purpose (DKVB, MOS, SimpleCIL): Lightning's notice of it is not news
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")


class _Forgiving:
    """An output stream whose reader may go away (``cil run ... | head -1``) or that was never open (``2>&-``):
    once a write fails, the stream's descriptor points at /dev/null and the run goes on, losing only its output."""

    def __init__(self, stream):
        self._stream = stream

    def _lost(self) -> None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError, AttributeError):
            self._stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError, OSError):
            self._lost()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._lost()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    saved = sys.stdout, sys.stderr
    # output to a closed pipe or a closed descriptor must neither kill nor corrupt a run: a closed descriptor 1 or
    # 2 first gets /dev/null, or the next file the run opens would take its number and receive its output
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    sys.stdout = _Forgiving(sys.stdout if sys.stdout is not None else open(os.devnull, "w"))
    sys.stderr = _Forgiving(sys.stderr if sys.stderr is not None else open(os.devnull, "w"))
    try:
        args = _parser().parse_args(argv)
        try:
            return _dispatch(args)
        except ConfigError as e:
            print(f"cil: error: {e}", file=sys.stderr)
            return 2
        except DataError as e:  # bad data found mid-run: the run folder keeps every finished session
            print(f"cil: error: {e}", file=sys.stderr)
            return 1
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = saved


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "list":
        from cil import registry

        print("strategies:", ", ".join(registry.strategy_names()))
        print("streams:   ", ", ".join(registry.stream_names()))
        from cil.config import config_names

        print("configs (cil run NAME):")
        for name in config_names():
            print(f"  {name}")
        return 0
    if args.command == "report":
        return _report(args)
    return _run(args)


def _settings_added_since(config: Path) -> list[str]:
    """Overrides that keep a run folder written by an older cil computing as it did: settings added since, whose
    new default would change its numbers mid-run (``backbone.memory_format``: run folders before it were
    contiguous)."""
    import yaml

    saved = yaml.safe_load(config.read_text()) or {}
    backbone = saved.get("backbone") or {}
    return [] if "memory_format" in backbone else ["backbone.memory_format=contiguous"]


def _run(args: argparse.Namespace) -> int:
    from cil.config import load_config

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume RUN_DIR takes no config or overrides: the run folder's config.yaml is used")
        from cil.runs import RunFolder

        run_dir = Path(args.resume)
        if not RunFolder(run_dir).config.is_file():
            raise ConfigError(f"--resume '{run_dir}' is not a run folder (no {RunFolder.CONFIG})")
        cfg = load_config(RunFolder(run_dir).config, _settings_added_since(RunFolder(run_dir).config))
    else:
        if args.config is None:
            raise ConfigError("give a config file (cil run CONFIG [key=value ...]) or --resume RUN_DIR")
        if "=" in args.config and not Path(args.config).exists():
            raise ConfigError(f"'{args.config}' looks like an override; the config file comes first")
        if args.seeds:
            return _run_seeds(args)
        cfg = load_config(args.config, args.overrides)
        from cil.resume import requeued_run

        run_dir = requeued_run(cfg)  # a requeued SLURM job goes on with its own run folder
        if run_dir is not None:
            print(f"[cil] SLURM job requeued: resuming {run_dir}")
    quiet_lightning()  # before the checks: they build a Trainer, whose start-up chatter must not reach the user
    check_before_running(cfg)
    from cil import distributed
    from cil.distributed import is_rank_zero
    from cil.resume import RunInterrupted, requeue_slurm_job
    from cil.session import run_experiment

    if run_dir is not None and _complete(run_dir):
        print(f"[cil] {run_dir} is complete: every session has its results (cil report {run_dir})")
        return 0
    try:
        path = run_experiment(cfg, run_dir=run_dir)
    except RunInterrupted as e:  # Ctrl-C or a scheduler's signal: 128 + the signal's number, as a shell reports it
        if is_rank_zero():
            how = f"resume with: cil run --resume {e.folder}"
            job = distributed.slurm_job_id()
            if cfg.run.requeue and job is not None and e.signum != signal.SIGINT:
                how = (
                    f"requeued SLURM job {job}, which resumes it"
                    if requeue_slurm_job(job)
                    else f"{how} (requeue failed)"
                )
            print(f"cil: {e}; {how}", file=sys.stderr)
        return e.exit_code
    if is_rank_zero():
        print(f"[cil] run folder: {path}")
    return 0


def _run_seeds(args: argparse.Namespace) -> int:
    """``--seeds 0 1 2``: every seed's config is checked first, then one run per seed, in order."""
    from cil.config import load_config

    for seed in args.seeds:
        load_config(args.config, [*args.overrides, f"run.seed={seed}"])
    for seed in args.seeds:
        print(f"[cil] seed {seed}")
        code = _run(
            argparse.Namespace(**{**vars(args), "seeds": None, "overrides": [*args.overrides, f"run.seed={seed}"]})
        )
        if code:
            return code
    return 0


def check_before_running(cfg) -> None:
    """What only the file system, timm and Lightning can say about a config, asked before any data is loaded: the
    output folder and a strategy's cache folders must be writable folders, the backbone a model timm or open_clip
    knows, and Lightning must accept the trainer settings on this machine."""
    out = Path(cfg.run.output_dir)
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir='{out}' is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir='{out}' cannot be created or written ('{existing}' is not writable)")
    # the cheap checks first: a missing data folder is said before a model is built or weights are downloaded
    for key in ("data_root", "index_dir", "unlabelled_root"):
        value = cfg.stream.get(key)
        if value is not None and not Path(str(value)).expanduser().exists():
            if key == "data_root":  # the stream's own message shows the layout it expects; it reads nothing else
                _stream_error(cfg)
            raise ConfigError(f"stream.{key}='{value}' does not exist")
    _check_input_size(cfg)
    from cil.backbones import check_backbone_name
    from cil.config import check_folders

    check_folders(cfg)  # caches a strategy writes into (DKVB's feature cache)
    from cil import registry

    registry.strategy_class(str(cfg.strategy.name)).check_config(cfg)  # what needs the strategy's own libraries
    check_backbone_name(cfg.backbone.name)
    quiet_lightning()
    from cil.trainers import check_loggers, make_trainer

    check_loggers(cfg.trainer.loggers)
    try:
        make_trainer(cfg, logger=False, enable_checkpointing=False)
    except Exception as e:  # Lightning's own rules (strategy names, accelerators present on this machine)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"trainer (accelerator={cfg.trainer.accelerator}, strategy={cfg.trainer.strategy}, "
            f"devices={cfg.trainer.devices}): {first}"
        ) from None


def _stream_error(cfg) -> None:
    """The ConfigError a stream gives for its missing data folder (with the layout it expects), if it gives one
    before it needs transforms; nothing otherwise."""
    from cil import registry

    try:
        registry.stream_builder(str(cfg.stream.name))(cfg.stream, None)
    except ConfigError:
        raise
    except Exception:  # a stream that needs more before it looks at its folder: the generic line follows
        return


def _check_input_size(cfg) -> None:
    """An input size whose first batch of images alone cannot fit in this machine's memory (a mistyped
    ``backbone.image_size=100000``) is one line now, not a MemoryError after the model is built."""
    size = cfg.backbone.image_size
    if size is None:
        return
    batch = max(int(cfg.stream.batch_size), int(cfg.stream.eval_batch_size))
    needed = batch * 3 * int(size) ** 2 * 4  # one float32 batch of inputs, before any activation
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if needed > available:
        raise ConfigError(
            f"backbone.image_size={size}: one batch of {batch} inputs alone takes {needed / 2**30:.1f} GiB, more than "
            f"the {available / 2**30:.1f} GiB of memory available; use a smaller backbone.image_size or batch size"
        )


def _complete(run_dir: Path) -> bool:
    from cil.runs import RunFolder

    try:
        return RunFolder(run_dir).is_complete()
    except (OSError, ValueError):
        return False


def _report(args: argparse.Namespace) -> int:
    from cil.runs import compare, load_run, over_seeds, plot_comparison

    if args.plot is not None:  # a plot path that cannot be written is said before any table
        _check_plot_path(Path(args.plot))
    runs, skipped = [], []
    for path in args.runs:
        try:
            runs.append(load_run(path))
        except FileNotFoundError as e:  # a run stopped before its first session's results: skipped, said so
            skipped.append(str(e))
        except (OSError, ValueError, KeyError) as e:  # a truncated summary.json or table: the other runs still count
            skipped.append(f"'{path}' has unreadable results ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    for note in skipped:
        print(f"[cil] skipped: {note}", file=sys.stderr)
    if not runs:
        raise ConfigError("no run folder with results among " + ", ".join(map(str, args.runs)))
    table = compare(runs)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    seeds = over_seeds(runs)
    if (seeds["seeds"].map(len) > 1).any():  # runs of one config over several seeds: as papers report them
        columns = ["seeds", "avg_incremental_acc", "last_acc", "forgetting"]
        print("\nmean ± std over seeds (%), runs whose configs differ in the seed alone:")
        print(seeds[columns].to_string())
    plot = Path(args.plot) if args.plot else runs[0].path.parent / "cil_report.png"
    try:
        print(f"[cil] comparison plot: {plot_comparison(runs, plot)}")
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        print(f"[cil] comparison plot not written to {plot} ({why}); give a writable path with --plot", file=sys.stderr)
        return 2 if args.plot else 0  # the default place may be a read-only copy of the runs: the tables stand
    return 0


def _check_plot_path(plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if plot.is_dir():
        raise ConfigError(f"--plot '{plot}' is a folder; give a file name such as {plot / 'report.png'}")
    if plot.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"--plot '{plot}': unknown image format '{plot.suffix}'; use one of {sorted(formats)}")


if __name__ == "__main__":
    sys.exit(main())
