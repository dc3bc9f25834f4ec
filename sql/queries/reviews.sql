-- Named queries about reviews, including the one that writes.

-- name: reviews_for_book
-- A book's reviews, newest first.
-- params: book_id int, lim int
SELECT r.id, r.rating, r.reviewer, r.body, r.created_at
FROM review r
WHERE r.book_id = :book_id
ORDER BY r.created_at DESC, r.id DESC
LIMIT :lim;

-- name: top_rated
-- The best-rated books that have at least min_reviews reviews.
-- params: min_reviews int, lim int
SELECT b.id, b.title, a.name AS author,
       count(*) AS reviews, round(avg(r.rating), 2) AS avg_rating
FROM review r
JOIN book b ON b.id = r.book_id
JOIN author a ON a.id = b.author_id
GROUP BY b.id, a.name
HAVING count(*) >= :min_reviews
ORDER BY avg_rating DESC, reviews DESC, b.id
LIMIT :lim;

-- name: add_review<!
-- Adds a review to a book and returns it. An unknown book_id is a foreign key
-- violation (409); a rating outside 1-5 breaks a CHECK constraint (400).
-- params: book_id int, rating int, reviewer text, body text
INSERT INTO review (book_id, rating, reviewer, body)
VALUES (:book_id, :rating, :reviewer, :body)
RETURNING id, book_id, rating, reviewer, body, created_at;

-- name: draft_review<!
-- A reviewer's draft of a review, in the name their token gives (its sub): only
-- they see it until it is published (the demo's row-level security policy).
-- params: book_id int, rating int, body text
-- roles: bookshop_reviewer
INSERT INTO review (book_id, rating, reviewer, body, published)
VALUES (:book_id, :rating, nullif(current_setting('request.jwt.claim.sub', true), ''), :body, false)
RETURNING id, book_id, rating, reviewer, body, published;
