// The demo and test IdP: the real oauth2-mock-server (pinned in tests/deps.sh), started through
// its library API so token requests can ask for identity claims. A client_credentials request
// may carry `sub`, `email` and `roles` (comma-separated) form fields; they become the `sub`,
// `email` and `realm_access.roles` claims (Keycloak's shape), so the gateway's claim projection
// can be shown and tested with a real RS256 IdP.
//
// usage: node tests/idp/server.js PORT [--alg RS256|ES256|PS256|EdDSA] [--jwk FILE]
'use strict';
const path = require('node:path');
const fs = require('node:fs');

const modules = path.join(__dirname, '..', '..', '.deps', 'idp', 'node_modules');
const { OAuth2Server } = require(path.join(modules, 'oauth2-mock-server'));

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
    if (typeof body.sub === 'string') token.payload.sub = body.sub;
    if (typeof body.email === 'string') token.payload.email = body.email;
    if (typeof body.roles === 'string') {
      token.payload.realm_access = { roles: body.roles.split(',').filter(Boolean) };
    }
    if (typeof body.exp_in === 'string') {
      token.payload.exp = Math.floor(Date.now() / 1000) + Number(body.exp_in);
    }
  });

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
