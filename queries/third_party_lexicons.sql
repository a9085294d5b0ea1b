-- How active is each third-party lexicon (collections outside app.bsky and chat.bsky)?
-- Tables: events (the real collection is kept even for rows stored in the _other partition).
SELECT collection,
       count(*) AS events,
       count(DISTINCT did) AS accounts,
       sum(CASE WHEN operation = 'delete' THEN 1 ELSE 0 END) AS deletes
FROM events
WHERE kind = 'commit'
  AND collection NOT LIKE 'app.bsky.%'
  AND collection NOT LIKE 'chat.bsky.%'
GROUP BY collection
ORDER BY events DESC, collection
LIMIT 25;
