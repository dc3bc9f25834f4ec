// drizzle-orm's neon-http adapter on the unmodified driver, against pgqg's POST /sql.
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { neon } from '@neondatabase/serverless';
import { asc, eq, gt, sql } from 'drizzle-orm';
import { drizzle } from 'drizzle-orm/neon-http';
import { bigint, integer, jsonb, numeric, pgTable, text, timestamp } from 'drizzle-orm/pg-core';

import { drizzleTable, readWrite } from './gateway.mjs';

const books = pgTable(drizzleTable, {
  id: integer('id').primaryKey(),
  name: text('name').notNull(),
  price: numeric('price', { precision: 10, scale: 2 }),
  tags: text('tags').array(),
  meta: jsonb('meta'),
  created: timestamp('created', { withTimezone: true, mode: 'date' }),
  big: bigint('big', { mode: 'bigint' }),
});

const db = drizzle({ client: neon(readWrite) });

beforeEach(async () => {
  await db.delete(books);
});

test('insert through the schema, then select it back', async () => {
  const dune = {
    id: 1,
    name: 'Dune',
    price: '9.99',
    tags: ['sf', 'a,b', 'NULL'],
    meta: { pages: 412, nested: { x: [1, null] } },
    created: new Date('2024-02-29T10:34:56.789Z'),
    big: 9007199254740993n,
  };
  const inserted = await db
    .insert(books)
    .values([
      dune,
      { id: 2, name: 'Emma', price: '5.50', tags: [], meta: null, created: null, big: null },
    ])
    .returning({ id: books.id, name: books.name });
  assert.deepEqual(inserted, [
    { id: 1, name: 'Dune' },
    { id: 2, name: 'Emma' },
  ]);

  // every value as it went in: numeric as its text, a Date, a bigint, arrays and JSON
  assert.deepEqual(await db.select().from(books).where(eq(books.id, 1)), [dune]);

  const cheap = await db
    .select({ name: books.name, price: books.price })
    .from(books)
    .where(gt(books.id, 0))
    .orderBy(asc(books.price));
  assert.deepEqual(cheap, [
    { name: 'Emma', price: '5.50' },
    { name: 'Dune', price: '9.99' },
  ]);
});

test('update, delete and an aggregate', async () => {
  await db.insert(books).values([
    { id: 1, name: 'a', price: '1.00' },
    { id: 2, name: 'b', price: '2.00' },
  ]);
  const updated = await db
    .update(books)
    .set({ price: sql`${books.price} * 2` })
    .where(eq(books.id, 2))
    .returning({ price: books.price });
  assert.deepEqual(updated, [{ price: '4.00' }]);
  await db.delete(books).where(eq(books.id, 1));
  const [{ n, total }] = await db
    .select({ n: sql`count(*)`.mapWith(Number), total: sql`sum(${books.price})` })
    .from(books);
  assert.equal(n, 1);
  assert.equal(total, '4.00');
});

test('db.batch runs in one transaction', async () => {
  const [inserted, selected] = await db.batch([
    db.insert(books).values({ id: 7, name: 'seven' }).returning({ id: books.id }),
    db.select({ name: books.name }).from(books).where(eq(books.id, 7)),
  ]);
  assert.deepEqual(inserted, [{ id: 7 }]);
  assert.deepEqual(selected, [{ name: 'seven' }]);

  await assert.rejects(
    db.batch([
      db.insert(books).values({ id: 8, name: 'eight' }),
      db.insert(books).values({ id: 7, name: 'seven again' }),
    ]),
    (err) => {
      // drizzle wraps the driver's error; the driver's NeonDbError is its cause
      const cause = err.cause ?? err;
      assert.equal(cause.code, '23505');
      return true;
    },
  );
  const rows = await db.select({ id: books.id }).from(books).orderBy(asc(books.id));
  assert.deepEqual(rows, [{ id: 7 }]);
});

test('raw SQL through drizzle', async () => {
  const result = await db.execute(sql`select ${'x'}::text as x, 2::int as two`);
  assert.deepEqual(result.rows, [{ x: 'x', two: 2 }]);
});
