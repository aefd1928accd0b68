#pragma once
// A pipeline's value stage as plain numbers: what the device kernels
// (torch_ext/csrc/cuda/codecs.cu, through core/codec/impl/lanes.h) need to
// encode or decode a value section. No includes beyond <cstdint>: nvcc reads it.

#include <cstdint>

namespace strait::core {

struct ValueStageSpec {
  uint8_t kind = 0;         // the wire id: 1 fp32, 2 fp16, 3 bf16, 4 int, 5 qsgd, 6 sign
  uint8_t bits = 0;         // bits per value: 32, 16, 8, 4, 2 or 1
  bool stochastic = false;  // int: stochastic rounding; qsgd: always
  bool l2 = false;          // qsgd: the scale is the block's l2 norm
  uint32_t block = 0;       // values per scale (int, qsgd, sign); 0 for the float kinds
  uint32_t limit = 0;       // float bits of the smallest magnitude a float kind refuses
};

}  // namespace strait::core
