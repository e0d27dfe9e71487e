"""Text corpora: the built-in pydoc corpus, streaming readers and the sample selection.

Readers stream: a corpus is never held in memory, only the records selected from it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy
import zstandard
from tqdm import tqdm

from shadowquant.atomic import atomic_path
from shadowquant.errors import PipelineError

CORPUS_EXTENSIONS = (".jsonl.zst", ".jsonl", ".txt")

# Split levels, coarsest first: paragraphs, lines, words (each with the joiner that rebuilds them).
_SPLIT_LEVELS = (
    (re.compile(r"\n(?:[ \t]*\n)+"), "\n\n"),
    (re.compile(r"\n"), "\n"),
    (re.compile(r"[ \t]+"), " "),
)
_READ_SIZE = 1 << 16


# ---------------------------------------------------------------- built-in pydoc corpus


def split_text(text: str, max_chars: int = 2000) -> list[str]:
    """Split `text` into chunks of at most `max_chars`, at paragraph, then line, then word boundaries.

    A word longer than `max_chars` is cut hard; whitespace-only chunks are dropped.
    """
    if max_chars < 1:
        raise PipelineError(f"chunk size must be at least 1 character, got {max_chars}")
    chunks = (chunk.strip("\n").rstrip() for chunk in _split(text, max_chars, 0))
    return [chunk for chunk in chunks if chunk.strip()]


def _split(text: str, max_chars: int, level: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    if level == len(_SPLIT_LEVELS):
        return [text[start : start + max_chars] for start in range(0, len(text), max_chars)]
    pattern, joiner = _SPLIT_LEVELS[level]
    chunks: list[str] = []
    current = ""
    for piece in pattern.split(text):
        if not piece.strip():
            continue
        # Greedy packing: pieces are appended while the chunk stays within the limit.
        for part in _split(piece, max_chars, level + 1):
            candidate = f"{current}{joiner}{part}" if current else part
            if len(candidate) <= max_chars:
                current = candidate
            else:
                if current:
                    chunks.append(current)
                current = part
    if current:
        chunks.append(current)
    return chunks


def pydoc_records(chunk_chars: int = 2000) -> list[str]:
    """Python's pydoc topics (sorted by topic) cut into chunks of about `chunk_chars` characters."""
    from pydoc_data.topics import topics

    records: list[str] = []
    for topic in sorted(topics):
        records.extend(split_text(topics[topic], chunk_chars))
    return records


def build_pydoc_corpus(out_path: str | os.PathLike) -> int:
    """Write the pydoc records to `out_path` as JSON lines (atomically); return the record count."""
    records = pydoc_records()
    write_jsonl(out_path, records)
    return len(records)


# ---------------------------------------------------------------- readers


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGICS = range(0x184D2A50, 0x184D2A60)


def _check_zstd_frames(handle: BinaryIO, path: str) -> None:
    """Walk the frame and block headers of a .zst file (no decompression) and fail if it is cut short.

    `ZstdDecompressor.stream_reader` ends silently when the last frame is
    truncated (an interrupted download); the headers say where each frame ends.
    Layout per RFC 8878: magic, frame header, blocks (3-byte headers), optional checksum.
    """
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise PipelineError(f"{path}: empty file, not a zstd stream")

    def read_exact(position: int, count: int) -> bytes:
        handle.seek(position)
        data = handle.read(count)
        if len(data) < count:
            raise PipelineError(f"{path}: truncated zstd file (it ends inside a frame at byte {size})")
        return data

    position = 0
    while position < size:
        magic = int.from_bytes(read_exact(position, 4), "little")
        if magic in _SKIPPABLE_MAGICS:
            position += 8 + int.from_bytes(read_exact(position + 4, 4), "little")
        elif magic == _ZSTD_MAGIC:
            descriptor = read_exact(position + 4, 1)[0]
            single_segment = (descriptor >> 5) & 1
            header_size = (
                1
                + (0 if single_segment else 1)  # window descriptor
                + (0, 1, 2, 4)[descriptor & 3]  # dictionary id
                + (single_segment, 2, 4, 8)[descriptor >> 6]  # frame content size
            )
            position += 4 + header_size
            last_block = False
            while not last_block:
                block_header = int.from_bytes(read_exact(position, 3), "little")
                last_block = bool(block_header & 1)
                block_type = (block_header >> 1) & 3
                if block_type == 3:
                    raise PipelineError(f"{path}: corrupt zstd data (reserved block type at byte {position})")
                position += 3 + (1 if block_type == 1 else block_header >> 3)  # an RLE block stores one byte
            position += 4 if descriptor & 4 else 0  # content checksum
        else:
            raise PipelineError(f"{path}: not zstd data (no zstd frame starts at byte {position})")
        if position > size:
            raise PipelineError(f"{path}: truncated zstd file (it ends inside a frame at byte {size})")


def _zstd_lines(handle: BinaryIO, path: str) -> Iterator[bytes]:
    """Decompressed byte lines, streamed: memory stays at a few read buffers."""
    _check_zstd_frames(handle, path)
    handle.seek(0)
    reader = zstandard.ZstdDecompressor().stream_reader(handle, read_size=_READ_SIZE, read_across_frames=True)
    lines = io.BufferedReader(reader, buffer_size=_READ_SIZE)
    number = 0
    try:
        for number, line in enumerate(lines, start=1):
            yield line
    except zstandard.ZstdError as error:
        raise PipelineError(f"{path}:{number + 1}: corrupt zstd data ({error})") from None


def _corpus_kind(path: str) -> str:
    lowered = path.lower()
    for extension in CORPUS_EXTENSIONS:
        if lowered.endswith(extension):
            return extension
    raise PipelineError(f"{path}: unknown corpus file type; valid extensions are {', '.join(CORPUS_EXTENSIONS)}")


@contextlib.contextmanager
def _open_lines(path: str) -> Iterator[Iterable[bytes]]:
    """Open a corpus file as an iterable of raw byte lines (decompressed for .zst)."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: corpus file not found")
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: corpus path is not a file")
    with open(path, "rb") as raw:
        if path.lower().endswith(".zst"):
            yield _zstd_lines(raw, path)
        else:
            yield raw


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, decoded strictly as UTF-8 (a leading BOM is dropped)."""
    offset = 0
    with _open_lines(path) as lines:
        for number, raw_line in enumerate(lines, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = raw_line[error.start]
                where = "decompressed byte offset" if path.lower().endswith(".zst") else "byte offset"
                raise PipelineError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{bad:02x} at {where} {offset + error.start}); "
                    "re-encode the file as UTF-8"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            offset += len(raw_line)
            yield number, line.rstrip("\r\n")


def _jsonl_texts(path: str) -> Iterator[str]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PipelineError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise PipelineError(f"{path}:{number}: a record must be a JSON object with a 'text' field")
        if "text" not in record:
            keys = ", ".join(map(str, list(record)[:8])) or "none"
            raise PipelineError(f"{path}:{number}: record has no 'text' field (its keys: {keys})")
        text = record["text"]
        if not isinstance(text, str):
            raise PipelineError(f"{path}:{number}: 'text' must be a string, got {type(text).__name__}")
        yield text


def _paragraph_texts(path: str) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _decoded_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def iter_records(path: str | os.PathLike) -> Iterator[str]:
    """Stream the texts of a corpus: .jsonl / .jsonl.zst (field `text`) or .txt (blank-line paragraphs)."""
    path = os.fspath(path)
    kind = _corpus_kind(path)
    if kind == ".txt":
        yield from _paragraph_texts(path)
    else:
        yield from _jsonl_texts(path)


def _progress(records: Iterable[str], description: str) -> tqdm:
    # `delay` keeps small corpora quiet; a long pass over a big corpus shows its rate.
    return tqdm(records, desc=description, unit=" records", file=sys.stderr, delay=2.0, leave=False)


def count_records(path: str | os.PathLike) -> int:
    """Number of records in a corpus (one streaming pass, which also validates every record)."""
    with contextlib.closing(iter_records(path)) as records, _progress(records, f"counting {Path(path).name}") as bar:
        return sum(1 for _ in bar)


# ---------------------------------------------------------------- selection


def selection_indices(n_records: int, num_samples: int, seed: int = 42, offset: int = 0) -> list[int]:
    """Record indices at positions [offset, offset + num_samples) of the seeded shuffle.

    Equal to Hugging Face `datasets` `shuffle(seed=seed)`: position i holds record
    `numpy.random.default_rng(seed).permutation(n_records)[i]`.
    """
    if num_samples < 1 or offset < 0:
        raise PipelineError(f"need num_samples >= 1 and offset >= 0, got num_samples={num_samples}, offset={offset}")
    if offset + num_samples > n_records:
        raise PipelineError(
            f"cannot take {num_samples} records from offset {offset} of a corpus of {n_records} records"
        )
    permutation = numpy.random.default_rng(seed).permutation(n_records)
    return [int(index) for index in permutation[offset : offset + num_samples]]


def select_records(path: str | os.PathLike, indices: list[int]) -> list[str]:
    """Texts of the records at `indices`, in the order of `indices`, from one streaming pass."""
    positions: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        positions.setdefault(int(index), []).append(position)
    selected: list[str | None] = [None] * len(indices)
    remaining = len(positions)
    if remaining:
        with (
            contextlib.closing(iter_records(path)) as records,
            _progress(records, f"selecting from {Path(path).name}") as bar,
        ):
            for index, text in enumerate(bar):
                if index in positions:
                    for position in positions[index]:
                        selected[position] = text
                    remaining -= 1
                    if not remaining:
                        break
    if remaining:
        missing = sorted(index for index, places in positions.items() if selected[places[0]] is None)
        raise PipelineError(f"{path}: has no record at index {missing[0]} (indices must be below the record count)")
    return [text for text in selected if text is not None]


def prepare_samples(
    path: str | os.PathLike, num_samples: int, seed: int = 42, offset: int = 0, what: str = "calibration"
) -> list[str]:
    """The `num_samples` records after `offset` of the seeded shuffle of a corpus.

    `what` ('calibration' or 'evaluation') names the config section in error messages;
    a held-out evaluation set uses offset = calibration.num_samples so the two never overlap.
    """
    n_records = count_records(path)
    if n_records == 0:
        raise PipelineError(f"{path}: the corpus has no records (expected JSON lines with a 'text' field, "
                            "or blank-line separated paragraphs in a .txt)")
    if offset + num_samples > n_records:
        available = n_records - offset
        if available > 0:
            advice = f"lower {what}.num_samples to at most {available}"
        else:
            advice = f"lower calibration.num_samples below {n_records} so records are left for {what}"
        raise PipelineError(
            f"{path}: the corpus has {n_records} records, but {what} needs {num_samples}"
            + (f" after the first {offset} (used for calibration)" if offset else "")
            + f"; {advice} (or use a bigger corpus)"
        )
    return select_records(path, selection_indices(n_records, num_samples, seed, offset))


# ---------------------------------------------------------------- JSON lines files


def write_jsonl(path: str | os.PathLike, texts: Iterable[str]) -> None:
    """Write `{"text": ...}` JSON lines atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for text in texts:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def read_jsonl_texts(path: str | os.PathLike) -> list[str]:
    """All texts of a .jsonl or .jsonl.zst file."""
    if _corpus_kind(os.fspath(path)) == ".txt":
        raise PipelineError(f"{path}: expected a .jsonl or .jsonl.zst file")
    return list(iter_records(path))
