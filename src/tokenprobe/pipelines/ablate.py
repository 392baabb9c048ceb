"""`ablate`: does the model use the probe's direction? (Elazar et al. 2021, "Amnesic Probing")

For each probed layer L the model runs on held-out chunks of the run's own corpus with the probe's
direction edited in the residual stream at layer L at every position, and the model's own next-token
distribution is read at two kinds of positions:

- where the target comes next: the change in log P(target) (ablated minus clean, mean over positions)
  and the share of the positions where the target was the model's top prediction and no longer is;
- elsewhere (a seeded sample): the KL divergence of the next-token distribution, clean to edited, so
  that a direction whose removal breaks everything is not mistaken for a specific one.

The same is measured for `random` directions (seeded, unit norm like the probe's, drawn isotropic in
the standardised coordinates the probes are fitted in: see Passes.standardising_scale), the baseline:
the probe's direction is "used" at a layer when its effect on log P(target) lies beyond every random
direction's, intervals included (95%, bootstrap over the chunks). Edits:

- ``project`` (default): h - (h . d) d, d the unit direction (the component removed);
- ``mean``: h - (h . d - m) d, the component set to its training mean m (the probe's training mean
  where it keeps one, else the clean held-out mean);
- ``--steer ALPHA``: h + ALPHA * s * d instead, s the clean spread (standard deviation) of h . d: P(target)
  should rise where the model uses the direction.

Layer 0 is the input of the first block, layer l the output of block l (as the probes read it). Each
pass is one forward pass over the chunks stopped after the last block (the unembedding runs at the
measured positions only, tile by tile): 1 + (1 + random) x layers passes. Results go into the run
folder: ablation.json, ablation.png and a section of report.md.
"""

from __future__ import annotations

import datetime
import json
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprobe.config import RunConfig, parse_layers
from tokenprobe.data.labels import make_labeler, parse_task
from tokenprobe.data.prepare import prepare_chunks
from tokenprobe.distributed import refuse_distributed
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.capture import LayerCapture
from tokenprobe.files import default_cache_dir, json_safe, write_json
from tokenprobe.locks import RunLock
from tokenprobe.models.loading import LoadedModel, load_model
from tokenprobe.models.surgery import Unembedding
from tokenprobe.pipelines.train import say
from tokenprobe.probes.base import Probe, load_probe, probe_files
from tokenprobe.report.ablation import ABLATION

MODES = ("project", "mean")


@dataclass
class AblateOptions:
    layers: str | None = None  # a subset of the run's probed layers (default: all of them)
    family: str | None = None  # the probe family whose direction is edited (default: the run's primary one)
    max_tokens: int = 4096  # held-out tokens the model runs on (whole chunks)
    random: int = 20  # random directions per layer, the baseline
    mode: str = "project"
    steer: float | None = None
    kl_positions: int = 128  # positions (not followed by the target) where the KL divergence is measured
    batch_size: int = 8
    resamples: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise TokenprobeError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_tokens", "batch_size", "kl_positions"):
            if getattr(self, name) < 1:
                raise TokenprobeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.random < 2:
            raise TokenprobeError(f"--random must be at least 2 (the baseline is their spread), got {self.random}")
        if self.resamples != 0 and self.resamples < 100:
            raise TokenprobeError(f"--bootstrap must be 0 or at least 100, got {self.resamples}")
        if self.layers is not None:
            parse_layers(self.layers, num_layers=None)


# ------------------------------------------------------------------------------------------ the edit


def unit(direction: torch.Tensor) -> torch.Tensor:
    norm = direction.float().norm()
    if not norm > 0:
        return torch.zeros_like(direction, dtype=torch.float32)
    return direction.float() / norm


def edit_hidden(hidden: torch.Tensor, direction: torch.Tensor, mode: str, value: float = 0.0) -> torch.Tensor:
    """The residual `hidden` (..., width) with its component along the unit `direction` removed
    (``project``), set to `value` (``mean``), or with `value` times the direction added (``steer``);
    computed in float32, returned in hidden's dtype."""
    x = hidden.float()
    d = direction.to(device=x.device, dtype=torch.float32)
    if mode == "steer":
        x = x + value * d
    else:
        component = x @ d
        target = 0.0 if mode == "project" else value
        x = x - (component - target)[..., None] * d
    return x.to(hidden.dtype)


@contextmanager
def edited(loaded: LoadedModel, layer: int, direction: torch.Tensor, mode: str, value: float = 0.0) -> Iterator[None]:
    """Hooks that apply `edit_hidden` to the residual stream at `layer` (the input of block 0 for layer
    0, the output of block `layer` - 1 otherwise) at every position, for the forward passes inside."""
    stack = loaded.layer_stack
    if layer == 0:
        def pre_hook(module, args, kwargs):
            if args:
                return (edit_hidden(args[0], direction, mode, value), *args[1:]), kwargs
            kwargs["hidden_states"] = edit_hidden(kwargs["hidden_states"], direction, mode, value)
            return args, kwargs
        handle = stack[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(module, args, output):
            if isinstance(output, (tuple, list)):
                return type(output)([edit_hidden(output[0], direction, mode, value), *output[1:]])
            return edit_hidden(output, direction, mode, value)
        handle = stack[layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -------------------------------------------------------------------------------------- measurement


@dataclass
class Measured:
    """The model's last residual (before the final norm) at the measured positions of one pass."""

    target: torch.Tensor  # (positives, width): where the target comes next
    other: torch.Tensor  # (kl positions, width)
    finite: bool


class _Resume(torch.nn.Module):
    """Stands in for decoder block `index` during an edited pass from layer L >= 1: blocks below L - 1 pass
    their input through unchanged (nothing computed), and block L - 1 returns the clean residual at layer L
    (cached for the batch) with the edit applied. The blocks from L on run as usual."""

    def __init__(self, original: torch.nn.Module, passes: Passes, layer: int | None, edit: tuple | None):
        super().__init__()
        for name, value in vars(original).items():  # attributes a model's loop may read (attention type, ...)
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, name, value)
        self.passes, self.layer, self.edit = passes, layer, edit

    def forward(self, hidden_states, *args, **kwargs):
        if self.layer is None:
            return hidden_states
        clean = self.passes.residual[self.layer][self.passes.batch].to(hidden_states.device)
        _, direction, mode, value = self.edit
        return edit_hidden(clean, direction, mode, value)


class Passes:
    """Forward passes over the held-out chunks, each stopped after the last block, with an optional edit.

    The clean pass keeps every layer's residual at every position of the chunks; an edited pass from layer
    L >= 1 then starts from the clean residual at L (blocks below L are stood in for, not run: the edit
    cannot change them), which halves the cost of a sweep over all layers. Tested equal to a full pass
    with the edit hooked in (tests/pipelines/test_ablate.py)."""

    def __init__(self, loaded: LoadedModel, chunks: np.ndarray, target_rows: np.ndarray, other_rows: np.ndarray,
                 batch_size: int, resume: bool = True):
        self.loaded, self.chunks, self.batch_size = loaded, chunks, batch_size
        self.target_rows, self.other_rows = target_rows, other_rows  # (chunk, position) pairs, (n, 2)
        self.resume = resume
        self.residual: dict[int, torch.Tensor] = {}  # layer -> (chunks, length, width), from the clean pass
        self.batch = np.zeros(0, dtype=np.int64)
        self.tokens = 0
        self.seconds = 0.0

    def standardising_scale(self, layer: int) -> torch.Tensor:
        """1 / the standard deviation of each residual dimension at `layer` over every position of the clean
        pass (0 where it does not vary): random directions drawn isotropic in these standardised
        coordinates, as the probes are fitted, stay off the few dimensions of huge variance that a direction
        drawn isotropic in the raw residual stream would catch (removing those breaks the model whatever the
        target, which is no baseline for a probe's direction)."""
        std = self.residual[layer].float().reshape(-1, self.loaded.hidden_size).std(0)
        return torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std))

    def clean_states(self, layer: int) -> torch.Tensor:
        """The clean residual at `layer` at every measured position (after the clean pass)."""
        wanted = np.concatenate([self.target_rows, self.other_rows])
        return self.residual[layer][torch.from_numpy(wanted[:, 0]), torch.from_numpy(wanted[:, 1])]

    def run(self, edit: tuple[int, torch.Tensor, str, float] | None = None) -> Measured:
        """The clean pass (no `edit`; it also keeps every layer's residual), or a pass with `edit` =
        (layer, unit direction, mode, value) applied at that layer."""
        started = time.perf_counter()
        loaded, last = self.loaded, self.loaded.num_layers
        device = loaded.placement.input
        wanted = np.concatenate([self.target_rows, self.other_rows])
        out = torch.empty(len(wanted), loaded.hidden_size, dtype=loaded.dtype)
        finite = True
        skip = edit is not None and edit[0] >= 1 and self.resume and self.residual
        stack = loaded.layer_stack
        originals = list(stack)
        if skip:
            layer = edit[0]
            for i in range(layer):
                stack[i] = _Resume(originals[i], self, layer if i == layer - 1 else None, edit)
        keep = edit is None
        layers = list(range(0, last + 1)) if keep else [last]
        try:
            context = edited(loaded, *edit) if edit is not None and not skip else _nothing()
            with context, LayerCapture(loaded, layers) as capture, torch.inference_mode():
                for first in range(0, len(self.chunks), self.batch_size):
                    batch = np.arange(first, min(first + self.batch_size, len(self.chunks)))
                    index = np.flatnonzero(np.isin(wanted[:, 0], batch))
                    if not len(index) and not keep:
                        continue
                    self.batch = batch
                    ids = torch.from_numpy(self.chunks[batch]).to(device)
                    length = ids.shape[1]
                    if keep:  # every position of every layer, for the edited passes to start from
                        rows = torch.arange(len(batch)).repeat_interleave(length)
                        cols = torch.arange(length).repeat(len(batch))
                    else:
                        rows = torch.from_numpy(wanted[index, 0] - first)
                        cols = torch.from_numpy(wanted[index, 1])
                    captured, nonfinite = capture.run(loaded.model, ids, rows.to(device), cols.to(device))
                    finite = finite and not nonfinite
                    if keep:
                        for layer, states in captured.items():
                            if layer not in self.residual:
                                self.residual[layer] = torch.empty(len(self.chunks), length, loaded.hidden_size,
                                                                   dtype=states.dtype)
                            self.residual[layer][torch.from_numpy(batch)] = states.cpu().view(len(batch), length, -1)
                        last_states = self.residual[last][torch.from_numpy(wanted[index, 0]),
                                                          torch.from_numpy(wanted[index, 1])]
                    else:
                        last_states = captured[last].cpu()
                    out[torch.from_numpy(index)] = last_states
                    self.tokens += ids.numel()
        finally:
            for i, module in enumerate(originals):
                if stack[i] is not module:
                    stack[i] = module
        self.seconds += time.perf_counter() - started
        n = len(self.target_rows)
        return Measured(target=out[:n], other=out[n:], finite=finite)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def chunk_bootstrap(values: np.ndarray, chunk: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its 95% interval, resampling whole chunks."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if resamples == 0:
        return mean, float("nan"), float("nan")
    unique, inverse = np.unique(chunk, return_inverse=True)
    rng = np.random.default_rng([seed, zlib.crc32(b"ablate")])
    counts = rng.multinomial(len(unique), np.full(len(unique), 1 / len(unique)), size=resamples).astype(np.float64)
    sums = counts @ np.bincount(inverse, weights=values, minlength=len(unique))
    sizes = counts @ np.bincount(inverse, minlength=len(unique)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / sizes
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


@dataclass
class Effect:
    """One edited pass against the clean one."""

    log_ratio: tuple[float, float, float]  # mean change of log P(target) where it comes next, 95% interval
    top_lost: tuple[float, float, float]  # share of the positions where the target was top 1 and no longer is
    kl: tuple[float, float, float]  # mean KL(clean || edited) elsewhere, nats
    finite: bool

    def to_dict(self) -> dict[str, Any]:
        def triple(t):
            return {"mean": t[0], "low": t[1], "high": t[2]}
        return {"log_ratio": triple(self.log_ratio), "top1_lost": triple(self.top_lost), "kl": triple(self.kl),
                "finite": self.finite}


class Measure:
    """The clean pass's figures, and each edited pass's effect against them."""

    def __init__(self, unembed: Unembedding, target_ids: list[int], clean: Measured, target_chunk: np.ndarray,
                 other_chunk: np.ndarray, resamples: int, seed: int):
        self.unembed, self.target_ids, self.clean = unembed, target_ids, clean
        self.target_chunk, self.other_chunk = target_chunk, other_chunk
        self.resamples, self.seed = resamples, seed
        self.clean_log, self.clean_top = unembed.target_log_probability(clean.target, target_ids)

    def effect(self, edited_pass: Measured) -> Effect:
        log, top = self.unembed.target_log_probability(edited_pass.target, self.target_ids)
        change = log - self.clean_log
        was_top = self.clean_top.astype(bool)
        lost = (was_top & ~top.astype(bool))[was_top].astype(np.float64)
        kl = self.unembed.kl_divergence(self.clean.other, edited_pass.other)
        return Effect(log_ratio=chunk_bootstrap(change, self.target_chunk, self.resamples, self.seed),
                      top_lost=chunk_bootstrap(lost, self.target_chunk[was_top], self.resamples, self.seed),
                      kl=chunk_bootstrap(kl, self.other_chunk, self.resamples, self.seed),
                      finite=edited_pass.finite)


# ----------------------------------------------------------------------------------------- pipeline


@dataclass
class AblationResult:
    data: dict[str, Any]  # what ablation.json holds
    path: Path | None


def _probes(run_dir: Path, family: str | None, layers: str | None, num_layers: int | None = None) -> list[Probe]:
    files = probe_files([run_dir])
    probes = [load_probe(path) for path in files]
    kinds = []
    for p in probes:
        if p.kind not in kinds:
            kinds.append(p.kind)
    primary = next((p.kind for p, path in zip(probes, files) if path.name.startswith("layer")), kinds[0])
    family = family or primary
    if family not in kinds:
        raise TokenprobeError(f"--probe {family}: this run has no {family} probes (it has {', '.join(kinds)})")
    chosen = sorted((p for p in probes if p.kind == family), key=lambda p: p.layer)
    if chosen[0].direction() is None:
        raise TokenprobeError(f"--probe {family}: an {family} probe has no single direction to remove; use a "
                              "linear, mean-diff or sparse probe")
    if layers is not None:
        wanted = set(parse_layers(layers, num_layers))
        missing = sorted(wanted - {p.layer for p in chosen})
        if missing:
            raise TokenprobeError(f"--layers {','.join(map(str, missing))}: this run has no {family} probe there "
                                  f"(probed layers: {', '.join(str(p.layer) for p in chosen)})")
        chosen = [p for p in chosen if p.layer in wanted]
    return chosen


def read_run(run_dir: Path) -> tuple[dict[str, Any], RunConfig]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise TokenprobeError(f"{run_dir} is not a tokenprobe run folder: no run.json")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenprobeError(f"cannot read {path}: {exc}") from None
    if record.get("kind") == "scan":
        raise TokenprobeError(f"{run_dir} is a scan; ablate one target's run: tokenprobe train --target T, then "
                              "tokenprobe ablate RUN")
    return record, RunConfig.from_dict(record["config"])


def ablate(run_dir: str | Path, options: AblateOptions | None = None, *, loaded: LoadedModel | None = None,
           cache_dir: str | Path | None = None, device: str | None = None, save: bool = True,
           progress: bool = True) -> AblationResult:
    """The causal check of a run's probes (see the module); writes ablation.json, ablation.png and a
    report.md section into the run folder."""
    refuse_distributed("`ablate`")
    options = options or AblateOptions()
    options.validate()
    run_dir = Path(run_dir)
    record, config = read_run(run_dir)
    if config.span_labels is not None or parse_task(config.task)[1] != 1:
        raise TokenprobeError(f"ablate measures the model's own next-token probability of the target: it needs a "
                              f"--task next run with a target token (this run: --task {config.task}"
                              f"{', span labels' if config.span_labels else ''})")
    probes = _probes(run_dir, options.family, options.layers)
    quiet = not progress
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    lock = RunLock(run_dir).acquire() if save else None
    try:
        started = time.perf_counter()
        if loaded is None:
            say(f"Loading model {config.model} ...", quiet)
            loaded = load_model(config.model, config.dtype, device or config.device, cache_dir, progress=progress)
        for probe in probes:
            probe.check_compatible(loaded)
        data = _run(config, options, probes, loaded, cache_dir, progress)
        data["timings"]["total_s"] = time.perf_counter() - started
        if save:
            write_json(run_dir / ABLATION, data)
            from tokenprobe.report.markdown import write_report

            write_report(run_dir)  # report.md gains the check's section, and ablation.png is drawn
    finally:
        if lock is not None:
            lock.release()
    return AblationResult(data=json_safe(data), path=run_dir / ABLATION if save else None)


def _run(config: RunConfig, options: AblateOptions, probes: list[Probe], loaded: LoadedModel, cache_dir: Path,
         progress: bool) -> dict[str, Any]:
    quiet = not progress
    prepared = prepare_chunks(config, loaded, cache_dir, progress)
    target_ids = list(probes[0].meta.target_ids)
    count = max(1, math.ceil(options.max_tokens / config.context_length))
    chosen = np.sort(prepared.split.eval[:count])  # held-out chunks, in the run's seeded order
    chunks = prepared.chunks[chosen]
    labels, valid = make_labeler(config.task, target_ids).labels(chunks, has_bos=prepared.bos_id is not None)
    target_rows = np.argwhere(labels & valid)
    if len(target_rows) < 4:
        raise TokenprobeError(f"the target comes next at only {len(target_rows)} position(s) of the {len(chunks)} "
                              f"held-out chunks used; raise --max-tokens (now {options.max_tokens:,})")
    rng = np.random.default_rng([options.seed, zlib.crc32(b"ablate-kl")])
    others = np.argwhere(~labels & valid)
    other_rows = others[np.sort(rng.choice(len(others), size=min(options.kl_positions, len(others)),
                                           replace=False))]
    say(f"Ablating the {probes[0].kind} probe's direction at layer(s) {', '.join(str(p.layer) for p in probes)}: "
         f"{len(chunks)} held-out chunks ({chunks.size:,} tokens), the target next at {len(target_rows):,} positions, "
         f"KL at {len(other_rows):,} others; {options.random} random directions per layer", quiet)
    passes = Passes(loaded, chunks, target_rows, other_rows, options.batch_size)
    unembed = Unembedding.of(loaded.model)
    width = loaded.hidden_size
    total = 1 + len(probes) * (1 + options.random + (1 if options.steer is not None else 0))
    layers_out = []
    with tqdm(total=total, desc="Ablation passes", unit="pass", disable=not progress, dynamic_ncols=True) as bar:
        clean = passes.run()
        bar.update(1)
        measure = Measure(unembed, target_ids, clean, target_rows[:, 0], other_rows[:, 0], options.resamples,
                          options.seed)
        generator = torch.Generator().manual_seed(options.seed)
        for probe in probes:
            layer = probe.layer
            direction = unit(probe.direction())
            value = _mean_value(probe, direction, options.mode, passes, layer)
            effect = measure.effect(passes.run((layer, direction, options.mode, value)))
            bar.update(1)
            randoms = []
            scale = passes.standardising_scale(layer)
            for _ in range(options.random):
                r = unit(torch.randn(width, generator=generator) * scale)
                r_value = _mean_value(probe, r, options.mode, passes, layer)
                randoms.append(measure.effect(passes.run((layer, r, options.mode, r_value))))
                bar.update(1)
                bar.set_postfix_str(f"layer {layer}, {passes.tokens / max(passes.seconds, 1e-9):,.0f} tok/s")
            entry = {"layer": layer, "probe": effect.to_dict(), "random": [r.to_dict() for r in randoms],
                     "edit_value": value}
            entry.update(_verdict(effect, randoms))
            if options.steer is not None:
                spread = _spread(passes, layer, direction)
                steered = measure.effect(passes.run((layer, direction, "steer", options.steer * spread)))
                entry["steer"] = {"alpha": options.steer, "spread": spread, **steered.to_dict()}
                bar.update(1)
            layers_out.append(entry)
    return {
        "kind": "ablation",
        "family": probes[0].kind,
        "mode": options.mode,
        "target": probes[0].meta.target, "target_ids": target_ids,
        "model": loaded.name,
        "chunks": int(len(chunks)), "tokens": int(chunks.size),
        "target_positions": int(len(target_rows)), "kl_positions": int(len(other_rows)),
        "target_top1_clean": float(measure.clean_top.mean()),
        "clean_log_probability": float(measure.clean_log.mean()),
        "random_directions": options.random, "resamples": options.resamples, "seed": options.seed,
        "random_draw": "isotropic in standardised coordinates (each dimension divided by its clean standard deviation "
                       "at the layer), then unit length",
        "layers": layers_out,
        "timings": {"passes": total, "forward_s": passes.seconds,
                    "tokens_per_second": passes.tokens / max(passes.seconds, 1e-9)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _verdict(effect: Effect, randoms: list[Effect]) -> dict[str, Any]:
    """Whether the probe direction's effect on log P(target) lies beyond every random direction's, intervals
    included, and the random directions' band (the range of their means)."""
    means = [r.log_ratio[0] for r in randoms]
    lows = [r.log_ratio[1] for r in randoms]
    highs = [r.log_ratio[2] for r in randoms]
    low, high = effect.log_ratio[1], effect.log_ratio[2]
    below = bool(np.isfinite(high) and high < np.nanmin(lows))
    above = bool(np.isfinite(low) and low > np.nanmax(highs))
    return {"random_band": {"min": float(np.min(means)), "max": float(np.max(means)),
                            "median": float(np.median(means))},
            "beyond_random": below or above, "direction_of_effect": "lowers" if below else "raises" if above else None}


def _mean_value(probe: Probe, direction: torch.Tensor, mode: str, passes: Passes, layer: int) -> float:
    """The component's training mean along `direction` for ``mean`` (0 for ``project``): from the probe's
    training mean where it keeps one (linear, sparse), else from the clean held-out states."""
    if mode != "mean":
        return 0.0
    mean = getattr(probe, "mean", None)
    if mean is not None:
        return float(mean.float() @ direction)
    return float(passes.clean_states(layer).float().mean(0) @ direction)


def _spread(passes: Passes, layer: int, direction: torch.Tensor) -> float:
    return float((passes.clean_states(layer).float() @ direction).std())
