-- The five best-selling products of one store since a date, by revenue.
-- param store_id: int = 1 from claim store_id
-- param since: date = 2024-01-01
-- cache: public, max-age=10, stale-while-revalidate=60
SELECT p.id, p.name, sum(o.quantity) AS units, sum(o.total) AS revenue
FROM demo.orders o
JOIN demo.products p ON p.id = o.product_id
WHERE o.store_id = :store_id AND o.created_at >= :since AND o.status <> 'cancelled'
GROUP BY p.id, p.name
ORDER BY revenue DESC, p.id
LIMIT 5
