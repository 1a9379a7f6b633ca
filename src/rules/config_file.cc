#include "rules/config_file.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

namespace sluice::rules {

Status ReadConfigFile(const std::string& path, std::string* text) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return Status::Invalid(path + ": cannot read the file");
  if (S_ISDIR(st.st_mode)) return Status::Invalid(path + ": is a directory, not a file");
  if (!S_ISREG(st.st_mode)) return Status::Invalid(path + ": not a regular file");
  if (static_cast<size_t>(st.st_size) > kMaxConfigFileBytes) {
    return Status::Invalid(path + ": larger than " + std::to_string(kMaxConfigFileBytes >> 20) +
                           " MiB");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::Invalid(path + ": cannot read the file");
  std::ostringstream out;
  out << in.rdbuf();
  *text = std::move(out).str();
  return Status::Ok();
}

std::string ConfigFileStamp(const std::string& path) {
  struct stat st {};
  if (path.empty() || ::stat(path.c_str(), &st) != 0) return {};
  return std::to_string(st.st_dev) + ' ' + std::to_string(st.st_ino) + ' ' +
         std::to_string(st.st_size) + ' ' + std::to_string(st.st_mtim.tv_sec) + '.' +
         std::to_string(st.st_mtim.tv_nsec) + ' ' + std::to_string(st.st_ctim.tv_sec) + '.' +
         std::to_string(st.st_ctim.tv_nsec);
}

}  // namespace sluice::rules
