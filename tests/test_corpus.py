"""Corpus readers, the pydoc corpus and the seeded sample selection."""

from __future__ import annotations

import json
import tracemalloc

import numpy
import pytest
import zstandard

from shadowquant.inputs import corpus
from shadowquant.errors import PipelineError


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jsonl_bytes(texts):
    return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode("utf-8")


def write_zst(path, data: bytes, **compressor_options):
    path.write_bytes(zstandard.ZstdCompressor(**compressor_options).compress(data))
    return path


# ---------------------------------------------------------------- pydoc corpus


def test_pydoc_records_are_bounded_chunks_and_deterministic():
    records = corpus.pydoc_records()
    assert len(records) > 100
    assert all(record.strip() for record in records)
    assert max(len(record) for record in records) <= 2000
    # Chunks are packed paragraphs, not tiny fragments.
    assert sum(len(record) for record in records) / len(records) > 1000
    assert corpus.pydoc_records() == records
    assert any("assert" in record for record in records[:5])  # sorted topics: 'assert' comes first


def test_pydoc_chunks_keep_the_topic_text():
    from pydoc_data.topics import topics

    whole = "".join("".join(topics[key].split()) for key in sorted(topics))
    assert "".join("".join(record.split()) for record in corpus.pydoc_records()) == whole


def test_split_text_falls_back_to_lines_words_and_hard_cuts():
    paragraphs = "alpha beta\n\ngamma delta\n\n\n   \nepsilon"
    assert corpus.split_text(paragraphs, 30) == ["alpha beta\n\ngamma delta", "epsilon"]
    one_paragraph = "\n".join(f"line {i:03d}" for i in range(30))  # no blank line at all
    chunks = corpus.split_text(one_paragraph, 50)
    assert all(len(chunk) <= 50 for chunk in chunks)
    assert "\n".join(chunks).split("\n") == one_paragraph.split("\n")
    one_line = " ".join(["word"] * 40)
    assert all(len(chunk) <= 23 for chunk in corpus.split_text(one_line, 23))
    assert corpus.split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert corpus.split_text(" \n\n \t\n", 10) == []


def test_build_pydoc_corpus_round_trips(tmp_path):
    out = tmp_path / "pydoc.jsonl"
    count = corpus.build_pydoc_corpus(out)
    assert count == corpus.count_records(out)
    assert corpus.read_jsonl_texts(out) == corpus.pydoc_records()


# ---------------------------------------------------------------- readers


def test_jsonl_reader_skips_blank_lines_and_keeps_unicode(tmp_path):
    texts = ["first", "zweite – Ünïcode ✓", "", "multi\nline"]
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + jsonl_bytes(texts[:2]) + b"\n  \n" + jsonl_bytes(texts[2:]).replace(b"\n", b"\r\n")
    )
    assert list(corpus.iter_records(path)) == texts
    assert corpus.count_records(path) == 4


def test_txt_reader_splits_paragraphs_on_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\none\ntwo\n\n \n\nthree\n\n\nfour   \nfive", encoding="utf-8")
    assert list(corpus.iter_records(path)) == ["one\ntwo", "three", "four   \nfive"]


def test_zst_reader_matches_plain_reader_across_frames(tmp_path):
    texts = [f"record {i} " + "x" * (i % 50) for i in range(500)]
    data = jsonl_bytes(texts)
    path = tmp_path / "c.jsonl.zst"
    # Two concatenated frames, as produced by appending to a .zst file.
    half = len(data) // 2
    half = data.index(b"\n", half) + 1
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(compressor.compress(data[:half]) + compressor.compress(data[half:]))
    assert list(corpus.iter_records(path)) == texts


def test_zst_reader_streams_a_multi_megabyte_file(tmp_path):
    texts = [f"record {i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(20000)]
    data = jsonl_bytes(texts)
    assert len(data) > 10_000_000
    path = write_zst(tmp_path / "big.jsonl.zst", data, level=3)
    tracemalloc.start()
    try:
        count = 0
        for text in corpus.iter_records(path):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(texts)
    assert peak < len(data) / 10  # bounded buffers, never the whole decompressed file
    assert corpus.select_records(path, [19999, 0]) == [texts[19999], texts[0]]


def test_truncated_zst_is_an_error(tmp_path):
    compressed = zstandard.ZstdCompressor().compress(jsonl_bytes([f"t{i}" * 50 for i in range(2000)]))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(PipelineError, match=r"cut\.jsonl\.zst.*truncated"):
        list(corpus.iter_records(path))


@pytest.mark.parametrize(
    "make_bytes",
    [
        pytest.param(lambda data: b"this is not zstd at all\n", id="not-zstd"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(
            lambda data: (lambda c: c[: len(c) // 2] + bytes([c[len(c) // 2] ^ 0xFF]) + c[len(c) // 2 + 1 :])(
                zstandard.ZstdCompressor(write_checksum=True).compress(data)
            ),
            id="flipped-byte",
        ),
    ],
)
def test_corrupt_zst_is_an_error(tmp_path, make_bytes):
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(make_bytes(jsonl_bytes([f"text {i}" for i in range(3000)])))
    with pytest.raises(PipelineError, match=r"bad\.jsonl\.zst"):
        list(corpus.iter_records(path))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', r"bad\.jsonl:2: invalid JSON"),
        ('{"content": "no text field"}', r"bad\.jsonl:2: record has no 'text' field \(its keys: content\)"),
        ('{"text": 5}', r"bad\.jsonl:2: 'text' must be a string, got int"),
        ('["text"]', r"bad\.jsonl:2: a record must be a JSON object"),
    ],
)
def test_bad_jsonl_records_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "fine"}', line, '{"text": "after"}'])
    with pytest.raises(PipelineError, match=message):
        list(corpus.iter_records(path))


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte offset 30\)"):
        list(corpus.iter_records(path))
    zst = write_zst(tmp_path / "bad.jsonl.zst", path.read_bytes())
    with pytest.raises(PipelineError, match=r"bad\.jsonl\.zst:2: not UTF-8 .*decompressed byte offset 30"):
        list(corpus.iter_records(zst))
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"ok\n\n\xff\n")
    with pytest.raises(PipelineError, match=r"bad\.txt:3: not UTF-8"):
        list(corpus.iter_records(txt))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.jsonl: corpus file not found"):
        list(corpus.iter_records(tmp_path / "nope.jsonl"))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(
        PipelineError, match=r"data\.csv: unknown corpus file type; valid extensions are .jsonl.zst, .jsonl, .txt"
    ):
        corpus.count_records(other)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(PipelineError, match="not a file"):
        corpus.count_records(folder)


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(("n_records", "num_samples"), [(10, 10), (1000, 128), (295, 32)])
def test_selection_indices_equal_the_seeded_permutation(n_records, num_samples):
    expected = numpy.random.default_rng(42).permutation(n_records)[:num_samples].tolist()
    indices = corpus.selection_indices(n_records, num_samples)
    assert indices == expected
    assert all(type(index) is int for index in indices)
    assert corpus.selection_indices(n_records, num_samples, seed=7) != indices or num_samples == n_records == 1


def test_calibration_and_heldout_sets_are_disjoint():
    calibration = corpus.selection_indices(300, 32)
    heldout = corpus.selection_indices(300, 64, offset=32)
    assert not set(calibration) & set(heldout)
    assert calibration + heldout == corpus.selection_indices(300, 96)


def test_selection_indices_rejects_impossible_requests():
    with pytest.raises(PipelineError):
        corpus.selection_indices(10, 11)
    with pytest.raises(PipelineError):
        corpus.selection_indices(10, 0)
    with pytest.raises(PipelineError):
        corpus.selection_indices(10, 5, offset=-1)


def test_select_records_keeps_the_order_of_indices(tmp_path):
    texts = [f"record {i}" for i in range(50)]
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes(texts))
    assert corpus.select_records(path, [42, 3, 17, 3]) == ["record 42", "record 3", "record 17", "record 3"]
    assert corpus.select_records(path, []) == []
    with pytest.raises(PipelineError, match="no record at index 50"):
        corpus.select_records(path, [1, 50])


def test_prepare_samples_selects_the_shuffled_records(tmp_path):
    texts = [f"record {i}" for i in range(100)]
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes(texts))
    permutation = numpy.random.default_rng(42).permutation(100)
    assert corpus.prepare_samples(path, 8) == [texts[i] for i in permutation[:8]]
    assert corpus.prepare_samples(path, 5, offset=8, what="evaluation") == [texts[i] for i in permutation[8:13]]


def test_prepare_samples_says_which_key_to_lower(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes([f"r{i}" for i in range(20)]))
    with pytest.raises(PipelineError, match=r"has 20 records.*lower calibration\.num_samples to at most 20"):
        corpus.prepare_samples(path, 32)
    with pytest.raises(PipelineError, match=r"has 20 records.*lower evaluation\.num_samples to at most 4"):
        corpus.prepare_samples(path, 10, offset=16, what="evaluation")
    with pytest.raises(PipelineError, match=r"lower calibration\.num_samples below 20"):
        corpus.prepare_samples(path, 10, offset=20, what="evaluation")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PipelineError, match=r"empty\.jsonl: the corpus has no records"):
        corpus.prepare_samples(empty, 1)


def test_write_jsonl_is_atomic_and_readable(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    corpus.write_jsonl(path, ["a", "b\nc", "ü"])
    assert corpus.read_jsonl_texts(path) == ["a", "b\nc", "ü"]

    def failing():
        yield "x"
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        corpus.write_jsonl(path, failing())
    assert corpus.read_jsonl_texts(path) == ["a", "b\nc", "ü"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]
