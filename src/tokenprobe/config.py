"""The one typed description of a run.

`RunConfig` is the CLI's schema (``tokenprobe train --help`` is generated from it), the record saved in
``run.json``, and part of the metadata inside every probe file. Values resolved at run time (the
layer list, the dtype actually used, hashes of the model, tokenizer and corpus) live beside it in
the run record built by :mod:`tokenprobe.pipelines.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

from tokenprobe.errors import TokenprobeError

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_CORPUS = "wiki-summaries"
TASKS = ("next", "current")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # or a JSON file (transformers' device_map)
LOAD_IN = ("8bit", "4bit")  # bitsandbytes
BASELINE_KINDS = ("model", "lens", "stats")  # --baselines: the model's own prediction, logit lens, token statistics
BALANCE_MODES = ("positions", "none")
BOS_MODES = ("auto", "always", "never")  # see tokenprobe.data.text.resolve_bos
LEGACY_BOS = "legacy"  # the `bos` of a config saved before --bos: the tokenizer's BOS wherever it has one
PROBE_FAMILIES = ("linear", "mlp", "mean-diff", "sparse")  # see tokenprobe.probes.base.FAMILIES


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _opt(help: str, choices: tuple[str, ...] | None = None, **kwargs: Any) -> dict[str, Any]:
    return {"help": help, "choices": choices, **kwargs}


@dataclass
class RunConfig:
    """Everything that decides what a `tokenprobe train` run computes."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata=_opt(
            f"'{DEFAULT_MODEL}' (Gemma 3 270M from the bundled GGUF package), a Hugging Face hub id, "
            "a local model directory, or a .gguf file"
        ),
    )
    corpus: str = field(
        default=DEFAULT_CORPUS,
        metadata=_opt(
            f"'{DEFAULT_CORPUS}' (10,033 bundled Wikipedia lead summaries), a .txt/.jsonl/.json/.parquet "
            "file or a folder of them, a saved `datasets` folder, or a Hugging Face dataset name"
        ),
    )
    text_field: str = field(
        default="text", metadata=_opt("field holding the text in .jsonl/.json/.parquet/dataset corpora")
    )
    corpus_config: str | None = field(default=None, metadata=_opt("Hugging Face dataset config name"))
    corpus_split: str = field(default="train", metadata=_opt("Hugging Face dataset split"))
    max_tokens: int | None = field(
        default=None, metadata=_opt("use at most this many corpus tokens (a seeded random subset of chunks)")
    )
    task: str = field(
        default="next",
        metadata=_opt("next: is the NEXT token the target? current: is THIS token the target? ahead:K: is the "
                      "token K positions ahead the target? (ahead:1 is next)"),
    )
    target: str | list[str] = field(
        default=" the",
        metadata=_opt("target token as an exact string (leading space matters); several mean any of them, "
                      "e.g. --target ' the' ' The'", nargs="+"),
    )
    target_id: int | list[int] | None = field(
        default=None,
        metadata=_opt("target token id(s); override --target (use when a string splits in several)", nargs="+"),
    )
    labels: str | None = field(
        default=None,
        metadata=_opt("labels that are not a token: a JSONL file, one {\"text\": ..., \"spans\": [[start, end], "
                      "...]} per corpus document; a token is positive where its characters overlap a span "
                      "(with --task current; next and ahead:K look that many tokens ahead)"),
    )
    label_regex: str | None = field(
        default=None, metadata=_opt("like --labels, the spans being the matches of this regular expression"),
    )
    layers: str = field(
        default="auto",
        metadata=_opt(
            "auto (0, quartiles, middle, last), all, or a list like 0,5,17. Layer 0 is the embedding "
            "output, layer L the residual stream after decoder block L"
        ),
    )
    context_length: int = field(default=256, metadata=_opt("tokens per chunk, BOS included"))
    bos: str = field(
        default="auto",
        metadata=_opt("start every chunk with the tokenizer's BOS token: auto where the tokenizer itself adds "
                      "one (Gemma, Llama; not GPT-2 or Qwen), always, or never"),
    )
    dtype: str = field(
        default="auto",
        metadata=_opt(
            "model dtype; auto is bfloat16 on CUDA and on CPUs with native bfloat16, else float32. "
            "float16 overflows on Gemma 3. Probes always train in float32",
            DTYPES,
        ),
    )
    device: str = field(default="auto", metadata=_opt("where the model runs", DEVICES))
    device_map: str | None = field(
        default=None,
        metadata=_opt("spread the model over GPUs, the CPU and disk as Accelerate does: auto, balanced, "
                      "balanced_low_0, sequential, or a JSON file mapping module names to devices (overrides "
                      "--device for the model)"),
    )
    load_in: str | None = field(
        default=None,
        metadata=_opt("load the weights in 8 or 4 bits with bitsandbytes (needs it installed and a CUDA GPU)", LOAD_IN),
    )
    batch_size: int | str = field(
        default=16,
        metadata=_opt(
            "chunks per forward pass, or auto: the largest that fits in free CUDA memory; on the CPU the "
            "largest within 5%% of the fastest in a throughput probe costing at most 3%% of the run (runs too "
            "short to repay one use 16); the run says what it picked",
            type=lambda v: v if v == "auto" else _positive_int(v),
        ),
    )
    seed: int = field(default=0, metadata=_opt("seed for chunk order, the split and position sampling"))
    train_positions: int = field(
        default=20_000, metadata=_opt("training positions to sample (half of them positive when balanced)")
    )
    eval_positions: int = field(
        default=6_000,
        metadata=_opt("held-out positions for each evaluation set (balanced and natural class ratio)"),
    )
    eval_fraction: float = field(default=0.2, metadata=_opt("fraction of chunks held out for evaluation"))
    balance: str = field(
        default="positions",
        metadata=_opt(
            "positions: 50/50 positive/negative training positions; none: natural ratio, trained "
            "with a capped square-root pos_weight",
            BALANCE_MODES,
        ),
    )
    pos_weight_cap: float = field(default=5.0, metadata=_opt("cap on pos_weight = sqrt(negatives/positives)"))
    l2: float | str = field(
        default="auto",
        metadata=_opt(
            "L2 penalty on the probe weights (standardised inputs), or auto: per layer, the penalty with the "
            "lowest log-loss on a fifth of the training chunks set aside (strong with little data, weak with much)",
            type=lambda v: v if v == "auto" else _number(v),
        ),
    )
    max_iter: int = field(default=300, metadata=_opt("L-BFGS iterations for probe training"))
    probe: str = field(
        default="linear",
        metadata=_opt(
            "probe families, comma-separated, all trained on the same activations: linear (logistic, --l2), "
            "mlp (one hidden layer, early stopping), mean-diff (difference of the class means), sparse "
            "(L1 logistic, penalty chosen like --l2 auto). The first is the run's primary probe"
        ),
    )
    mlp_width: int = field(default=256, metadata=_opt("hidden units of the mlp probe"))
    control: bool | None = field(
        default=None,
        metadata=_opt(
            "also train every family on a control task (each current-token type gets a random label at the "
            "task's positive rate; Hewitt & Liang 2019) and report selectivity = task minus control "
            "(default: on for --task next, off for current)"
        ),
    )
    mdl: bool = field(
        default=False,
        metadata=_opt("online-code description length per layer and family (Voita & Titov 2020)"),
    )
    baselines: str = field(
        default="all",
        metadata=_opt(
            "compare every probe with the model's own prediction (model), the logit lens (lens) and token "
            "statistics (stats) on the same held-out positions: all, none, or a comma-separated subset such as "
            "lens,stats. Only the model's own prediction needs every block: without it a run loads the blocks up "
            "to its deepest probed layer only (--no-baselines is --baselines none)",
            nargs="?", const="all", negative="none",
        ),
    )
    bootstrap: int = field(
        default=1000, metadata=_opt("bootstrap resamples of held-out chunks for the 95%% intervals (0: none)")
    )
    wandb: bool = field(
        default=False,
        metadata=_opt("log each layer as a WandB run in one group per sweep (offline when no credentials)"),
    )
    wandb_project: str = field(default="tokenprobe", metadata=_opt("WandB project for --wandb"))
    keep_activations: bool | None = field(
        default=None,
        metadata=_opt(
            "keep the sampled positions' activations in the run folder (activations/), so `tokenprobe fit` can "
            "retrain and rescore without the model (default: keep when they take under 2 GB)"
        ),
    )

    def __post_init__(self) -> None:
        if isinstance(self.baselines, bool):  # a config saved before --baselines took a subset
            self.baselines = "all" if self.baselines else "none"

    def validate(self) -> None:
        """Checks that need no model; a TokenprobeError names the bad value and the fix."""
        self.baseline_kinds()
        if self.device_map is not None and self.device_map not in DEVICE_MAPS and not (
                str(self.device_map).endswith(".json") and Path(self.device_map).is_file()):
            raise TokenprobeError(f"--device-map {self.device_map!r}: use {', '.join(DEVICE_MAPS)}, or a JSON file "
                                  "mapping module names to devices")
        if self.load_in is not None and self.load_in not in LOAD_IN:
            raise TokenprobeError(f"--load-in must be 8bit or 4bit, got {self.load_in!r}")
        task_offset(self.task)
        if self.labels is not None and self.label_regex is not None:
            raise TokenprobeError("give --labels or --label-regex, not both")
        if self.labels is not None and not Path(self.labels).is_file():
            raise TokenprobeError(f"--labels {self.labels}: file not found; give a JSONL file of "
                                  '{"text": ..., "spans": [[start, end], ...]} per corpus document')
        if self.label_regex is not None:
            if not self.label_regex:
                raise TokenprobeError("--label-regex is empty: give a pattern, e.g. --label-regex '\\d+'")
            try:
                re.compile(self.label_regex)
            except re.error as exc:
                raise TokenprobeError(f"--label-regex {self.label_regex!r} is not a regular expression: {exc}") \
                    from None
        if self.dtype not in DTYPES:
            raise TokenprobeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise TokenprobeError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.balance not in BALANCE_MODES:
            raise TokenprobeError(f"--balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise TokenprobeError(f"--batch-size must be auto or at least 1, got {self.batch_size!r}")
        for name in ("context_length", "train_positions", "eval_positions", "max_iter"):
            if getattr(self, name) < 1:
                raise TokenprobeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.context_length < 3:
            raise TokenprobeError(f"--context-length must be at least 3, got {self.context_length}")
        if self.bos not in (*BOS_MODES, LEGACY_BOS):
            raise TokenprobeError(f"--bos must be auto, always or never, got {self.bos!r}")
        if self.max_tokens is not None and self.max_tokens < self.context_length:
            raise TokenprobeError(
                f"--max-tokens {self.max_tokens} is less than one chunk (--context-length {self.context_length})"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise TokenprobeError(f"--eval-fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.bootstrap != 0 and self.bootstrap < 100:
            raise TokenprobeError(f"--bootstrap must be 0 (no intervals) or at least 100, got {self.bootstrap}")
        if self.l2 != "auto" and not (isinstance(self.l2, (int, float)) and self.l2 >= 0):
            raise TokenprobeError(f"--l2 must be auto or a number >= 0, got {self.l2!r}")
        if self.pos_weight_cap < 1.0:
            raise TokenprobeError(f"--pos-weight-cap must be at least 1, got {self.pos_weight_cap}")
        if self.target_id is None and any(t == "" for t in self.targets()):
            raise TokenprobeError("--target is empty: give the exact token string, e.g. --target ' the'")
        parse_layers(self.layers, num_layers=None)
        self.probe_families()
        if self.mlp_width < 1:
            raise TokenprobeError(f"--mlp-width must be at least 1, got {self.mlp_width}")

    def baseline_kinds(self) -> tuple[str, ...]:
        """--baselines as the kinds it asks for, in BASELINE_KINDS order (empty for none); an error names a
        bad one."""
        spec = str(self.baselines).strip().lower()
        if spec == "all":
            return BASELINE_KINDS
        if spec == "none":
            return ()
        names = [name.strip() for name in spec.split(",")]
        unknown = [name for name in names if name not in BASELINE_KINDS]
        if unknown or len(set(names)) != len(names):
            raise TokenprobeError(
                f"--baselines {self.baselines!r}: use all, none, or a comma-separated subset of "
                f"{', '.join(BASELINE_KINDS)} (e.g. --baselines lens,stats)"
                + (f"; {unknown[0]!r} is not one" if unknown else "; a kind is named twice"))
        return tuple(kind for kind in BASELINE_KINDS if kind in names)

    def probe_families(self) -> list[str]:
        """The families of --probe, in order (the first is the primary one); an error names a bad one."""
        names = [name.strip() for name in str(self.probe).split(",")]
        unknown = [name for name in names if name not in PROBE_FAMILIES]
        if unknown or not names:
            raise TokenprobeError(f"--probe {unknown[0] if unknown else ''!r} is not a probe family; use any of "
                                  f"{', '.join(PROBE_FAMILIES)}, comma-separated (e.g. --probe linear,mlp)")
        if len(set(names)) != len(names):
            raise TokenprobeError(f"--probe {self.probe!r} names a family twice")
        return names

    def targets(self) -> list[str]:
        """--target as a list (one string is one target)."""
        return [self.target] if isinstance(self.target, str) else list(self.target)

    def target_ids(self) -> list[int]:
        """--target-id as a list (empty when not given)."""
        if self.target_id is None:
            return []
        return [int(self.target_id)] if isinstance(self.target_id, int) else [int(t) for t in self.target_id]

    @property
    def span_labels(self) -> str | None:
        """The span source as a labeler spec ("spans:FILE" or "regex:PATTERN"), or None for token targets."""
        if self.labels is not None:
            return f"spans:{self.labels}"
        return f"regex:{self.label_regex}" if self.label_regex is not None else None

    @property
    def control_task(self) -> bool:
        """--control as resolved: on by default for the next-token task."""
        return self.task == "next" if self.control is None else bool(self.control)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A saved config (run.json, a probe file); one saved before --bos chunked as before it: LEGACY_BOS."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"bos": LEGACY_BOS, **{k: v for k, v in data.items() if k in names}})


# --------------------------------------------------------------------------------------------- layers


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """Resolves ``auto``/``all``/``0,5,17`` against a model with `num_layers` decoder blocks.

    With ``num_layers=None`` only the syntax is checked (and an empty list returned).
    Layer 0 is the embedding output; layer ``num_layers`` is the output of the last block.
    """
    spec = spec.strip().lower()
    if spec in ("auto", "all"):
        if num_layers is None:
            return []
        if spec == "all":
            return list(range(num_layers + 1))
        n = num_layers
        return sorted({0, round(n / 4), round(n / 2), round(3 * n / 4), n})
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", spec):
        raise TokenprobeError(
            f"--layers {spec!r} is malformed: use auto, all, or comma-separated layer numbers like 0,5,17"
        )
    layers = sorted({int(x) for x in spec.split(",")})
    if num_layers is not None:
        bad = [layer for layer in layers if layer > num_layers]
        if bad:
            raise TokenprobeError(
                f"--layers {','.join(map(str, bad))} out of range: this model has layers 0 to {num_layers} "
                f"(0 is the embedding output, {num_layers} the last block)"
            )
    return layers


# ------------------------------------------------------------------------------------------ run names


def slug(text: str) -> str:
    text = text.rstrip("/").split("/")[-1]
    text = re.sub(r"\.gguf$", "", text)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def data_label(config: RunConfig) -> str:
    """'all' when the whole corpus is eligible, else the token cap, e.g. '200k'."""
    if config.max_tokens is None:
        return "all"
    if config.max_tokens >= 1000:
        return f"{config.max_tokens // 1000}k"
    return str(config.max_tokens)


def task_label(config: RunConfig) -> str:
    """The task as it appears in names: ``next``, ``ahead3``, ``current-regex``, ``next-labels-names``."""
    label = config.task.replace(":", "")
    if config.labels is not None:
        label += "-labels-" + slug(Path(config.labels).stem)
    elif config.label_regex is not None:
        label += "-regex"
    return label


def run_name(config: RunConfig, layer: int, model_name: str) -> str:
    """One layer's name: ``probe-layer5-ctx256-all-next-gemma-3-270m``."""
    return f"probe-layer{layer}-ctx{config.context_length}-{data_label(config)}-{task_label(config)}-{slug(model_name)}"


def sweep_name(config: RunConfig, model_name: str) -> str:
    """The group name shared by the per-layer runs of one sweep."""
    return f"sweep-ctx{config.context_length}-{data_label(config)}-{task_label(config)}-{slug(model_name)}"


def task_offset(task: str) -> int:
    """How many tokens ahead ``--task`` looks: next 1, current 0, ahead:K K; an error names a bad task."""
    if task == "next":
        return 1
    if task == "current":
        return 0
    if isinstance(task, str) and task.startswith("ahead:"):
        count = task.removeprefix("ahead:")
        if count.isascii() and count.isdigit():
            if int(count) == 0:
                raise TokenprobeError("--task ahead:0 asks about this very token: use --task current")
            return int(count)
        raise TokenprobeError(f"--task {task!r}: K in ahead:K must be a whole number of tokens >= 1, e.g. ahead:2")
    raise TokenprobeError(f"--task must be next, current or ahead:K (K tokens ahead), got {task!r}")


# ---------------------------------------------------------------------------------------------- CLI


def _base_type(tp: Any) -> type:
    """`int | None` -> int; the dataclass annotations are strings under `from __future__`."""
    if isinstance(tp, str):
        tp = {"str": str, "int": int, "float": float, "bool": bool}.get(tp.split("|")[0].strip(), str)
    if get_origin(tp) is not None:
        tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None,
                         unset: str | None = None) -> None:
    """Adds one ``--flag`` per RunConfig field, with the field's default and help (but the fields in
    `exclude`; `defaults` and `helps` replace a field's own, for a command that reads it otherwise).
    With `unset`, every default is None and the help says `unset` instead (``fit``: "the run's")."""
    defaults, helps = defaults or {}, helps or {}
    for f in dataclasses.fields(RunConfig):
        if f.name in exclude:
            continue
        meta = dict(f.metadata)
        if f.name in helps:
            meta["help"] = helps[f.name]
        default = None if unset else defaults.get(f.name, f.default)
        if _base_type(f.type) is bool:  # --wandb / --no-wandb
            shown = f" (default: {unset})" if unset else f" (default: {default!r})" if default is not None else ""
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{meta.get('help', '')}{shown}")
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=meta.get("type") or _base_type(f.type),
            default=default,
            choices=meta.get("choices"),
            nargs=meta.get("nargs"),
            const=meta.get("const"),  # the value of the bare flag (--baselines: all)
            help=f"{meta.get('help', '')} (default: {unset or repr(default)})",
        )
        if meta.get("negative") is not None:  # --no-baselines, as --baselines none
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const",
                                const=meta["negative"], help=f"same as --{f.name.replace('_', '-')} {meta['negative']}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed options (fields a command does not offer keep their defaults); a list
    option given one value stores that value alone, so a single target is recorded as it always was."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)}
    for name, value in values.items():
        if isinstance(value, list) and len(value) == 1:
            values[name] = value[0]
    return RunConfig(**values)
