// The unmodified @neondatabase/serverless driver against pgqg's POST /sql.
import assert from 'node:assert/strict';
import { beforeEach, describe, test } from 'node:test';

import { NeonDbError, neon } from '@neondatabase/serverless';

import {
  reader,
  readerToken,
  readOnly,
  readWrite,
  table,
  withTokens,
} from './gateway.mjs';

const sql = neon(readWrite);

// the table's name as a raw piece of SQL (it is ours, not the user's)
const t = sql.unsafe(table);

async function failure(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the query did not fail');
}

beforeEach(async () => {
  await sql`delete from ${t}`;
});

describe('queries', () => {
  test('tagged templates with parameters', async () => {
    const name = "O'Brien; drop table x --";
    const rows = await sql`select ${41}::int + 1 as answer, ${name}::text as name`;
    assert.deepEqual(rows, [{ answer: 42, name }]);
  });

  test('sql.query() with $n placeholders', async () => {
    assert.deepEqual(await sql.query('select $1::int * 2 as n, $2 as s', [21, 'x']), [
      { n: 42, s: 'x' },
    ]);
    assert.deepEqual(await sql.query('select 1 as one'), [{ one: 1 }]);
  });

  test('int8, numeric, json, timestamptz and arrays keep their values', async () => {
    const [row] = await sql`select
      9007199254740993::int8 as big,
      0.10000000000000000555::numeric as exact,
      0.1::float8 as float,
      '{"b": 1.50, "a": [1, null, "x"]}'::jsonb as doc,
      '[3, 2]'::json as list,
      '2024-02-29 12:34:56.789+02'::timestamptz as at,
      array[1, null, 3]::int[] as ints,
      array['a', null, 'NULL', 'b,c', '', 'q"', 'b\\s', '{x}']::text[] as texts,
      '{{1,2},{3,4}}'::int[] as grid,
      true as yes,
      null::text as nothing`;
    // the driver's own parsers: int8 and numeric stay strings (no digit is lost)
    assert.equal(row.big, '9007199254740993');
    assert.equal(row.exact, '0.10000000000000000555');
    assert.equal(row.float, 0.1);
    assert.deepEqual(row.doc, { a: [1, null, 'x'], b: 1.5 });
    assert.deepEqual(row.list, [3, 2]);
    assert.ok(row.at instanceof Date);
    assert.equal(row.at.toISOString(), '2024-02-29T10:34:56.789Z');
    assert.deepEqual(row.ints, [1, null, 3]);
    assert.deepEqual(row.texts, ['a', null, 'NULL', 'b,c', '', 'q"', 'b\\s', '{x}']);
    assert.deepEqual(row.grid, [
      [1, 2],
      [3, 4],
    ]);
    assert.equal(row.yes, true);
    assert.equal(row.nothing, null);
  });

  test('JavaScript values as parameters', async () => {
    const at = new Date('2024-02-29T10:34:56.789Z');
    const [row] = await sql`select
      ${at}::timestamptz as at,
      ${[1, 2, null]}::int[] as ints,
      ${['a,b', 'c"d', null]}::text[] as texts,
      ${{ a: [1, 'x'] }}::jsonb as doc,
      ${null}::int as nothing,
      ${true}::bool as yes,
      ${'9007199254740993'}::int8 + 0 as big,
      ${Buffer.from([0, 255, 10])}::bytea as bytes`;
    assert.equal(row.at.getTime(), at.getTime());
    assert.deepEqual(row.ints, [1, 2, null]);
    assert.deepEqual(row.texts, ['a,b', 'c"d', null]);
    assert.deepEqual(row.doc, { a: [1, 'x'] });
    assert.equal(row.nothing, null);
    assert.equal(row.yes, true);
    assert.equal(row.big, '9007199254740993');
    assert.deepEqual([...row.bytes], [0, 255, 10]);
  });

  test('arrayMode', async () => {
    const arrays = neon(readWrite, { arrayMode: true });
    assert.deepEqual(await arrays`select 1 as a, 'x' as b`, [[1, 'x']]);
    assert.deepEqual(await sql.query('select 1 as a, $1 as b', ['y'], { arrayMode: true }), [
      [1, 'y'],
    ]);
  });

  test('fullResults', async () => {
    const full = neon(readWrite, { fullResults: true });
    const result = await full`select 1::int as n, 'x'::text as s from generate_series(1, 3)`;
    assert.equal(result.command, 'SELECT');
    assert.equal(result.rowCount, 3);
    assert.equal(result.rowAsArray, false);
    assert.deepEqual(
      result.fields.map((f) => [f.name, f.dataTypeID, f.format]),
      [
        ['n', 23, 'text'],
        ['s', 25, 'text'],
      ],
    );
    assert.deepEqual(result.rows[0], { n: 1, s: 'x' });
    const inserted = await full`insert into ${t} values (1, 'a'), (2, 'b')`;
    assert.equal(inserted.command, 'INSERT');
    assert.equal(inserted.rowCount, 2);
    assert.deepEqual(inserted.rows, []);
  });
});

describe('transactions', () => {
  test('transaction([...]) answers each query in order', async () => {
    const [inserted, selected, count] = await sql.transaction([
      sql`insert into ${t} values (${1}, ${'a'}) returning id`,
      sql.query(`select v from ${table} where id = $1`, [1]),
      sql`select count(*)::int as n from ${t}`,
    ]);
    assert.deepEqual(inserted, [{ id: 1 }]);
    assert.deepEqual(selected, [{ v: 'a' }]);
    assert.deepEqual(count, [{ n: 1 }]);
  });

  test('a failing query rolls the whole transaction back', async () => {
    const err = await failure(
      sql.transaction([sql`insert into ${t} values (1, 'a')`, sql`select 1 / 0`]),
    );
    assert.ok(err instanceof NeonDbError);
    assert.equal(err.code, '22012');
    assert.equal(err.message, 'division by zero');
    assert.deepEqual(await sql`select count(*)::int as n from ${t}`, [{ n: 0 }]);
  });

  for (const [level, setting] of [
    ['ReadUncommitted', 'read uncommitted'],
    ['ReadCommitted', 'read committed'],
    ['RepeatableRead', 'repeatable read'],
    ['Serializable', 'serializable'],
  ]) {
    test(`isolationLevel ${level}`, async () => {
      const [[row]] = await sql.transaction(
        [sql`select current_setting('transaction_isolation') as level`],
        { isolationLevel: level },
      );
      assert.equal(row.level, setting);
    });
  }

  test('readOnly', async () => {
    const settings = sql`select current_setting('transaction_read_only') as ro`;
    assert.deepEqual(await sql.transaction([settings], { readOnly: true }), [[{ ro: 'on' }]]);
    assert.deepEqual(await sql.transaction([settings], { readOnly: false }), [[{ ro: 'off' }]]);
    const err = await failure(
      sql.transaction([sql`insert into ${t} values (1, 'a')`], { readOnly: true }),
    );
    assert.equal(err.code, '25006');
  });

  test('deferrable', async () => {
    const [[row]] = await sql.transaction(
      [sql`select current_setting('transaction_deferrable') as d`],
      { isolationLevel: 'Serializable', readOnly: true, deferrable: true },
    );
    assert.equal(row.d, 'on');
    const [[plain]] = await sql.transaction([
      sql`select current_setting('transaction_deferrable') as d`,
    ]);
    assert.equal(plain.d, 'off');
  });

  test('per-query options inside a transaction', async () => {
    const [arrays, objects] = await sql.transaction(
      (q) => [q.query('select 1 as a', [], { arrayMode: true }), q`select 2 as b`],
    );
    assert.deepEqual(arrays, [[1]]);
    assert.deepEqual(objects, [{ b: 2 }]);
  });
});

describe('errors', () => {
  test('PostgreSQL errors are NeonDbErrors with their fields', async () => {
    await sql`insert into ${t} values (1, 'a')`;
    const dup = await failure(sql`insert into ${t} values (1, 'b')`);
    assert.ok(dup instanceof NeonDbError);
    assert.equal(dup.code, '23505');
    assert.equal(dup.severity, 'ERROR');
    assert.equal(dup.detail, 'Key (id)=(1) already exists.');
    assert.equal(dup.table, table);
    assert.equal(dup.constraint, `${table}_pkey`);

    const syntax = await failure(sql.query('select 1 frm x'));
    assert.equal(syntax.code, '42601');
    assert.equal(syntax.position, '14');

    const missing = await failure(sql`select * from no_such_table_here`);
    assert.equal(missing.code, '42P01');
    assert.match(missing.message, /no_such_table_here/);
  });

  test('a read-only gateway refuses a write as /v1 does', async () => {
    const ro = neon(readOnly);
    assert.deepEqual(await ro`select 1 as one`, [{ one: 1 }]);
    const err = await failure(ro`insert into ${t} values (1, 'a')`);
    assert.ok(err instanceof NeonDbError);
    assert.equal(err.code, '25006');
    const batch = await failure(ro.transaction([ro`insert into ${t} values (1, 'a')`]));
    assert.equal(batch.code, '25006');
    assert.deepEqual(await sql`select count(*)::int as n from ${t}`, [{ n: 0 }]);
  });
});

describe('identity', () => {
  const who = 'select current_user::text as role, current_setting($1, true) as sub';
  const claim = 'request.jwt.claim.sub';

  test('authToken: the request runs as the role its token names', async () => {
    const sqlAsReader = neon(withTokens, { authToken: readerToken });
    assert.deepEqual(await sqlAsReader.query(who, [claim]), [{ role: reader, sub: 'ana' }]);
    // a function that gives the token, per query
    const anyone = neon(withTokens);
    const getToken = async () => readerToken;
    assert.deepEqual(await anyone.query(who, [claim], { authToken: getToken }), [
      { role: reader, sub: 'ana' },
    ]);
    // a transaction sends neon()'s token (driver 1.2.0 leaves a transaction's own
    // authToken option out of the request)
    const [[row]] = await sqlAsReader.transaction([sqlAsReader.query(who, [claim])]);
    assert.deepEqual(row, { role: reader, sub: 'ana' });
  });

  test('without a token, a gateway that wants one refuses', async () => {
    const err = await failure(neon(withTokens)`select 1`);
    assert.match(err.message, /HTTP status 401/);
    const forged = await failure(neon(withTokens, { authToken: `${readerToken}x` })`select 1`);
    assert.match(forged.message, /HTTP status 401/);
  });
});
