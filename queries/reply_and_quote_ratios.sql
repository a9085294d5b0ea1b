-- What share of new posts are replies, and what share quote another post?
-- Tables: posts (typed columns reply_parent_uri, quote_uri).
SELECT count(*) AS posts,
       sum(CASE WHEN reply_parent_uri IS NOT NULL THEN 1 ELSE 0 END) AS replies,
       sum(CASE WHEN quote_uri IS NOT NULL THEN 1 ELSE 0 END) AS quotes,
       round(avg(CASE WHEN reply_parent_uri IS NOT NULL THEN 1.0 ELSE 0.0 END), 4) AS reply_ratio,
       round(avg(CASE WHEN quote_uri IS NOT NULL THEN 1.0 ELSE 0.0 END), 4) AS quote_ratio
FROM posts
WHERE operation = 'create';
