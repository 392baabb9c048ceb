"""The HTML explorer: every layer's probe on every token of a text, in one self-contained page."""
