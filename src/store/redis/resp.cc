#include "store/redis/resp.h"

#include <charconv>

namespace sluice::redis {
namespace {

void AppendLength(std::string& out, char type, size_t n) {
  char buf[24];
  buf[0] = type;
  auto [end, ec] = std::to_chars(buf + 1, buf + sizeof(buf) - 2, n);
  (void)ec;  // 22 digits always fit a size_t
  *end++ = '\r';
  *end++ = '\n';
  out.append(buf, static_cast<size_t>(end - buf));
}

class Parser {
 public:
  explicit Parser(std::string_view buf) : buf_(buf) {}

  ParseStatus Parse(Reply& out, size_t depth) {
    if (depth > kMaxReplyDepth) return ParseStatus::kProtocolError;
    if (pos_ >= buf_.size()) return ParseStatus::kIncomplete;
    char type = buf_[pos_++];
    std::string_view line;
    if (ParseStatus st = Line(&line); st != ParseStatus::kOk) return st;
    switch (type) {
      case '+':
      case '-':
        out.type = type == '+' ? Reply::Type::kStatus : Reply::Type::kError;
        out.str.assign(line);
        return ParseStatus::kOk;
      case ':':
        out.type = Reply::Type::kInteger;
        return Integer(line, &out.integer) ? ParseStatus::kOk : ParseStatus::kProtocolError;
      case '$': {
        int64_t n;
        if (!Integer(line, &n) || n < -1 || n > kMaxStringLength)
          return ParseStatus::kProtocolError;
        if (n == -1) {
          out.type = Reply::Type::kNil;
          return ParseStatus::kOk;
        }
        auto len = static_cast<size_t>(n);
        if (buf_.size() - pos_ < len + 2) return ParseStatus::kIncomplete;
        if (buf_[pos_ + len] != '\r' || buf_[pos_ + len + 1] != '\n') {
          return ParseStatus::kProtocolError;
        }
        out.type = Reply::Type::kString;
        out.str.assign(buf_.substr(pos_, len));
        pos_ += len + 2;
        return ParseStatus::kOk;
      }
      case '*': {
        int64_t n;
        if (!Integer(line, &n) || n < -1 || n > kMaxArrayLength) return ParseStatus::kProtocolError;
        if (n == -1) {
          out.type = Reply::Type::kNil;
          return ParseStatus::kOk;
        }
        // Each element takes 3 bytes at least ("+\r\n"): a length the bytes received cannot
        // hold yet waits for them, so what is allocated stays in proportion to what came.
        if (static_cast<size_t>(n) > (buf_.size() - pos_) / 3) return ParseStatus::kIncomplete;
        out.type = Reply::Type::kArray;
        out.elements.resize(static_cast<size_t>(n));
        for (Reply& e : out.elements) {
          if (ParseStatus st = Parse(e, depth + 1); st != ParseStatus::kOk) return st;
        }
        return ParseStatus::kOk;
      }
      default:
        return ParseStatus::kProtocolError;
    }
  }

  size_t pos() const { return pos_; }

 private:
  // The rest of the line up to CRLF; a lone LF or CR inside is malformed.
  ParseStatus Line(std::string_view* line) {
    size_t end = buf_.find('\r', pos_);
    if (end == std::string_view::npos) {
      // Guard against an endless line from a broken peer.
      return buf_.size() - pos_ > 64 * 1024 ? ParseStatus::kProtocolError
                                            : ParseStatus::kIncomplete;
    }
    if (end + 1 >= buf_.size()) return ParseStatus::kIncomplete;
    if (buf_[end + 1] != '\n') return ParseStatus::kProtocolError;
    *line = buf_.substr(pos_, end - pos_);
    pos_ = end + 2;
    return ParseStatus::kOk;
  }

  static bool Integer(std::string_view s, int64_t* v) {
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *v);
    return ec == std::errc() && end == s.data() + s.size() && !s.empty();
  }

  std::string_view buf_;
  size_t pos_ = 0;
};

}  // namespace

void AppendCommand(std::string& out, std::span<const std::string_view> args) {
  AppendLength(out, '*', args.size());
  for (std::string_view a : args) {
    AppendLength(out, '$', a.size());
    out.append(a);
    out.append("\r\n", 2);
  }
}

bool Reply::ErrorIs(std::string_view prefix) const {
  return type == Type::kError && str.size() >= prefix.size() &&
         std::string_view(str).substr(0, prefix.size()) == prefix &&
         (str.size() == prefix.size() || str[prefix.size()] == ' ');
}

std::string Reply::ToString() const {
  switch (type) {
    case Type::kNil:
      return "(nil)";
    case Type::kInteger:
      return std::to_string(integer);
    case Type::kString:
      return "\"" + str + "\"";
    case Type::kStatus:
      return str;
    case Type::kError:
      return "(error) " + str;
    case Type::kArray: {
      std::string s = "[";
      for (size_t i = 0; i < elements.size(); ++i) {
        if (i) s += ", ";
        s += elements[i].ToString();
      }
      return s + "]";
    }
  }
  return "";
}

ParseStatus ParseReply(std::string_view buf, Reply& out, size_t* consumed) {
  *consumed = 0;
  Parser p(buf);
  ParseStatus st = p.Parse(out, 0);
  if (st == ParseStatus::kOk) *consumed = p.pos();
  return st;
}

}  // namespace sluice::redis
