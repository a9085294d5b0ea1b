-- Which posts got the most likes in the last hour of data?
-- Tables: likes (typed column subject_uri). "Last hour" is relative to the newest like in the
-- lake, so the answer is the same whenever the query runs; use now() for a live dashboard.
SELECT subject_uri AS post, count(*) AS likes
FROM likes
WHERE operation = 'create'
  AND time > (SELECT max(time) FROM likes) - INTERVAL '1 hour'
GROUP BY post
ORDER BY likes DESC, post
LIMIT 10;
