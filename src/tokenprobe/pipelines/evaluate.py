"""`eval`: a run's saved probes on another corpus, nothing refitted.

The run's own config with the corpus (and, if asked, --max-tokens) replaced goes through `prepare` (the
same held-out sampling, seed and split rules as training), one extraction of the probed layers (plus the
last layer for the baselines, as `train` plans it), then `train`'s own scoring: `score_run` for the
primary family (baselines, intervals, layer comparisons) and `score_families` for the others (no control
task). The output folder has `train`'s shape (run.json, results.json, report.md, plot.png) so that
`tokenprobe report` reads it, plus a "transfer" block: each probe's figures in its own corpus (the
source run's results.json) and in this one, side by side, with the difference (see
tokenprobe.report.transfer). Published through RunDir like a run: nothing half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenprobe.analysis.families import score_families
from tokenprobe.analysis.scoring import score_run
from tokenprobe.config import DEFAULT_CORPUS, RunConfig, slug
from tokenprobe.data.corpus import SUPPORTED
from tokenprobe.data.prepare import prepare
from tokenprobe.distributed import refuse_distributed
from tokenprobe.errors import TokenprobeError
from tokenprobe.files import default_cache_dir, json_safe
from tokenprobe.models.loading import LoadedModel
from tokenprobe.pipelines.run_dir import RUN_RECORD, RunDir
from tokenprobe.pipelines.train import (
    ProbeSubject,
    RunResult,
    extract_stage,
    layer_results,
    load_stage,
    plan_stage,
    record_stage,
    say,
    target_ids,
    write_outputs,
)
from tokenprobe.probes.base import Probe, load_probe, probe_files
from tokenprobe.report.markdown import load_results
from tokenprobe.report.transfer import transfer_block, transfer_table
from tokenprobe.vocabulary import HELD_OUT

EVAL_KIND = "eval"


@dataclass
class EvalSource:
    """The run whose probes are evaluated: its folder, record, results and the probes asked for."""

    path: Path
    record: dict[str, Any]  # its run.json
    results: dict[str, Any]  # its results.json (the in-corpus figures)
    config: RunConfig
    probes: dict[str, dict[int, Probe]]  # family -> layer -> probe; the first family is the primary one
    files: dict[tuple[str, int], Path]  # (family, layer) -> the probe's file

    @property
    def layers(self) -> list[int]:
        return sorted({layer for by_layer in self.probes.values() for layer in by_layer})


@dataclass
class EvalResult(RunResult):
    """An eval's figures on the new corpus (as a run's), and the side-by-side "transfer" block."""

    transfer: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def transfer_table(self) -> str:
        return transfer_table(self.transfer)


# ------------------------------------------------------------------------------------------- reading


def _run_record(folder: Path) -> dict[str, Any]:
    path = folder / RUN_RECORD
    if not path.is_file():
        if (folder / "scan.json").is_file():
            raise TokenprobeError(f"{folder} is a scan; eval evaluates a run of `tokenprobe train`")
        raise TokenprobeError(f"{folder} is not a tokenprobe run folder: no {RUN_RECORD}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenprobeError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise TokenprobeError(f"cannot read {path}: not a tokenprobe run record (no \"config\")")
    if record.get("kind") == EVAL_KIND:
        source = (record.get("source") or {}).get("run", "the run it came from")
        raise TokenprobeError(f"{folder} is an eval, not a training run; evaluate the run its probes come from "
                              f"({source})")
    if record.get("kind") == "scan":
        raise TokenprobeError(f"{folder} is a scan; eval evaluates a run of `tokenprobe train`")
    return record


def read_source(sources: list[str | Path]) -> EvalSource:
    """The run folder, or probe files of one run, to evaluate; every check that needs no model."""
    sources = [Path(s) for s in sources]
    if not sources:
        raise TokenprobeError("name a run folder (or probe files of one run) to evaluate")
    for source in sources:
        if source.is_dir() and not (source / "probes").is_dir():
            _run_record(source)  # says what the folder is (not a run, a scan, an eval) before "no probe files"
    files = list(dict.fromkeys(p.resolve() for p in probe_files(sources)))
    probes = [load_probe(path) for path in files]
    runs: dict[Path, list[Path]] = {}
    for path, probe in zip(files, probes):
        if probe.meta is None or not probe.meta.run_record:
            raise TokenprobeError(f"{path} does not say which run it comes from (no run record in its metadata)")
        runs.setdefault((path.parent / probe.meta.run_record).resolve(), []).append(path)
    if len(runs) > 1:
        listed = "; ".join(f"{record.parent} ({len(paths)} file{'s' if len(paths) > 1 else ''})"
                           for record, paths in runs.items())
        raise TokenprobeError(f"the probes come from {len(runs)} different runs ({listed}); evaluate one run at "
                              "a time")
    folder = next(iter(runs)).parent
    record = _run_record(folder)
    for path, probe in zip(files, probes):
        if probe.meta.created != record.get("created") or probe.meta.sweep_name != record.get("sweep_name"):
            raise TokenprobeError(f"{path} does not belong to the run in {folder} (its run record says "
                                  f"{record.get('sweep_name')}, created {record.get('created')}; the probe "
                                  f"{probe.meta.sweep_name}, created {probe.meta.created})")
    results = load_results(folder)
    config = RunConfig.from_dict(record["config"])
    order = [*config.probe_families(), *dict.fromkeys(p.kind for p in probes)]
    by_family: dict[str, dict[int, Probe]] = {}
    where: dict[tuple[str, int], Path] = {}
    for family in dict.fromkeys(order):
        for path, probe in sorted(zip(files, probes), key=lambda pair: pair[1].meta.layer):
            if probe.kind != family:
                continue
            if (family, probe.meta.layer) in where:
                raise TokenprobeError(f"two {family} probes of layer {probe.meta.layer}: "
                                      f"{where[(family, probe.meta.layer)]} and {path}")
            by_family.setdefault(family, {})[probe.meta.layer] = probe
            where[(family, probe.meta.layer)] = path
    return EvalSource(path=folder, record=record, results=results, config=config, probes=by_family, files=where)


def _check_corpus(spec: str) -> None:
    """A local corpus that is not there is an error before the model loads (hub datasets load later)."""
    if spec == DEFAULT_CORPUS:
        return
    path = Path(spec).expanduser()
    if not path.exists() and (path.suffix.lower() in SUPPORTED or spec.startswith((".", "/", "~"))):
        raise TokenprobeError(f"corpus not found: {spec}")


def eval_config(source: EvalSource, corpus: str, text_field: str = "text", corpus_config: str | None = None,
                corpus_split: str = "train", max_tokens: int | None = None, bootstrap: int | None = None,
                device: str | None = None) -> RunConfig:
    """The run's config with the corpus (and max_tokens, bootstrap, device where given) replaced, the
    families those of the probes evaluated; no control task, no MDL, no WandB (nothing is fitted)."""
    run = source.config
    if run.labels is not None and corpus != run.corpus:
        raise TokenprobeError(f"this run's labels come from the span file {run.labels}, one entry per document of "
                              f"its own corpus ({run.corpus}); they cannot label another corpus (a run with "
                              "--label-regex can be evaluated anywhere)")
    config = dataclasses.replace(
        run, corpus=str(corpus), text_field=text_field, corpus_config=corpus_config, corpus_split=corpus_split,
        max_tokens=run.max_tokens if max_tokens is None else max_tokens,
        bootstrap=run.bootstrap if bootstrap is None else bootstrap, device=device or run.device,
        probe=",".join(source.probes), control=False, mdl=False, wandb=False)
    config.validate()
    _check_corpus(config.corpus)
    return config


def default_eval_dir(source: EvalSource, corpus: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"eval-{source.path.name}-on-{slug(corpus)}-{stamp}"


# ------------------------------------------------------------------------------------------ pipeline


def evaluate_run(
    sources: str | Path | list[str | Path],
    corpus: str,
    *,
    text_field: str = "text",
    corpus_config: str | None = None,
    corpus_split: str = "train",
    max_tokens: int | None = None,
    bootstrap: int | None = None,
    device: str | None = None,
    out_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    save: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Evaluates a run's saved probes (every layer, every family; or the probe files given, of one run)
    on another corpus, fitting nothing; see the module. With ``save=True`` the eval goes to `out_dir`
    (default ``runs/eval-<run folder>-on-<corpus>-<time>``)."""
    refuse_distributed("`eval`")
    source = read_source([sources] if isinstance(sources, (str, Path)) else list(sources))
    config = eval_config(source, corpus, text_field, corpus_config, corpus_split, max_tokens, bootstrap, device)
    if out_dir is not None and Path(out_dir).resolve() == source.path.resolve():
        raise TokenprobeError(f"--out {out_dir} is the run being evaluated; choose another --out")
    quiet = not progress
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    run_dir = RunDir(out_dir, overwrite) if save else None  # a given --out is checked and locked now
    try:
        return _evaluate(source, config, run_dir, save, loaded, cache_dir, progress, quiet)
    finally:
        if run_dir is not None:
            run_dir.release()


def _evaluate(source: EvalSource, config: RunConfig, run_dir: RunDir | None, save: bool,
              loaded: LoadedModel | None, cache_dir: Path, progress: bool, quiet: bool) -> EvalResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = load_stage(config, loaded, cache_dir, progress)
    timings["load_model_s"] = time.perf_counter() - started
    for family, by_layer in source.probes.items():
        for layer, probe in by_layer.items():
            probe.check_compatible(loaded)
            if not 0 <= layer <= loaded.num_layers:
                raise TokenprobeError(f"the {family} probe of layer {layer} does not fit {loaded.source!r}, which "
                                      f"has layers 0 to {loaded.num_layers}")
    layers = source.layers

    t = time.perf_counter()
    prepared = prepare(config, loaded, cache_dir, progress, say=lambda m: say(m, quiet))
    timings["chunks_s"] = time.perf_counter() - t
    first = next(iter(next(iter(source.probes.values())).values()))
    if prepared.target is not None and first.meta.target_ids and target_ids(prepared) != list(first.meta.target_ids):
        raise TokenprobeError(f"the run's target resolves to token ids {target_ids(prepared)} with this tokenizer, "
                              f"its probes were trained for {list(first.meta.target_ids)}")
    counts = prepared.positions.counts()
    say(f"Evaluating the {', '.join(source.probes)} probes of {source.path} (nothing refitted); held-out positions: "
        + "; ".join(f"{k} {counts[k]['positions']:,} ({counts[k]['positive']:,} positive) from "
                    f"{counts[k]['chunks']:,} chunks" for k in HELD_OUT), quiet)

    planned = plan_stage(config, loaded, prepared, layers, cache_dir, timings, quiet)
    acts, stats = extract_stage(loaded, prepared, planned, progress)
    timings["forward_s"] = stats.seconds

    t = time.perf_counter()
    primary = next(iter(source.probes.values()))
    scored = score_run(loaded, prepared, acts, primary, planned.baselines, config.bootstrap, config.seed,
                       sets=HELD_OUT)
    timings["baselines_intervals_s"] = time.perf_counter() - t
    if planned.baselines_skipped:
        scored.info["skipped"] = planned.baselines_skipped
    families = None
    if len(source.probes) > 1:
        t = time.perf_counter()
        families = score_families(prepared, acts, source.probes, None, None, None, config.bootstrap, config.seed,
                                  sets=HELD_OUT)
        timings["families_scoring_s"] = time.perf_counter() - t
        for row in families.layers:
            row.probe_file = str(source.files[(row.family, row.layer)])

    record = record_stage(config, loaded, prepared, layers, stats, source.record.get("pos_weight"), timings, scored)
    source_name = source.record.get("sweep_name")
    record = {"kind": EVAL_KIND, **record,
              "sweep_name": f"eval-{source_name}-on-{slug(config.corpus)}",
              "source": {"run": str(source.path), "sweep_name": source_name, "corpus": source.record.get("corpus"),
                         "created": source.record.get("created"), "config": source.record.get("config")}}
    family = next(iter(source.probes))
    results = [dataclasses.replace(r, probe_file=str(source.files[(family, r.layer)]))
               for r in layer_results(config, ProbeSubject.of(loaded, prepared), record, primary, scored, save=False,
                                             describe=False)]
    transfer = transfer_block(source.path, source.results, record, json_safe([r.to_dict() for r in results]),
                              json_safe(families.to_dict()) if families is not None else None)
    timings["total_s"] = time.perf_counter() - started

    out_dir = None
    if save:
        def write(staging: Path) -> None:
            write_outputs(staging, record, results, scored, families, {"transfer": transfer})

        out_dir = run_dir.publish(default_eval_dir(source, config.corpus), write)
    planned.checkpoint.remove()
    return EvalResult(config=config, record=record, layers=results, probes=primary, out_dir=out_dir,
                      baselines=scored.baselines, comparisons=scored.comparisons, families=families,
                      family_probes=source.probes, transfer=json_safe(transfer), source=source.path)
