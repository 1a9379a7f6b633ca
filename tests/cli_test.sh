#!/usr/bin/env bash
# Drives the real sluice binary: version, serve on the embedded default, check, bad input.
# Usage: tests/cli_test.sh path/to/sluice
set -u
bin=${1:?usage: cli_test.sh path/to/sluice}
pass=0 fail=0

expect() {  # expect NAME WANT_RC WANT_REGEX -- command...
  local name=$1 want_rc=$2 want=$3
  shift 4
  local out rc
  out=$(timeout 10 "$@" 2>&1)
  rc=$?
  if [ "$rc" -eq "$want_rc" ] && grep -Eq -- "$want" <<<"$out"; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    printf 'FAIL %s: rc=%s (want %s), output:\n%s\n(wanted /%s/)\n' "$name" "$rc" "$want_rc" "$out" "$want"
  fi
}

version=$(sed -n 's/^project(sluice VERSION \([0-9.]*\).*/\1/p' "$(dirname "$0")/../CMakeLists.txt")
expect "--version" 0 "^sluice $version\$" -- "$bin" --version
expect "version" 0 "^sluice $version\$" -- "$bin" version
root="$(cd "$(dirname "$0")/.." && pwd)"
expect "validate lists the seed rules" 0 "rule POST /api/login: key ip, sliding_window_counter 5/1m" -- \
  "$bin" validate "$root/tests/config/seed.yaml"
expect "serve refuses a bad config" 2 "bad_window.yaml:5:15: rate_limits.endpoints\\[0\\].window: bad duration '5 minutes'" -- \
  "$bin" serve --config "$root/tests/config/bad/bad_window.yaml"
# A local_sync store is shown as what it does: its interval and peers, and no timeout,
# pool, breaker or fail mode (the request path never waits for Redis there).
expect "validate shows the local_sync mode" 0 \
  "^store redis 127.0.0.1:6379, mode local_sync every 100ms \(connect 200ms\), key prefix 'sluice:'\$" -- \
  "$bin" validate "$root/tests/config/hybrid.yaml"
expect "validate shows no fail mode under local_sync" 0 \
  "^rule search: any method /api/search, key user_id, fixed_window 100/1s\$" -- \
  "$bin" validate "$root/tests/config/hybrid.yaml"
peers_yaml=$(mktemp --suffix=.yaml)
trap 'rm -f "$peers_yaml"' EXIT
printf '%s\n' 'region: us-east' 'rate_limits: {default: {limit: 10, window: 1s}}' \
  'store: {type: redis, address: 127.0.0.1:6379, mode: local_sync, sync_interval: 50ms,' \
  '  peers: [{region: eu-west, address: 10.1.0.5:6379}, {region: ap-south, address: 10.2.0.5:6380}]}' \
  > "$peers_yaml"
expect "validate shows the region and its peers" 0 \
  "mode local_sync every 50ms .*, region us-east, publishes to eu-west 10.1.0.5:6379, ap-south 10.2.0.5:6380\$" -- \
  "$bin" validate "$peers_yaml"
server_yaml=$(mktemp --suffix=.yaml)
trap 'rm -f "$peers_yaml" "$server_yaml"' EXIT
printf '%s\n' 'rate_limits: {default: {limit: 10, window: 1s}}' \
  'server: {listen: 127.0.0.1:0, admin_token: s3cret, threads: 2, log_format: json}' > "$server_yaml"
expect "validate shows the server section, never the token" 0 \
  "^server listen 127.0.0.1:0, admin token set, threads 2, log_format json\$" -- \
  "$bin" validate "$server_yaml"
printf '%s\n' 'rate_limits: {default: {limit: 10, window: 1s}}' \
  'keys: {from_trusted_proxies_only: true}' > "$server_yaml"
expect "validate warns of identity headers no caller can give" 0 \
  "WARN $server_yaml:2:35: keys.from_trusted_proxies_only: no trusted_proxies are set" -- \
  "$bin" validate "$server_yaml"
envoy="$root/tests/config/envoy"
store_only=$(mktemp --suffix=.yaml)
trap 'rm -f "$peers_yaml" "$server_yaml" "$store_only"' EXIT
printf '%s\n' 'store: {type: redis, address: 127.0.0.1:6379, mode: local_sync}' > "$store_only"
expect "validate an Envoy config directory" 0 "^$envoy/examples: ok \(9 domains\)\$" -- \
  "$bin" validate --envoy-config "$envoy/examples"
expect "validate names the Envoy file, line and column" 1 \
  "^$envoy/dir_duplicate_domain/b.yaml:2:9: domain: duplicate domain 'shared'" -- \
  "$bin" validate --envoy-config "$envoy/dir_duplicate_domain"
expect "validate merges one domain's files when asked" 0 "^$envoy/dir_merge_domain: ok \(2 domains\)\$" -- \
  "$bin" validate --envoy-config "$envoy/dir_merge_domain" --envoy-merge-domains
expect "validate merges with a config file too" 0 "^$envoy/dir_merge_domain: ok \(2 domains\)\$" -- \
  "$bin" validate --config "$root/tests/config/seed.yaml" --envoy-config "$envoy/dir_merge_domain" \
  --envoy-merge-domains
expect "merging needs an Envoy directory to merge" 2 \
  "--envoy-merge-domains needs --envoy-config \(or server.envoy_config in the config file\)" -- \
  "$bin" validate "$root/tests/config/seed.yaml" --envoy-merge-domains
envoy_in_file=$(mktemp --suffix=.yaml)
trap 'rm -f "$peers_yaml" "$server_yaml" "$store_only" "$envoy_in_file"' EXIT
printf '%s\n' "server: {envoy_config: $envoy/dir_merge_domain, grpc: 127.0.0.1:0, rls_headers: true}" \
  > "$envoy_in_file"
expect "validate shows the file's Envoy settings" 0 \
  "^server envoy_config $envoy/dir_merge_domain, grpc 127.0.0.1:0, rls_headers true\$" -- \
  "$bin" validate "$envoy_in_file" --envoy-merge-domains
expect "validate loads the file's Envoy directory" 0 "^$envoy/dir_merge_domain: ok \(2 domains\)\$" -- \
  "$bin" validate "$envoy_in_file" --envoy-merge-domains
expect "the file's Envoy directory, loaded as serve loads it" 1 \
  "dir_merge_domain/b.yaml:.*duplicate domain" -- "$bin" validate "$envoy_in_file"
expect "a client CA needs the server's certificate" 2 \
  "^sluice serve: --grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key" -- \
  "$bin" serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 --envoy-config "$envoy/examples" \
  --grpc-tls-client-ca "$root/tests/config/seed.yaml"
expect "a store-only config goes with an Envoy directory" 0 "^$envoy/examples: ok" -- \
  "$bin" validate --envoy-config "$envoy/examples" --config "$store_only"
expect "a store-only config alone lacks its rules" 1 \
  "missing 'rate_limits' \(a file with only the store: section goes with --envoy-config or server.envoy_config\)" -- \
  "$bin" validate "$store_only"
# The directory's limits are checked against the file's store: local_sync adds up windows.
bucket_dir=$(mktemp -d)
trap 'rm -rf "$peers_yaml" "$store_only" "$bucket_dir"' EXIT
printf '%s\n' 'domain: d' 'descriptors:' '  - key: k' \
  '    rate_limit: {unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 20}' \
  > "$bucket_dir/bucket.yaml"
expect "validate checks Envoy limits against the store" 1 "cannot run with store mode local_sync" -- \
  "$bin" validate --envoy-config "$bucket_dir" --config "$store_only"
expect "validate with nothing to check" 106 "At least 1 option from \[config,--config,--envoy-config\]" -- \
  "$bin" validate
expect "validate accepts the seed config" 0 "seed.yaml: ok" -- "$bin" validate "$root/tests/config/seed.yaml"
expect "validate names file, line, column and key" 1 \
  "unknown_key.yaml:5:7: rate_limits.endpoints\\[0\\].windw: unknown key 'windw'" -- \
  "$bin" validate "$root/tests/config/bad/unknown_key.yaml"
expect "validate an empty path" 105 "config: an empty path" -- "$bin" validate ''
expect "serve with an empty --config" 105 "--config: an empty path" -- "$bin" serve --config ''
expect "validate a missing file" 1 "/nonexistent.yaml: cannot read the file" -- "$bin" validate /nonexistent.yaml
expect "validate a directory" 1 "/tmp: is a directory, not a file" -- "$bin" validate /tmp
expect "validate a device that never ends" 1 "/dev/zero: not a regular file" -- "$bin" validate /dev/zero
expect "check admits the burst, then rejects" 1 \
  "^3 allowed limit=3 remaining=0.*" -- "$bin" check --algorithm gcra --limit 3 --period 1s --times 5
expect "check reports retry_after" 1 "^4 rejected limit=3 remaining=0 .*retry_after=0.333334s" -- \
  "$bin" check --algorithm gcra --limit 3 --period 1s --times 4
expect "check shows the queue delay" 0 "^3 allowed .*delay=0.200000s" -- \
  "$bin" check --algorithm leaky_queue --limit 10 --period 1s --burst 5 --times 3
expect "unknown algorithm" 2 "unknown algorithm 'nope'" -- "$bin" check --algorithm nope
expect "bad period" 2 "bad period '5 minutes'" -- "$bin" check --period "5 minutes"
expect "invalid policy" 2 "limit must be >= 0, got -3" -- "$bin" check --limit -3
expect "a limit past 64 bits" 105 "--limit: .99999999999999999999. is not a whole number" -- "$bin" check --limit 99999999999999999999
expect "a cost past 64 bits" 105 "--cost: .1e30. is not a whole number" -- "$bin" check --cost 1e30
expect "a negative cost" 105 "--cost: .-5. is negative" -- "$bin" check --cost -5
expect "a bad RLS header name" 105 "--rls-limit-header: .bad name. is not a header name" -- \
  "$bin" serve --rls-limit-header "bad name"
expect "a config of two documents" 1 "two_documents.yaml:4:1: a config file holds one YAML document" -- \
  "$bin" validate "$root/tests/config/bad/two_documents.yaml"
expect "burst on a window" 2 "burst applies to token_bucket, gcra and leaky_queue" -- "$bin" check --algorithm fixed_window --burst 10
expect "bad listen address" 2 "bad --listen 'nowhere'" -- "$bin" serve --listen nowhere
expect "a port with letters after it" 2 "bad --listen '127.0.0.1:8080x'" -- "$bin" serve --listen 127.0.0.1:8080x
expect "a hex port is not port 0" 2 "bad --listen '127.0.0.1:0x8181'" -- "$bin" serve --listen 127.0.0.1:0x8181
expect "a host name the listener cannot bind" 2 "bad --admin 'localhost:9090' \\(IP:PORT" -- \
  "$bin" serve --admin localhost:9090
expect "no keys at all" 105 "--max-keys: Value -1 not in range" -- "$bin" serve --max-keys -1
expect "threads beyond any machine" 105 "--threads: Value 100000 not in range" -- "$bin" serve --threads 100000
expect "an admin token no header can carry" 2 "the admin token holds a space or control character" -- \
  "$bin" serve --admin-token 'abc ' --listen 127.0.0.1:0 --admin 127.0.0.1:0
expect "connections per address below zero" 105 "--max-connections-per-ip: Value -1 not in range" -- \
  "$bin" serve --max-connections-per-ip -1
expect "no request body at all" 105 "--max-request-body: Value 0 not in range" -- \
  "$bin" serve --max-request-body 0
for flag in "--grpc 127.0.0.1:8081" --rls-headers --envoy-merge-domains --rls-shadow \
  "--rls-limit-header X-Limit" "--grpc-max-buffered-mib 8" \
  "--grpc-tls-client-ca $root/tests/config/seed.yaml"; do
  # shellcheck disable=SC2086  # the flag and its value, split
  expect "$flag without an Envoy config" 2 \
    "^sluice serve: ${flag%% *} needs --envoy-config \(or server.envoy_config in the config file\)\$" -- \
    "$bin" serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 $flag
done
expect "unknown flag" 109 "The following argument was not expected: --frobnicate" -- "$bin" --frobnicate

echo "cli_test: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
