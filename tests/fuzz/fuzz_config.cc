// Job configs and site policies are text written by people: any text must
// parse or fail with ConfigError, never crash. The first byte picks which.
#include <cstdint>
#include <string>

#include "core/config/config.h"
#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    if (data[0] & 1) {
      strait::core::SitePolicy::parse(text, "fuzz.yaml");
    } else {
      const strait::core::JobConfig c = strait::core::JobConfig::parse(text, "fuzz.yaml");
      (void)c.sharedText();
      if (!c.sites.empty()) (void)c.compression.ruleFor("ddp.bucket0", 1000);
    }
  } catch (const strait::Error&) {
  }
  return 0;
}
