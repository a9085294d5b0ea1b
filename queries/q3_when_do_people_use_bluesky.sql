-- JSONBench Q3: when do people use Bluesky? Creations of posts, reposts and likes by hour of day.
-- Tables: events. The hour is the stream time (relay/Jetstream clock), never the record's createdAt.
SELECT collection AS event, extract(hour FROM time) AS hour_of_day, count(*) AS count
FROM events
WHERE kind = 'commit'
  AND operation = 'create'
  AND collection IN ('app.bsky.feed.post', 'app.bsky.feed.repost', 'app.bsky.feed.like')
GROUP BY event, hour_of_day
ORDER BY hour_of_day, event;
