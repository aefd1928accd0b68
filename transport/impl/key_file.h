#pragma once
// Key files (transport-internal): one line of text, secret files created with
// an exact mode, never overwritten. Shared by the CurveZMQ keys (options.cc)
// and the Ed25519 audit keys (audit.cc).

#include <sys/types.h>

#include <string>

namespace strait::transport {

// The first line of a key file, trailing spaces and CR removed; ConfigError
// naming the file when it cannot be read.
std::string readKeyLine(const std::string& path);

// Creates `path` with exactly `mode` (whatever the umask) holding text and a
// newline, synced to disk; Error if it exists or cannot be written.
void writeKeyLine(const std::string& path, const std::string& text, mode_t mode);

}  // namespace strait::transport
