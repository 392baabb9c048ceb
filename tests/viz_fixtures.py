"""A tiny trained run for the `viz` tests: real probe files from a random tiny model, in seconds."""

from __future__ import annotations

from pathlib import Path

from tokenprobe import RunConfig, train

# Text that must come out of the page exactly as it went in.
TRICKY_TEXT = (
    "Line one\n\tTabbed line  with two spaces,   three <script>window.__pwned = 1</script> &amp; &lt; "
    "\U0001F600 emoji.\n\n  Indented: the cat sat on the mat. \nThe king walked to the market."
)


def train_tiny_run(model_dir: Path, corpus: Path, out: Path, cache_dir: Path, context_length: int = 32) -> Path:
    """All layers of a tiny model, short chunks (so a paragraph spans several), a few hundred positions."""
    config = RunConfig(model=str(model_dir), corpus=str(corpus), layers="all", context_length=context_length,
                       dtype="float32", device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300,
                       max_iter=50)
    train(config, out_dir=out, cache_dir=cache_dir, progress=False)
    return out
