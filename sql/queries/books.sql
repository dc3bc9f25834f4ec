-- Named queries about books. Format: docs/http-api.md, "Named queries".

-- name: book_by_id
-- One book by its id, with its author and a summary of its reviews.
-- params: id int
SELECT b.id, b.title, a.id AS author_id, a.name AS author, b.published, b.price,
       b.isbn, b.pages, b.tags,
       (SELECT count(*) FROM review r WHERE r.book_id = b.id) AS reviews,
       (SELECT round(avg(r.rating), 2) FROM review r WHERE r.book_id = b.id) AS avg_rating
FROM book b
JOIN author a ON a.id = b.author_id
WHERE b.id = :id;

-- name: search_books
-- Books whose title matches q, best matches first. q is read as a web search
-- box reads it (dragon -empire, "glass tower", river or harbor); a title that
-- starts with q matches too, so partly typed titles find something.
-- params: q text, lim int
SELECT b.id, b.title, a.name AS author, b.published, b.price,
       ts_rank(to_tsvector('english', b.title), websearch_to_tsquery('english', :q)) AS rank
FROM book b
JOIN author a ON a.id = b.author_id
WHERE to_tsvector('english', b.title) @@ websearch_to_tsquery('english', :q)
   -- \ % _ in q are literal characters, not LIKE wildcards
   OR lower(b.title) LIKE replace(replace(replace(lower(:q), '\', '\\'), '%', '\%'), '_', '\_')
                          || '%'
ORDER BY rank DESC, b.title, b.id
LIMIT :lim;

-- name: list_books
-- All books in id order, one page at a time (keyset pagination): pass
-- after_id 0 for the first page, then the last id of the page before.
-- params: page_size int, after_id int
SELECT b.id, b.title, a.name AS author, b.published, b.price, b.tags
FROM book b
JOIN author a ON a.id = b.author_id
WHERE b.id > :after_id
ORDER BY b.id
LIMIT :page_size;
