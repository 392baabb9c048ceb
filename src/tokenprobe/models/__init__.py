"""Loading a causal LM once (GGUF ready copies, local folders, hub ids), naming it (fingerprints) and
finding its parts (decoder stack, final norm, unembedding)."""
