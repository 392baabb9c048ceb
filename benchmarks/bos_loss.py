"""Measurement: what a BOS the tokenizer never adds does to a model, --bos auto against --bos always.

For a model (default: Qwen2.5-Coder-0.5B from its GGUF, whose tokenizer names <|endoftext|> as BOS but
never adds it), the mean next-token loss over `--chunks` held-out chunks of the default corpus, each
chunked as that --bos chunks it; then the same predictions (tokens 2..256 of the auto chunks) with and
without the BOS put in front; then the top answers to "The capital of France is".

    python scripts/fetch_models.py qwen2.5-coder-0.5b
    python benchmarks/bos_loss.py                  # 16 chunks: about 10 minutes on 2 cores (AVX2, float32)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tokenprobe import RunConfig, load_model
from tokenprobe.data.prepare import prepare_chunks
from tokenprobe.data.text import resolve_bos, tokenizer_adds_bos
from tokenprobe.files import default_cache_dir

QWEN = "~/.cache/tokenprobe/models/qwen2.5-coder-0.5b.gguf"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=QWEN, help=f"as --model (default: {QWEN})")
    parser.add_argument("--chunks", type=int, default=16, help="held-out chunks of 256 tokens (default: 16)")
    args = parser.parse_args(argv)
    model = str(Path(args.model).expanduser()) if args.model.endswith(".gguf") else args.model
    cache = default_cache_dir()
    loaded = load_model(model, "auto", "cpu", cache, progress=False)
    tok = loaded.tokenizer
    print(f"{loaded.name}: BOS {tok.bos_token!r} (id {tok.bos_token_id}); the tokenizer adds it: "
          f"{tokenizer_adds_bos(tok)}; --bos auto resolves to {resolve_bos(tok, 'auto')}")

    def losses(chunks: np.ndarray, skip: int) -> np.ndarray:
        """Each chunk's next-token losses from position `skip` on (targets: its tokens skip+1 ...)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(chunks), 4):
                ids = torch.as_tensor(chunks[start : start + 4], dtype=torch.long)
                log_p = torch.log_softmax(loaded.model(input_ids=ids).logits[:, skip:-1].float(), -1)
                out.append(-log_p.gather(-1, ids[:, skip + 1 :, None])[..., 0].numpy())
        return np.concatenate(out)

    shown = {}
    for mode in ("auto", "always"):
        prepared = prepare_chunks(RunConfig(model=model, bos=mode), loaded, cache, progress=False)
        chunks = shown[mode] = prepared.chunks[np.sort(prepared.split.eval[: args.chunks])]
        t = time.perf_counter()
        loss = losses(chunks, 0)
        print(f"--bos {mode}: chunks start with {prepared.bos_id}; mean next-token loss {loss.mean():.3f} nats "
              f"over {loss.size:,} predictions of {len(chunks)} held-out chunks ({time.perf_counter() - t:.0f} s)")
    chunks = shown["auto"]
    with_bos = np.concatenate([np.full((len(chunks), 1), tok.bos_token_id), chunks], axis=1)
    plain, bos = losses(chunks, 0), losses(with_bos, 1)
    print(f"the same {plain.size:,} predictions: {plain.mean():.3f} nats without BOS, {bos.mean():.3f} with "
          f"{tok.bos_token!r} in front")
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    for name, ids in (("without BOS", prompt), ("with BOS", [tok.bos_token_id] + prompt)):
        with torch.inference_mode():
            probs = torch.softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        top = torch.topk(probs, 3)
        print(f"'The capital of France is' {name}: "
              + ", ".join(f"{tok.decode([int(i)])!r} {float(p):.2f}" for p, i in zip(top.values, top.indices)))


if __name__ == "__main__":
    main()
