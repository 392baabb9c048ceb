"""The viz page's mistake counter in the singular and the plural (issue 13: "1 false alarms").

A hand-made page (no model, no run): three labelled tokens and probabilities chosen so the count of
mistakes, false alarms and missed tokens is known, read back from the Debian chromium via Playwright."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenprobe.viz.explore import render_html

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install playwright)")


def _page(labels: list[int], probs: list[float]) -> str:
    words = [" the", " cat", " sat", " on", " a", " mat"][: len(labels)]
    return render_html({
        "model": "tiny", "model_source": "tiny", "task": "next", "target": " the", "target_ids": [1],
        "context_length": 32, "dtype": "float32", "run_name": "wording", "layers": [0],
        "metrics": [{"eval": {"balanced_accuracy": 0.5, "auroc": 0.5, "accuracy": 0.5, "n": 10, "positives": 5}}],
        "documents": [{"title": None, "pieces": [[w, i] for i, w in enumerate(words)]}],
        "tokens": {"id": list(range(len(words))), "chunk": [0] * len(words), "pos": list(range(len(words))),
                   "label": labels, "model_prob": None},
        "probs": [probs],
    })


@pytest.mark.parametrize(("labels", "probs", "expected"), [
    # one false alarm (a 0 at 0.9) among three labelled tokens
    ([0, 1, 0], [0.9, 0.8, 0.1], "1 mistake (1 false alarm, 0 missed) of 3 labelled tokens"),
    # one token, missed
    ([1], [0.1], "1 mistake (0 false alarms, 1 missed) of 1 labelled token"),
    ([0, 0, 1], [0.9, 0.7, 0.2], "3 mistakes (2 false alarms, 1 missed) of 3 labelled tokens"),
    ([0, 1], [0.1, 0.9], "0 mistakes (0 false alarms, 0 missed) of 2 labelled tokens"),
])
def test_mistake_counts_agree_with_their_nouns(labels, probs, expected, tmp_path):
    path = tmp_path / "page.html"
    path.write_text(_page(labels, probs), encoding="utf-8")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.resolve().as_uri())
            text = page.evaluate("() => document.getElementById('mistake-stats').textContent")
        finally:
            browser.close()
    assert errors == []
    assert text == expected
