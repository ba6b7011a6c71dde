// The few functions of llama.cpp's common.cpp and log.cpp that its chat layer calls (llama-sys,
// build/chat.rs). Compiling common.cpp itself would bring sampling, speculative decoding and the
// parameter fitting with it, and log.cpp starts a logging thread; these are our own short
// versions of just what the chat code uses.

#include "common.h"
#include "log.h"

#include <cstdarg>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

std::string string_format(const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    const int size = std::vsnprintf(nullptr, 0, fmt, args);
    va_end(args);
    if (size < 0) {
        va_end(copy);
        throw std::runtime_error("string_format: invalid format");
    }
    std::string out(static_cast<size_t>(size) + 1, '\0');
    std::vsnprintf(out.data(), out.size(), fmt, copy);
    va_end(copy);
    out.resize(static_cast<size_t>(size));
    return out;
}

std::string string_join(const std::vector<std::string> & values, const std::string & separator) {
    std::string out;
    for (size_t i = 0; i < values.size(); ++i) {
        if (i > 0) {
            out += separator;
        }
        out += values[i];
    }
    return out;
}

std::vector<std::string> string_split(const std::string & str, const std::string & delimiter) {
    std::vector<std::string> parts;
    if (delimiter.empty()) {
        parts.push_back(str);
        return parts;
    }
    size_t start = 0;
    for (size_t end; (end = str.find(delimiter, start)) != std::string::npos; start = end + delimiter.size()) {
        parts.push_back(str.substr(start, end - start));
    }
    parts.push_back(str.substr(start));
    return parts;
}

std::string string_repeat(const std::string & str, size_t n) {
    std::string out;
    out.reserve(str.size() * n);
    for (size_t i = 0; i < n; ++i) {
        out += str;
    }
    return out;
}

void string_replace_all(std::string & s, const std::string & search, const std::string & replace) {
    if (search.empty()) {
        return;
    }
    std::string out;
    size_t start = 0;
    for (size_t pos; (pos = s.find(search, start)) != std::string::npos; start = pos + search.size()) {
        out.append(s, start, pos - start);
        out += replace;
    }
    out.append(s, start, std::string::npos);
    s = std::move(out);
}

std::vector<llama_token> common_tokenize(const llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special) {
    if (text.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
        throw std::runtime_error("common_tokenize: text too long");
    }
    std::vector<llama_token> tokens(text.size() + 2);
    int32_t n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(), static_cast<int32_t>(tokens.size()),
                               add_special, parse_special);
    if (n == std::numeric_limits<int32_t>::min()) {
        throw std::runtime_error("common_tokenize: too many tokens");
    }
    if (n < 0) {
        tokens.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(), static_cast<int32_t>(tokens.size()),
                           add_special, parse_special);
        if (n < 0) {
            throw std::runtime_error("common_tokenize: the token count changed between two calls");
        }
    }
    tokens.resize(static_cast<size_t>(n));
    return tokens;
}

std::string common_token_to_piece(const llama_vocab * vocab, llama_token token, bool special) {
    std::string piece(16, '\0');
    int32_t n = llama_token_to_piece(vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0, special);
    if (n < 0) {
        piece.resize(static_cast<size_t>(-n));
        n = llama_token_to_piece(vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0, special);
        if (n < 0) {
            throw std::runtime_error("common_token_to_piece: the piece length changed between two calls");
        }
    }
    piece.resize(static_cast<size_t>(n));
    return piece;
}

// Logging: the chat code's LOG_* lines. Warnings and errors go to llama.cpp's own log (whatever
// callback the process installed, e.g. the `llama` crate's, which hands them to `tracing`);
// anything quieter is dropped.

int common_log_get_verbosity_thold(void) {
    return LOG_LEVEL_WARN;
}

struct common_log * common_log_main() {
    return nullptr;
}

void common_log_add(struct common_log * /* log */, enum ggml_log_level level, const char * fmt, ...) {
    if (level != GGML_LOG_LEVEL_WARN && level != GGML_LOG_LEVEL_ERROR) {
        return;
    }
    va_list args;
    va_start(args, fmt);
    char line[1024];
    std::vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    ggml_log_callback callback = nullptr;
    void * user_data = nullptr;
    llama_log_get(&callback, &user_data);
    if (callback != nullptr) {
        callback(level, line, user_data);
    } else {
        std::fputs(line, stderr);
    }
}
