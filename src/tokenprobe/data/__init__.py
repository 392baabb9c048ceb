"""Text to labelled positions: corpus, chunks, labels (Labeler), positions and `prepare`, from token ids
alone (no model runs here)."""
