"""`tokenprobe fit RUN`: retrain and rescore a run's probes from its kept activations, without the model.

A `train` run keeps its sampled positions' activations in ``RUN/activations/`` (see
:mod:`tokenprobe.extract.store`) with the positions, each position's token and every baseline's scores.
`fit` reads them, fits the probes again with the options given (``--probe``, ``--l2``, ``--layers``,
``--control``, ``--mdl``, ``--bootstrap``, ...; everything else is the run's), scores them with the
baselines the run computed, and publishes a new run folder. With the run's own options it reproduces
its probes and figures exactly: the same activations, in the same order, through the same code.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from tokenprobe.analysis.baselines import BaselineSet
from tokenprobe.analysis.bootstrap import Scorer
from tokenprobe.analysis.families import score_families
from tokenprobe.analysis.scoring import score_run
from tokenprobe.config import BASELINE_KINDS, RunConfig, parse_layers, sweep_name
from tokenprobe.data.positions import PositionSet
from tokenprobe.device import resolve_device
from tokenprobe.distributed import refuse_distributed
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.store import STORE_RECORD, StoredRun, open_store
from tokenprobe.pipelines.run_dir import RUN_RECORD, RunDir
from tokenprobe.pipelines.train import (
    ACTIVATIONS,
    ProbeSubject,
    RunResult,
    _fit_summary,
    _version,
    family_files,
    fit_stage,
    layer_results,
    say,
    write_run,
)
from tokenprobe.probes.base import ModelIdentity, load_probe, probe_files
from tokenprobe.vocabulary import LOGIT_LENS, MAJORITY, MODEL, TOKEN_STATS, ScorerKey, baseline_key

# The options `fit` may change: how probes are fitted and scored. The rest (model, corpus, target, task,
# positions, seed, context) decided the activations and stays the run's.
FIT_OPTIONS = ("probe", "l2", "layers", "control", "mdl", "bootstrap", "max_iter", "mlp_width", "pos_weight_cap",
               "baselines", "device")


@dataclass
class _StoredPositions:
    """What scoring needs of a `Prepared`: the positions."""

    positions: PositionSet


def store_folder(run: Path, record: dict[str, Any]) -> Path:
    """The activation store a run's probes can be refitted from: its own, or the one it was fitted from."""
    own = run / ACTIVATIONS
    if (own / STORE_RECORD).is_file():
        return own
    origin = (record.get("fit") or {}).get("activations")
    if origin and (Path(origin) / STORE_RECORD).is_file():
        return Path(origin)
    why = ("it was run with --no-keep-activations or they took 2 GB or more"
           if (record.get("activations") or {}).get("kept") is False else
           "it was made before tokenprobe kept activations" if "activations" not in record else
           "the store was deleted")
    raise TokenprobeError(f"{run} has no stored activations ({why}); run `tokenprobe train` again with "
                          "--keep-activations")


def _scorer_key(text: str) -> ScorerKey:
    kind, _, name = text.partition("/")
    return ScorerKey(kind, int(name)) if name else baseline_key(kind)


KIND_OF = {LOGIT_LENS: "lens", MODEL: "model", TOKEN_STATS: "stats"}  # scorer label -> --baselines kind


def stored_baselines(stored: StoredRun, layers: list[int], kinds: tuple[str, ...]) -> BaselineSet | None:
    """The baselines the run scored, for `layers` (the logit lens of other layers dropped) and `kinds`
    (--baselines; the majority class comes with any), or None when the run kept none of them."""
    scorers = {}
    for text, (scores, threshold) in stored.baseline_scores.items():
        key = _scorer_key(text)
        if key.layer is not None and key.layer not in layers:
            continue
        if KIND_OF.get(key.label, "majority") in (*kinds, "majority"):
            scorers[key] = Scorer(scores=scores, threshold=threshold)
    if not [key for key in scorers if key.label != MAJORITY]:
        return None
    info = dict((stored.record.get("baselines") or {}).get("info") or {})
    if list(kinds) != list(BASELINE_KINDS):
        info["kinds"] = [kind for kind in kinds]
    return BaselineSet(scorers=scorers, info=info)


def fit_run(run_dir: str | Path, options: dict[str, Any] | None = None, *, out_dir: str | Path | None = None,
            overwrite: bool = False, save: bool = True, progress: bool = True) -> RunResult:
    """Refits and rescores `run_dir`'s probes from its activation store with `options` (a subset of
    FIT_OPTIONS, as RunConfig fields) changed, into `out_dir` (default: beside the run, named
    ``<run>-fit-<time>``)."""
    refuse_distributed("`fit`")
    quiet = not progress
    started = time.perf_counter()
    run = Path(run_dir)
    if not (run / RUN_RECORD).is_file():
        raise TokenprobeError(f"{run} is not a tokenprobe run folder (no {RUN_RECORD}); give the folder `tokenprobe "
                              "train` wrote")
    record = json.loads((run / RUN_RECORD).read_text())
    if record.get("kind"):
        raise TokenprobeError(f"{run} is a `tokenprobe {record['kind']}` folder; give a `tokenprobe train` run")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(FIT_OPTIONS))
    if unknown:
        raise TokenprobeError(f"fit cannot change {', '.join(unknown)}: they decided the activations; "
                              "run `tokenprobe train` for that")
    config = dataclasses.replace(RunConfig.from_dict(record["config"]), **options)
    config.validate()
    folder = store_folder(run, record)
    stored_layers = json.loads((folder / STORE_RECORD).read_text()).get("probed_layers", [])
    layers = parse_layers(config.layers, record["model"]["num_layers"])
    missing = [layer for layer in layers if layer not in stored_layers]
    if missing:
        raise TokenprobeError(f"the stored activations hold layers {','.join(map(str, stored_layers))}, not "
                              f"{','.join(map(str, missing))}; choose --layers among them, or run `tokenprobe train` "
                              "with those layers")
    run_folder = RunDir(out_dir, overwrite) if save else None
    timings: dict[str, float] = {}

    t = time.perf_counter()
    stored = open_store(folder)
    timings["read_store_s"] = time.perf_counter() - t
    source = stored.source
    positions = PositionSet(chunk=stored.chunk, position=stored.position, label=stored.label, subset=stored.subset)
    say(f"Activations of {len(positions):,} positions at layers {','.join(map(str, source.layers))} from {folder} "
        f"(checked; {source.nbytes() / 1024**2:.0f} MB); fitting layers {','.join(map(str, layers))}", quiet)

    device = resolve_device(config.device or "auto")  # where train fits them: the accelerator, else the CPU
    fitted = fit_stage(config, positions, stored.token, source, layers, device, progress, timings)
    probes = fitted.primary
    for family, by_layer in fitted.probes.items():
        summary = _fit_summary(config, family, list(by_layer.values()))
        if summary:
            say(summary, quiet)

    kinds = config.baseline_kinds()
    made = stored_baselines(stored, layers, kinds) if kinds else None
    if kinds and made is None:
        say("Baselines skipped: the run kept none of those asked for (--no-baselines or --baselines, or a task "
            "they do not answer)", quiet)
    t = time.perf_counter()
    prepared = _StoredPositions(positions)
    scored = score_run(None, prepared, source, probes, kinds if made is not None else False, config.bootstrap,
                       config.seed, made=made)
    timings["baselines_intervals_s"] = time.perf_counter() - t
    skipped = (record.get("baselines") or {}).get("skipped")
    if skipped:
        scored.info["skipped"] = skipped
    families = None
    if len(fitted.probes) > 1 or fitted.control is not None or fitted.mdl is not None:
        t = time.perf_counter()
        families = score_families(prepared, source, fitted.probes, fitted.control, fitted.control_labels,
                                  fitted.control_task.record() if fitted.control_task else None,
                                  config.bootstrap, config.seed, fitted.mdl)
        timings["families_scoring_s"] = time.perf_counter() - t

    model = record["model"]
    subject = _subject(run, record)
    new = {**record,
           "config": config.to_dict(),
           "sweep_name": sweep_name(config, model["name"]),
           "layers": layers,
           "pos_weight": fitted.pos_weight,
           "timings": timings,
           "baselines": scored.info,
           "intervals": {"level": 0.95, "resamples": config.bootstrap, "unit": "held-out chunks"},
           "activations": {"kept": False, "bytes": source.nbytes(), "layers": source.layers, "path": None},
           "fit": {"from": str(run.resolve()), "activations": str(folder.resolve()),
                   "changed": {k: options[k] for k in options}},
           "versions": {**record.get("versions", {}), "tokenprobe": _version()},
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    results = layer_results(config, subject, new, probes, scored, save)
    others = family_files(config, subject, new, fitted, families, save)
    timings["total_s"] = time.perf_counter() - started

    written = None
    if run_folder is not None:
        def write(staging: Path) -> None:
            write_run(staging, new, results, probes, others, scored, families)

        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        written = run_folder.publish(run.parent / f"{run.name}-fit-{stamp}", write)
    return RunResult(config=config, record=new, layers=results, probes=probes, out_dir=written,
                     baselines=scored.baselines, comparisons=scored.comparisons, families=families,
                     family_probes=fitted.probes)


def _subject(run: Path, record: dict[str, Any]) -> ProbeSubject:
    """The model and target the run's probes name (read from one of its probe files)."""
    files = probe_files([run])
    if files:
        meta = load_probe(files[0]).meta
        return ProbeSubject(record["model"]["name"], meta.model, meta.target, list(meta.target_ids))
    model = record["model"]
    identity = ModelIdentity(model["name"], model["source"], model["weights_hash"], model["tokenizer_hash"],
                             int(model["hidden_size"]))
    target = record.get("target") or {}
    ids = target.get("token_ids") or ([target["token_id"]] if "token_id" in target else [])
    return ProbeSubject(model["name"], identity, target.get("text", ""), ids)
