-- Daily sales of one store: orders and revenue per day (cancelled orders excluded).
-- param store_id: int = 1 from claim store_id
-- param since: date = 2024-01-01
-- cache: public, max-age=5, stale-while-revalidate=30
SELECT date_trunc('day', created_at)::date AS day,
       count(*) AS orders,
       sum(total) AS revenue
FROM demo.orders
WHERE store_id = :store_id AND created_at >= :since AND status <> 'cancelled'
GROUP BY 1
ORDER BY 1
