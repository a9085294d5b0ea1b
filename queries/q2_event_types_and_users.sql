-- JSONBench Q2: for record creations, how many events and distinct users per event type?
-- Tables: events.
SELECT collection AS event, count(*) AS count, count(DISTINCT did) AS users
FROM events
WHERE kind = 'commit' AND operation = 'create'
GROUP BY event
ORDER BY count DESC, event;
