-- One store's orders, newest first, a page at a time; optionally of one status.
-- param store_id: int = 1 from claim store_id
-- param status: text = null
-- param page: int = 1
-- param limit: int = 50
-- cache: public, max-age=2
-- export: order by created_at desc, id desc
-- export: count
SELECT id, product_id, quantity, total, status, created_at
FROM demo.orders
WHERE store_id = :store_id AND (:status IS NULL OR status = :status)
ORDER BY created_at DESC, id DESC
