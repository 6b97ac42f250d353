-- Named queries of the demo (service/demo.py): seed data and the demo writer's changes.

-- name: demo_has_orders
SELECT EXISTS (SELECT 1 FROM demo.orders)

-- name: demo_seed_orders
-- $1 orders spread over 90 days, every status, 30 products of 3 stores.
INSERT INTO demo.orders (store_id, product_id, quantity, total, status, created_at, updated_at)
SELECT p.store_id, p.id, q, p.price * q,
       (ARRAY['pending','paid','shipped','delivered','cancelled'])[1 + (g % 5)],
       now() - (g % 90) * interval '1 day' - (g % 1440) * interval '1 minute',
       now() - (g % 90) * interval '1 day'
FROM generate_series(1, $1::int) AS g
CROSS JOIN LATERAL (SELECT 1 + (g * 7) % 4 AS q) qty
JOIN demo.products p ON p.id = 1 + (g * 13) % 30

-- name: demo_new_order
-- $1 product, $2 quantity.
INSERT INTO demo.orders (store_id, product_id, quantity, total)
SELECT store_id, id, $2::int, price * $2::int FROM demo.products WHERE id = $1

-- name: demo_open_order
-- One of the latest open orders of store $1 ($2: how far back).
SELECT id, status FROM demo.orders WHERE status IN ('pending','paid','shipped')
AND store_id = $1 ORDER BY created_at DESC LIMIT 1 OFFSET $2

-- name: demo_set_status
UPDATE demo.orders SET status = $2, updated_at = now() WHERE id = $1

-- name: demo_new_payout
INSERT INTO demo.payouts (store_id, amount) VALUES ($1, $2) RETURNING id

-- name: demo_pay_payout
UPDATE demo.payouts SET status = 'paid' WHERE id = $1

-- name: demo_publish_payout
-- A custom event beside the row change: $1 topic, $2 payout, $3 store.
SELECT realtime.publish($1, 'payout.status.changed',
       jsonb_build_object('payout_id', $2::bigint, 'store_id', $3::int, 'status', 'paid'))
