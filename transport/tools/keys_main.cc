// strait_keys: CurveZMQ key files for a site (`./strait keys ...`).
//
//   strait_keys generate SITE [--dir DIR]   writes DIR/SITE.key (0600) and DIR/SITE.pub
//   strait_keys public FILE                 prints the key in a key file (checks it)

#include <cstdio>
#include <cstring>
#include <string>

#include "core/error.h"
#include "transport/gateway.h"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: ./strait keys generate SITE [--dir DIR]   (default DIR: keys)\n"
               "       ./strait keys public FILE\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  const std::string cmd = argv[1];
  try {
    if (cmd == "generate") {
      const std::string site = argv[2];
      std::string dir = "keys";
      for (int i = 3; i < argc; ++i) {
        if (std::strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
          dir = argv[++i];
        } else {
          return usage();
        }
      }
      if (site.empty() || site.find('/') != std::string::npos) {
        std::fprintf(stderr, "strait keys: '%s' is not a site name\n", site.c_str());
        return 2;
      }
      const auto keys = strait::transport::generateKeyPair();
      strait::transport::writeKeyPair(keys, dir, site);
      std::printf("wrote %s/%s.key (secret, mode 0600) and %s/%s.pub\n", dir.c_str(), site.c_str(),
                  dir.c_str(), site.c_str());
      std::printf("config: public_key: %s/%s.pub   secret_key: %s/%s.key (this site only)\n", dir.c_str(),
                  site.c_str(), dir.c_str(), site.c_str());
      return 0;
    }
    if (cmd == "public") {
      std::printf("%s\n", strait::transport::readKeyFile(argv[2]).c_str());
      return 0;
    }
  } catch (const strait::Error& e) {
    std::fprintf(stderr, "strait keys: %s\n", e.what());
    return 1;
  }
  return usage();
}
