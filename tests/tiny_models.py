"""Tiny randomly initialised causal LMs (Gemma 3, Llama, GPT-2, Qwen2) with a real trained tokenizer.

Everything is built locally: a byte-level BPE tokenizer is trained on a synthetic corpus (so ' the'
is a single token), and each model is saved with ``save_pretrained`` so that tokenprobe loads it
through the same path as a user's local model directory. Every tokenizer names ``<bos>`` as its BOS
token; as in the real families, the Gemma 3 and Llama ones add it to an encoded text (so ``--bos auto``
starts their chunks with it) and the GPT-2 and Qwen2 ones do not (as GPT-2's own tokenizer, and Qwen's
from a GGUF file, which names a BOS it never adds).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

ARCHITECTURES = ("gemma3", "llama", "gpt2", "qwen2")

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the river", "a small bird", "the king", "our teacher"]
_VERBS = ["sat on", "looked at", "walked to", "talked about", "ran past", "jumped over", "found", "painted"]
_OBJECTS = ["the mat", "a house", "the garden", "the hill", "a boat", "the moon", "an apple", "the market"]
_TAILS = ["in the morning", "with a smile", "before the storm", "after dinner", "at the end of the day", ""]


def synthetic_text(n_sentences: int, seed: int = 0) -> str:
    """English-like sentences where ' the' is common (roughly one token in eight)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        sentence = " ".join(w for w in words if w)
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs)


ADDS_BOS = {"gemma3": True, "llama": True, "gpt2": False, "qwen2": False}  # as each real family's tokenizer


def build_tokenizer(directory: Path, adds_bos: bool = True):
    """The tiny byte-level BPE tokenizer, saved in `directory`; `adds_bos`: its post-processor starts
    every encoded text with ``<bos>`` (as Gemma's and Llama's do), else nothing adds it (GPT-2, Qwen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(synthetic_text(2000, seed=1).splitlines(), trainer=trainer)
    if adds_bos:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def build_model(arch: str, vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import (
        GPT2Config, GPT2LMHeadModel, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
        Qwen2Config, Qwen2ForCausalLM,
    )

    torch.manual_seed({"gemma3": 1, "llama": 2, "gpt2": 3, "qwen2": 4}[arch])
    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if arch == "gemma3":
        config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                                  sliding_window=16, **common)
        return Gemma3ForCausalLM(config)
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
        return LlamaForCausalLM(config)
    if arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
        return GPT2LMHeadModel(config)
    if arch == "qwen2":  # attention biases, tied embeddings: as Qwen2.5 0.5B
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
        return Qwen2ForCausalLM(config)
    raise ValueError(arch)


def build_all(root: Path) -> dict[str, Path]:
    """Saves each architecture with the shared tokenizer under `root/<arch>`; returns the folders."""
    folders = {}
    tokenizer = None
    for arch in ARCHITECTURES:
        folder = root / arch
        tokenizer = build_tokenizer(folder, adds_bos=ADDS_BOS[arch])
        model = build_model(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                            tokenizer.pad_token_id)
        model.save_pretrained(folder)
        folders[arch] = folder
    return folders
