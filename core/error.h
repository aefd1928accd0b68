#pragma once
// The error hierarchy of strait. Every exception the library throws derives
// from strait::Error. Which ones a caller can recover from is documented in
// docs/ARCHITECTURE.md ("Errors").

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace strait {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A caller passed something the API does not accept (bad size, non-finite
// value, unknown codec name). Fix the call; retrying the same call fails again.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A configuration file or pipeline string is malformed or fails validation.
// The message names the file, line, key, bad value and what is allowed.
class ConfigError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

// Bytes that arrived from elsewhere are malformed: a truncated payload, a bad
// length, an index out of range, a non-finite scale. The payload is dropped;
// nothing it described was applied.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

// A deadline passed.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// Something would leave the site that its egress policy does not allow.
class PolicyViolation : public Error {
 public:
  using Error::Error;
};

namespace detail {

inline void appendAll(std::ostringstream&) {}

template <typename T, typename... Rest>
void appendAll(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  appendAll(os, rest...);
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  appendAll(os, args...);
  return os.str();
}

}  // namespace detail

// Throws ErrorType with the concatenation of args (streamed with <<).
template <typename ErrorType, typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw ErrorType(detail::concat(args...));
}

}  // namespace strait

// Always-on invariant check: throws strait::Error with file:line and a message
// (at least one message argument is required).
#define STRAIT_CHECK(cond, ...)                                                   \
  do {                                                                            \
    if (!(cond)) {                                                                \
      ::strait::fail<::strait::Error>(__FILE__, ":", __LINE__, ": check '", #cond, \
                                      "' failed: ", __VA_ARGS__);               \
    }                                                                             \
  } while (0)

// Like STRAIT_CHECK but throws the given subclass of strait::Error, without the
// source location: for messages addressed to users, not to developers.
#define STRAIT_REQUIRE(cond, ErrorType, ...)      \
  do {                                            \
    if (!(cond)) {                                \
      ::strait::fail<ErrorType>(__VA_ARGS__);     \
    }                                             \
  } while (0)
