// The Node.js peer: node:http answering 200 or 429 from rate-limiter-flexible's memory
// limiter, keyed by client IP, with the same headers Sluice sends.
const http = require('node:http');
const { RateLimiterMemory } = require('rate-limiter-flexible');

const port = Number(process.argv[2]);
const points = Number(process.argv[3] || 1e9);
const limiter = new RateLimiterMemory({ points, duration: 1 });

http.createServer((req, res) => {
  limiter.consume(req.socket.remoteAddress, 1).then((r) => {
    res.writeHead(200, {
      'Content-Type': 'application/json',
      'X-RateLimit-Limit': points,
      'X-RateLimit-Remaining': r.remainingPoints,
      'X-RateLimit-Reset': Math.ceil((Date.now() + r.msBeforeNext) / 1000),
    });
    res.end('{"allowed":true}');
  }).catch((r) => {
    res.writeHead(429, { 'Retry-After': Math.ceil(r.msBeforeNext / 1000) });
    res.end('{"error":"rate_limit_exceeded"}');
  });
}).listen(port, '127.0.0.1');
