"""`tokenprobe viz` in a real browser: the Debian chromium driven by Playwright, from file://, offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe import load_model, load_probe
from tokenprobe.probes.linear import LinearProbe
from tokenprobe.viz.explore import render_html, visualize
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
            assert page.page.locator("#tip-model").count() == 0  # the run computed no model probability
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
