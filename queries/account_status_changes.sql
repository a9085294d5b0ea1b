-- Which account status changes happen, and to how many accounts (takedowns, deactivations, …)?
-- Tables: account (typed columns active, status).
SELECT coalesce(status, CASE WHEN active THEN 'active' ELSE 'inactive' END) AS status,
       active,
       count(*) AS events,
       count(DISTINCT did) AS accounts
FROM account
GROUP BY 1, active
ORDER BY events DESC, status;
