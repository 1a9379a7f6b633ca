#include "rules/path.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>

namespace sluice::rules {
namespace {

using namespace std::string_literals;

struct Case {
  std::string input;
  std::optional<std::string> want;  // nullopt: rejected
};

void ExpectAll(const Case* cases, size_t n, const PathOptions& options) {
  for (size_t k = 0; k < n; ++k) {
    const Case& c = cases[k];
    SCOPED_TRACE(testing::Message() << "input \"" << c.input << "\"");
    EXPECT_EQ(NormalizePath(c.input, options), c.want);
  }
}

TEST(NormalizePath, DefaultOptions) {
  const Case cases[] = {
      {"/api/login", "/api/login"},
      {"/api//login", "/api/login"},
      {"/api/./login", "/api/login"},
      {"/api/x/../login", "/api/login"},
      {"/API/login/", "/api/login"},
      {"/api/%6cogin", "/api/login"},
      {"/api/%6Cogin", "/api/login"},
      {"/api/%4Cogin", "/api/login"},  // decoded, then lowercased
      {"/api/login?x=1", "/api/login"},
      {"/api/login#frag", "/api/login"},
      {"/api/login?x=1#frag/../..", "/api/login"},
      {"/api/login/?x", "/api/login"},
      {"/?x=1", "/"},
      {"/../../etc", "/etc"},
      {"/a/b/../../..", "/"},
      {"/a/b/..", "/a"},
      {"/a/.", "/a"},
      {"/a/./", "/a"},
      {"/.", "/"},
      {"/..", "/"},
      {"/", "/"},
      {"/.//", "/"},
      {"/.///a///b///", "/a/b"},
      {"/%2e%2e/api/login", "/api/login"},
      {"/api/x/.%2E/login", "/api/login"},
      {"/api/x/%2E./login", "/api/login"},
      {"/api/%2e/login", "/api/login"},
      {"/a/.../b", "/a/.../b"},  // three dots are a name
      {"/a/..b/.c/", "/a/..b/.c"},
      {"/a%3Fb", "/a%3Fb"},  // an encoded '?' is not a query
      {"/a%23b", "/a%23b"},  // nor an encoded '#' a fragment
      {"/a%25", "/a%25"},    // nor an encoded '%' an escape
      {"/%252e", "/%252e"},  // single pass: a literal "%2e", not "."
      {"/x/%252e%252e", "/x/%252e%252e"},
      {"/%7e%41%5a", "/~az"},
      {"/caf%C3%A9/%C3%89", "/caf\xC3\xA9/\xC3\x89"},  // non-ASCII bytes are not lowercased
      {"/a b", "/a b"},
      {"/%20", "/ "},
      {"/api/login;jsessionid=abc", "/api/login"},  // a segment's parameters are dropped
      {"/api/login;", "/api/login"},
      {"/api/login;x/", "/api/login"},
      {"/api;v=1/login", "/api/login"},
      {"/api/x/..;/login", "/api/login"},  // "..;" is ".." to a servlet container
      {"/api/x/%2e%2e;y/login", "/api/login"},
      {"/;x/a", "/a"},
      {"/api/login%3Bx", "/api/login%3Bx"},  // an encoded ';' is not a parameter
      {"/api/login%3bx", "/api/login%3Bx"},
  };
  ExpectAll(cases, std::size(cases), PathOptions{});
}

TEST(NormalizePath, OptionsOff) {
  const PathOptions off{
      .case_insensitive = false, .strip_trailing_slash = false, .strip_path_parameters = false};
  const Case cases[] = {
      {"/api/login;x", "/api/login;x"},
      {"/api/x/..;/login", "/api/x/..;/login"},
      {"/a%3Bb", "/a;b"},
      {"/API/Login/", "/API/Login/"},
      {"/API//Login//", "/API/Login/"},
      {"/api/%6Cogin", "/api/login"},
      {"/api/%4Cogin", "/api/Login"},
      {"/a/.", "/a/"},  // RFC 3986 remove_dot_segments
      {"/a/b/..", "/a/"},
      {"/a/..", "/"},
      {"/", "/"},
      {"/.//", "/"},
      {"//", std::nullopt},  // a leading "//" may name a host (see Refused)
  };
  ExpectAll(cases, std::size(cases), off);
}

TEST(NormalizePath, EncodedSlashesAreRefusedUnlessAllowed) {
  // Upstreams disagree on them: "/api%2Flogin" is "/api/login" to a WSGI server and one
  // segment to Express. Refused, neither reading can take a request out of its rule.
  const Case refused[] = {
      {"/api%2Flogin", std::nullopt},
      {"/api%2flogin", std::nullopt},
      {"/api/%2F..%2F", std::nullopt},
      {"/a%5cb", std::nullopt},
      {"/a%5Cb?x", std::nullopt},
      {"/api\\login", std::nullopt},
      {"/api\\x\\..\\login", std::nullopt},
      {"//host/api/login", std::nullopt},
      {"//", std::nullopt},
  };
  ExpectAll(refused, std::size(refused), PathOptions{});
  for (std::string_view t : {"/api%2Flogin", "/a%5cb", "/x/%2f", "/api\\login", "//h/x"})
    EXPECT_TRUE(HasAmbiguousSlash(t)) << t;
  for (std::string_view t :
       {"/api/login", "/a%252F", "/a?b=%2F", "/a%2", "/%25%32%46", "/a//b", "/?//"}) {
    EXPECT_FALSE(HasAmbiguousSlash(t)) << t;
  }
  const Case allowed[] = {
      {"/api/%2Fslash", "/api/%2Fslash"},  // encoded '/' keeps the segment whole
      {"/api/%2fslash", "/api/%2Fslash"},  // and its hex is uppercased
      {"/api/%2F..%2F", "/api/%2F..%2F"},  // not a dot segment
      {"/a%5cb", "/a%5Cb"},
      {"/a\\b", "/a\\b"},       // a raw backslash is then an ordinary byte
      {"///a///b///", "/a/b"},  // and a leading "//" runs of '/' as any
  };
  ExpectAll(allowed, std::size(allowed), PathOptions{.allow_encoded_slashes = true});
  const PathOptions off{.case_insensitive = false,
                        .strip_trailing_slash = false,
                        .strip_path_parameters = false,
                        .allow_encoded_slashes = true};
  const Case off_cases[] = {{"/api/%2fx", "/api/%2Fx"}};
  ExpectAll(off_cases, std::size(off_cases), off);
}

TEST(NormalizePath, Rejections) {
  const Case cases[] = {
      {"", std::nullopt},
      {"api/login", std::nullopt},
      {"http://x/api", std::nullopt},
      {"*", std::nullopt},
      {"?x=1", std::nullopt},
      {"#frag", std::nullopt},
      {"/a%", std::nullopt},
      {"/a%4", std::nullopt},
      {"/a%zz", std::nullopt},
      {"/a%G1", std::nullopt},
      {"/a%00b", std::nullopt},
      {"/a%0d%0a", std::nullopt},
      {"/a%1F", std::nullopt},
      {"/a%7f", std::nullopt},
      {"/a\x01"s
       "b",
       std::nullopt},
      {"/a\0b"s, std::nullopt},
      {"/a\x7f", std::nullopt},
      {"/a\tb", std::nullopt},
      {"/a;%zz", std::nullopt},  // dropped parameters are still checked
      {"/a;b%0a/c", std::nullopt},
      {"/a;\x01"s, std::nullopt},
  };
  ExpectAll(cases, std::size(cases), PathOptions{});
}

TEST(NormalizePath, MalformedEscapeInQueryIsIgnored) {
  EXPECT_EQ(NormalizePath("/a?b=%zz"), "/a");
  EXPECT_EQ(NormalizePath("/a#%"), "/a");
}

// A linear pass handles long hostile inputs at once; a quadratic one would take minutes.
TEST(NormalizePath, LongInputsStayLinear) {
  std::string up;
  std::string deep;
  for (int k = 0; k < 200000; ++k) {
    up += "/a/..";
    deep += "/x";
  }
  EXPECT_EQ(NormalizePath(up), "/");
  std::string climb = deep;
  for (int k = 0; k < 200000; ++k) climb += "/..";
  EXPECT_EQ(NormalizePath(climb), "/");
  EXPECT_EQ(NormalizePath(deep + "//" + std::string(400000, '/')), deep);
}

// Random byte strings drawn mostly from the bytes that matter to the normalizer.
TEST(NormalizePath, RandomInputsNeverCrashAndGiveFixedPoints) {
  constexpr std::string_view kAlphabet = "/./%%2eEfFcC5A3Fz0?#\\aZ;3bB";
  std::mt19937_64 rng(20231103);
  const PathOptions option_sets[] = {
      {}, {false, false, false}, {true, false, true}, {false, true, false}, {true, true, false}};
  int accepted = 0;
  for (int k = 0; k < 10000; ++k) {
    std::string s;
    const size_t len = rng() % 24;
    if (rng() % 8 != 0) s.push_back('/');
    for (size_t j = 0; j < len; ++j) {
      s.push_back(rng() % 6 == 0 ? static_cast<char>(rng() % 256)
                                 : kAlphabet[rng() % kAlphabet.size()]);
    }
    const PathOptions& options = option_sets[k % std::size(option_sets)];
    const std::optional<std::string> once = NormalizePath(s, options);
    if (!once) continue;
    ++accepted;
    ASSERT_FALSE(once->empty()) << s;
    ASSERT_EQ(once->front(), '/') << s;
    ASSERT_LE(once->size(), s.size()) << s;
    ASSERT_EQ(NormalizePath(*once, options), once) << s;
  }
  EXPECT_GT(accepted, 1000);  // the generator exercises acceptance too, not only rejections
}

}  // namespace
}  // namespace sluice::rules
