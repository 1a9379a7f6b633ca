// The Node.js peer of scripts/bench-redis: node:http answering 200 or 429 from
// rate-limiter-flexible's Redis limiter (RateLimiterRedis over one ioredis connection), with
// the same endpoint, headers and bodies as server.js (its memory-limiter twin).
// The key is the X-API-Key header when the request has one (so a load generator can spread
// keys), else the client IP. A Redis error answers 503 (never counted as a decision).
// Usage: node server-redis.js PORT [REDIS host:port, default $REDIS_ADDRESS or 127.0.0.1:6379]
//                             [POINTS per DURATION, default 1e9] [DURATION seconds, default 60]
const http = require('node:http');
const Redis = require('ioredis');
const { RateLimiterRedis, RateLimiterRes } = require('rate-limiter-flexible');

const port = Number(process.argv[2]);
const address = process.argv[3] || process.env.REDIS_ADDRESS || '127.0.0.1:6379';
const points = Number(process.argv[4] || 1e9);
const duration = Number(process.argv[5] || 60);
const sep = address.lastIndexOf(':');
const redis = new Redis({
  host: address.slice(0, sep),
  port: Number(address.slice(sep + 1)),
  password: process.env.REDIS_PASSWORD || undefined,
  lazyConnect: true,
});
const limiter = new RateLimiterRedis({ storeClient: redis, points, duration });

function answer(req, res) {
  const key = req.headers['x-api-key'] || req.socket.remoteAddress;
  limiter.consume(key, 1).then((r) => {
    res.writeHead(200, {
      'Content-Type': 'application/json',
      'X-RateLimit-Limit': points,
      'X-RateLimit-Remaining': r.remainingPoints,
      'X-RateLimit-Reset': Math.ceil((Date.now() + r.msBeforeNext) / 1000),
    });
    res.end('{"allowed":true}');
  }).catch((r) => {
    if (!(r instanceof RateLimiterRes)) {
      res.writeHead(503, { 'Content-Type': 'application/json' });
      res.end('{"error":"store_unavailable"}');
      return;
    }
    res.writeHead(429, { 'Retry-After': Math.ceil(r.msBeforeNext / 1000) });
    res.end('{"error":"rate_limit_exceeded"}');
  });
}

// Listen only once Redis answers, so "the port is open" means "ready to decide".
redis.connect().then(() => {
  http.createServer(answer).listen(port, '127.0.0.1');
}).catch((e) => {
  console.error(`cannot connect to Redis at ${address}: ${e.message}`);
  process.exit(1);
});
