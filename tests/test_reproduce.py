"""The reproduction guide, run: every ``cil run`` command in ``benchmarks/reproduce.md`` (the file is the source) runs
through the command line to the end of its first training step.

Each command's ``/data/...`` folders are replaced by data written here in the data set's real on-disk format at
its real number of classes (the paper-scale rehearsal's writers), FSCIL index lists in CEC's format, ZSCL's
reference images and a Conceptual Captions TSV. What the test adds to a command, and why:
``backbone.pretrained=false`` (no network for weights), ``stream.verify_checksums=false`` (the files are written
here, not the published ones), a batch of 2 and no loader workers (a tiny cut, as the rehearsal's), CPU, and an
output folder. Everything else — the config, its split, shots, transforms, backbone at its real input size, the
strategy's checks — is the command's own.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from cil.config import load_config, split_sizes
from tests import writers as W
from tests.helpers import ROOT

GUIDE = ROOT / "benchmarks" / "reproduce.md"
COMMANDS = [shlex.split(c) for c in re.findall(r"`(cil run [^`]+)`", GUIDE.read_text())]
NAMES = [c[2].removeprefix("configs/") for c in COMMANDS]
BATCH = 2


def test_the_guide_has_only_commands_a_user_can_copy():
    """Placeholders (``<setting>``, ``...``) cannot be pasted into a shell: the guide spells each command out."""
    assert COMMANDS
    assert not [c for c in COMMANDS if any("<" in a or "..." in a or not a.isprintable() for a in c)]


def test_the_guide_covers_every_paper_config():
    paper = {
        str(p.relative_to(ROOT / "configs"))
        for p in (ROOT / "configs").glob("*/*.yaml")
        if p.parent.name != "base" and not any(s in p.stem for s in ("digits", "fashion_mnist"))  # not paper configs
    }
    assert paper <= set(NAMES), sorted(paper - set(NAMES))


def test_readme_commands_validate():
    """The README's commands for paper configs (multi-device ones cannot run here) at least load and validate."""
    found = [shlex.split(c) for c in re.findall(r"(cil run configs/\S+\.yaml(?: [\w.]+=\S+)*)", _readme())]
    readme = [c for c in found if c[2].removeprefix("configs/") in NAMES]
    assert readme
    for command in readme:
        load_config(ROOT / command[2], command[3:])


def _readme() -> str:
    return (ROOT / "README.md").read_text()


class FirstStep(Exception):
    """Raised at the end of the first training step: the command has run as far as the test needs."""


class StopAfterFirstStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        raise FirstStep(None if loss is None else float(loss))


class DataFolders:
    """Data written once per (data set, images per class) for the whole module; references and captions once."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}

    def _once(self, key, write) -> Path:
        if key not in self.made:
            path = self.root / "-".join(map(str, key))
            write(path)
            self.made[key] = path
        return self.made[key]

    def data(self, stream_name: str, per_class: int) -> Path:
        from benchmarks.paper_scale import write_data

        cfg = SimpleNamespace(stream=SimpleNamespace(name=stream_name))
        return self._once((stream_name, per_class), lambda p: write_data(cfg, p, per_class))

    def index(self, cfg, per_class: int) -> Path:
        base, way = split_sizes(cfg.stream.split)
        data = self.data(cfg.stream.name, per_class)
        entries = W.fscil_index_entries(cfg.stream.name, data, base, way, 5)
        return self._once(("index", cfg.stream.name, base, way), lambda p: W.write_fscil_index(p, entries))

    def reference_images(self) -> Path:
        def write(path):
            for k in range(3):
                W.image(path / f"n0000000{k}" / f"n0000000{k}_{k}.JPEG", 40 * k)

        return self._once(("reference-images",), write)

    def reference_captions(self, name: str) -> Path:
        """Conceptual Captions as the guide names it: the raw TSV (caption, URL) or gather_cc.py's ``*_output.csv``
        (tab-separated, header ``title  filepath``: the captions of the images that downloaded)."""

        def write(path):
            path.mkdir(parents=True)
            if name.endswith("_output.csv"):
                rows = ["title\tfilepath", *(f"a photo of thing {k}\tvalidation/{k}.jpg" for k in range(4))]
            else:
                rows = [f"a photo of thing {k}\thttps://example.com/{k}.jpg" for k in range(4)]
            (path / name).write_text("\n".join(rows) + "\n")

        return self._once(("reference-captions", name), write) / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return DataFolders(tmp_path_factory.mktemp("data"))


def local_command(command: list[str], folders: DataFolders, out: Path) -> list[str]:
    """The guide's command with its /data folders written here, plus the test's additions (module docstring)."""
    overrides = command[3:]
    cfg = load_config(ROOT / command[2], overrides)
    per_class = max(cfg.stream.shots or 0, cfg.stream.base_shots or 0, 5 if cfg.stream.index_dir else 2)
    where = {
        "stream.data_root": lambda _: folders.data(cfg.stream.name, per_class),
        "stream.unlabelled_root": lambda _: folders.data(cfg.stream.unlabelled, 1),
        "stream.index_dir": lambda _: folders.index(cfg, per_class),
        "strategy.reference_images": lambda _: folders.reference_images(),
        "strategy.reference_captions": lambda value: folders.reference_captions(Path(value).name),
    }
    local = []
    for override in overrides:
        key, _, value = override.partition("=")
        if value.startswith("/data/"):
            assert key in where, f"the guide points {key} at {value}: the test has no writer for it"
            value = str(where[key](value))
        local.append(f"{key}={value}")
    local += [
        "backbone.pretrained=false",
        "stream.verify_checksums=false",
        "stream.num_workers=0",
        f"stream.batch_size={BATCH}",
        f"stream.eval_batch_size={BATCH}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run.output_dir={out}",
    ]
    if cfg.strategy.name == "zscl":
        local += [f"strategy.reference_batch_size={BATCH}", "strategy.reference_num_workers=0"]
    return [command[0], command[1], str(ROOT / command[2]), *local]


def release_memory() -> None:
    """Each command builds a paper-size model (ViT-B/16 student and teacher: 5-8 GB at peak): collect the cycles it
    left and hand freed heap back, or 40 commands in one process fragment the heap past this machine's 24 GB."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_to_first_step(argv: list[str], monkeypatch) -> tuple[int, float | None]:
    import cil.session
    from cil.cli import main

    make_trainer = cil.session.make_trainer

    def with_stop(cfg, root=None, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StopAfterFirstStep()]
        return make_trainer(cfg, root, **kwargs)

    monkeypatch.setattr(cil.session, "make_trainer", with_stop)
    try:
        code = main(argv[1:])
    except FirstStep as step:
        return 0, step.args[0]
    raise AssertionError(f"'{shlex.join(argv)}' ended with exit code {code} before its first training step")


DEFAULT_SUITE = {"mamba_fscil/cifar100_fscil.yaml"}  # cheap (ResNet-12 at 32 px) and an FSCIL index-list command
CASES = [pytest.param(c, id=n, marks=() if n in DEFAULT_SUITE else pytest.mark.slow) for c, n in zip(COMMANDS, NAMES)]


@pytest.mark.parametrize("command", CASES)
def test_guide_command_runs_to_its_first_training_step(command, folders, tmp_path, monkeypatch):
    argv = local_command(command, folders, tmp_path / "runs")
    torch.manual_seed(0)
    try:
        _, loss = run_to_first_step(argv, monkeypatch)
    finally:
        release_memory()
    assert loss is None or torch.isfinite(torch.tensor(loss)), loss
    assert [p.parent.name for p in (tmp_path / "runs").rglob("config.yaml")], "no run folder was written"
