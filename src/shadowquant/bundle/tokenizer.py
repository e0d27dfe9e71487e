"""The tokenizer files mllm's BPE tokenizers read, written from a Hugging Face tokenizer.json, and a
re-implementation that tokenizes from those files alone (to prove they reproduce the model's ids).

mllm's vocabulary file (mllm/tokenizers/Tokenizer.cpp, load_vocab), little-endian:
`int32 magic = 23333`, `int32 count`, then per token `int32 id`, `int32 byte length`, the token's
bytes, `float32 score`. For a BPE vocabulary mllm's own converter (tools/convertor/vocab.py) writes
each token of tokenizer.json's `model.vocab` with score = its id, then the added tokens the same
way. The merges file is one merge per line, the two parts separated by one space, in rank order
(the C++ tokenizers read it line by line, skipping empty lines and lines starting with '#').

Tokens are stored in their byte-level form ('Ġthe' for ' the'), as in tokenizer.json: the C++
tokenizers byte-encode the text before the lookup.
"""

from __future__ import annotations

import json
import os
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from shadowquant.atomic import atomic_path
from shadowquant.errors import PipelineError

VOCAB_MAGIC = 23333
# The pre-tokenizer pattern of GPT-2's ByteLevel (use_regex=true), as the tokenizers library has it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


BYTE_ENCODER = bytes_to_unicode()


@dataclass
class VocabEntry:
    id: int
    token: bytes
    score: float


@dataclass
class TokenizerSpec:
    """What a byte-level BPE tokenizer does before the merges, read from tokenizer.json."""

    split_patterns: list[str] = field(default_factory=list)  # applied in order, each piece isolated
    normalizer: str | None = None  # None or "NFC"
    ignore_merges: bool = False
    added_tokens: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"split_patterns": self.split_patterns, "normalizer": self.normalizer,
                "ignore_merges": self.ignore_merges, "added_tokens": self.added_tokens}

    @classmethod
    def from_dict(cls, data: dict) -> "TokenizerSpec":
        return cls(list(data["split_patterns"]), data.get("normalizer"), bool(data.get("ignore_merges")),
                   list(data.get("added_tokens", [])))


def _fail(path, what: str) -> PipelineError:
    return PipelineError(f"{path}: {what}")


def read_tokenizer_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise _fail(path, "no tokenizer.json; the bundle needs the model's fast tokenizer file") from None
    except (OSError, ValueError) as exc:
        raise _fail(path, f"cannot read the tokenizer ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise _fail(path, "not a tokenizers tokenizer.json (no 'model' object)")
    return data


def _normalizer(path, data: dict) -> str | None:
    normalizer = data.get("normalizer")
    if normalizer is None:
        return None
    if normalizer.get("type") == "NFC":
        return "NFC"
    raise _fail(path, f"normalizer {normalizer.get('type')!r} is not supported by the bundle's tokenizer check "
                      "(supported: none, NFC)")


def _split_patterns(path, pre: dict | None) -> list[str]:
    """The pre-tokenizer as a list of regexes whose matches (and the text between them) become pieces."""
    if pre is None:
        raise _fail(path, "the tokenizer has no pre-tokenizer; mllm's BPE tokenizers need a byte-level one")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    patterns, byte_level = [], False
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise _fail(path, f"pre-tokenizer Split with behavior {step.get('behavior')!r} "
                                  f"(invert={step.get('invert')}) is not supported (supported: Isolated)")
            if "Regex" in pattern:
                patterns.append(pattern["Regex"])
            elif "String" in pattern:
                import regex

                patterns.append(regex.escape(pattern["String"]))
            else:
                raise _fail(path, f"pre-tokenizer Split pattern {pattern!r} is neither Regex nor String")
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise _fail(path, "ByteLevel add_prefix_space=true is not supported (mllm's tokenizers add no prefix "
                                  "space)")
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
            byte_level = True
        else:
            raise _fail(path, f"pre-tokenizer {kind!r} is not supported: the bundle writes byte-level BPE "
                              "tokenizers (GPT-2, Qwen2, SmolLM, LLaMA-3 style)")
    if not byte_level:
        raise _fail(path, "the tokenizer is not byte-level (no ByteLevel pre-tokenizer); mllm's BPE tokenizer "
                          "files for it would need the SentencePiece converter")
    return patterns


def tokenizer_files(path: str | os.PathLike) -> tuple[list[VocabEntry], list[str], TokenizerSpec]:
    """(vocabulary entries, merge lines, the pre-tokenization) of a byte-level BPE tokenizer.json."""
    data = read_tokenizer_json(path)
    model = data["model"]
    if model.get("type") != "BPE":
        raise _fail(path, f"tokenizer model {model.get('type')!r} is not supported (the bundle writes BPE "
                          "tokenizers; mllm's Unigram files need its SentencePiece converter)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _fail(path, f"BPE {key} = {model[key]!r} is not supported (mllm's BPE uses neither)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise _fail(path, "the BPE model has no vocab")
    entries = [VocabEntry(int(i), token.encode("utf-8"), float(i)) for token, i in vocab.items()]
    known = {(e.token, e.id) for e in entries}
    added = []
    for token in data.get("added_tokens") or []:
        content, token_id = token["content"], int(token["id"])
        added.append(content)
        if (content.encode("utf-8"), token_id) not in known:
            entries.append(VocabEntry(token_id, content.encode("utf-8"), float(token_id)))
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise _fail(path, "two tokens share an id; mllm's vocabulary keeps one token per id")
    merges = []
    for number, merge in enumerate(model.get("merges") or []):
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2 or any(" " in p or "\n" in p or not p for p in parts):
            raise _fail(path, f"merge {number} ({merge!r}) cannot be written as one 'a b' line of mllm's merges file")
        merges.append(f"{parts[0]} {parts[1]}")
    spec = TokenizerSpec(_split_patterns(path, data.get("pre_tokenizer")), _normalizer(path, data),
                         bool(model.get("ignore_merges")), added)
    return sorted(entries, key=lambda e: e.id), merges, spec


def write_vocab(path: str | os.PathLike, entries: list[VocabEntry]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<ii", VOCAB_MAGIC, len(entries)))
        for entry in entries:
            out.write(struct.pack("<ii", entry.id, len(entry.token)))
            out.write(entry.token)
            out.write(struct.pack("<f", entry.score))


def read_vocab(path: str | os.PathLike) -> list[VocabEntry]:
    """The entries of an mllm vocabulary file, checked the way load_vocab reads it."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise _fail(path, "too short for an mllm vocabulary file")
    magic, count = struct.unpack_from("<ii", data, 0)
    if magic != VOCAB_MAGIC:
        raise _fail(path, f"magic {magic}, expected {VOCAB_MAGIC}: not an mllm vocabulary file")
    if count <= 0:
        raise _fail(path, f"vocabulary length {count}; mllm refuses a length <= 0")
    entries, pos = [], 8
    for number in range(count):
        if pos + 8 > len(data):
            raise _fail(path, f"ends inside entry {number} of {count}")
        token_id, length = struct.unpack_from("<ii", data, pos)
        pos += 8
        if length < 0 or pos + length + 4 > len(data):
            raise _fail(path, f"entry {number} (id {token_id}) runs past the end of the file")
        token = data[pos:pos + length]
        (score,) = struct.unpack_from("<f", data, pos + length)
        pos += length + 4
        if not 0 <= token_id < count:
            # load_vocab sizes its id table by the count and indexes it by id
            raise _fail(path, f"entry {number} has id {token_id}, outside [0, {count}) (mllm indexes a table of "
                              "that size by id)")
        entries.append(VocabEntry(token_id, token, score))
    if pos != len(data):
        raise _fail(path, f"{len(data) - pos} bytes after the last of {count} entries")
    return entries


def write_merges(path: str | os.PathLike, merges: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for line in merges:
            out.write(line + "\n")


def read_merges(path: str | os.PathLike, as_mllm: bool = True) -> list[str]:
    """Merge lines in rank order. `as_mllm`: as the C++ tokenizers read them, skipping empty lines and
    every line starting with '#' (meant for GPT-2's '#version' header, it also drops real merges of
    '#' tokens, such as '# !'); otherwise only empty lines are skipped."""
    with open(path, encoding="utf-8", newline="\n") as handle:
        lines = [line for line in handle.read().split("\n") if line]
    return [line for line in lines if not line.startswith("#")] if as_mllm else lines


def merges_mllm_skips(merges: list[str]) -> list[str]:
    """The merges mllm's reader drops (lines starting with '#')."""
    return [line for line in merges if line.startswith("#")]


class FileTokenizer:
    """Byte-level BPE from mllm's files alone: the pre-tokenization, then merges by rank.

    This is the algorithm the files encode (the one tokenizer.json describes); it proves the bundle's
    files carry the model's tokenizer, independent of the tokenizers library. `as_mllm` reads the
    merges as mllm does (see read_merges); without it, every merge line counts.
    """

    def __init__(self, vocab_path, merges_path, spec: TokenizerSpec, as_mllm: bool = True):
        import regex

        self.vocab = {entry.token: entry.id for entry in read_vocab(vocab_path)}
        merges = read_merges(merges_path, as_mllm=as_mllm)
        self.ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(merges)}
        self.spec = spec
        self.patterns = [regex.compile(p) for p in spec.split_patterns]
        self.added = sorted(spec.added_tokens, key=len, reverse=True)
        self._added_re = regex.compile("|".join(regex.escape(t) for t in self.added)) if self.added else None
        self._cache: dict[str, list[int]] = {}

    def _pieces(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self.patterns:
            split = []
            for piece in pieces:
                pos = 0
                for match in pattern.finditer(piece):
                    if match.start() > pos:
                        split.append(piece[pos:match.start()])
                    if match.end() > match.start():
                        split.append(match.group())
                    pos = match.end()
                if pos < len(piece):
                    split.append(piece[pos:])
            pieces = split
        return pieces

    def _bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        if self.spec.ignore_merges and word.encode("utf-8") in self.vocab:
            ids = [self.vocab[word.encode("utf-8")]]
            self._cache[word] = ids
            return ids
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            ranked = [(r, i) for r, i in ranked if r is not None]
            if not ranked:
                break
            best = min(ranked)[0]
            first, second = next((parts[i], parts[i + 1]) for r, i in ranked if r == best)
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            ids = [self.vocab[p.encode("utf-8")] for p in parts]
        except KeyError as exc:
            raise PipelineError(f"token {exc.args[0]!r} of word {word!r} is not in the vocabulary file") from None
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added around it."""
        segments = [(text, False)]
        if self._added_re is not None:
            segments, pos = [], 0
            for match in self._added_re.finditer(text):
                if match.start() > pos:
                    segments.append((text[pos:match.start()], False))
                segments.append((match.group(), True))
                pos = match.end()
            if pos < len(text):
                segments.append((text[pos:], False))
        ids: list[int] = []
        for segment, is_added in segments:
            if is_added:
                ids.append(self.vocab[segment.encode("utf-8")])
                continue
            if self.spec.normalizer == "NFC":
                segment = unicodedata.normalize("NFC", segment)
            for piece in self._pieces(segment):
                ids.extend(self._bpe("".join(BYTE_ENCODER[b] for b in piece.encode("utf-8"))))
        return ids


def reference_ids(hf_tokenizer, texts: list[str]) -> list[list[int]]:
    """The Hugging Face tokenizer's ids of `texts`, without special tokens (computed once per check)."""
    return [hf_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def round_trip(tokenizer: FileTokenizer, texts: list[str], expected: list[list[int]]) -> dict:
    """How many of `texts` the files tokenize exactly as `expected` (reference_ids) has them."""
    mismatches = []
    tokens = our_tokens = 0
    for index, (text, theirs) in enumerate(zip(texts, expected, strict=True)):
        ours = tokenizer.encode(text)
        tokens += len(theirs)
        our_tokens += len(ours)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            mismatches.append({"record": index, "first_difference": at, "ours": ours[at:at + 5],
                               "hf": theirs[at:at + 5]})
    return {"records": len(texts), "tokens": tokens, "tokens_from_files": our_tokens,
            "identical": len(texts) - len(mismatches), "mismatches": mismatches[:10]}


# mllm v1's BPETokenizer::tokenize with merges loaded (mllm/tokenizers/BPE/Bpe.cpp) cuts each byte-encoded
# piece with this std::regex (on bytes: \w is ASCII [A-Za-z0-9_], \S any non-whitespace byte) ...
_MLLM_V1_WORDS = rb"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\w+|\d+|\S+"


class MllmV1Tokenizer(FileTokenizer):
    """What mllm v1's BPE tokenizer computes from the same files: the same pieces, then per word the whole
    word if it is in the vocabulary, else greedy longest-prefix matches (tokenizeWordWithVocab), bytes
    falling back to id byte + 3. The merges are loaded but not applied by rank."""

    def __init__(self, vocab_path, merges_path, spec: TokenizerSpec):
        import re

        super().__init__(vocab_path, merges_path, spec, as_mllm=True)
        self._words = re.compile(_MLLM_V1_WORDS)
        self._longest = max(len(token) for token in self.vocab)

    def _greedy(self, word: bytes) -> list[int]:
        if word in self.vocab:
            return [self.vocab[word]]
        ids, pos = [], 0
        while pos < len(word):
            for length in range(min(self._longest, len(word) - pos), 0, -1):
                token = self.vocab.get(word[pos:pos + length])
                if token is not None:
                    ids.append(token)
                    pos += length
                    break
            else:
                ids.append(word[pos] + 3)  # byte fallback
                pos += 1
        return ids

    def _bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        ids = [i for match in self._words.finditer(word.encode("utf-8")) for i in self._greedy(match.group())]
        self._cache[word] = ids
        return ids
