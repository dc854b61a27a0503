"""Frozen, validated configuration for the model and for training.

A configuration is saved as JSON beside every checkpoint and every logged model, so a
model can be rebuilt from its files alone. Presets are TOML files with a ``[model]`` and
a ``[train]`` table (see ``pipelines/configs/``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import numbers
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

logger = logging.getLogger(__name__)

Coupling = Literal["affine", "additive"]
InvConv = Literal["lu", "plain"]
Resize = Literal["stretch", "crop", "pad"]
Optimizer = Literal["adam", "adamax"]
Device = Literal["auto", "cpu", "cuda"]

PRESETS = ("tiny", "small", "fashion-mnist")

MAX_BATCH = 65536
"""The largest training ``batch_size`` and ``init_batch_size``: each step draws noise for
a whole batch, so a size far past any memory (a typo, an extra digit) would fail inside
torch with pages of C++ instead of as a setting."""

MAX_IMAGE_SIZE = 1024
"""The largest ``image_size`` a config accepts. A flow is invertible, so it discards no
resolution: its first level's K coupling networks run at half the image side, and
training keeps their activations for the backward pass. That memory grows with the
square of the side; at 1024 one grey image needs about 0.5 GB of it with the ``tiny``
preset and 75 GB with the default architecture (512 channels, K=32), and larger sizes
end in an out-of-memory error, or the system's OOM killer, not in a model."""


MAX_STEPS_PER_LEVEL = 1024
"""The largest ``steps_per_level`` (K): the reference architecture has 32, and the model
is built step by step in Python, so a typo of a million steps would hang building it
before any error could be raised."""

MAX_HIDDEN_CHANNELS = 65536
"""The largest ``hidden_channels``: the reference architecture has 512; a width past any
memory (a typo, an extra digit) would fail inside torch with pages of C++, or past 2**63
with a traceback, instead of as a setting."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _check(condition: bool, field: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{field} = {value!r} is invalid: {requirement}.")


def _check_choice(field: str, value: Any, literal: Any) -> None:
    choices = get_args(literal)
    _check(value in choices, field, value, f"choose one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class GlowConfig:
    """Architecture of a multi-scale Glow.

    Attributes:
        in_channels: Image channels: 1 (mode ``L``) or 3 (mode ``RGB``).
        image_size: Side of the square input in pixels; divisible by ``2**levels`` (at
            most :data:`MAX_IMAGE_SIZE` for training).
        levels: Number of scales L; each starts with a squeeze, all but the last end
            with a split.
        steps_per_level: Flow steps K per level (actnorm, 1x1 conv, coupling).
        hidden_channels: Width of the coupling networks.
        coupling: ``"affine"`` (scale ``sigmoid(h + 2)``) or ``"additive"``.
        invconv: ``"lu"`` (LU-parametrised 1x1 convolution) or ``"plain"``.
        n_bits: Bits per colour channel the images are quantised to; ``n_bins = 2**n_bits``.
        resize: How an image that is not ``image_size`` square becomes so, in training and
            scoring alike: ``"stretch"`` resizes it to the square (the aspect ratio is
            not kept), ``"crop"`` takes its centred square first (what lies outside is
            not seen), ``"pad"`` fits it whole inside the square, centred on black.
    """

    in_channels: int = 1
    image_size: int = 32
    levels: int = 3
    steps_per_level: int = 32
    hidden_channels: int = 512
    coupling: Coupling = "affine"
    invconv: InvConv = "lu"
    n_bits: int = 8
    resize: Resize = "stretch"

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.in_channels in (1, 3), "in_channels", self.in_channels,
               "use 1 for grey images or 3 for RGB")
        _check(self.levels >= 1, "levels", self.levels, "need at least one level")
        _check(1 <= self.steps_per_level <= MAX_STEPS_PER_LEVEL, "steps_per_level",
               self.steps_per_level,
               f"need from 1 to {MAX_STEPS_PER_LEVEL} flow steps per level")
        _check(1 <= self.hidden_channels <= MAX_HIDDEN_CHANNELS, "hidden_channels",
               self.hidden_channels, f"must be a width from 1 to {MAX_HIDDEN_CHANNELS}")
        _check(1 <= self.n_bits <= 8, "n_bits", self.n_bits, "must be between 1 and 8")
        # 2**levels of a mistyped levels (a million, say) would take long to compute and
        # could not be printed; no image is 2**30 pixels wide
        _check(self.levels <= 30, "levels", self.levels,
               "at most 30 (each level halves the image side; 2**levels must divide it)")
        factor = 2**self.levels
        _check(self.image_size >= factor and self.image_size % factor == 0, "image_size",
               self.image_size,
               f"must be a positive multiple of 2**levels = {factor}; pick such an image_size "
               "(the images are resized to it) or change levels")
        _check_choice("coupling", self.coupling, Coupling)
        _check_choice("invconv", self.invconv, InvConv)
        _check_choice("resize", self.resize, Resize)

    @property
    def mode(self) -> Literal["L", "RGB"]:
        """PIL mode images are converted to."""
        return "L" if self.in_channels == 1 else "RGB"

    @property
    def n_bins(self) -> int:
        return 2**self.n_bits

    @property
    def n_dims(self) -> int:
        """D = C * H * W, the dimension bits/dim is divided by."""
        return self.in_channels * self.image_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GlowConfig:
        return _from_dict(cls, data, "model")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GlowConfig:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class TrainConfig:
    """How a Glow is trained.

    Attributes:
        epochs: Passes over the training images.
        batch_size: Global batch size (split across ranks under DDP).
        lr: Peak learning rate, reached after ``warmup_steps``.
        warmup_steps: Linear learning-rate warm-up from 0.
        optimizer: ``"adam"`` or ``"adamax"``.
        grad_clip: Maximum gradient norm; 0 disables clipping.
        val_fraction: Share of the images held out for validation bits/dim and the
            normal reference (the ``typicality``, ``knn``, ``pixel_knn`` and
            ``ensemble`` scores).
        seed: Seed for the split, initialisation, shuffling and dequantisation noise.
        bf16: Run the coupling networks under bf16 autocast; log-dets and priors stay
            in float32. CUDA only: ignored (float32, logged) when training on the CPU.
        checkpoint_every: Write a checkpoint every N optimiser steps (and at the end).
        max_nonfinite_steps: Stop with an error after this many non-finite losses in a row.
        num_workers: DataLoader workers decoding images.
        sample_temperature: Temperature of the sample grid drawn after training.
        init_batch_size: Images used for the data-dependent ActNorm initialisation.
        compile: ``torch.compile`` the model for the training steps (after the ActNorm
            initialisation, around DDP). The first step pays the compilation (tens of
            seconds on a CPU, minutes for the reference architecture), once: the batch
            size is left symbolic, so the shorter last batch of an epoch does not compile
            again (a batch of one image does). Validation, sampling and the saved model
            stay eager. Needs a C++ compiler on the CPU. Under DDP every rank compiles the
            wrapped model on its own (tested with gloo on the CPU, ranks with batches of
            different sizes included).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    optimizer: Optimizer = "adam"
    grad_clip: float = 50.0
    val_fraction: float = 0.1
    seed: int = 0
    bf16: bool = False
    checkpoint_every: int = 500
    max_nonfinite_steps: int = 20
    num_workers: int = 0
    sample_temperature: float = 0.7
    init_batch_size: int = 256
    compile: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.epochs >= 1, "epochs", self.epochs, "train for at least one epoch")
        _check(1 <= self.batch_size <= MAX_BATCH, "batch_size", self.batch_size,
               f"must be from 1 to {MAX_BATCH}")
        _check(0 < self.lr < math.inf, "lr", self.lr, "must be a positive finite number")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _check_choice("optimizer", self.optimizer, Optimizer)
        _check(0 <= self.grad_clip < math.inf, "grad_clip", self.grad_clip,
               "must be a finite number >= 0 (0 disables)")
        _check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction,
               "must be in [0, 1)")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every,
               "must be positive")
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps",
               self.max_nonfinite_steps, "must be positive")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        _check(0 < self.sample_temperature < math.inf, "sample_temperature",
               self.sample_temperature, "must be a positive finite number")
        _check(1 <= self.init_batch_size <= MAX_BATCH, "init_batch_size",
               self.init_batch_size, f"must be from 1 to {MAX_BATCH}")
        # each step's noise generator is seeded with seed·1,000,003 + step, within 2**64
        _check(0 <= self.seed < 2**42, "seed", self.seed, "must be from 0 to 2**42 - 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data, "train")


@dataclass(frozen=True)
class RunConfig:
    """A model and its training, as read from a preset or config file."""

    model: GlowConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        for section, part, kind in (("model", self.model, GlowConfig),
                                    ("train", self.train, TrainConfig)):
            if not isinstance(part, kind):
                raise ConfigError(f"{section} must be a {kind.__name__}, got "
                                  f"{type(part).__name__}; RunConfig.from_dict reads a "
                                  "configuration given as a dict")
        # a training limit, not the model's: a saved model of any size still loads
        size = self.model.image_size
        _check(size <= MAX_IMAGE_SIZE, "image_size", size,
               f"must be at most {MAX_IMAGE_SIZE} for training: the memory a flow's "
               "activations take in training grows with image_size² (being invertible, it "
               "runs its coupling networks at half the image side), and larger sizes "
               "exhaust it; use a smaller image_size (the images are resized to it when "
               "loaded)")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError("a configuration must be a table with [model] and [train] "
                              f"sections, got {data!r}.")
        unknown = set(map(str, data)) - {"model", "train"}
        if homeless := {name for name in unknown if _home(name)}:  # keys above any table
            raise ConfigError("; ".join(f"{name} is outside any table: it goes under "
                                        f"[{_home(name)}]" for name in sorted(homeless)) + ".")
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)}; use [model] and [train].")
        for section, fields in data.items():
            if isinstance(fields, dict) and (strays := sorted(
                    name for name in map(str, fields) if _home(name) not in (None, section))):
                raise ConfigError(f"{', '.join(strays)} in [{section}] "
                                  f"{'belongs' if len(strays) == 1 else 'belong'} in "
                                  f"[{_home(strays[0])}]; move "
                                  f"{'it' if len(strays) == 1 else 'them'} there.")
        return cls(GlowConfig.from_dict(data.get("model", {})),
                   TrainConfig.from_dict(data.get("train", {})))

    def replace(self, **train_overrides: Any) -> RunConfig:
        """A copy with some training fields changed (``None`` values are ignored)."""
        changes = {k: v for k, v in train_overrides.items() if v is not None}
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))


_FIELDS = {"model": {f.name for f in dataclasses.fields(GlowConfig)},
           "train": {f.name for f in dataclasses.fields(TrainConfig)}}


def _home(name: str) -> str | None:
    """The table (``model`` or ``train``) that has a field ``name``, if one has."""
    return next((section for section, fields in _FIELDS.items() if name in fields), None)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from TOML/JSON, or given in Python) fits a field
    annotated ``hint``."""
    if get_origin(hint) is Literal:
        return isinstance(value, str)  # the choice itself is checked by __post_init__
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return True


_field_types = functools.cache(get_type_hints)


def _check_types(config: Any) -> None:
    """Refuse a field of the dataclass ``config`` whose value is not of its type (a
    ``2.5`` batch size, an ``"2"`` epochs given in Python), before its range checks
    compare it; a number of another numeric type (numpy's) becomes a plain ``int`` or
    ``float``, as JSON writes them and processes compare them."""
    for name, hint in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _type_ok(value, hint):
            kind = ("a string" if get_origin(hint) is Literal
                    else {bool: "true or false", int: "a whole number"}.get(hint, "a number"))
            shown = (str(value).lower() if isinstance(value, bool)  # as TOML writes them
                     else value.isoformat() if isinstance(value, (dt.date, dt.time))
                     else repr(value))
            raise ConfigError(f"{name} = {shown} is invalid: must be {kind}.")
        if hint in (int, float) and type(value) is not hint:
            try:
                coerced = hint(value)
            except OverflowError:  # a whole number past any float: said as lr = 1e400 is
                coerced = math.inf
            object.__setattr__(config, name, coerced)  # frozen: set before anyone reads


def _from_dict(cls: type, data: Any, section: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table of fields, got {data!r}; "
                          "see anomaly_flow/presets/*.toml.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown field(s) {sorted(map(str, unknown))} in [{section}]; known fields: "
            f"{sorted(names)}."
        )
    try:
        return cls(**data)
    except ConfigError as exc:  # a type or range check: say which table the field is in
        raise ConfigError(str(exc).replace(" is invalid", f" in [{section}] is invalid", 1)) \
            from None


def changed_fields(before: Any, after: Any, section: str,
                   names: Sequence[str] | None = None) -> list[str]:
    """``"section.name is AFTER but was BEFORE"`` for each field of two config dataclasses
    (of ``names``, default all) that differs: what a refusal to resume says."""
    names = [f.name for f in dataclasses.fields(after)] if names is None else names
    return [f"{section}.{name} is {getattr(after, name)!r} but was {getattr(before, name)!r}"
            for name in names if getattr(before, name) != getattr(after, name)]


# the fields that decide what a training costs and gives: a file that leaves one out is
# told the default it gets (model.hidden_channels = 512 makes a CPU training crawl)
_SIZING_FIELDS = {"model": ("image_size", "in_channels", "levels", "steps_per_level",
                            "hidden_channels"),
                  "train": ("epochs", "batch_size", "lr")}


def _unique_keys(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refusing a key given twice (``json`` keeps the last one
    silently; TOML refuses it)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"config file {path} gives {key!r} twice in one object, and "
                              "only one value can hold; keep the one you mean.")
        seen[key] = value
    return seen


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML (preset) or JSON run configuration."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a .toml or .json file.")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing .toml or .json.")
    try:
        # utf-8-sig: a byte-order mark (Windows editors add one) is dropped, not a
        # "cannot parse ... (at line 1, column 1)" on a first line that looks right
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8 TOML or "
                          "JSON.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}.") from None
    as_json = path.suffix.lower() == ".json"
    try:
        data = (json.loads(text, object_pairs_hook=functools.partial(_unique_keys, path))
                if as_json else tomllib.loads(text))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = path.suffix.lstrip(".").upper()  # a YAML or INI file, most likely
        fix = ""
        if not as_json and kind != "TOML":
            fix = ("; a config file is TOML (or JSON, named .json)"
                   + (f", not {kind}" if kind else "")
                   + ": copy a preset from anomaly_flow/presets/ and edit it")
        raise ConfigError(f"cannot parse {path} as {'JSON' if as_json else 'TOML'}: "
                          f"{exc}{fix}") from exc
    except RecursionError:  # arrays nested thousands deep: no config is
        raise ConfigError(f"cannot parse {path}: its values are nested too deeply for a "
                          "config; copy a preset from anomaly_flow/presets/ and edit it") from None
    if data == {}:
        raise ConfigError(f"config file {path} is empty; give at least a [model] or [train] "
                          "table (see the presets in anomaly_flow/presets/).")
    config = RunConfig.from_dict(data)
    if "model" not in data:
        m = config.model
        logger.warning("%s has no [model] table, so the model is the default one: %d×%d "
                       "%s, L=%d, K=%d, %d channels, slow to train on a CPU; copy the [model] "
                       "table of a preset (anomaly_flow/presets/) to choose", path,
                       m.image_size, m.image_size, "grey" if m.in_channels == 1 else "RGB",
                       m.levels, m.steps_per_level, m.hidden_channels)
    defaulted = [f"{section}.{name} = {getattr(getattr(config, section), name)!r}"
                 for section, names in _SIZING_FIELDS.items()
                 if section in data or section != "model"  # no [model]: said above
                 for name in names if name not in data.get(section, {})]
    if defaulted:
        logger.warning("%s does not set %s, so these defaults are used; set them to choose "
                       "(each preset in anomaly_flow/presets/ sets them all)", path,
                       ", ".join(defaulted))
    return config


def load_preset(name: str) -> RunConfig:
    """Read one of the presets shipped with the package (``tiny``, ``small``, ...)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    text = resources.files("anomaly_flow.presets").joinpath(f"{name}.toml").read_text()
    return RunConfig.from_dict(tomllib.loads(text))
