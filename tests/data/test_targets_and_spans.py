"""Issue 15's data layer: ahead:K tasks, target sets ("any of these"), and span labels aligned to the token
stream by character offsets, cut into chunks exactly as make_chunks cuts the stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_models import build_tokenizer, synthetic_text
from tokenprobe.data.chunks import SEPARATOR, make_chunks, tokenize_stream
from tokenprobe.data.labels import (
    TargetSet, TokenLabeler, make_labeler, parse_task, resolve_target, resolve_targets,
)
from tokenprobe.data.spans import (
    SpanLabeler, make_span_labeler, read_span_file, regex_spans, span_stream, span_token_labels,
)
from tokenprobe.errors import TokenprobeError

T = 7  # target id in hand-made chunks


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _pieces(tok, ids, mask):
    return [tok.convert_ids_to_tokens(int(i)) for i, m in zip(ids, mask) if m]


def _brute_force(tok, documents, spans):
    """The expected stream labels, token by token, with the overlap rule written out plainly."""
    separator = tok(SEPARATOR, add_special_tokens=False)["input_ids"]
    out = []
    for doc, doc_spans in zip(documents, spans):
        for a, b in tok(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]:
            out.append(a < b and any(a < e and s < b for s, e in doc_spans))
        out += [False] * len(separator)
    return np.array(out, dtype=bool)


# ------------------------------------------------------------------------------------------- ahead:K


def test_ahead_k_looks_k_tokens_ahead_with_and_without_bos():
    chunks = np.array([[2, 5, T, 6, T, 9, T]])
    labeler = make_labeler("ahead:2", [T])
    labels, valid = labeler.labels(chunks, has_bos=True)
    # position i asks about token i + 2
    assert labels.tolist() == [[True, False, True, False, True, False, False]]
    assert valid.tolist() == [[False, True, True, True, True, False, False]]  # BOS and the last 2 unused
    labels, valid = labeler.labels(chunks, has_bos=False)
    assert labels.tolist() == [[True, False, True, False, True, False, False]]
    assert valid.tolist() == [[True, True, True, True, True, False, False]]

    labels, valid = make_labeler("ahead:3", [T]).labels(chunks, has_bos=True)
    assert labels.tolist() == [[False, True, False, True, False, False, False]]
    assert valid.tolist() == [[False, True, True, True, False, False, False]]


def test_ahead_k_on_random_chunks_reads_the_token_k_ahead():
    chunks = np.random.default_rng(1).integers(0, 12, (5, 20))
    for k in (2, 5, 19, 20, 25):
        labels, valid = make_labeler(f"ahead:{k}", [7, 9]).labels(chunks, has_bos=True)
        assert labels.shape == valid.shape == chunks.shape and labels.dtype == valid.dtype == bool
        assert not valid[:, 0].any() and not valid[:, max(20 - k, 0):].any()
        assert valid[:, 1 : max(20 - k, 1)].all()
        rows, cols = np.nonzero(valid)
        assert np.array_equal(labels[rows, cols], np.isin(chunks, [7, 9])[rows, cols + k])


def test_ahead_1_is_exactly_next():
    assert make_labeler("ahead:1", [T, 9]) == make_labeler("next", [T, 9]) == TokenLabeler((T, 9), 1)
    labeler = make_labeler("ahead:1", [T])
    assert labeler.spec == "next" and labeler.predicts_next_token
    chunks = np.random.default_rng(2).integers(0, 12, (4, 16))
    for has_bos in (True, False):
        a, b = labeler.labels(chunks, has_bos), make_labeler("next", [T]).labels(chunks, has_bos)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_ahead_k_spec_question_and_round_trip():
    labeler = make_labeler("ahead:3", [T])
    assert labeler.spec == "ahead:3" and not labeler.predicts_next_token
    assert labeler.question == "will the token 3 ahead be"
    assert make_labeler(labeler.spec, labeler.target_ids) == labeler
    assert make_labeler("current", [T]).spec == "current" and make_labeler("next", [T]).spec == "next"


def test_parse_task():
    assert parse_task("next") == ("next", 1)
    assert parse_task("current") == ("current", 0)
    assert parse_task("ahead:1") == ("next", 1)
    assert parse_task("ahead:4") == ("ahead", 4)
    with pytest.raises(TokenprobeError, match="current"):
        parse_task("ahead:0")
    for bad in ("ahead:x", "ahead:-1", "ahead:", "ahead:1.5", "ahead: 2"):
        with pytest.raises(TokenprobeError, match="whole number"):
            parse_task(bad)
    with pytest.raises(TokenprobeError, match="unknown task 'later'"):
        parse_task("later")
    with pytest.raises(TokenprobeError, match="unknown task"):
        make_labeler("later", [T])
    with pytest.raises(TokenprobeError, match="span"):
        make_labeler("regex:\\d+", [T])


# ------------------------------------------------------------------------------------------- target sets


def test_target_set_resolves_each_token(tok):
    targets = resolve_targets(tok, [" the", " The"])
    the, The = tok.convert_tokens_to_ids("Ġthe"), tok.convert_tokens_to_ids("ĠThe")
    assert isinstance(targets, TargetSet) and targets.token_ids == (the, The)
    assert targets.text == "' the' | ' The'"
    assert str(the) in targets.describe() and str(The) in targets.describe() and "' The'" in targets.describe()
    one = resolve_targets(tok, [" the"])
    assert one.targets == (resolve_target(tok, " the"),) and one.describe() == resolve_target(tok, " the").describe()
    by_id = resolve_targets(tok, [" cat"], token_ids=[The])
    assert by_id.token_ids == (tok.convert_tokens_to_ids("Ġcat"), The) and by_id.targets[1].text == " The"


def test_target_set_labels_any_of_its_tokens(tok):
    targets = resolve_targets(tok, [" the", " The"])
    ids = np.array([tok("The cat saw the dog. The end of The the", add_special_tokens=False)["input_ids"]])
    labels, valid = make_labeler("current", targets.token_ids).labels(ids, has_bos=False)
    pieces = tok.convert_ids_to_tokens(ids[0].tolist())
    assert [p for p, y in zip(pieces, labels[0]) if y] == ["Ġthe", "ĠThe", "ĠThe", "Ġthe"]
    assert all(p not in ("Ġthe", "ĠThe") for p, y in zip(pieces, labels[0]) if not y)
    nxt, _ = make_labeler("next", targets.token_ids).labels(ids, has_bos=False)
    assert np.array_equal(nxt[0, :-1], labels[0, 1:])


def test_target_set_errors(tok):
    with pytest.raises(TokenprobeError, match=r"' antidisestablishment' is \d+ tokens .*'Ġan'"):
        resolve_targets(tok, [" the", " antidisestablishment"])
    with pytest.raises(TokenprobeError, match="already named"):
        resolve_targets(tok, [" the", " The", " the"])
    with pytest.raises(TokenprobeError, match="already named"):
        resolve_targets(tok, [" the"], token_ids=[tok.convert_tokens_to_ids("Ġthe")])
    with pytest.raises(TokenprobeError, match="no target"):
        resolve_targets(tok, [])
    with pytest.raises(TokenprobeError, match="out of range"):
        resolve_targets(tok, [], token_ids=[10**6])


# ------------------------------------------------------------------------------------------- span alignment


def test_partial_overlap_and_a_span_over_several_tokens(tok):
    doc = "the cat sat on the mat"  # t he Ġcat(3,7) Ġsat(7,11) Ġon(11,14) Ġthe(14,18) Ġmat(18,22)
    stream = span_stream([doc], [[(5, 6)]], tok)  # the "t" of "cat": cuts the token
    assert _pieces(tok, stream.ids, stream.labels) == ["Ġcat"]
    stream = span_stream([doc], [[(4, 14)]], tok)  # "cat sat on": ends where Ġthe starts (half-open)
    assert _pieces(tok, stream.ids, stream.labels) == ["Ġcat", "Ġsat", "Ġon"]
    stream = span_stream([doc], [[(3, 4)], ], tok)  # only the space before "cat" still overlaps Ġcat
    assert _pieces(tok, stream.ids, stream.labels) == ["Ġcat"]
    spans = [[(0, 2), (10, 12), (19, 20)]]
    assert np.array_equal(span_stream([doc], spans, tok).labels, _brute_force(tok, [doc], spans))


def test_offsets_are_characters_for_multi_byte_text(tok):
    doc = "café 😀 naïve"  # 😀 is character 5 but bytes 6..9; its four byte tokens all span (5, 6)
    emoji = span_stream([doc], [[(5, 6)]], tok)
    assert emoji.labels.sum() == 4
    assert tok.decode(emoji.ids[emoji.labels].tolist()) == "😀"
    accent = span_stream([doc], [[(3, 4)]], tok)
    assert tok.decode(accent.ids[accent.labels].tolist()) == "é"
    word = span_stream([doc], [[(7, 12)]], tok)
    assert tok.decode(word.ids[word.labels].tolist()) == "naïve"
    spans = [[(2, 4), (6, 9)]]
    assert np.array_equal(span_stream([doc], spans, tok).labels, _brute_force(tok, [doc], spans))


def test_separator_is_never_positive(tok):
    documents = ["the cat sat", "a dog ran"]
    spans = [[(0, len(d))] for d in documents]
    stream = span_stream(documents, spans, tok)
    separator = tok(SEPARATOR, add_special_tokens=False)["input_ids"]
    first = len(tok(documents[0], add_special_tokens=False)["input_ids"])
    expected = [True] * first + [False] * len(separator)
    expected += [True] * (len(stream.ids) - len(expected) - len(separator)) + [False] * len(separator)
    assert stream.labels.tolist() == expected
    assert np.array_equal(stream.ids, tokenize_stream(documents, tok, progress=False))
    # a document that itself holds a blank line: those tokens are inside the span, the separator is not
    stream = span_stream(["a\n\nb"], [[(0, 4)]], tok)
    assert stream.labels.tolist() == [True] * (len(stream.ids) - len(separator)) + [False] * len(separator)


def test_regex_digits_labels_exactly_the_digit_tokens(tok):
    documents = ["the cat sat on 42 mats in 1999", "no numbers here", "room 7 and room 300, then 5."]
    spans = regex_spans(documents, r"\d+")
    assert spans == [[(15, 17), (26, 30)], [], [(5, 6), (16, 19), (26, 27)]]
    labels = span_token_labels(documents, spans, tok)
    ids = tokenize_stream(documents, tok, progress=False)
    is_digit = np.array([any(c.isdigit() for c in tok.decode([int(i)])) for i in ids])
    assert labels.sum() == 2 + 4 + 1 + 3 + 1 and np.array_equal(labels, is_digit)


def test_regex_errors_and_no_match(tok):
    with pytest.raises(TokenprobeError, match=r"regular expression '\(ab' is not valid"):
        regex_spans(["abc"], "(ab")
    assert regex_spans(["abc", "def"], r"\d+") == [[], []]  # the caller decides
    assert regex_spans(["abc"], r"x*") == [[]]  # empty matches mark nothing
    with pytest.raises(TokenprobeError, match="marks no token"):
        make_span_labeler(r"regex:\d+", ["abc def " * 10], tok, 8)


def test_zero_width_tokens_are_negative_and_the_stream_is_checked(tok):
    class Extra:
        """A fast tokenizer that adds a zero-width token in every document (as some do for markers)."""

        is_fast, bos_token_id = True, tok.bos_token_id

        def __init__(self, differ_with_offsets=False):
            self.differ = differ_with_offsets

        def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
            enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
            if isinstance(texts, str):
                return {"input_ids": enc["input_ids"]}
            ids = [[1] + i for i in enc["input_ids"]]
            if return_offsets_mapping and self.differ:
                ids = [[0] + i[1:] for i in ids]
            out = {"input_ids": ids}
            if return_offsets_mapping:
                out["offset_mapping"] = [[(1, 1)] + o for o in enc["offset_mapping"]]
            return out

    labels = span_token_labels(["the cat"], [[(0, 3)]], Extra())
    assert labels.tolist()[0] is False and labels[1:3].all()  # (1, 1) lies inside the span, yet is empty
    with pytest.raises(TokenprobeError, match="differ from the corpus's token stream at token 0"):
        span_token_labels(["the cat"], [[(0, 3)]], Extra(differ_with_offsets=True))

    class Slow(Extra):
        is_fast = False

    with pytest.raises(TokenprobeError, match="fast tokenizer"):
        span_token_labels(["the cat"], [[(0, 3)]], Slow())


def test_spans_given_in_code_are_checked(tok):
    with pytest.raises(TokenprobeError, match="document 1: span 0 .*out of range"):
        span_stream(["abc", "de"], [[], [(1, 3)]], tok)
    with pytest.raises(TokenprobeError, match="document 0: span 1 .*start must be < end"):
        span_stream(["abcdef"], [[(0, 1), (3, 3)]], tok)
    with pytest.raises(TokenprobeError, match="one list of spans per document"):
        span_stream(["abc", "de"], [[]], tok)


# ------------------------------------------------------------------------------------------- span files


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_span_file(tmp_path):
    documents = ["alpha beta", "gamma delta", "café 😀"]
    records = [{"text": d, "spans": s} for d, s in zip(documents, [[[0, 5]], [], [[5, 6], [0, 4]]])]
    path = _write(tmp_path / "s.jsonl", [json.dumps(records[0]), "", json.dumps(records[1]), json.dumps(records[2])])
    assert read_span_file(path, documents) == [[(0, 5)], [], [(5, 6), (0, 4)]]


def test_span_file_whose_text_differs_names_the_document(tmp_path):
    documents = ["alpha beta", "gamma delta", "epsilon"]
    lines = [json.dumps({"text": "alpha beta", "spans": []}), json.dumps({"text": "gamma DELTA", "spans": []}),
             json.dumps({"text": "epsilon", "spans": []})]
    with pytest.raises(TokenprobeError, match=r"line 2: the text of document 1 differs .*'gamma DELTA'.*'gamma delta'"):
        read_span_file(_write(tmp_path / "a.jsonl", lines), documents)
    with pytest.raises(TokenprobeError, match=r"2 documents, the corpus 3: document 2 \('epsilon'\)"):
        read_span_file(_write(tmp_path / "b.jsonl", [lines[0], json.dumps({"text": "gamma delta", "spans": []})]),
                       documents)
    with pytest.raises(TokenprobeError, match="more documents than the corpus"):
        read_span_file(_write(tmp_path / "c.jsonl", lines[:1] + [json.dumps({"text": "gamma delta", "spans": []})]),
                       documents[:1])


def test_span_file_errors_name_the_line(tmp_path):
    docs = ["alpha beta", "gamma"]
    good = json.dumps({"text": "alpha beta", "spans": [[0, 5]]})
    cases = {
        "line 3 is not valid JSON": [good, "", '{"text": "gamma", "spans": [[0, 1]'],
        "line 2 must be an object": [good, '["gamma"]'],
        r"line 2: span 0 \[2, 9\) is out of range: the text has 5":
            [good, json.dumps({"text": "gamma", "spans": [[2, 9]]})],
        r"line 2: span 1 \[3, 3\) is empty": [good, json.dumps({"text": "gamma", "spans": [[0, 1], [3, 3]]})],
        r"line 1: span 0 is \[0\], not a pair": [json.dumps({"text": "alpha beta", "spans": [[0]]})],
    }
    for message, lines in cases.items():
        with pytest.raises(TokenprobeError, match=message):
            read_span_file(_write(tmp_path / "e.jsonl", lines), docs)
    with pytest.raises(TokenprobeError, match="not found"):
        read_span_file(tmp_path / "missing.jsonl", docs)


# ------------------------------------------------------------------------------------------- the labeler


@pytest.fixture(scope="module")
def documents():
    return synthetic_text(120, seed=3).split("\n\n")


@pytest.mark.parametrize("context_length", [16, 33])
def test_span_labeler_cuts_like_make_chunks(tok, documents, context_length):
    labeler = make_span_labeler(r"regex:\bthe\b", documents, tok, context_length)
    stream = tokenize_stream(documents, tok, progress=False)
    stream_labels = span_token_labels(documents, regex_spans(documents, r"\bthe\b"), tok)
    chunks = make_chunks(stream, context_length, tok.bos_token_id)
    labels, valid = labeler.labels(chunks, has_bos=True)
    assert labels.shape == valid.shape == chunks.shape and labels.dtype == valid.dtype == bool
    assert not valid[:, 0].any() and not labels[:, 0].any() and valid[:, 1:].all()
    body = context_length - 1
    c, p = np.nonzero(np.ones_like(chunks[:, 1:], dtype=bool))
    p = p + 1
    assert np.array_equal(chunks[c, p], stream[c * body + p - 1])  # the stream position of (c, p) ...
    assert np.array_equal(labels[c, p], stream_labels[c * body + p - 1])  # ... gives its label
    pieces = np.array(tok.convert_ids_to_tokens(chunks.ravel().tolist())).reshape(chunks.shape)
    assert labels.any() and (pieces[labels] == "Ġthe").all() and labels[pieces == "Ġthe"].all()
    assert labeler.spec == r"regex:\bthe\b" and not labeler.predicts_next_token and "inside" in labeler.question
    assert labeler.record()["positives"] == int(labels.sum())

    no_bos = SpanLabeler.from_stream(stream, stream_labels, context_length, None, "regex:x")
    plain = make_chunks(stream, context_length, None)
    labels, valid = no_bos.labels(plain, has_bos=False)
    assert valid.all() and np.array_equal(labels.ravel(), stream_labels[: plain.size])


def test_span_labeler_refuses_other_chunks(tok, documents):
    labeler = make_span_labeler(r"regex:\bthe\b", documents, tok, 16)
    chunks = make_chunks(tokenize_stream(documents, tok, progress=False), 16, tok.bos_token_id)
    labeler.labels(chunks, has_bos=True)
    with pytest.raises(TokenprobeError, match="were cut for"):
        labeler.labels(chunks[:-1], has_bos=True)
    with pytest.raises(TokenprobeError, match="were cut for"):
        labeler.labels(make_chunks(tokenize_stream(documents, tok, progress=False), 17, tok.bos_token_id)[:len(chunks)],
                       has_bos=True)
    swapped = chunks[[1, 0] + list(range(2, len(chunks)))]
    with pytest.raises(TokenprobeError, match="not the chunks"):
        labeler.labels(swapped, has_bos=True)
    changed = chunks.copy()
    changed[-1, -1] += 1
    with pytest.raises(TokenprobeError, match="not the chunks"):
        labeler.labels(changed, has_bos=True)
    with pytest.raises(TokenprobeError, match="BOS"):
        labeler.labels(chunks, has_bos=False)
    assert labeler.labels(chunks.astype(np.int32), has_bos=True)[0].any()  # the cache stores int32


def test_span_file_task(tok, documents, tmp_path):
    path = tmp_path / "marked.jsonl"
    spans = regex_spans(documents, r"cat|dog")
    _write(path, [json.dumps({"text": d, "spans": s}) for d, s in zip(documents, spans)])
    labeler = make_span_labeler(f"spans:{path}", documents, tok, 32)
    same = make_span_labeler("regex:cat|dog", documents, tok, 32)
    chunks = make_chunks(tokenize_stream(documents, tok, progress=False), 32, tok.bos_token_id)
    assert labeler.spec == f"spans:{path}" and "marked.jsonl" in labeler.question
    assert np.array_equal(labeler.labels(chunks, True)[0], same.labels(chunks, True)[0])
    assert labeler.positives > 0
