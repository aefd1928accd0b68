#pragma once
// JSON text for the few places strait writes JSON by hand (audit records,
// the metrics lines, strait_audit --json): one quoting rule for all of them.

#include <cstdio>
#include <string>

namespace strait {

// `s` as a JSON string literal, quotes included: `"` and `\` escaped, control
// characters as \u00XX. Bytes >= 0x80 pass through (UTF-8 stays UTF-8).
inline std::string jsonString(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += char(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      o += buf;
    } else {
      o += char(c);
    }
  }
  return o + "\"";
}

}  // namespace strait
