#include "rules/config_file.h"

#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/parser.h>

#include <cerrno>
#include <cstring>

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string_view>

namespace sluice::rules {

std::string Located(const std::string& source, const YAML::Mark& mark, const std::string& key,
                    const std::string& message) {
  std::ostringstream out;
  out << source;
  if (mark.line >= 0) out << ":" << mark.line + 1 << ":" << mark.column + 1;
  out << ": ";
  if (!key.empty()) out << key << ": ";
  out << message;
  return out.str();
}

size_t FirstNonUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    unsigned char c = b(i);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;  // the bounds of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // past U+10FFFF
    } else {
      return i;
    }
    if (i + n > s.size() || b(i + 1) < lo || b(i + 1) > hi) return i;
    for (size_t k = 2; k < n; ++k) {
      if ((b(i + k) & 0xC0) != 0x80) return i;
    }
    i += n;
  }
  return std::string_view::npos;
}

namespace {

bool HasUtf16Or32Bom(std::string_view s) {
  return s.starts_with("\xFE\xFF") || s.starts_with("\xFF\xFE") ||
         s.starts_with(std::string_view("\0\0\xFE\xFF", 4));
}

}  // namespace

std::string ExplainYamlError(std::string_view text, int line, const std::string& message) {
  // The line the error names and the one before it (yaml-cpp often names the next token).
  for (int l = line; l >= 0 && l >= line - 1; --l) {
    size_t start = 0;
    for (int i = 0; i < l && start != std::string_view::npos; ++i) {
      start = text.find('\n', start);
      if (start != std::string_view::npos) ++start;
    }
    if (start == std::string_view::npos || start >= text.size()) continue;
    std::string_view rest = text.substr(start);
    size_t indent_end = rest.find_first_not_of(" \t");
    if (rest.substr(0, indent_end).find('\t') != std::string_view::npos) {
      return message + " (line " + std::to_string(l + 1) +
             " is indented with a tab; YAML indents with spaces only)";
    }
  }
  return message;
}

std::string ExplainYamlError(std::string_view text, const YAML::Exception& e) {
  if (dynamic_cast<const YAML::DeepRecursion*>(&e) != nullptr) {
    return "nested deeper than " + std::to_string(kMaxYamlDepth) + " levels";
  }
  return ExplainYamlError(text, e.mark.line, e.msg);
}

namespace {

enum class Size { kWithin, kTooMany, kTooDeep };

Size Measure(const YAML::Node& n, size_t& left, size_t depth) {
  if (depth > kMaxYamlDepth) return Size::kTooDeep;
  if (left == 0) return Size::kTooMany;
  --left;
  auto each = [&](const YAML::Node& child) { return Measure(child, left, depth + 1); };
  if (n.IsMap()) {
    for (const auto& kv : n) {
      if (Size k = each(kv.first); k != Size::kWithin) return k;
      if (Size v = each(kv.second); v != Size::kWithin) return v;
    }
  } else if (n.IsSequence()) {
    for (const auto& e : n) {
      if (Size c = each(e); c != Size::kWithin) return c;
    }
  }
  return Size::kWithin;
}

}  // namespace

std::optional<std::string> ExpandedTooLarge(const YAML::Node& root) {
  size_t left = kMaxYamlNodes;
  switch (Measure(root, left, 0)) {
    case Size::kWithin:
      return std::nullopt;
    case Size::kTooMany:
      return "more than " + std::to_string(kMaxYamlNodes) + " YAML nodes once aliases are expanded";
    case Size::kTooDeep:
      break;
  }
  return "nested deeper than " + std::to_string(kMaxYamlDepth) +
         " levels once aliases are expanded (an alias inside the node it names never ends)";
}

YamlScan ScanYaml(std::string_view yaml, bool first_only) {
  struct Stop {};  // thrown by the handler: the scan has found what ends it
  struct Counter : YAML::EventHandler {
    YamlScan found;
    size_t nodes = 0;
    size_t document = 0;  // 0-based, of the one being read
    bool content = false;
    std::optional<size_t> start;  // where the document being read starts
    void Note(const YAML::Mark& m) {
      content = true;
      if (document > 0) {
        found.later_document = m;
        throw Stop{};
      }
      if (++nodes > kMaxYamlNodes) {
        found.too_many = m;
        throw Stop{};
      }
    }
    void OnDocumentStart(const YAML::Mark& m) override {
      content = false;
      start = static_cast<size_t>(m.pos);
    }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark& m, YAML::anchor_t) override { Note(m); }
    void OnScalar(const YAML::Mark& m, const std::string&, YAML::anchor_t,
                  const std::string&) override {
      Note(m);
    }
    void OnSequenceStart(const YAML::Mark& m, const std::string&, YAML::anchor_t,
                         YAML::EmitterStyle::value) override {
      Note(m);
    }
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark& m, const std::string&, YAML::anchor_t,
                    YAML::EmitterStyle::value) override {
      Note(m);
    }
    void OnMapEnd() override {}
  };
  std::istringstream in{std::string(yaml)};
  YAML::Parser parser(in);
  Counter counter;
  try {
    // An empty document that starts where the last one did is the parser going nowhere
    // (some malformed input, such as ",name:", gives empty documents forever): the end.
    std::optional<size_t> last_start;
    while (parser.HandleNextDocument(counter)) {
      if (first_only || (!counter.content && counter.start == last_start)) break;
      last_start = counter.start;
      ++counter.document;
    }
  } catch (const Stop&) {
  }
  return counter.found;
}

Status ReadConfigFile(const std::string& path, std::string* text) {
  struct stat st {};
  // The reason (missing, not permitted) is what an operator needs to fix it.
  if (::stat(path.c_str(), &st) != 0) {
    return Status::Invalid(path + ": cannot read the file (" + std::strerror(errno) + ")");
  }
  if (S_ISDIR(st.st_mode)) return Status::Invalid(path + ": is a directory, not a file");
  if (!S_ISREG(st.st_mode)) return Status::Invalid(path + ": not a regular file");
  if (static_cast<size_t>(st.st_size) > kMaxConfigFileBytes) {
    return Status::Invalid(path + ": larger than " + std::to_string(kMaxConfigFileBytes >> 20) +
                           " MiB");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::Invalid(path + ": cannot read the file (" + std::strerror(errno) + ")");
  std::ostringstream out;
  out << in.rdbuf();
  *text = std::move(out).str();
  // YAML text is Unicode. The parser does not check UTF-8, and a stray byte would reach
  // rule names, and from them JSON answers and /metrics labels, as it is. (UTF-16 and
  // UTF-32, which a byte order mark announces, the parser decodes itself.)
  if (size_t bad = HasUtf16Or32Bom(*text) ? std::string_view::npos : FirstNonUtf8(*text);
      bad != std::string_view::npos) {
    size_t line_start = text->rfind('\n', bad == 0 ? 0 : bad - 1);
    line_start = (line_start == std::string::npos || bad == 0) ? 0 : line_start + 1;
    size_t line = 1 + static_cast<size_t>(std::count(text->begin(), text->begin() + bad, '\n'));
    return Status::Invalid(path + ":" + std::to_string(line) + ":" +
                           std::to_string(bad - line_start + 1) +
                           ": not UTF-8 text (a YAML file is UTF-8, or UTF-16 or UTF-32 with a "
                           "byte order mark)");
  }
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
