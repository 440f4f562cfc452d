"""The run configuration: typed sections read from TOML files and `--section.key VALUE` overrides.

    cfg = load_run_config(["--config", "engine/configs/t5-small.toml", "--run.max_steps", "100"])

A run config is a file a user can read and diff; every key has a type and a commented default here.
An unknown key or a value of the wrong type is one `ValueError` naming the key (and the file), raised
before anything expensive starts. Lists take several words on the command line:
`--data.paths a.json.gz 'c4/*.json.gz'`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import tomllib
import typing
from dataclasses import dataclass, field

from engine.tokenizer_files import BYT5

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


@dataclass
class RunSection:
    dir: str = "runs/tiny"  # checkpoints, metrics.jsonl, TensorBoard; rerunning on it resumes
    max_steps: int = 500  # optimizer steps (skipped non-finite steps count too: they consume data)
    seed: int = 0
    log_every: int = 10  # steps between metrics.jsonl records (and progress-bar refreshes)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    engine: str = "auto"  # auto (deepspeed under its launcher or on a GPU) | deepspeed | local
    threads: int = 0  # torch intra-op threads per process; 0 = cores / local processes
    # auto: on for CPU runs (bit-identical reruns at any thread count, about free there), off on GPUs |
    # on (also on GPUs: PyTorch's deterministic algorithms, the attention kernel's deterministic bias
    # gradient) | off
    deterministic: str = "auto"
    # auto: on for CUDA runs, off on the CPU (minutes of inductor start-up for a few % there) | on | off:
    # the model's forward and backward under torch.compile (DeepSpeed: its engine's own compile hook)
    compile: str = "auto"
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" compiles in seconds (tests)
    demo: bool = True  # fill in a few corrupted sentences at the end of the run
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look the device up (none on CPU)
    max_nonfinite_in_a_row: int = 5  # stop the run after this many skipped steps in a row
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True  # also log to TensorBoard when it is installed


@dataclass
class ModelSection:
    preset: str = "tiny"  # models.config.T5Config.from_preset name
    vocab_size: int = 0  # 0 = the tokenizer's size rounded up to a multiple of 128 (T5 uses 32128)
    dropout_rate: float = -1.0  # -1 = the preset's value
    kernel_backend: str = "auto"  # auto | torch | triton
    gradient_checkpointing: bool = False  # recompute each block in backward (activation checkpointing)


@dataclass
class DataSection:
    paths: list[str] = field(default_factory=list)  # C4-style JSON lines (globs ok); empty = built-in corpus
    tokenizer: str = ""  # SentencePiece model or "byt5"; "" = built-in tokenizer (built-in corpus) or required
    objective: str = "span_corruption"  # any objective of engine/data/objectives.py
    input_length: int = 128  # encoder tokens per row (512 in the paper)
    target_length: int = 0  # 0 = derived from the objective (114 for 512 with span corruption)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    pack: bool = True  # several examples per row with segment ids and positions
    shuffle_buffer: int = 1000  # documents held for shuffling
    num_workers: int = 0  # DataLoader worker processes per rank (0: in the training process); resume is exact
    strict: bool = False  # raise on a corrupt shard / bad line instead of skipping, counting and reporting it


@dataclass
class BatchSection:
    micro_batch_size: int = 16  # rows per device per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro * accum * world size


@dataclass
class OptimSection:
    name: str = "adafactor"  # adafactor (T5's settings) | adamw (step scaled by parameter RMS)
    lr: float = 0.01  # adafactor: T5's 1/sqrt(10^4) plateau; adamw with RMS scaling: ~2e-2 (nanoT5)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    eps: float = 1e-8  # adamw only
    scale_by_param_rms: bool = True  # adamw: multiply the step by max(1e-3, RMS(param)) as Adafactor does
    decay_rate: float = 0.8  # adafactor: beta2_t = 1 - t^-0.8
    clip_threshold: float = 1.0  # adafactor update clipping (RMS of the update)
    factored: bool = True  # adafactor: row/column second moments for 2-D parameters
    clip_grad_norm: float = 0.0  # global gradient-norm clipping; 0 = off (T5 relies on update clipping)
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2); T5X uses 1e-4


@dataclass
class ScheduleSection:
    name: str = "inverse_sqrt"  # inverse_sqrt | cosine | linear | constant
    warmup_steps: int = 100  # inverse_sqrt: T5 holds the lr until here then decays 1/sqrt(step)
    warmup_shape: str = "constant"  # inverse_sqrt: constant (T5) | linear ramp; others always linear
    final_lr_fraction: float = 0.0  # cosine / linear: lr at max_steps as a fraction of optim.lr


@dataclass
class CheckpointSection:
    every: int = 250  # steps between checkpoints; the last step always saves
    keep_last: int = 3  # older checkpoints are deleted after a new one is complete
    resume: bool = True  # resume from run.dir/checkpoints/latest when it exists
    # a damaged latest checkpoint: fallback (resume from the newest one that verifies, and say which) | error
    on_damaged: str = "fallback"


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0  # 0-3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer states and step on the CPU
    offload_params: bool = False  # ZeRO 3: parameters on the CPU
    reduce_bucket_size: int = 50_000_000
    overlap_comm: bool = True


# `t5forge finetune`'s own sections ([finetune] and [[tasks]]; engine/finetune.py reads them).
FINETUNE_METHODS = ("full", "adapters", "gradual_unfreezing")


@dataclass
class FinetuneSection:
    init: str = ""  # Hugging Face directory, our run dir / checkpoint (run/checkpoints/step_N), or "preset:NAME"
    tokenizer: str = ""  # SentencePiece model or "byt5"; "" = the init's own (engine/tokenizer_files.py)
    method: str = "full"  # full | adapters | gradual_unfreezing
    d_adapter: int = 64  # adapters: inner size of each dense-ReLU-dense adapter
    unfreeze_every: int = 100  # gradual_unfreezing: steps between unfreezing one more block per stack
    mixture: str = "proportional"  # proportional | temperature | equal (engine/mixtures.py)
    mixture_limit: int = 0  # examples-proportional limit K; 0 = none
    temperature: float = 1.0  # temperature mixing: rates ** (1/T), renormalised
    max_input_length: int = 512  # encoder tokens per example (longer inputs are cut, EOS kept)
    max_target_length: int = 128
    eval_every: int = 100  # steps between evaluations (and at the last step)
    eval_limit: int = 0  # examples per task per evaluation; 0 = all
    eval_metric: str = ""  # "task/metric" that picks the best model; "" = the first score reported
    eval_batch_size: int = 32
    eval_max_length: int = 0  # tokens generated at evaluation; 0 = max_target_length
    num_beams: int = 1  # evaluation decoding: 1 = greedy; beams use T5X's length penalty, alpha 0.6
    task_modules: list[str] = field(default_factory=list)  # modules / .py files that register_task() your tasks


@dataclass
class TaskEntry:
    name: str = ""  # a registered task (engine/tasks)
    train: list[str] = field(default_factory=list)  # files or data directories; empty = eval only
    eval: list[str] = field(default_factory=list)
    train_split: str = "train"  # split looked up when `train` is a directory
    eval_split: str = "validation"
    limit: int = 0  # training examples used (the first ones); 0 = all
    eval_skip: int = 0  # evaluation starts after this many examples (one file split in two for a demo)
    # Unsupervised source (multi-task pretraining): an objective of engine/data/objectives.py applied to the
    # C4-style JSON lines in `train` (globs ok), examples cut as in pretraining; `name` is then free.
    objective: str = ""
    size: int = 0  # objective sources: examples the mixing rate counts (with finetune.mixture_limit K: >= K)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Allowed values of string keys; checked once in `validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": ("auto", "cpu", "cuda"),
    "run.deterministic": ("auto", "on", "off"),
    "run.compile": ("auto", "on", "off"),
    "checkpoint.on_damaged": ("fallback", "error"),
    "run.engine": ("auto", "deepspeed", "local"),
    "model.kernel_backend": ("auto", "torch", "triton"),
    "optim.name": ("adafactor", "adamw"),
    "schedule.name": ("inverse_sqrt", "cosine", "linear", "constant"),
    "schedule.warmup_shape": ("constant", "linear"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
}
POSITIVE = ("run.max_steps", "run.log_every", "data.input_length", "batch.micro_batch_size",
            "batch.grad_accum", "checkpoint.every", "checkpoint.keep_last", "run.max_nonfinite_in_a_row")
NON_NEGATIVE = ("run.threads", "model.vocab_size", "data.target_length", "data.shuffle_buffer", "data.num_workers", "optim.lr", "optim.weight_decay", "optim.clip_grad_norm", "optim.z_loss",
                "schedule.warmup_steps", "run.peak_tflops", "deepspeed.reduce_bucket_size")


def _field_types(section_cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _convert(key: str, value, typ, where: str):
    """Coerce a TOML value or a list of command-line words to `typ`, or raise naming the key."""
    def bad(expected: str):
        return ValueError(f"{where}config key '{key}': expected {expected}, got {value!r}")

    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        items = value if isinstance(value, list) else [value]
        return [_convert(key, item, inner, where) for item in items]
    if isinstance(value, list):  # command-line words for a scalar key
        if len(value) != 1:
            raise bad("one value")
        value = value[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise bad("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise TypeError(f"unsupported config type {typ} for {key}")


def set_key(cfg: RunConfig, dotted: str, value, where: str = "") -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    if not key or section_name not in sections:
        raise ValueError(f"{where}unknown config key '{dotted}' (sections: {', '.join(sections)})")
    section = getattr(cfg, section_name)
    types = _field_types(type(section))
    if key not in types:
        raise ValueError(f"{where}unknown config key '{dotted}' (keys of [{section_name}]: {', '.join(types)})")
    setattr(section, key, _convert(dotted, value, types[key], where))


def set_fields(obj, table: dict, where: str, prefix: str) -> None:
    """Set the dataclass `obj`'s fields from a TOML table (typed, unknown keys refused), as every section is."""
    types = _field_types(type(obj))
    for key, value in table.items():
        if key not in types:
            raise ValueError(f"{where}unknown config key '{prefix}{key}' (keys: {', '.join(types)})")
        if types[key] == list[str] and isinstance(value, str):
            value = [value]
        setattr(obj, key, _convert(f"{prefix}{key}", value, types[key], where))


def read_toml(path: str | pathlib.Path) -> dict:
    """A config file's TOML document; a missing file or invalid TOML is a one-line error."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path}: is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: config file is not UTF-8 text (byte {err.start}; a binary file?)") from None
    if not text.strip():
        raise ValueError(f"{path}: config file is empty (leave out --config to use the defaults)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None


def apply_sections(cfg: RunConfig, doc: dict, where: str = "") -> None:
    """Set every `[section] key = value` of `doc` on `cfg`; `where` (e.g. "FILE: ") starts each error."""
    for section_name, table in doc.items():
        if not isinstance(table, dict):
            raise ValueError(f"{where}top-level key '{section_name}' must be a [section] table")
        for key, value in table.items():
            set_key(cfg, f"{section_name}.{key}", value, where)


# Input paths a config file names resolve against the file's own directory, so a config runs from any
# working directory; run.dir (an output) and every command-line override stay relative to the working
# directory. Absolute paths, `~`, "preset:..." and the tokenizer name "byt5" are kept as they are.
INPUT_PATH_KEYS = ("data.paths", "data.tokenizer")


def resolve_against(base: pathlib.Path, value):
    """`value` (a path or a list of them) made relative to `base` when it is a relative path."""
    if isinstance(value, list):
        return [resolve_against(base, v) for v in value]
    if (not isinstance(value, str) or not value or value.startswith(("~", "preset:")) or value == BYT5
            or pathlib.Path(value).is_absolute()):
        return value
    return str(base / value)


def resolve_input_paths(doc: dict, base: pathlib.Path, keys=INPUT_PATH_KEYS) -> None:
    """Rewrite, in place, the `keys` ("section.key") of a TOML document against `base`."""
    for dotted in keys:
        section, _, key = dotted.partition(".")
        table = doc.get(section)
        if isinstance(table, dict) and key in table:
            table[key] = resolve_against(base, table[key])


def apply_toml(cfg: RunConfig, path: str | pathlib.Path) -> None:
    doc = read_toml(path)
    resolve_input_paths(doc, pathlib.Path(path).parent)
    apply_sections(cfg, doc, f"{pathlib.Path(path)}: ")


def parse_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Split argv into `--config` files and `(key, words)` overrides, in order.

    `--a.b x y` and `--a.b=x` are both accepted; a value cannot start with `--`.
    """
    configs: list[str] = []
    overrides: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are --config FILE and --section.key VALUE")
        name, eq, inline = arg[2:].partition("=")
        words = [inline] if eq else []
        i += 1
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            words.append(argv[i])
            i += 1
        if name == "config":
            if len(words) != 1:
                raise ValueError("--config takes exactly one file")
            configs.append(words[0])
        elif "." not in name:
            raise ValueError(f"unknown option '--{name}': overrides look like --section.key VALUE")
        else:
            if not words:
                raise ValueError(f"config key '{name}': missing value")
            overrides.append((name, words))
    return configs, overrides


def validate(cfg: RunConfig) -> None:
    def get(dotted: str):
        section, key = dotted.split(".")
        return getattr(getattr(cfg, section), key)

    for dotted, allowed in CHOICES.items():
        if get(dotted) not in allowed:
            raise ValueError(f"config key '{dotted}': {get(dotted)!r} is not one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if get(dotted) <= 0:
            raise ValueError(f"config key '{dotted}': must be > 0, got {get(dotted)}")
    for dotted in NON_NEGATIVE:
        if get(dotted) < 0:
            raise ValueError(f"config key '{dotted}': must be >= 0, got {get(dotted)}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"config key 'deepspeed.zero_stage': must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ValueError("config key 'deepspeed.offload_params': needs deepspeed.zero_stage = 3")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ValueError("config key 'deepspeed.offload_optimizer': needs deepspeed.zero_stage >= 1")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ValueError(f"config key 'optim.betas': two numbers in [0, 1), got {cfg.optim.betas}")
    if not 0.0 < cfg.data.noise_density < 1.0:
        raise ValueError(f"config key 'data.noise_density': must be in (0, 1), got {cfg.data.noise_density}")
    if not 0.0 <= cfg.schedule.final_lr_fraction <= 1.0:
        raise ValueError("config key 'schedule.final_lr_fraction': must be in [0, 1]")
    if cfg.model.dropout_rate != -1.0 and not 0.0 <= cfg.model.dropout_rate < 1.0:
        raise ValueError(f"config key 'model.dropout_rate': must be in [0, 1) or -1, got {cfg.model.dropout_rate}")


def preset_config_path(preset: str) -> pathlib.Path:
    """The ready config shipped for a model preset (engine/configs/<preset>.toml)."""
    return CONFIG_DIR / f"{preset}.toml"


def load_run_config(argv: list[str]) -> RunConfig:
    """Defaults <- each `--config FILE` in order <- `--section.key VALUE` overrides; then validated."""
    configs, overrides = parse_overrides(argv)
    cfg = RunConfig()
    for path in configs:
        apply_toml(cfg, path)
    for key, words in overrides:
        set_key(cfg, key, words)
    validate(cfg)
    return cfg


def config_from_dict(doc: dict) -> RunConfig:
    """Rebuild a RunConfig saved with `to_dict` (checkpoints store the run config)."""
    cfg = RunConfig()
    apply_sections(cfg, doc)
    validate(cfg)
    return cfg
