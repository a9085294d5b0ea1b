-- How is the lake laid out: files, rows and bytes per partition?
-- Tables: system.files.
SELECT partition, count(*) AS files, sum(rows) AS rows, sum(bytes) AS bytes
FROM system.files
GROUP BY partition
ORDER BY rows DESC, partition
LIMIT 15;
