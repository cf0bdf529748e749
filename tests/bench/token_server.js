// A fast token endpoint for scale benchmarks: POST /token answers a real HS256 JWT, token n for
// the n-th request (n from 0). Tokens are deterministic, so the driver can recompute every
// signature it caused to be issued without reading responses.
//
// usage: node tests/bench/token_server.js PORT SECRET EXP PAD
//   EXP: the exp claim (Unix seconds) of every token, or, when negative, a lifetime: each token
//   then expires -EXP seconds after it is issued (churn runs). PAD: bytes of a filler claim.
'use strict';
const http = require('node:http');
const crypto = require('node:crypto');

const [port, secret, exp, pad] = process.argv.slice(2);
const b64 = (buf) => Buffer.from(buf).toString('base64url');
const header = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
const filler = 'x'.repeat(Number(pad));
let n = 0;

function token(i) {
  const e = Number(exp) < 0 ? Math.floor(Date.now() / 1000) - Number(exp) : Number(exp);
  const payload = b64(JSON.stringify({ sub: `user-${i}`, exp: e, pad: filler }));
  const signed = `${header}.${payload}`;
  const sig = crypto.createHmac('sha256', secret).update(signed).digest('base64url');
  return `${signed}.${sig}`;
}

const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      const body = JSON.stringify({ access_token: token(n++), token_type: 'Bearer', expires_in: 3600 });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
    });
  });
// Longer than Envoy keeps an idle upstream connection (1 h): Node's default of 5 s would close
// connections Envoy is about to reuse, and those requests would fail with a reset.
server.keepAliveTimeout = 3_700_000;
server.listen(Number(port), '127.0.0.1', () => console.log(`token server on ${port}`));
