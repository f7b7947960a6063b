// Just enough JSON writing for the status and info strings the bridge parses.
#pragma once

#include <algorithm>
#include <cstring>
#include <map>
#include <string>

namespace mk {

inline std::string json_str(const std::string & v) {
    std::string o = "\"";
    for (char c : v) {
        if (c == '"' || c == '\\') { o += '\\'; o += c; }
        else if ((unsigned char) c < 0x20) { o += ' '; }
        else { o += c; }
    }
    return o + "\"";
}

inline std::string json_value(const std::string & v) { return json_str(v); }
template <typename T> inline std::string json_value(T v) { return std::to_string(v); }

// {"key": value, ...} of a map with string keys and number or string values
template <typename T>
inline std::string json_counts(const std::map<std::string, T> & m) {
    std::string o = "{";
    for (auto it = m.begin(); it != m.end(); ++it) {
        if (it != m.begin()) o += ",";
        o += json_str(it->first) + ":" + json_value(it->second);
    }
    return o + "}";
}

// Copy text into a caller's buffer (truncated, NUL-terminated) and return the size it needs: the shape of every
// JSON-returning C API function.
inline size_t copy_out(const std::string & text, char * buf, size_t size) {
    if (buf && size > 0) {
        const size_t n = std::min(size - 1, text.size());
        memcpy(buf, text.data(), n);
        buf[n] = '\0';
    }
    return text.size() + 1;
}

}  // namespace mk
