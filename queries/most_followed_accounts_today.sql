-- Which accounts gained the most followers today (the day of the newest follow in the lake)?
-- Tables: follows (typed column subject_did).
SELECT subject_did AS account, count(*) AS new_followers
FROM follows
WHERE operation = 'create'
  AND time >= date_trunc('day', (SELECT max(time) FROM follows))
GROUP BY account
ORDER BY new_followers DESC, account
LIMIT 10;
