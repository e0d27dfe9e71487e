"""The C++ tokenizer header of the bundle's cpp/ folder (written by bundle/cpp.py), as a string.

Byte-level BPE with the merges applied by rank, every merge line counted (also lines starting with
'#', which mllm's own merges readers skip), the model's added tokens matched before the
pre-tokenization, and the pre-tokenization patterns hand-written over mllm's Unicode categories
(mllm/tokenizers/Unicode.hpp: unicode_cpt_from_utf8, unicode_cpt_flags). Its Python twin is
shadowquant.bundle.tokenizer.FileTokenizer(as_mllm=False) without NFC (see bundle.cpp.demo_tokenizer).
It depends on mllm only through those Unicode functions, so it compiles standalone against a stub.
"""

TOKENIZER_HEADER = "shadowquant_tokenizer.hpp"

TOKENIZER_HPP = r'''// shadowquant_tokenizer.hpp: byte-level BPE for the shadowquant bundle (written by shadowquant).
//
// The model's tokenizer from the bundle's vocab.mllm and merges.txt: added tokens matched first
// (leftmost, longest), then the model's pre-tokenization, GPT-2's byte encoding and the merges
// applied by rank, as the Hugging Face tokenizer does. Every merge line counts, also lines that
// start with '#'. No Unicode normalization is applied: a model whose tokenizer normalizes (NFC)
// must get NFC text.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizers/Unicode.hpp"

namespace shadowquant {

// The pre-tokenizations of byte-level BPE tokenizers, each a Split with behavior Isolated.
enum class Split {
    Gpt2,   // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    Qwen2,  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    Llama3, // the same with \p{N}{1,3}
    Digit,  // \p{N}
    Digits, // \p{N}+
    Regex,  // any other pattern: mllm's unicode_regex_split (not checked against the model's tokenizer)
};

struct SplitStep {
    Split kind;
    std::string pattern; // only for Split::Regex
};

class BpeTokenizer {
public:
    BpeTokenizer(const std::string &vocab_path, const std::string &merges_path, std::vector<SplitStep> steps,
                 const std::vector<std::string> &added_tokens, bool ignore_merges = false) :
        steps_(std::move(steps)), ignore_merges_(ignore_merges) {
        init_bytes();
        read_vocab(vocab_path);
        read_merges(merges_path);
        for (const auto &token : added_tokens) {
            auto found = token_to_id_.find(token);
            if (found == token_to_id_.end()) throw std::runtime_error("added token not in " + vocab_path + ": " + token);
            added_.emplace_back(token, found->second);
            added_ids_.push_back(found->second);
            first_bytes_[static_cast<unsigned char>(token[0])] = true;
        }
        std::stable_sort(added_.begin(), added_.end(),
                         [](const auto &a, const auto &b) { return a.first.size() > b.first.size(); });
    }

    // Token ids of `text` (UTF-8), no special tokens added around it.
    std::vector<int> encode(const std::string &text) const {
        std::vector<int> ids;
        size_t start = 0, pos = 0;
        while (pos < text.size()) {
            int id = -1;
            size_t length = 0;
            if (first_bytes_[static_cast<unsigned char>(text[pos])]) {
                for (const auto &added : added_) {
                    if (text.compare(pos, added.first.size(), added.first) == 0) {
                        id = added.second;
                        length = added.first.size();
                        break;
                    }
                }
            }
            if (id < 0) {
                ++pos;
                continue;
            }
            if (pos > start) encode_plain(text.substr(start, pos - start), ids);
            ids.push_back(id);
            pos += length;
            start = pos;
        }
        if (start < text.size()) encode_plain(text.substr(start), ids);
        return ids;
    }

    // The bytes a token stands for (an added token as written, any other token byte-decoded).
    const std::string &token_bytes(int id) const {
        static const std::string empty;
        return id >= 0 && static_cast<size_t>(id) < id_to_bytes_.size() ? id_to_bytes_[id] : empty;
    }

    std::string decode(const std::vector<int> &ids) const {
        std::string out;
        for (int id : ids) out += token_bytes(id);
        return out;
    }

    int id_of(const std::string &token) const {
        auto found = token_to_id_.find(token);
        return found == token_to_id_.end() ? -1 : found->second;
    }

    size_t vocab_entries() const { return token_to_id_.size(); }
    size_t merges() const { return ranks_.size(); }

    // The pieces the pre-tokenization cuts `text` into (for checks).
    std::vector<std::string> pre_tokenize(const std::string &text) const {
        std::vector<std::string> pieces{text};
        for (const auto &step : steps_) {
            std::vector<std::string> next;
            for (const auto &piece : pieces) {
                if (step.kind == Split::Regex) {
                    for (auto &p : unicode_regex_split(piece, {step.pattern})) next.push_back(p);
                } else {
                    split(piece, step.kind, next);
                }
            }
            pieces.swap(next);
        }
        return pieces;
    }

private:
    struct Cpt {
        uint32_t c;
        bool letter, number, space;
        bool other() const { return !letter && !number && !space; }
    };

    std::vector<SplitStep> steps_;
    bool ignore_merges_;
    std::string byte_encoder_[256];
    std::unordered_map<uint32_t, unsigned char> byte_decoder_;
    std::unordered_map<std::string, int> token_to_id_;
    std::vector<std::string> id_to_bytes_;
    std::unordered_map<std::string, int> ranks_;
    std::vector<std::pair<std::string, int>> added_;
    std::vector<int> added_ids_;
    bool first_bytes_[256] = {};
    mutable std::unordered_map<std::string, std::vector<int>> cache_;

    static std::string utf8(uint32_t cp) {
        std::string out;
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        return out;
    }

    // GPT-2's byte -> printable character table.
    void init_bytes() {
        uint32_t extra = 0;
        for (int b = 0; b < 256; ++b) {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            uint32_t cp = printable ? static_cast<uint32_t>(b) : 256 + extra++;
            byte_encoder_[b] = utf8(cp);
            byte_decoder_[cp] = static_cast<unsigned char>(b);
        }
    }

    // vocab.mllm: int32 23333, int32 count, then per token int32 id, int32 length, bytes, float32 score.
    void read_vocab(const std::string &path) {
        std::ifstream in(path, std::ios::binary);
        if (!in) throw std::runtime_error("cannot open vocabulary file " + path);
        int32_t magic = 0, count = 0;
        in.read(reinterpret_cast<char *>(&magic), 4);
        in.read(reinterpret_cast<char *>(&count), 4);
        if (!in || magic != 23333 || count <= 0) throw std::runtime_error(path + " is not an mllm vocabulary file");
        id_to_bytes_.assign(count, std::string());
        std::vector<std::string> raw(count);
        for (int32_t i = 0; i < count; ++i) {
            int32_t id = 0, length = 0;
            float score = 0;
            in.read(reinterpret_cast<char *>(&id), 4);
            in.read(reinterpret_cast<char *>(&length), 4);
            if (!in || length < 0 || id < 0 || id >= count) throw std::runtime_error(path + ": bad entry");
            std::string token(length, '\0');
            in.read(&token[0], length);
            in.read(reinterpret_cast<char *>(&score), 4);
            if (!in) throw std::runtime_error(path + ": ends inside an entry");
            token_to_id_[token] = id;
            raw[id] = token;
        }
        for (int32_t id = 0; id < count; ++id) id_to_bytes_[id] = byte_decode(raw[id]);
    }

    // A byte-level token back to its bytes; a token with a character outside the byte alphabet
    // (an added token such as <|im_end|>) stands for itself.
    std::string byte_decode(const std::string &token) const {
        std::string out;
        size_t offset = 0;
        while (offset < token.size()) {
            uint32_t cp = unicode_cpt_from_utf8(token, offset);
            auto found = byte_decoder_.find(cp);
            if (found == byte_decoder_.end()) return token;
            out += static_cast<char>(found->second);
        }
        return out;
    }

    // merges.txt: one merge "a b" per line in rank order; every non-empty line is a merge.
    void read_merges(const std::string &path) {
        std::ifstream in(path, std::ios::binary);
        if (!in) throw std::runtime_error("cannot open merges file " + path);
        std::string line;
        int rank = 0;
        while (std::getline(in, line)) {
            if (!line.empty() && line.back() == '\r') line.pop_back();
            if (line.empty()) continue;
            if (line.find(' ') == std::string::npos) throw std::runtime_error(path + ": merge without a space: " + line);
            ranks_.emplace(line, rank++);
        }
    }

    void encode_plain(const std::string &text, std::vector<int> &ids) const {
        for (const auto &piece : pre_tokenize(text)) {
            const auto &piece_ids = bpe(piece);
            ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
        }
    }

    const std::vector<int> &bpe(const std::string &piece) const {
        auto cached = cache_.find(piece);
        if (cached != cache_.end()) return cached->second;
        std::vector<std::string> parts;
        std::string word;
        for (unsigned char b : piece) {
            parts.push_back(byte_encoder_[b]);
            word += byte_encoder_[b];
        }
        if (ignore_merges_ && token_to_id_.count(word)) {
            parts.assign(1, word);
        }
        while (parts.size() > 1) {
            int best = INT_MAX;
            size_t at = parts.size();
            for (size_t i = 0; i + 1 < parts.size(); ++i) {
                auto found = ranks_.find(parts[i] + " " + parts[i + 1]);
                if (found != ranks_.end() && found->second < best) {
                    best = found->second;
                    at = i;
                }
            }
            if (at == parts.size()) break;
            const std::string first = parts[at], second = parts[at + 1];
            std::vector<std::string> merged;
            for (size_t i = 0; i < parts.size();) {
                if (i + 1 < parts.size() && parts[i] == first && parts[i + 1] == second) {
                    merged.push_back(first + second);
                    i += 2;
                } else {
                    merged.push_back(parts[i]);
                    i += 1;
                }
            }
            parts.swap(merged);
        }
        std::vector<int> ids;
        for (const auto &part : parts) {
            auto found = token_to_id_.find(part);
            if (found != token_to_id_.end()) {
                ids.push_back(found->second);
                continue;
            }
            // not in the vocabulary (a broken file): fall back to the part's byte tokens
            size_t offset = 0;
            while (offset < part.size()) {
                size_t begin = offset;
                unicode_cpt_from_utf8(part, offset);
                auto byte = token_to_id_.find(part.substr(begin, offset - begin));
                if (byte == token_to_id_.end()) throw std::runtime_error("byte token missing from the vocabulary");
                ids.push_back(byte->second);
            }
        }
        return cache_.emplace(piece, std::move(ids)).first->second;
    }

    static bool is_crlf(uint32_t c) { return c == '\r' || c == '\n'; }

    static uint32_t lower(uint32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

    // Length of a contraction ('s 't 're 've 'm 'll 'd) at i, 0 if none.
    static size_t contraction(const std::vector<Cpt> &t, size_t i, bool any_case) {
        if (t[i].c != '\'' || i + 1 >= t.size()) return 0;
        auto at = [&](size_t k) -> uint32_t { return k < t.size() ? (any_case ? lower(t[k].c) : t[k].c) : 0; };
        uint32_t a = at(i + 1), b = at(i + 2);
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
        return 0;
    }

    // End of the next match at i of a GPT-2 / Qwen2 / LLaMA-3 pattern (every position matches).
    static size_t match(const std::vector<Cpt> &t, size_t i, Split kind) {
        const size_t n = t.size();
        auto L = [&](size_t k) { return k < n && t[k].letter; };
        auto N = [&](size_t k) { return k < n && t[k].number; };
        auto S = [&](size_t k) { return k < n && t[k].space; };
        auto O = [&](size_t k) { return k < n && t[k].other(); };
        auto run = [&](size_t k, auto pred) {
            while (pred(k)) ++k;
            return k;
        };
        if (size_t c = contraction(t, i, kind != Split::Gpt2)) return i + c;
        if (kind == Split::Gpt2) {
            size_t j = (t[i].c == ' ' && (L(i + 1) || N(i + 1) || O(i + 1))) ? i + 1 : i;
            if (L(j)) return run(j, L);
            if (N(j)) return run(j, N);
            if (O(j)) return run(j, O);
        } else {
            if (!is_crlf(t[i].c) && !L(i) && !N(i) && L(i + 1)) return run(i + 1, L);
            if (L(i)) return run(i, L);
            if (N(i)) {
                if (kind == Split::Qwen2) return i + 1;
                size_t k = i;
                while (k < i + 3 && N(k)) ++k;
                return k;
            }
            size_t j = (t[i].c == ' ' && O(i + 1)) ? i + 1 : i;
            if (O(j)) {
                size_t k = run(j, O);
                while (k < n && is_crlf(t[k].c)) ++k;
                return k;
            }
            if (S(i)) { // \s*[\r\n]+
                size_t k = run(i, S);
                for (size_t p = k; p > i; --p) {
                    if (is_crlf(t[p - 1].c)) return p;
                }
            }
        }
        // \s+(?!\S) then \s+
        size_t k = run(i, S);
        if (k == n) return n;
        if (k - i >= 2) return k - 1;
        return i + 1;
    }

    void split(const std::string &piece, Split kind, std::vector<std::string> &out) const {
        std::vector<Cpt> t;
        std::vector<size_t> starts;
        size_t offset = 0;
        while (offset < piece.size()) {
            starts.push_back(offset);
            uint32_t c = unicode_cpt_from_utf8(piece, offset);
            codepoint_flags flags = unicode_cpt_flags(c);
            t.push_back({c, static_cast<bool>(flags.is_letter), static_cast<bool>(flags.is_number),
                         static_cast<bool>(flags.is_whitespace)});
        }
        starts.push_back(piece.size());
        auto emit = [&](size_t a, size_t b) {
            if (b > a) out.push_back(piece.substr(starts[a], starts[b] - starts[a]));
        };
        if (kind == Split::Digit || kind == Split::Digits) {
            size_t i = 0;
            while (i < t.size()) {
                size_t k = i;
                if (t[i].number) {
                    k = kind == Split::Digit ? i + 1 : i;
                    while (kind == Split::Digits && k < t.size() && t[k].number) ++k;
                } else {
                    while (k < t.size() && !t[k].number) ++k;
                }
                emit(i, k);
                i = k;
            }
            return;
        }
        for (size_t i = 0; i < t.size();) {
            size_t k = match(t, i, kind);
            emit(i, k);
            i = k;
        }
    }
};

} // namespace shadowquant
'''
