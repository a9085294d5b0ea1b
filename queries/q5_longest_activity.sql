-- JSONBench Q5: which 3 accounts posted over the longest span of time (milliseconds between their
-- first and last post)?
-- Tables: events.
SELECT did AS user_id, (max(time_us) - min(time_us)) / 1000 AS activity_span
FROM events
WHERE kind = 'commit' AND operation = 'create' AND collection = 'app.bsky.feed.post'
GROUP BY user_id
ORDER BY activity_span DESC, user_id
LIMIT 3;
