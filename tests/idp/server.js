// The demo and test IdP: the real oauth2-mock-server (pinned in tests/deps.sh), started through
// its library API so token requests can ask for identity claims. A client_credentials request
// may carry `sub`, `email` and `roles` (comma-separated) form fields; they become the `sub`,
// `email` and `realm_access.roles` claims (Keycloak's shape), so the gateway's claim projection
// can be shown and tested with a real RS256 IdP.
//
// A token request with a `DPoP` proof header gets a DPoP-bound token (RFC 9449): `cnf.jkt` is the
// thumbprint of the proof's key and `token_type` is "DPoP". The proof itself is not checked
// here: it only carries the client's key. With `--record FILE`, every revocation request body
// the IdP receives is appended to FILE as a JSON line, so tests can see what was forwarded.
//
// usage: node tests/idp/server.js PORT [--alg RS256|ES256|PS256|EdDSA] [--jwk FILE] [--record FILE]
'use strict';
const path = require('node:path');
const fs = require('node:fs');

const modules = path.join(__dirname, '..', '..', '.deps', 'idp', 'node_modules');
const { OAuth2Server } = require(path.join(modules, 'oauth2-mock-server'));
const { decodeProtectedHeader } = require(path.join(modules, 'jose'));
const crypto = require('node:crypto');

// RFC 7638 thumbprint: SHA-256 of the key's required members, in lexicographic order.
function thumbprint(jwk) {
  const members = { EC: ['crv', 'kty', 'x', 'y'], RSA: ['e', 'kty', 'n'], OKP: ['crv', 'kty', 'x'] }[jwk.kty];
  if (!members) throw new Error(`unsupported kty ${jwk.kty}`);
  const canonical = JSON.stringify(Object.fromEntries(members.map((m) => [m, jwk[m]])));
  return crypto.createHash('sha256').update(canonical).digest('base64url');
}

// The DPoP key of a client_credentials token request, if it sent a proof.
function proofKey(req) {
  const proof = req.headers.dpop;
  if (typeof proof !== 'string' || (req.body || {}).grant_type !== 'client_credentials') return undefined;
  try {
    return thumbprint(decodeProtectedHeader(proof).jwk);
  } catch (e) {
    console.error(`ignoring an unusable DPoP proof: ${e.message}`);
    return undefined;
  }
}

async function main() {
  const args = process.argv.slice(2);
  const port = Number(args[0]);
  if (!Number.isInteger(port) || port <= 0) {
    console.error('usage: server.js PORT [--alg ALG] [--jwk FILE]');
    process.exit(2);
  }
  const option = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };

  const server = new OAuth2Server();
  const jwk = option('--jwk');
  if (jwk) {
    await server.issuer.keys.add(JSON.parse(fs.readFileSync(jwk, 'utf8')));
  } else {
    await server.issuer.keys.generate(option('--alg') || 'RS256');
  }

  server.service.on('beforeTokenSigning', (token, req) => {
    const body = req.body || {};
    const jkt = proofKey(req);
    if (jkt) token.payload.cnf = { jkt };
    if (typeof body.sub === 'string') token.payload.sub = body.sub;
    if (typeof body.email === 'string') token.payload.email = body.email;
    if (typeof body.roles === 'string') {
      token.payload.realm_access = { roles: body.roles.split(',').filter(Boolean) };
    }
    if (typeof body.exp_in === 'string') {
      token.payload.exp = Math.floor(Date.now() / 1000) + Number(body.exp_in);
    }
  });

  server.service.on('beforeResponse', (response, req) => {
    if (proofKey(req) && response.body && response.body.access_token) {
      response.body.token_type = 'DPoP';
    }
  });
  // A real IdP reads a revocation or introspection request before it answers (it needs the
  // token); the mock answers them at once, unread. Read the whole body first, as an IdP does,
  // so that a gateway which sends the headers before the body (no
  // allow_on_headers_stop_iteration) meets the behaviour it meets in production. A layer of the
  // app's router before its routes (after Express's own).
  const app = server.service.requestHandler;
  app.use((req, _res, next) => {
    if (req.method !== 'POST' || !['/revoke', '/introspect'].includes(req.path)) return next();
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { raw += chunk; });
    req.on('end', () => { req.rawBody = raw; next(); });
    return undefined;
  });
  const layers = app._router.stack;
  const mine = layers.pop();
  layers.splice(layers.findIndex((l) => l.name !== 'query' && l.name !== 'expressInit'), 0, mine);
  const record = option('--record');
  if (record) {
    server.service.on('beforeRevoke', (_response, req) => {
      const form = Object.fromEntries(new URLSearchParams(req.rawBody || ''));
      fs.appendFileSync(record, JSON.stringify(form) + '\n');
    });
  }

  await server.start(port, '127.0.0.1');
  const kids = server.issuer.keys.toJSON().map((k) => k.kid);
  console.log(`OAuth 2 server listening on http://127.0.0.1:${port}, issuer ${server.issuer.url}, keys ${kids.join(',')}`);

  const stop = async () => {
    await server.stop();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
