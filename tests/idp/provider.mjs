// A real OpenID Provider for wiregate's relying-party tests: panva's oidc-provider
// (OpenID Certified), with development login/consent pages and the device flow.
// Usage: node provider.mjs PORT   (listens on 127.0.0.1:PORT only; issuer http://127.0.0.1:PORT)
// WIREGATE_IDP_REDIRECT_URIS: more redirect URIs for both clients (space separated), e.g. a
// gateway on a random loopback port: http://127.0.0.1:PORT/oidc/callback
// Accounts: any login works; its id is the subject. Ids starting with "admin" are in the
// groups wiregate-admins and engineering, the others in engineering only.
// Workload tokens: the client "wiregate-workload" (client_secret_basic) gets RFC 9068 JWT
// access tokens (typ at+jwt, sub = client_id, 5 min) from the client_credentials grant for
// one resource, the gateway: WIREGATE_IDP_WORKLOAD_AUDIENCE (default
// https://gateway.wiregate.test), scope wiregate:enroll.
// Test-only secrets: this provider must never face a real network.
import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node provider.mjs PORT');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;
const grants = ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'];
const extraRedirects = (process.env.WIREGATE_IDP_REDIRECT_URIS || '').split(/\s+/).filter(Boolean);
const redirectUris = ['http://127.0.0.1/oidc/callback', ...extraRedirects];
const workloadAudience = process.env.WIREGATE_IDP_WORKLOAD_AUDIENCE || 'https://gateway.wiregate.test';
const WORKLOAD_CLIENT = 'wiregate-workload';

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'wiregate',
      client_secret: 'wiregate-test-secret-basic',
      redirect_uris: redirectUris,
      grant_types: grants,
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      client_id: 'wiregate-post',
      client_secret: 'wiregate-test-secret-post',
      redirect_uris: redirectUris,
      grant_types: grants,
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_post',
    },
    {
      client_id: WORKLOAD_CLIENT,
      client_secret: 'wiregate-test-secret-workload',
      redirect_uris: [],
      grant_types: ['client_credentials'],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  async findAccount(ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        const groups = sub.startsWith('admin') ? ['wiregate-admins', 'engineering'] : ['engineering'];
        return { sub, email: `${sub}@example.test`, email_verified: true, name: `Test ${sub}`, groups };
      },
    };
  },
  cookies: { keys: ['wiregate-test-idp-cookie-key'] },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client) => (client?.clientId === WORKLOAD_CLIENT ? workloadAudience : undefined),
      useGrantedResource: () => false,
      async getResourceServerInfo(ctx, resource, client) {
        if (client.clientId !== WORKLOAD_CLIENT || resource !== workloadAudience) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: 'wiregate:enroll',
          audience: workloadAudience,
          accessTokenTTL: 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  pkce: { required: () => true, methods: ['S256'] },
  // scope claims (email) in the ID token too, not only at userinfo
  conformIdTokenClaims: false,
});

// RFC 8628 3.2: oidc-provider leaves `interval` out (clients then wait 5 s);
// announce 1 s so that the device-grant test stays fast.
provider.on('device_authorization.success', (ctx, body) => {
  body.interval = 1;
});

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
