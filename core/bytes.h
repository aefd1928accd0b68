#pragma once
// Little-endian byte writing and bounds-checked reading for wire formats.
// ByteReader treats its input as hostile: every read is checked against the
// remaining length and throws ProtocolError naming what was being read.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"

namespace strait::core {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "strait's wire formats are little-endian; big-endian hosts are not supported");

// Appends to a caller-owned vector. Not thread-safe; does not own the vector.
class ByteWriter {
 public:
  explicit ByteWriter(std::vector<uint8_t>& out) : out_(out) {}

  template <typename T>
  void put(T value) {
    static_assert(std::is_trivially_copyable<T>::value, "put() takes plain values");
    const size_t at = out_.size();
    out_.resize(at + sizeof(T));
    std::memcpy(out_.data() + at, &value, sizeof(T));
  }

  // Grows the buffer by n bytes and returns a pointer to them (valid until the
  // next call that grows the buffer).
  uint8_t* extend(size_t n) {
    const size_t at = out_.size();
    out_.resize(at + n);
    return out_.data() + at;
  }

  size_t size() const { return out_.size(); }

 private:
  std::vector<uint8_t>& out_;
};

// Reads from a borrowed buffer; never reads past its end.
class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  template <typename T>
  T get(const char* what) {
    static_assert(std::is_trivially_copyable<T>::value, "get() returns plain values");
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  // Returns a pointer to the next n bytes and skips them.
  const uint8_t* take(size_t n, const char* what) {
    need(n, what);
    const uint8_t* at = data_ + pos_;
    pos_ += n;
    return at;
  }

  size_t remaining() const { return size_ - pos_; }
  size_t position() const { return pos_; }

  // Throws unless every byte was consumed: trailing bytes mean the payload is
  // not what its header says it is.
  void expectEnd(const char* what) const {
    if (pos_ != size_) {
      fail<ProtocolError>(what, ": ", size_ - pos_, " unexpected trailing bytes after byte ", pos_,
                          " of ", size_);
    }
  }

 private:
  void need(size_t n, const char* what) const {
    if (n > size_ - pos_) {
      fail<ProtocolError>("truncated payload: reading ", what, " needs ", n, " bytes at offset ",
                          pos_, " but only ", size_ - pos_, " remain of ", size_);
    }
  }

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace strait::core
