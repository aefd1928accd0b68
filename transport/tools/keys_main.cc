// strait_keys: a site's key files (`./strait keys ...`).
//
//   strait_keys generate SITE [--dir DIR]  writes DIR/SITE.key (0600) and DIR/SITE.pub (CurveZMQ, the
//                                          link) and DIR/SITE.sign (0600) and DIR/SITE.sign.pub
//                                          (Ed25519, the audit log); writes only the missing pair
//   strait_keys rotate SITE [--dir DIR]    retires the current files (renamed *.retired-TIME) and
//                                          writes new ones
//   strait_keys public FILE                prints the key in a CurveZMQ key file (checks it)

#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

#include "core/error.h"
#include "transport/audit.h"
#include "transport/gateway.h"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: ./strait keys generate SITE [--dir DIR]   (default DIR: keys)\n"
               "       ./strait keys rotate SITE [--dir DIR]\n"
               "       ./strait keys public FILE\n");
  return 2;
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

void generate(const std::string& dir, const std::string& site) {
  namespace t = strait::transport;
  const std::string base = dir + "/" + site;
  const bool link = exists(base + ".key") || exists(base + ".pub");
  const bool sign = exists(base + ".sign") || exists(base + ".sign.pub");
  if (link && sign) {
    strait::fail<strait::Error>("keys for site '", site, "' already exist in ", dir,
                                "; ./strait keys rotate ", site, " replaces them");
  }
  if (!link) {
    t::writeKeyPair(t::generateKeyPair(), dir, site);
    std::printf("wrote %s.key (secret, mode 0600) and %s.pub: the CurveZMQ link key\n", base.c_str(), base.c_str());
    std::printf("  job config: public_key: %s.pub   secret_key: %s.key (read by this site only)\n", base.c_str(),
                base.c_str());
  }
  if (!sign) {
    t::writeSigningKeys(t::generateSigningKeys(), dir, site);
    std::printf("wrote %s.sign (secret, mode 0600) and %s.sign.pub: the Ed25519 audit-log key\n", base.c_str(),
                base.c_str());
    std::printf("  site policy: audit: {signing_key: %s.sign}; auditors verify with %s.sign.pub\n", base.c_str(),
                base.c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  const std::string cmd = argv[1];
  try {
    if (cmd == "generate" || cmd == "rotate") {
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
      if (cmd == "rotate") {
        char stamp[32];
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        gmtime_r(&now, &tm);
        std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
        int moved = 0;
        for (const char* ext : {".key", ".pub", ".sign", ".sign.pub"}) {
          const std::string from = dir + "/" + site + ext;
          if (!exists(from)) continue;
          const std::string to = from + ".retired-" + stamp;
          if (std::rename(from.c_str(), to.c_str()) != 0) {
            strait::fail<strait::Error>("cannot retire '", from, "': ", std::strerror(errno));
          }
          std::printf("retired %s -> %s\n", from.c_str(), to.c_str());
          ++moved;
        }
        if (moved == 0) std::printf("no keys of site '%s' in %s: generating\n", site.c_str(), dir.c_str());
        generate(dir, site);
        std::printf("give the other sites the new %s/%s.pub; keep the retired .sign.pub to verify older audit "
                    "records\n",
                    dir.c_str(), site.c_str());
        return 0;
      }
      generate(dir, site);
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
