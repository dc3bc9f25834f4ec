-- Named queries about authors.

-- name: author_by_id
-- One author by id, with how many books they wrote and when.
-- params: id int
SELECT a.id, a.name, a.country, a.born,
       count(b.id) AS books, min(b.published) AS first_published,
       max(b.published) AS last_published
FROM author a
LEFT JOIN book b ON b.author_id = a.id
WHERE a.id = :id
GROUP BY a.id;

-- name: author_stats
-- Authors with at least min_books books, most prolific first: number of books,
-- average price, number of reviews and average rating over all their reviews.
-- params: min_books int, lim int
WITH book_reviews AS (
    SELECT book_id, count(*) AS reviews, sum(rating) AS rating_sum
    FROM review
    GROUP BY book_id
)
SELECT a.id, a.name, a.country,
       count(b.id) AS books,
       round(avg(b.price), 2) AS avg_price,
       coalesce(sum(br.reviews), 0) AS reviews,
       round(sum(br.rating_sum) / nullif(sum(br.reviews), 0), 2) AS avg_rating
FROM author a
LEFT JOIN book b ON b.author_id = a.id
LEFT JOIN book_reviews br ON br.book_id = b.id
GROUP BY a.id
HAVING count(b.id) >= :min_books
ORDER BY books DESC, a.id
LIMIT :lim;
