-- What do posts embed (images, links, quotes), read straight from the record JSON?
-- Tables: posts. Shows the JSON operators on `record`, which work for any lexicon.
SELECT coalesce(record->'embed'->>'$type', '(none)') AS embed, count(*) AS posts
FROM posts
WHERE operation = 'create'
GROUP BY embed
ORDER BY posts DESC, embed;
