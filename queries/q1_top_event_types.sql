-- JSONBench Q1: what are the top event types (collections), by number of events?
-- Tables: events. Identity and account events have no collection (NULL), as in JSONBench.
SELECT collection AS event, count(*) AS count
FROM events
GROUP BY event
ORDER BY count DESC, event;
