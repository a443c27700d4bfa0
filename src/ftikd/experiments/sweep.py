"""``ftikd sweep``: a grid of distillation runs, each an independent job in a results database.

The grid is methods (with options) x teacher/student pairs x budgets n x seeds x learning rates
(METHODS.md §3.1). Each run is keyed by a hash of what defines its result (dataset, teacher,
student, method and the options given, n, seed, LR, view, the train settings that differ from the
defaults), never by paths or devices, so adding a method or a budget to a sweep re-runs nothing.
Teachers train once per pair into ``<out>/teachers/`` under a file lock, and every run of one
teacher shares one teacher-output store ``<out>/stores/``, so each sample's teacher output is paid
once per (teacher, view) whichever run needs it first. The LR is chosen per (method, pair, n) by
the mean validation accuracy over seeds and the test accuracy is reported at that LR ([S0] A.1);
with ``choose_lr_at`` the choice is made at one budget and carried to the others (``lr_choice``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftikd.engine.config import NOT_RESULT_FIELDS, TrainConfig
from ftikd.errors import FtikdError
from ftikd.experiments.config_check import check_run_config
from ftikd.experiments.db import JobRow, ResultsDB
from ftikd.experiments.lr_choice import runnable_jobs
from ftikd.experiments.teacher_outputs import with_feature_names
from ftikd.experiments.tracking import check_trackers, parse_track
from ftikd.options import parse_method_spec
from ftikd.teacher.train import TeacherTrainConfig

# Train settings kept out of run keys: those that do not change the result, and the LR, which is
# a key field of its own.
_NOT_IDENTITY = NOT_RESULT_FIELDS | {"lr"}


@dataclass(frozen=True)
class MethodSpec:
    """A method of the grid: registry name, the options given (others stay at their defaults)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Display name with options, e.g. ``ckd[k=3]`` (as :func:`ftikd.analysis.summary.method_label`)."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}[{opts}]" if opts else self.name

    def teacher_features(self) -> tuple[str, ...]:
        """The teacher features this method reads from the store (its store is chosen by them)."""
        from ftikd.methods import build_method

        return tuple(build_method(self.name, **self.options).teacher_features)

    def resolved_options(self) -> dict[str, Any]:
        """Every Config field of the method, the given options over its defaults.

        Run keys hash this, not the options as typed: a run stored before a default changed must not be
        reused for the new default (PKT's ``on`` is the case that showed the hazard).
        """
        from ftikd.methods import build_method

        return dataclasses.asdict(build_method(self.name, **self.options).config)

    @classmethod
    def parse(cls, raw: Any, source: str) -> MethodSpec:
        """``"kd"``, ``"ckd:k=3,form=kl"`` or ``{name: ckd, options: {k: 3}}``."""
        if isinstance(raw, str):
            return cls(*parse_method_spec(raw))
        if isinstance(raw, dict) and set(raw) <= {"name", "options"} and isinstance(raw.get("name"), str):
            options = raw.get("options") or {}
            if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
                raise FtikdError(
                    f"{source}: options of method {raw['name']!r} must map names to values (YAML reads "
                    "a bare on/off/yes/no key as a boolean: quote it)"
                )
            return cls(raw["name"], dict(options))
        raise FtikdError(
            f"{source}: a method must be a name, 'name:k=v,...' or {{name, options}}, got {raw!r}"
        )


@dataclass(frozen=True)
class PairSpec:
    """A teacher/student pair; the teacher is trained by the sweep unless ``teacher_path`` is given."""

    teacher: str
    student: str
    teacher_path: str | None = None

    @property
    def name(self) -> str:
        return f"{self.teacher}->{self.student}"

    @classmethod
    def parse(cls, raw: Any, source: str) -> PairSpec:
        """``"wrn_40_2->wrn_16_2"`` or ``{teacher, student, teacher_path}``."""
        if isinstance(raw, str) and "->" in raw:
            teacher, _, student = raw.partition("->")
            return cls(teacher.strip(), student.strip())
        if isinstance(raw, dict) and {"teacher", "student"} <= set(raw) <= {
            "teacher",
            "student",
            "teacher_path",
        }:
            return cls(str(raw["teacher"]), str(raw["student"]), raw.get("teacher_path"))
        raise FtikdError(f"{source}: a pair must be 'teacher->student' or {{teacher, student}}, got {raw!r}")


@dataclass
class SweepConfig:
    """A whole grid; ``train`` and ``teacher_train`` override TrainConfig / TeacherTrainConfig fields."""

    name: str = "sweep"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    pairs: list[PairSpec] = field(default_factory=lambda: [PairSpec("resnet14", "resnet8")])
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("ce"), MethodSpec("kd")])
    budgets: list[int] = field(default_factory=lambda: [500])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    lrs: list[float] = field(default_factory=lambda: [0.05])
    choose_lr_at: int | None = None  # run every LR at this budget only; carry its choice to the others
    view: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    teacher_train: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    db: str | None = None
    targets: list[float] = field(default_factory=list)
    scenario: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    track: str = ""  # every run's live tracking (RunConfig.track); not part of the run keys

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"results/sweeps/{self.name}")

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db else self.out_dir / "results.sqlite"

    def train_config(self, lr: float) -> TrainConfig:
        return TrainConfig(**{**self.train, "lr": lr})


def sweep_from_dict(raw: Any, source: str = "sweep") -> SweepConfig:
    """Build and check a :class:`SweepConfig` from a YAML/JSON mapping; a bad key or value is a user error."""
    if not isinstance(raw, dict):
        raise FtikdError(f"{source} must be a mapping of sweep settings")
    check_run_config({k: v for k, v in raw.items() if k not in ("pairs", "methods")}, SweepConfig, source)
    check_run_config(raw.get("train") or {}, TrainConfig, f"{source}: train")
    check_run_config(raw.get("teacher_train") or {}, TeacherTrainConfig, f"{source}: teacher_train")
    values = dict(raw)
    for key in ("pairs", "methods", "budgets", "seeds", "lrs"):
        if key in values and not values[key]:
            raise FtikdError(f"{source}: {key!r} must be a non-empty list")
    for key in ("pairs", "methods"):
        if not isinstance(values.get(key, []), list):
            raise FtikdError(f"{source}: {key!r} must be a list")
    if "pairs" in values:
        values["pairs"] = [PairSpec.parse(p, source) for p in values["pairs"]]
    if "methods" in values:
        values["methods"] = [MethodSpec.parse(m, source) for m in values["methods"]]
    cfg = SweepConfig(**values)
    for key in ("budgets", "seeds", "lrs", "targets"):
        if len(set(getattr(cfg, key))) != len(getattr(cfg, key)):
            raise FtikdError(f"{source}: {key!r} repeats a value (each value is one grid point)")
    labels = [m.label for m in cfg.methods]
    if (
        len(set(labels)) != len(labels)
        or min(cfg.lrs) <= 0
        or "lr" in cfg.train
        or "out" in cfg.teacher_train
    ):
        raise FtikdError(
            f"{source}: methods must be distinct, LRs positive, and the LR is set by 'lrs' (not train.lr)"
        )
    if cfg.choose_lr_at is not None and cfg.choose_lr_at not in cfg.budgets:
        raise FtikdError(
            f"{source}: choose_lr_at ({cfg.choose_lr_at}) must be one of the budgets {cfg.budgets}"
        )
    try:
        cfg.train_config(cfg.lrs[0])
        TeacherTrainConfig(**cfg.teacher_train)
    except (TypeError, ValueError) as exc:
        raise FtikdError(f"{source}: bad train or teacher_train value ({exc})") from None
    return cfg


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML (or JSON) file; a missing or malformed file is a user error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FtikdError(f"sweep file {path} does not exist; pass a YAML file or a preset name")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FtikdError(
            f"sweep file {path} is not valid YAML ({exc.__class__.__name__}); fix its syntax"
        ) from None


def load_sweep(source: str, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """A sweep from a YAML path or a preset name, with ``overrides`` (top-level keys; ``train`` merges)."""
    from ftikd.experiments.presets import load_preset, preset_names

    if source in preset_names():
        raw, where = load_preset(source), f"preset {source}"
    elif source.endswith((".yaml", ".yml", ".json")) or Path(source).exists():
        raw, where = load_yaml(source), f"sweep file {source}"
    else:
        raise FtikdError(
            f"unknown preset {source!r}; choose one of {', '.join(preset_names())} or a YAML path"
        )
    if not isinstance(raw, dict):
        raise FtikdError(f"{where} must be a mapping of sweep settings")
    for key, value in (overrides or {}).items():
        if key in ("train", "teacher_train"):
            raw[key] = {**(raw.get(key) or {}), **value}
        else:
            raw[key] = value
    return sweep_from_dict(raw, where)


def stable_hash(payload: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``payload`` (sorted keys): the same config, the same key."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def teacher_identity(cfg: SweepConfig, pair: PairSpec) -> dict[str, Any]:
    """What defines a teacher: its checkpoint fingerprint, or the arch and recipe the sweep trains it with."""
    if pair.teacher_path:
        from ftikd.teacher import read_checkpoint_meta

        return {"fingerprint": read_checkpoint_meta(pair.teacher_path)["fingerprint"]}
    recipe = {k: v for k, v in cfg.teacher_train.items() if k not in ("device", "data_dir")}
    return {"arch": pair.teacher, "dataset": cfg.dataset, "recipe": recipe}


def teacher_path(cfg: SweepConfig, pair: PairSpec) -> Path:
    """The checkpoint a pair's runs use: the given one, or ``<out>/teachers/<dataset>-<arch>-<id>``."""
    if pair.teacher_path:
        return Path(pair.teacher_path)
    ident = stable_hash(teacher_identity(cfg, pair), 8)
    return cfg.out_dir / "teachers" / f"{cfg.dataset}-{pair.teacher}-{ident}.safetensors"


def ensure_teacher(path: str | Path, recipe: dict[str, Any] | None) -> Path:
    """Train the teacher at ``path`` unless it exists, under an exclusive file lock (one trainer per file).

    A second sweep (or worker) asking for the same teacher waits on the lock and then finds it.
    """
    path = Path(path)
    if path.exists() or recipe is None:
        return path
    from ftikd.teacher.train import train_teacher

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            train_teacher(TeacherTrainConfig(**recipe, out=str(path)), progress=False)
    return path


def check_methods(cfg: SweepConfig, source: str) -> None:
    """Every method is registered and takes its options; refuse the sweep with one line otherwise."""
    from ftikd.methods import available_methods, build_method

    known = available_methods()
    for spec in cfg.methods:
        if spec.name not in known:
            raise FtikdError(
                f"{source}: method {spec.name!r} is not registered in this ftikd (registered: "
                f"{', '.join(known)}); drop it with --methods or add the method"
            )
        build_method(spec.name, **spec.options)


def expand(cfg: SweepConfig) -> list[JobRow]:
    """Every run of the grid as a database job: key, grouping columns and the run config to execute."""
    jobs = []
    for pair in cfg.pairs:
        ident = teacher_identity(cfg, pair)
        teacher = {
            "path": str(teacher_path(cfg, pair)),
            "recipe": None if pair.teacher_path else _teacher_recipe(cfg, pair),
            "store": str(
                cfg.out_dir / "stores" / f"{cfg.dataset}-{pair.teacher}-{stable_hash(ident, 8)}.sqlite"
            ),
            "identity": ident,
        }
        for n, seed, spec, lr in itertools.product(cfg.budgets, cfg.seeds, cfg.methods, cfg.lrs):
            jobs.append(_job(cfg, pair, teacher, spec, n, seed, float(lr)))
    return jobs


def _job(
    cfg: SweepConfig, pair: PairSpec, teacher: dict[str, Any], spec: MethodSpec, n: int, seed: int, lr: float
) -> JobRow:
    """One run: its identity (hashed into the key) and the RunConfig dict a worker executes."""
    train = dataclasses.asdict(cfg.train_config(lr))
    defaults = dataclasses.asdict(TrainConfig())
    scenario = {"scenario": cfg.scenario} if cfg.scenario else {}
    identity = {
        "dataset": cfg.dataset,
        "teacher": teacher["identity"],
        "student": pair.student,
        "method": spec.name,
        "options": spec.resolved_options(),
        "n": n,
        "seed": seed,
        "lr": lr,
        "view": cfg.view,
        "train": {k: v for k, v in train.items() if k not in _NOT_IDENTITY and v != defaults[k]},
        **scenario,
    }
    key = stable_hash(identity)
    run = {
        "teacher": teacher["path"],
        "dataset": cfg.dataset,
        "data_dir": cfg.data_dir,
        "student": pair.student,
        "method": spec.name,
        "method_options": spec.options,
        "calls": n,
        "seed": seed,
        "view": cfg.view,
        "store": str(with_feature_names(Path(teacher["store"]), spec.teacher_features())),
        "out": str(cfg.out_dir / "runs" / key),
        "train": train,
        "track": cfg.track,
        **scenario,
    }
    config = {"run": run, "teacher_recipe": teacher["recipe"], "identity": identity}
    return JobRow(key, spec.label, spec.name, spec.options, pair.name, cfg.dataset, n, seed, lr, config)


def _teacher_recipe(cfg: SweepConfig, pair: PairSpec) -> dict[str, Any]:
    """TeacherTrainConfig fields for a pair's teacher (its device follows the runs' device)."""
    device = cfg.train.get("device", "cpu")
    return {
        "dataset": cfg.dataset,
        "data_dir": cfg.data_dir,
        "arch": pair.teacher,
        "device": device,
        **cfg.teacher_train,
    }


def prepare(cfg: SweepConfig, source: str = "sweep") -> list[JobRow]:
    """Check the whole sweep (methods, budgets, pairs) and expand it, before anything is written."""
    from ftikd.data import load_dataset, validate_budget
    from ftikd.experiments.run import RunConfig
    from ftikd.models import available_models

    check_methods(cfg, source)
    check_trackers(parse_track(cfg.track))
    if cfg.scenario and "scenario" not in {f.name for f in dataclasses.fields(RunConfig)}:
        raise FtikdError(f"{source}: this ftikd's runs do not apply scenarios yet; remove the scenario key")
    if set(cfg.scenario) - {"label_noise", "imbalance"}:
        raise FtikdError(f"{source}: scenario keys are label_noise (sigma) and imbalance (gamma)")
    for pair in cfg.pairs:
        for arch in (pair.teacher, pair.student):
            if arch not in available_models():
                raise FtikdError(
                    f"{source}: unknown model {arch!r}; choose one of {', '.join(available_models())}"
                )
    total = load_dataset(cfg.dataset, cfg.data_dir).train_images.shape[0]
    for n in cfg.budgets:
        validate_budget(total, n)
    return expand(cfg)


def run_sweep(
    cfg: SweepConfig,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    progress: bool = True,
    retry_failed: bool = False,
) -> dict[str, int]:
    """Register the grid in the results database, train missing teachers, run what is left; return counts."""
    from ftikd.experiments.executors import ExecOptions, run_jobs

    if workers < 1:
        raise FtikdError(f"workers must be at least 1, got {workers}")
    if executor not in ("local", "ray"):
        raise FtikdError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    jobs = prepare(cfg, f"sweep {cfg.name}")
    opts = ExecOptions(workers=workers, progress=progress, retry_failed=retry_failed)
    registered = -1
    while True:  # one pass without choose_lr_at; with it, a further pass as LR choices complete
        with ResultsDB(cfg.db_path) as db:
            done = db.rows(cfg.name, "done") if cfg.choose_lr_at is not None else []
            now, waiting = runnable_jobs(jobs, done, cfg.choose_lr_at)
            if len(now) == registered:
                return {**db.counts(cfg.name), "waiting": waiting}
            db.add_jobs(cfg.name, now)
            db.drop_unlisted(cfg.name, {j.key for j in now})
        if registered < 0:
            for job in {j.config["run"]["teacher"]: j for j in jobs}.values():
                ensure_teacher(job.config["run"]["teacher"], job.config["teacher_recipe"])
        registered = len(now)
        run_jobs(cfg.db_path, cfg.name, executor, opts, address)
