-- Order counts by status for one store.
-- param store_id: int = 1 from claim store_id
-- cache: public, max-age=2, stale-while-revalidate=30
SELECT status, count(*) AS orders
FROM demo.orders
WHERE store_id = :store_id
GROUP BY status
ORDER BY status
