// Where the gateways under test are, as tests/test_neon_js.py starts them: the only
// setting the driver needs is neonConfig.fetchEndpoint.
import { neonConfig } from '@neondatabase/serverless';

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/test_neon_js.py`);
  return value;
}

// The driver's URL is postgresql://user:password@host:port/database; the gateway
// ignores all but the host and port, which fetchEndpoint turns into its /sql.
neonConfig.fetchEndpoint = (host, port) => `http://${host}:${port}/sql`;

function connectionString(base) {
  return `postgresql://anyone:anything@${new URL(base).host}/anydb`;
}

// a gateway with raw_sql = read-write, one in the default read-only mode, and one that
// verifies tokens (PGQG_JWT_SECRET): readerToken names the role reader
export const readWrite = connectionString(required('PGQG_URL'));
export const readOnly = connectionString(required('PGQG_READ_ONLY_URL'));
export const withTokens = connectionString(required('PGQG_TOKENS_URL'));
export const reader = required('PGQG_READER_ROLE');
export const readerToken = required('PGQG_READER_TOKEN');
// (id int primary key, v text), made for these tests and dropped after them
export const table = required('PGQG_TABLE');
// (id int primary key, name text not null, price numeric(10,2), tags text[], meta jsonb,
//  created timestamptz, big int8)
export const drizzleTable = required('PGQG_DRIZZLE_TABLE');
