-- Which hashtags are used most in new posts?
-- Tables: posts (typed column facet_tags, from the post's rich-text facets).
SELECT lower(tag) AS hashtag, count(*) AS uses, count(DISTINCT did) AS accounts
FROM (SELECT did, unnest(facet_tags) AS tag FROM posts WHERE operation = 'create')
GROUP BY hashtag
ORDER BY uses DESC, hashtag
LIMIT 10;
