-- How many posts are written in each language, hour by hour? (A post may declare several.)
-- Tables: posts (typed column langs).
SELECT date_trunc('hour', time) AS hour, lang, count(*) AS posts
FROM (SELECT time, unnest(langs) AS lang FROM posts WHERE operation = 'create')
GROUP BY hour, lang
ORDER BY hour, posts DESC, lang;
