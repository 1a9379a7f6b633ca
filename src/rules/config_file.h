// Reading a config file whole, for the Sluice and envoyproxy/ratelimit loaders.
//
// Only a regular file (symlinks followed) of at most kMaxConfigFileBytes is read: a
// directory, a FIFO (which would block the reload) or a device such as /dev/zero (which
// would never end) gets a clear error instead. Thread-safe: no state.
#ifndef SLUICE_RULES_CONFIG_FILE_H_
#define SLUICE_RULES_CONFIG_FILE_H_

#include <yaml-cpp/yaml.h>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "sluice/status.h"

namespace sluice::rules {

inline constexpr size_t kMaxConfigFileBytes = size_t{64} << 20;

// The offset of the first byte of `s` that does not belong to a well-formed UTF-8 sequence
// (no overlong forms, surrogates or code points past U+10FFFF); npos when there is none.
size_t FirstNonUtf8(std::string_view s);

// "file:line:col: key: message", as every error and warning of both loaders names its
// place (no line and column when `mark` has none, no key when `key` is empty).
std::string Located(const std::string& source, const YAML::Mark& mark, const std::string& key,
                    const std::string& message);

// YAML's own message for a syntax error at 0-based `line` of `text`, with what most often
// causes the ones it words obscurely: a tab in the line's indentation (YAML indents with
// spaces only; yaml-cpp says "illegal map value" or "end of map not found").
std::string ExplainYamlError(std::string_view text, int line, const std::string& message);
// The same for an exception yaml-cpp threw while reading `text`; its nesting bound, which
// it words as "bad file", is named as what it is.
std::string ExplainYamlError(std::string_view text, const YAML::Exception& e);

// YAML aliases share a node, so a file of a few hundred bytes can stand for billions of
// nodes (ten levels of ten aliases each); reading it would hold the reload, and the main
// loop, for good. Why `root` is too large to read once its aliases are expanded (more than
// kMaxYamlNodes nodes, or deeper than kMaxYamlDepth, as an alias inside the node it names
// is), or nullopt when it is not. Stops counting as soon as a bound is passed.
inline constexpr size_t kMaxYamlNodes = 2'000'000;
inline constexpr size_t kMaxYamlDepth = 2'000;  // yaml-cpp's own bound on plain nesting
std::optional<std::string> ExpandedTooLarge(const YAML::Node& root);

// What reading `yaml` event by event finds, before any tree is built (a tree takes hundreds
// of bytes a node: a file of a few MiB of short scalars would take gigabytes to load):
// where its node past kMaxYamlNodes is, if any, and where the first content of a document
// after the first is, if any. Reads all documents, stopping at the first of either (or,
// with `first_only`, the first document alone, as a loader that reads only it).
// Throws what yaml-cpp's parser throws on malformed text (YAML::Exception), as a load would.
struct YamlScan {
  std::optional<YAML::Mark> too_many;
  std::optional<YAML::Mark> later_document;
};
YamlScan ScanYaml(std::string_view yaml, bool first_only = false);
inline const std::string kTooManyYamlNodes =
    "more than " + std::to_string(kMaxYamlNodes) + " YAML nodes";

// The file's bytes into *text, or an error naming `path`.
Status ReadConfigFile(const std::string& path, std::string* text);

// What a config file is now, for the reload watches: the file the path names (through any
// symlinks), its size, its modification time and its status change time. A ConfigMap
// update swaps a "..data" symlink to a new file whose times may equal the old one's, and
// `cp -p` or `rsync -t` set the modification time back; the change time no writer sets.
// Empty when there is no file to read.
std::string ConfigFileStamp(const std::string& path);

}  // namespace sluice::rules

#endif  // SLUICE_RULES_CONFIG_FILE_H_
