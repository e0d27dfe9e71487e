// An independent re-implementation of how mllm v1's ParamLoader (mllm/ParamLoader.cpp, file-IO mode)
// reads a model file, for the tests: mllm itself cannot be fetched offline, and its code is not
// copied here. It follows the loader's steps and reports what the runtime would get:
//
//   magic   int32 read with fread; anything but 20012 and the loader stays empty
//   index   uint64 index_size, then entries are read while ftell() < index_size + 12:
//           int32 name length, the name, uint64 byte length, uint64 absolute offset, int32 dtype;
//           the entries go into a std::map, so a repeated name keeps its last entry
//   load    fseek(offset), fread(min(allocated, length)) bytes into the tensor (load(name) reads length)
//
// Usage: mllm_param_loader FILE [EXPECTED.tsv]
// Prints one line per tensor, in the map's (sorted) order:
//   tensor <name> <dtype> <offset> <length> <bytes read> <fnv1a64 of the bytes> <offset % element size>
// then "index <entries read> <distinct names> <ftell after the index> <index end>".
// With EXPECTED (lines "<name>\t<dtype>\t<bytes>": what the C++ model allocates), one line per
// expected tensor: "expect <name> ok|missing|size|dtype" (missing: the loader skips it silently;
// size: the mmap loader rejects it, the file loader reads a truncated or partial tensor).
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Entry {
    uint64_t offset = 0;
    uint64_t length = 0;
    int32_t dtype = 0;
};

int32_t read_i32(FILE *fp) {
    int32_t value = 0;
    if (fread(&value, sizeof(value), 1, fp) != 1) return 0;
    return value;
}

uint64_t read_u64(FILE *fp) {
    uint64_t value = 0;
    if (fread(&value, sizeof(value), 1, fp) != 1) return 0;
    return value;
}

std::string read_string(FILE *fp) {
    int32_t length = read_i32(fp);
    if (length <= 0) return "";
    std::string text(static_cast<size_t>(length), '\0');
    size_t got = fread(&text[0], 1, static_cast<size_t>(length), fp);
    text.resize(got);
    return text;
}

uint64_t fnv1a64(const std::vector<unsigned char> &bytes) {
    uint64_t hash = 1469598103934665603ULL;
    for (unsigned char byte : bytes) {
        hash ^= byte;
        hash *= 1099511628211ULL;
    }
    return hash;
}

// Element sizes of mllm's DataType codes (Types.hpp): F32 0, F16 1, I8 16, I16 17, I32 18.
// Block types (Q4_0 2, ...) are byte-aligned here.
int element_size(int32_t dtype) {
    switch (dtype) {
    case 0: return 4;
    case 1: return 2;
    case 17: return 2;
    case 18: return 4;
    default: return 1;
    }
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE [EXPECTED.tsv]\n", argv[0]);
        return 64;
    }
    FILE *fp = fopen(argv[1], "rb");
    if (fp == nullptr) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 66;
    }
    if (read_i32(fp) != 20012) {
        printf("magic error\n");
        fclose(fp);
        return 3;
    }
    uint64_t index_size = read_u64(fp);
    uint64_t index_end = index_size + static_cast<uint64_t>(ftell(fp));
    std::map<std::string, Entry> entries;
    long read_entries = 0;
    while (static_cast<uint64_t>(ftell(fp)) < index_end && !feof(fp)) {
        std::string name = read_string(fp);
        Entry entry;
        entry.length = read_u64(fp);
        entry.offset = read_u64(fp);
        entry.dtype = read_i32(fp);
        entries[name] = entry;
        ++read_entries;
    }
    long index_stop = ftell(fp);
    for (const auto &[name, entry] : entries) {
        std::vector<unsigned char> data(entry.length);
        fseek(fp, static_cast<long>(entry.offset), SEEK_SET);
        size_t got = entry.length ? fread(data.data(), 1, entry.length, fp) : 0;
        data.resize(got);
        printf("tensor\t%s\t%d\t%llu\t%llu\t%zu\t%016llx\t%llu\n", name.c_str(), entry.dtype,
               static_cast<unsigned long long>(entry.offset), static_cast<unsigned long long>(entry.length), got,
               static_cast<unsigned long long>(fnv1a64(data)),
               static_cast<unsigned long long>(entry.offset % element_size(entry.dtype)));
    }
    printf("index\t%ld\t%zu\t%ld\t%llu\n", read_entries, entries.size(), index_stop,
           static_cast<unsigned long long>(index_end));
    if (argc > 2) {
        std::ifstream expected(argv[2]);
        std::string line;
        while (std::getline(expected, line)) {
            if (line.empty()) continue;
            std::istringstream fields(line);
            std::string name;
            int32_t dtype = 0;
            unsigned long long bytes = 0;
            std::getline(fields, name, '\t');
            fields >> dtype >> bytes;
            auto found = entries.find(name);
            const char *status = "ok";
            if (found == entries.end()) {
                status = "missing";
            } else if (found->second.length != bytes) {
                status = "size";
            } else if (found->second.dtype != dtype) {
                status = "dtype";
            }
            printf("expect\t%s\t%s\n", name.c_str(), status);
        }
    }
    fclose(fp);
    return 0;
}
