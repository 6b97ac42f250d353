-- Payouts of one store by status: how many and how much.
-- param store_id: int = 1 from claim store_id
-- cache: public, max-age=5
SELECT status, count(*) AS payouts, sum(amount) AS amount
FROM demo.payouts
WHERE store_id = :store_id
GROUP BY status
ORDER BY status
