"""`tokenprobe viz` in a real browser: the Debian chromium driven by Playwright, from file://, offline."""

from __future__ import annotations

import json
import math
import os
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, load_model, load_probe
from tokenprobe.pipelines.ablate import AblateOptions, ablate
from tokenprobe.probes.linear import LinearProbe
from tokenprobe.viz.explore import encode_float32, render_html, visualize
from viz_fixtures import TRICKY_TEXT, train_tiny_run

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install playwright)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model_dirs["gemma3"], corpus_file, tmp_path_factory.mktemp("viz") / "gemma3-run",
                          session_cache)


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs, session_cache):
    return load_model(str(tiny_model_dirs["gemma3"]), "float32", "cpu", session_cache)


@pytest.fixture(scope="module")
def tricky(run, loaded, session_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages") / "tricky.html"
    return visualize([run], text=TRICKY_TEXT, loaded=loaded, cache_dir=session_cache, out=out)


class Page:
    """A page opened from file:// that fails the test on any script error or network request."""

    def __init__(self, browser, path: Path, width: int = 1000, height: int = 700):
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", lambda r: self.requests.append(r.url) if not r.url.startswith("file:") else None)
        self.page.goto(path.resolve().as_uri())

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def set_layer(self, index: int) -> None:
        self.js("k => { const s = document.getElementById('layer'); s.value = String(k); "
                "s.dispatchEvent(new Event('input')); }", index)

    def colours(self) -> list[str]:
        return self.js("() => [...document.querySelectorAll('.tok')].map(s => getComputedStyle(s).backgroundColor)")

    def close(self) -> None:
        assert self.errors == [], self.errors
        assert self.requests == [], self.requests
        self.context.close()


@pytest.fixture()
def opened(browser):
    pages: list[Page] = []

    def open_page(path: Path, **kwargs) -> Page:
        pages.append(Page(browser, path, **kwargs))
        return pages[-1]

    yield open_page
    for page in pages:
        page.close()


def test_text_renders_as_text_exactly(tricky, opened):
    page = opened(tricky.path)
    assert page.js("() => window.__pwned") is None
    assert page.js("() => document.querySelectorAll('main script, main b, main img').length") == 0
    # innerText follows the CSS layout: collapsed spaces would be missing and <br> gives '\n'
    assert page.js("() => document.querySelector('.text').innerText") == TRICKY_TEXT
    text = page.js("() => document.querySelector('.text').textContent")
    for piece in ("<script>window.__pwned = 1</script>", "&amp; &lt;", "\U0001F600", "\tTabbed", "   three"):
        assert piece in text
    assert page.js("() => document.querySelectorAll('.text br').length") == TRICKY_TEXT.count("\n")
    assert page.js("() => document.documentElement.outerHTML.includes('&nbsp;')") is False


def test_slider_and_arrow_keys_change_layer_colours_and_metrics(tricky, run, opened):
    page = opened(tricky.path)
    page.set_layer(0)
    assert page.js("() => document.getElementById('layer-num').textContent") == "0"
    first = page.colours()
    meta0 = load_probe(run / "probes" / "layer00.safetensors").metadata["metrics"]["eval"]
    assert f"balanced accuracy {meta0['balanced_accuracy']:.3f}" in page.js(
        "() => document.getElementById('metrics').textContent")
    last = len(tricky.layers) - 1
    page.set_layer(last)
    assert page.js("() => document.getElementById('layer-num').textContent") == str(tricky.layers[last])
    changed = sum(a != b for a, b in zip(first, page.colours()))
    assert changed > len(first) // 4
    meta = load_probe(run / "probes" / f"layer{tricky.layers[last]:02d}.safetensors").metadata["metrics"]["eval"]
    assert f"AUROC {meta['auroc']:.3f}" in page.js("() => document.getElementById('metrics').textContent")
    page.page.locator("h1").click()
    page.page.keyboard.press("ArrowLeft")
    assert page.js("() => document.getElementById('layer-num').textContent") == str(tricky.layers[last - 1])
    page.page.keyboard.press("Home")
    assert page.js("() => document.getElementById('layer-num').textContent") == "0"
    assert page.colours() == first


def test_hover_shows_the_python_probability(tricky, opened):
    page = opened(tricky.path)
    labels = tricky.labels
    texts = {i: s for d in tricky.data["documents"] for s, i in d["pieces"] if i >= 0}
    newline = next(i for i, s in texts.items() if s.strip(" ") == "\n")  # rendered as <br>, named in its tooltip
    checked = 0
    for layer_index in (0, len(tricky.layers) - 1):
        page.set_layer(layer_index)
        for i in (0, newline, 3, 11, len(tricky.token_ids) - 1):
            token = page.page.locator(f".tok[data-i='{i}']")
            if texts[i] == "":
                continue
            token.hover()
            tip = page.page.locator("#tip")
            assert tip.is_visible()
            expected = float(tricky.probabilities[layer_index, i])
            assert page.page.locator("#tip-prob").text_content() == f"{expected:.3f}"
            assert json.loads(page.page.locator("#tip-token").text_content()) == texts[i]
            truth = page.page.locator("#tip-truth").text_content()
            assert truth.endswith({True: "yes", False: "no", None: "unknown (end of text)"}[labels[i]])
            assert page.page.locator("#tip-spark polyline").count() >= 1
            # the model's own P(target next) from the same pass (float32 on the page)
            model = float(np.float32(tricky.model_probabilities[i]))
            assert page.page.locator("#tip-model").text_content() == \
                f"model's own P({json.dumps(tricky.data['target'], ensure_ascii=False)} next): {_fixed3(model)}"
            assert page.page.locator("#tip-ablated").count() == 0  # the run has no ablation.json
            checked += 1
    assert checked >= 8
    page.page.mouse.move(1, 1)
    assert not page.page.locator("#tip").is_visible()


def test_focus_shows_the_tooltip_and_model_probability_when_present(tricky, opened, tmp_path):
    data = json.loads(json.dumps(tricky.data))
    data["tokens"]["model_prob"] = [0.25] * len(tricky.token_ids)
    path = tmp_path / "with-model.html"
    path.write_text(render_html(data), encoding="utf-8")
    page = opened(path)
    page.page.locator(".tok[data-i='2']").focus()
    assert page.page.locator("#tip").is_visible()
    assert page.page.locator("#tip-model").text_content().endswith("0.250")


def test_long_paragraph_wraps_in_a_narrow_viewport(run, loaded, session_cache, opened, tmp_path):
    from tiny_models import synthetic_text

    text = synthetic_text(30, seed=3).replace(". ", ".    ", 10).replace(" the", "\tthe", 5)
    result = visualize([run], text=text, loaded=loaded, cache_dir=session_cache, out=tmp_path / "long.html")
    page = opened(result.path, width=320, height=600)
    assert page.js("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    assert page.js("() => document.querySelector('.text').scrollWidth <= document.querySelector('.text').clientWidth")
    lines = page.js("() => new Set([...document.querySelectorAll('.tok')].map(s => s.getBoundingClientRect().top)).size")
    assert lines > 20
    assert page.js("() => document.querySelector('.text').innerText") == text


def test_nan_renders_as_na(run, loaded, session_cache, opened, tmp_path):
    good = run / "probes" / "layer01.safetensors"
    probe = load_probe(run / "probes" / "layer02.safetensors")
    LinearProbe(weight=torch.full_like(probe.weight, float("nan")), bias=probe.bias, mean=probe.mean,
                scale=probe.scale, meta=probe.meta).save(tmp_path / "layer02-nan.safetensors")
    result = visualize([good, tmp_path / "layer02-nan.safetensors"], text="The cat sat on the mat.", loaded=loaded,
                       cache_dir=session_cache, out=tmp_path / "nan.html")
    assert result.layers == [1, 2] and np.isnan(result.probabilities[1]).all()
    page = opened(result.path)
    page.set_layer(1)
    assert page.js("() => document.querySelectorAll('.tok.na').length") == len(result.token_ids)
    page.page.locator(".tok[data-i='1']").hover()
    assert page.page.locator("#tip-prob").text_content() == "n/a"
    page.set_layer(0)
    assert page.js("() => document.querySelectorAll('.tok.na').length") == 0


def test_only_mistakes_matches_python(tricky, opened):
    page = opened(tricky.path)
    page.set_layer(0)
    page.page.locator("#only-mistakes").check()
    p, y = tricky.probabilities[0], tricky.labels
    wrong = sum(1 for i in range(len(y)) if y[i] is not None and (p[i] >= 0.5) != y[i])
    assert page.js("() => document.querySelectorAll('.only-mistakes .tok.wrong').length") == wrong
    right = page.js("() => [...document.querySelectorAll('.tok.right')].map(s => getComputedStyle(s).backgroundColor)")
    assert right and set(right) == {"rgba(0, 0, 0, 0)"}
    assert f"{wrong} mistakes" in page.js("() => document.getElementById('mistake-stats').textContent")


def test_screenshot(tricky, opened, tmp_path):
    """A screenshot for a person to look at (kept in $TOKENPROBE_SCREENSHOTS when set)."""
    page = opened(tricky.path, width=900, height=600)
    page.set_layer(len(tricky.layers) - 1)
    page.page.locator(".tok[data-i='5']").hover()
    shot = tmp_path / "viz.png"
    page.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TOKENPROBE_SCREENSHOTS"):
        folder = Path(os.environ["TOKENPROBE_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / "viz-tiny.png")


def _fixed3(x: float) -> str:
    """JavaScript's x.toFixed(3) for x >= 0: the exact double rounded half up (Python's format rounds half even)."""
    return str(Decimal(x).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


@pytest.fixture(scope="module")
def scan_page(tiny_model_dirs, corpus_file, session_cache, loaded, tmp_path_factory):
    """A scan of gemma3's three most frequent tokens at every layer, shown on TRICKY_TEXT."""
    from tokenprobe.pipelines.scan import ScanOptions, scan

    config = RunConfig(model=str(tiny_model_dirs["gemma3"]), corpus=str(corpus_file), layers="all", context_length=32,
                       dtype="float32", device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300,
                       max_iter=50, bootstrap=0, l2=0.01)
    folder = tmp_path_factory.mktemp("scan") / "scan"
    scan(config, ScanOptions(top=3, positives=100), out_dir=folder, loaded=loaded, cache_dir=session_cache,
         progress=False)
    return visualize([folder], text=TRICKY_TEXT, loaded=loaded, cache_dir=session_cache,
                     out=tmp_path_factory.mktemp("pages") / "scan.html")


def test_scan_page_switches_target(scan_page, opened):
    view, layers = scan_page.scan, scan_page.layers
    n = len(scan_page.token_ids)
    texts = {i: s for d in scan_page.data["documents"] for s, i in d["pieces"] if i >= 0}
    shown = [i for i in (3, 11, n - 1) if texts[i].strip()]
    page = opened(scan_page.path)
    assert page.js("() => document.getElementById('target-control').hidden") is False
    options = page.js("() => [...document.querySelectorAll('#target option')].map(o => o.textContent)")
    assert len(options) == len(view.targets) == 3
    for option, target in zip(options, view.targets):
        assert option.startswith(f"#{target.rank} {json.dumps(target.text, ensure_ascii=False)} \u00b7 best layer "
                                 f"{target.best_layer} (balanced accuracy ")

    def check(j: int) -> list[str]:
        target = view.targets[j]
        k = layers.index(target.best_layer)  # switching target moves the slider to its best layer
        quoted = json.dumps(target.text, ensure_ascii=False)
        assert page.js("() => document.getElementById('title').textContent").endswith(
            f"will the next token be {quoted}?")
        assert page.js("() => document.getElementById('layer-num').textContent") == str(target.best_layer)
        truth = page.js("() => [...document.querySelectorAll('.tok.truth')].map(s => +s.dataset.i)")
        assert truth == [i for i in range(n) if view.labels[j, i] == 1]
        for i in shown:
            page.page.mouse.move(1, 1)
            page.page.locator(f".tok[data-i='{i}']").hover()
            expected = round(float(view.probabilities[j, k, i]) * 10_000) / 10_000  # as embedded: 4 decimals
            assert page.page.locator("#tip-prob").text_content() == _fixed3(expected)
            assert quoted in page.page.locator("#tip-truth").text_content()
            model = float(np.float32(view.model_probabilities[j, i]))
            assert page.page.locator("#tip-model").text_content() == f"model's own P({quoted} next): {_fixed3(model)}"
        page.page.mouse.move(1, 1)
        return page.colours()

    first = check(0)
    assert sum(view.labels[0] == 1) >= 1  # the truth marks are there to be swapped
    # from another layer than the second target's best, so that the switch has to move the slider
    page.set_layer(next(k for k, layer in enumerate(layers) if layer != view.targets[1].best_layer))
    page.page.select_option("#target", "1")
    second = check(1)
    assert first != second and not np.array_equal(view.labels[0], view.labels[1])
    page.set_layer(0)  # the layer slider keeps working on the new target
    page.page.locator(f".tok[data-i='{shown[0]}']").hover()
    expected = round(float(view.probabilities[1, 0, shown[0]]) * 10_000) / 10_000
    assert page.page.locator("#tip-prob").text_content() == _fixed3(expected)
    page.page.mouse.move(1, 1)
    page.page.select_option("#target", "0")
    assert page.colours() == first


def test_ahead_k_wording(tricky, opened, tmp_path):
    data = json.loads(json.dumps(tricky.data))
    data["task"] = "ahead:3"
    path = tmp_path / "ahead.html"
    path.write_text(render_html(data), encoding="utf-8")
    page = opened(path)
    target = json.dumps(data["target"], ensure_ascii=False)
    assert page.js("() => document.getElementById('title').textContent").endswith(
        f"will the token 3 ahead be {target}?")
    assert page.js("() => document.querySelector('.legend').textContent").count(f"the token 3 ahead really is {target}") == 1
    page.page.locator(".tok[data-i='2']").hover()
    assert f"probe P(token 3 ahead is {target})" in page.page.locator("#tip").text_content()
    assert page.page.locator("#tip-truth").text_content().startswith(f"the token 3 ahead is {target}: ")


def test_colour_by_the_models_own_probability(tricky, opened):
    page = opened(tricky.path)
    assert page.js("() => document.getElementById('colour-control').hidden") is False
    assert page.js("() => [...document.querySelectorAll('#colour-by option')].map(o => o.value)") == ["probe", "model"]
    page.set_layer(0)
    probe0 = page.colours()
    page.page.select_option("#colour-by", "model")
    model = page.colours()
    assert model != probe0
    assert "model's own P(" in page.js("() => document.getElementById('scale-label').textContent")
    page.set_layer(len(tricky.layers) - 1)
    assert page.colours() == model  # the model's own P does not depend on the probe's layer
    page.page.select_option("#colour-by", "probe")
    assert page.colours() != model


@pytest.fixture(scope="module")
def ablation_page(run, loaded, session_cache, tmp_path_factory):
    """A copy of the gemma3 run ablated at layer 1 (`tokenprobe ablate`), shown on TRICKY_TEXT."""
    folder = tmp_path_factory.mktemp("ablated") / "run"
    shutil.copytree(run, folder)
    ablate(folder, AblateOptions(layers="1", random=2, max_tokens=320, resamples=0), loaded=loaded,
           cache_dir=session_cache, progress=False)
    return visualize([folder], text=TRICKY_TEXT, loaded=loaded, cache_dir=session_cache,
                     out=tmp_path_factory.mktemp("pages") / "ablated.html")


def test_ablated_layer_shows_the_models_probability_with_and_without_the_direction(ablation_page, opened):
    result = ablation_page
    assert result.ablation is not None and result.ablation.layers == [1]
    k = result.layers.index(1)
    clean = result.model_probabilities.astype(np.float32).astype(np.float64)
    without = result.ablation.probabilities[0].astype(np.float32).astype(np.float64)
    quoted = json.dumps(result.data["target"], ensure_ascii=False)
    texts = {i: s for d in result.data["documents"] for s, i in d["pieces"] if i >= 0}
    shown = [i for i in (2, 5, 11, len(result.token_ids) - 1) if texts[i].strip()]
    page = opened(result.path)
    note = page.js("() => document.getElementById('ablation-note').textContent")
    assert page.js("() => document.getElementById('ablation-note').hidden") is False
    assert "linear probe's direction removed at layer 1," in note
    page.set_layer(k + 1)  # not ablated: the clean P alone
    assert "Layer 2 is not ablated" in page.js("() => document.getElementById('ablation-here').textContent")
    for i in shown:
        page.page.mouse.move(1, 1)
        page.page.locator(f".tok[data-i='{i}']").hover()
        assert page.page.locator("#tip-model").text_content() == f"model's own P({quoted} next): {_fixed3(clean[i])}"
        assert page.page.locator("#tip-ablated").count() == 0
    page.page.mouse.move(1, 1)
    page.set_layer(k)  # the slider on the ablated layer: with and without the direction
    assert "Layer 1 is ablated" in page.js("() => document.getElementById('ablation-here').textContent")
    for i in shown:
        page.page.mouse.move(1, 1)
        page.page.locator(f".tok[data-i='{i}']").hover()
        assert page.page.locator("#tip-model").text_content() == f"model's own P({quoted} next): {_fixed3(clean[i])}"
        assert page.page.locator("#tip-ablated").text_content() == \
            f"with the direction removed at layer 1: {_fixed3(without[i])}"
        delta = page.page.locator("#tip-delta").text_content()
        assert delta.startswith("change in log P: ")
        value = float(delta.rsplit(" ", 1)[1].replace("\u2212", "-"))
        assert value == pytest.approx(math.log(without[i]) - math.log(clean[i]), abs=1e-3)
        assert page.page.locator("#tip-spark rect.ablated").count() == 1
    page.page.mouse.move(1, 1)
    page.page.select_option("#colour-by", "change")
    assert "change in the model's own P(" in page.js("() => document.getElementById('scale-label').textContent")
    page.set_layer(k + 1)  # no ablation at this layer: nothing to colour
    assert set(page.colours()) == {"rgba(0, 0, 0, 0)"}
    assert "no colours" in page.js("() => document.getElementById('ablation-here').textContent")


def test_colour_by_change_is_red_where_removal_lowers_p(ablation_page, opened, tmp_path):
    """The tiny model's P barely moves (its predictions are near uniform): the same page with planted
    probabilities without the direction, lower at some tokens and higher at others."""
    result = ablation_page
    n = len(result.token_ids)
    clean = result.model_probabilities
    change = np.where(np.arange(n) % 3 == 0, -0.4, np.where(np.arange(n) % 3 == 1, 0.4, 0.0))
    data = json.loads(json.dumps(result.data))
    data["own"]["prob"] = encode_float32(clean + 0.5)
    data["own"]["ablation"]["prob"] = [encode_float32(clean + 0.5 + change)]
    path = tmp_path / "planted.html"
    path.write_text(render_html(data), encoding="utf-8")
    page = opened(path)
    page.set_layer(result.layers.index(1))
    page.page.select_option("#colour-by", "change")
    colours = page.colours()
    rgb = [tuple(int(c) for c in s[s.index("(") + 1 : s.index(")")].split(",")[:3]) for s in colours]
    order = page.js("() => [...document.querySelectorAll('.tok')].map(s => +s.dataset.i)")
    for i, (r, g, b) in zip(order, rgb):
        if change[i] < 0:
            assert r > b + 60, (i, colours[i])  # red: removing the direction lowers P
        elif change[i] > 0:
            assert b > r + 60, (i, colours[i])  # blue: it raises P
        else:
            assert (r, g, b) == (255, 255, 255), (i, colours[i])
    page.page.select_option("#colour-by", "probe")
    assert page.colours() != colours
