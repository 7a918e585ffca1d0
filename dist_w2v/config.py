"""Typed configuration: defaults, then a YAML file, then dotted ``key=value`` overrides.

That is the only override path. Every field is validated where it is declared, and an unknown
key or a bad value raises :class:`UserError` naming the key and what it accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_w2v.atomic import write_text_atomically
from dist_w2v.errors import UserError


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config: {key} {message}")


def _require_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)} (got {value!r})")


MAX_WINDOW = 10_000  # data.max_sentence_length's default: no context reaches further
MAX_NEGATIVES = 10_000
MAX_DIM = 1_000_000_000  # past this a table's byte count nears int64; below, the allocator says no
MAX_BATCH = 2**31
MAX_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class DataConfig:
    prepared: str | None = None
    """A folder written by `dist-w2v prepare` to train on (then corpus, dir and the vocabulary
    settings below are not used)."""
    dir: str | None = None
    """Folder holding ptb.train.txt; else $DIST_W2V_DATA, else a per-user cache (downloaded)."""
    corpus: str | None = None
    """Any other whitespace-tokenized, one-sentence-per-line text file to train on, not PTB.
    PTB and this file are prepared once into the cache (keyed by content and settings)."""
    max_sentences: int = 0
    """Use only the first N sentences (0 = all); for smoke runs."""
    min_count: int = 10
    """Words seen fewer times map to <unk> and are dropped."""
    max_vocab: int = 0
    """Keep only the N most frequent words (0 = no limit)."""
    max_sentence_length: int = 10_000
    """Longer lines are cut into sentences of at most this many tokens (word2vec, gensim)."""
    subsample_t: float = 1e-4
    """Subsampling threshold t: keep word w with probability min(1, sqrt(t / f(w)))."""
    max_window: int = 5
    """Context window radius is drawn uniformly from 1..max_window for every center."""
    num_negatives: int = 5
    """Noise words drawn per context word, from unigram counts ** 0.75."""
    resample_each_epoch: bool = True
    """Redraw subsampling, windows and negatives every epoch (word2vec); false = d2l's draw-once."""
    shards: int = 16
    """Virtual shards S: each is its own stream of chunks, every global batch takes B/S examples
    from each, and rank r of W trains S/W of them. W must divide S, S must divide the batch."""
    chunk_tokens: int = 65_536
    """Sentence-aligned chunk size in tokens: examples are built (and held) one chunk per
    shard at a time, so memory follows this, not the corpus length."""

    def __post_init__(self) -> None:
        _require(self.corpus is None or self.corpus.strip() != "", "data.corpus",
                 "is empty; give a corpus file, or leave data.corpus unset (null) for PTB")
        _require(self.prepared is None or self.prepared.strip() != "", "data.prepared",
                 "is empty; give a folder written by `dist-w2v prepare`, or leave it unset")
        _require(not (self.prepared and self.corpus), "data.prepared",
                 "and data.corpus are both set; train on one of them")
        _require(self.max_sentences >= 0, "data.max_sentences", "must be >= 0 (0 = all)")
        _require(self.min_count >= 1, "data.min_count", "must be >= 1")
        _require(self.max_vocab >= 0, "data.max_vocab", "must be >= 0 (0 = no limit)")
        _require(self.max_sentence_length >= 2, "data.max_sentence_length", "must be >= 2")
        _require(self.subsample_t > 0, "data.subsample_t", "must be > 0")
        # Upper bounds far above any useful value: past them the example layout's size
        # overflows (a traceback deep in the builder) long before it trains anything.
        _require(1 <= self.max_window <= MAX_WINDOW, "data.max_window",
                 f"must be in [1, {MAX_WINDOW:,}] (got {self.max_window})")
        _require(1 <= self.num_negatives <= MAX_NEGATIVES, "data.num_negatives",
                 f"must be in [1, {MAX_NEGATIVES:,}] (got {self.num_negatives})")
        _require(self.shards >= 1, "data.shards", "must be >= 1")
        _require(self.chunk_tokens >= 1024, "data.chunk_tokens", "must be >= 1024")


@dataclass
class ModelConfig:
    dim: int = 100
    """Embedding width D of both tables."""

    def __post_init__(self) -> None:
        _require(1 <= self.dim <= MAX_DIM, "model.dim",
                 f"must be in [1, {MAX_DIM:,}] (got {self.dim})")


OPTIMIZERS = ("adam", "sparse_adam", "sgd", "rowwise_adagrad")
LR_SCHEDULES = ("auto", "constant", "linear")
DEVICES = ("auto", "cpu", "cuda")
# Seeds enter every random stream as 32-bit keys (data/examples.py's stream_seed): a larger
# seed would silently repeat a smaller one's examples.
SEED_LIMIT = 2**32
PATHS = ("fast", "padded")
KERNELS = ("fused", "csr", "index", "static", "triton")


@dataclass
class TrainConfig:
    epochs: int = 5
    """Passes over the corpus."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all (0 = no limit); for benchmarks and smoke runs."""
    batch_size: int = 512
    """Global batch, in center words; each of W ranks takes batch_size / W."""
    lr: float = 0.002
    """Learning rate, or the starting rate of a linear decay to lr_min."""
    lr_min: float = 0.0001
    """The rate a linear decay reaches at the last step (word2vec: 0.0001*lr)."""
    lr_schedule: str = "auto"
    """constant, linear (lr to lr_min over training) or auto (linear for sgd and
    rowwise_adagrad, constant for the Adams)."""
    warmup: float = 0.0
    """Fraction of training over which lr ramps linearly from 0 up to the schedule (0 = none)."""
    optimizer: str = "adam"
    """adam (the seed's: dense moments), sparse_adam (lazy: touched rows only, for huge
    vocabularies), sgd (word2vec's linear decay) or rowwise_adagrad (lazy, one accumulator
    per row: for large global batches)."""
    adagrad_eps: float = 1e-8
    """rowwise_adagrad: added to the root of the row's accumulator before dividing."""
    adagrad_init: float = 0.0
    """rowwise_adagrad: every row's accumulator starts here (> 0 damps the first steps)."""
    max_row_step: float = 0.0
    """sgd: the largest L2 norm one step may move a row (0 = no cap; plain SGD)."""
    seed: int = 0
    """Seeds the tables' initialisation and, unless data_seed is set, every epoch's examples:
    epoch e is a pure function of (seed, e). 0 to 2**32 - 1."""
    data_seed: int | None = None
    """Seeds the examples alone (subsampling, windows, negatives, their order); unset: seed.
    With it, a study can tell how much of the seed-to-seed spread the initialisation causes."""
    device: str = "auto"
    """auto picks cuda when available, else cpu."""
    threads: int = 0
    """Intra-op threads per process; 0 = cores / local processes (less one on CPU)."""
    path: str = "fast"
    """fast: the loss from the real (center, word) pairs only, with gradients that come out
    coalesced (dist_w2v/fast_path.py); padded: the seed's bmm over all L slots (the reference)."""
    kernel: str = "auto"
    """The fast path's kernel: auto (fused on CPU, static on CUDA), fused (CPU only), csr,
    index, static (every shape fixed by the batch's: no host sync in the step), or triton
    (CUDA: static's shapes from fused Triton kernels that read the real slots only)."""
    cuda_graph: bool = False
    """Capture the training step once as a CUDA graph and replay it (train/step.py): one
    CUDA process, the static or triton kernel, sgd or rowwise_adagrad."""
    compile: bool = False
    """torch.compile the model (padded path only: Dynamo cannot trace the fast path's kernels)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no limit)")
        _require(1 <= self.batch_size <= MAX_BATCH, "train.batch_size",
                 f"must be in [1, {MAX_BATCH:,}] (got {self.batch_size})")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.lr_min >= 0, "train.lr_min", "must be >= 0")
        _require_choice(self.optimizer, "train.optimizer", OPTIMIZERS)
        _require_choice(self.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
        _require(not self.decays or self.lr_min <= self.lr, "train.lr_min",
                 f"must be <= train.lr ({self.lr}) for a decaying schedule (got {self.lr_min})")
        _require(0.0 <= self.warmup < 1.0, "train.warmup", "must be in [0, 1) (a fraction)")
        _require(self.adagrad_eps > 0, "train.adagrad_eps", "must be > 0")
        _require(self.adagrad_init >= 0, "train.adagrad_init", "must be >= 0")
        _require(self.max_row_step >= 0, "train.max_row_step", "must be >= 0 (0 = no cap)")
        _require_choice(self.device, "train.device", DEVICES)
        _require_choice(self.path, "train.path", PATHS)
        _require_choice(self.kernel, "train.kernel", ("auto", *KERNELS))
        _require(not (self.compile and self.path == "fast"), "train.compile",
                 "works only with train.path=padded (Dynamo cannot trace the fast path's sparse "
                 "kernels, and the fast path is faster than compiled padded anyway); drop "
                 "train.compile or add train.path=padded")
        _require(self.threads >= 0, "train.threads", "must be >= 0 (0 = auto)")
        _require(0 <= self.seed < SEED_LIMIT, "train.seed",
                 f"must be in [0, 2**32) (got {self.seed})")
        _require(self.data_seed is None or 0 <= self.data_seed < SEED_LIMIT, "train.data_seed",
                 f"must be in [0, 2**32) or null (got {self.data_seed})")

    @property
    def examples_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def decays(self) -> bool:
        """Whether lr decays linearly to lr_min (auto: sgd and rowwise_adagrad, not the Adams)."""
        if self.lr_schedule == "auto":
            return self.optimizer in ("sgd", "rowwise_adagrad")
        return self.lr_schedule == "linear"


BACKENDS = ("auto", "gloo", "nccl")
GRAD_EXCHANGES = ("auto", "allreduce", "allgather", "dense")


@dataclass
class DistConfig:
    backend: str = "auto"
    """auto: nccl on CUDA, gloo on CPU."""
    grad_exchange: str = "auto"
    """How sparse gradients cross ranks: allreduce (gloo's sparse allreduce), allgather (hook),
    dense (hook: allreduce of the densified table), auto (allgather on NCCL, allreduce on gloo)."""
    timeout_s: float = 1800.0
    """How long a rank waits for the others, at the start (the rendezvous) and in every
    collective, before it fails; lower it where a rank that never starts should end a job soon."""

    def __post_init__(self) -> None:
        _require_choice(self.backend, "dist.backend", BACKENDS)
        _require_choice(self.grad_exchange, "dist.grad_exchange", GRAD_EXCHANGES)
        # c10d and gloo keep the timeout in int milliseconds: past about 2**31 ms it wraps
        # (a rank gave up at once, "after 1e+10 s") or overflows.
        _require(0 < self.timeout_s <= MAX_TIMEOUT_S, "dist.timeout_s",
                 f"must be in (0, {MAX_TIMEOUT_S:,}] seconds (a week; got {self.timeout_s})")


@dataclass
class CkptConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0 = only at epoch ends)."""
    keep: int = 3
    """How many of the newest checkpoints to keep."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "ckpt.every_steps", "must be >= 0 (0 = epoch ends only)")
        _require(self.keep >= 1, "ckpt.keep", "must be >= 1")


@dataclass
class EvalConfig:
    every_epochs: int = 1
    """Evaluate on rank 0 every N epochs (0 = never during training)."""
    probes: list[str] = field(default_factory=lambda: ["chip", "intel", "stock", "japan", "good"])
    """Words whose nearest neighbours are logged at each evaluation."""
    k: int = 3
    """Neighbours shown per probe word."""

    def __post_init__(self) -> None:
        _require(self.every_epochs >= 0, "eval.every_epochs", "must be >= 0")
        _require(self.k >= 1, "eval.k", "must be >= 1")


WANDB_MODES = ("off", "offline", "online")


@dataclass
class LogConfig:
    wandb: str = "off"
    """off, offline (no network, synced later with `wandb sync`) or online."""
    project: str = "dist-w2v"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    every_steps: int = 100
    """Every N steps the loss is read from the device (the only host sync) and logged."""

    def __post_init__(self) -> None:
        _require_choice(self.wandb, "log.wandb", WANDB_MODES)
        _require(self.every_steps >= 1, "log.every_steps", "must be >= 1")


@dataclass
class DebugConfig:
    fail_at_step: int = -1
    """Fault injection for tests: exit abruptly at this global step (first attempt only)."""
    fail_rank: int = 0
    """The rank that fails."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_text_atomically(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's annotation, accepting ints where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        raise UserError(f"config: {key} has a bad value {value!r} (expected {annotation})")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise UserError(f"config: {key} must be a list (got {value!r})")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config: {key} must be true or false (got {value!r})")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config: {key} must be an integer (got {value!r})")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        # inf passes every "> 0" check and nan fails them with a misleading message; no setting
        # means either, so both are refused here, once for every float.
        if number is None or not math.isfinite(number):
            raise UserError(f"config: {key} must be a finite number (got {value!r})")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # from a YAML file: off, no, on, yes unquoted
            raise UserError(f"config: {key} must be a string (got {value!r}: YAML reads off, "
                            "no, on and yes as true or false); quote the value, e.g. \"off\"")
        raise UserError(f"config: {key} must be a string (got {value!r})")
    raise UserError(f"config: {key} has an unsupported type {annotation}")


def keys_named(name: str) -> list[str]:
    """The SECTION.FIELD keys whose field is ``name`` (a mistyped --option's likely meaning)."""
    return [f"{section.name}.{name}" for section in dataclasses.fields(Config)
            if name in section.default_factory.__dataclass_fields__]  # type: ignore[misc]


def _merge(tree: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    section_names = [f.name for f in dataclasses.fields(Config)]
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in section_names:
        raise UserError(
            f"config: unknown key {key!r}; keys look like SECTION.FIELD with SECTION one of "
            f"{', '.join(section_names)}"
        )
    section, name = parts
    section_cls = Config.__dataclass_fields__[section].default_factory  # type: ignore[misc]
    valid = [f.name for f in dataclasses.fields(section_cls)]
    if name not in valid:
        raise UserError(f"config: unknown key {key!r}; {section} accepts {', '.join(valid)}")
    annotation = _section_types(section_cls)[name]
    if isinstance(value, OverrideText):
        value = typed_override(value, annotation)
    tree.setdefault(section, {})[name] = _coerce(value, annotation, key)


def _flatten_yaml(raw: Any, source: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(
            f"config: {source} must hold a mapping of sections (data, model, train, ...)"
        )
    flat: dict[str, Any] = {}
    for section, body in raw.items():
        if not isinstance(body, dict):
            raise UserError(f"config: section {section!r} in {source} must be a mapping of fields")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def read_yaml(text: str) -> Any:
    """safe_load, except that a key given twice in one mapping is an error: plain YAML keeps
    the last, so a second ``train:`` section would silently drop the first."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        refuse_duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


MERGE_TAG = "tag:yaml.org,2002:merge"


def refuse_duplicate_keys(node: yaml.Node, seen_nodes: set[int] | None = None) -> None:
    """Checked on the composed nodes, before merge keys (``<<: *base``) are expanded, so that a
    merged-in key may still be overridden, as YAML means it to be."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[tuple[str, str]] = set()
        for key_node, value_node in node.value:
            # A complex key is refused when constructed; a merge is no key of its own.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in keys:
                    raise yaml.composer.ComposerError(
                        None, None, f"{key_node.value!r} is given twice", key_node.start_mark)
                keys.add(key)
            refuse_duplicate_keys(value_node, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            refuse_duplicate_keys(item, seen_nodes)


def yaml_error_place(exc: yaml.YAMLError) -> str:
    """`` at line L, column C (what is wrong)`` from a YAML error, where it says."""
    mark = getattr(exc, "problem_mark", None)
    place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{place} ({problem})"


class OverrideText(str):
    """The right-hand side of a command-line ``key=value``, typed once its field is known
    (:func:`typed_override`)."""


def parse_override(text: str) -> tuple[str, OverrideText]:
    """``train.lr=0.003`` -> ("train.lr", "0.003"), the value still as written."""
    if "=" not in text:
        raise UserError(f"config: override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), OverrideText(raw)


def typed_override(raw: str, annotation: Any) -> Any:
    """A text field takes the value as written: read as YAML, a folder named 2024_01, 12:30 or
    0x10 became a number, ``x #y`` lost its tail, and ``log.wandb=off`` became false. ``null``
    and ``~`` still unset a field that may be unset; every other field reads YAML."""
    options = (typing.get_args(annotation)
               if typing.get_origin(annotation) in (typing.Union, types.UnionType)
               else (annotation,))
    if str in options:
        return None if type(None) in options and raw in ("null", "~") else str(raw)
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return str(raw)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Build the resolved config: dataclass defaults < YAML file < ``key=value`` overrides."""
    flat: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"config file {path} is a folder; pass a YAML file to --config")
        if not path.is_file():
            raise UserError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            raw = read_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it "
                            "as UTF-8") from None
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML{yaml_error_place(exc)}; fix "
                            "it there") from None
        except OSError as exc:
            raise UserError(f"cannot read config file {path} ({exc.strerror or exc}); fix its "
                            "permissions") from None
        flat.update(_flatten_yaml(raw, str(path)))
    given: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
        given.append(key)
    cfg = _build(flat)
    refuse_unused_overrides(cfg, given)
    return cfg


PREPARE_SETTINGS = ("min_count", "max_vocab", "max_sentence_length", "max_sentences")
"""data.* settings that decide a prepared corpus, and so do nothing with data.prepared."""


def refuse_unused_overrides(cfg: Config, keys: list[str]) -> None:
    """A setting asked for on the command line that the run would ignore is refused, not
    recorded in config.yaml as if it had been used. (A config file's own values of them,
    min_count in every shipped config, are for PTB and data.corpus.)"""
    if not cfg.data.prepared:
        return
    for key in keys:
        section, _, name = key.partition(".")
        if section == "data" and name in PREPARE_SETTINGS:
            raise UserError(f"config: {key} does nothing with data.prepared (that folder's "
                            "vocabulary and sentences were fixed by `dist-w2v prepare`); "
                            f"prepare again with --{name.replace('_', '-')} and train on the "
                            f"new folder, or drop {key}")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a saved config (a checkpoint's, or a run directory's config.yaml)."""
    return _build(_flatten_yaml(raw, "saved config"))


def _build(flat: dict[str, Any]) -> Config:
    tree: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        _merge(tree, key, value)
    return Config(
        **{
            f.name: f.default_factory(**tree.get(f.name, {}))  # type: ignore[misc]
            for f in dataclasses.fields(Config)
        }
    )
