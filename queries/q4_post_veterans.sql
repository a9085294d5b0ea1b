-- JSONBench Q4: who are the top 3 post veterans, the accounts with the earliest first post?
-- Tables: events.
SELECT did AS user_id, min(time) AS first_post_date
FROM events
WHERE kind = 'commit' AND operation = 'create' AND collection = 'app.bsky.feed.post'
GROUP BY user_id
ORDER BY first_post_date ASC, user_id
LIMIT 3;
