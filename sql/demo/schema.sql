-- Demo domain: a small commerce app (stores, products, orders moving through statuses,
-- payouts). Idempotent; watched with per-store topics.
CREATE SCHEMA IF NOT EXISTS demo;

CREATE TABLE IF NOT EXISTS demo.stores (
    id   int PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE IF NOT EXISTS demo.products (
    id       int PRIMARY KEY,
    store_id int NOT NULL REFERENCES demo.stores (id),
    name     text NOT NULL,
    price    numeric(10, 2) NOT NULL
);

CREATE TABLE IF NOT EXISTS demo.orders (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id   int NOT NULL REFERENCES demo.stores (id),
    product_id int NOT NULL REFERENCES demo.products (id),
    quantity   int NOT NULL CHECK (quantity > 0),
    total      numeric(12, 2) NOT NULL,
    status     text NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'paid', 'shipped', 'delivered', 'cancelled')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The aggregates filter by store and time, group by status, and list newest first.
CREATE INDEX IF NOT EXISTS orders_store_created ON demo.orders (store_id, created_at DESC);
CREATE INDEX IF NOT EXISTS orders_store_status ON demo.orders (store_id, status);
CREATE INDEX IF NOT EXISTS orders_product ON demo.orders (product_id, store_id);

CREATE TABLE IF NOT EXISTS demo.payouts (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store_id   int NOT NULL REFERENCES demo.stores (id),
    amount     numeric(12, 2) NOT NULL,
    status     text NOT NULL DEFAULT 'scheduled' CHECK (status IN ('scheduled', 'paid', 'failed')),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS payouts_store_status ON demo.payouts (store_id, status);

SELECT realtime.watch('demo.orders', 'orders', 'store_id');
SELECT realtime.watch('demo.payouts', 'payouts', 'store_id');
SELECT realtime.watch('demo.products', 'products', 'store_id');

GRANT USAGE ON SCHEMA demo TO pgsse_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA demo TO pgsse_reader;

INSERT INTO demo.stores (id, name) VALUES
    (1, 'Northwind Books'), (2, 'Harbor Coffee'), (3, 'Pixel Games')
ON CONFLICT (id) DO NOTHING;

INSERT INTO demo.products (id, store_id, name, price)
SELECT p, 1 + (p - 1) % 3, 'Product ' || p, round((5 + (p * 37) % 95)::numeric, 2)
FROM generate_series(1, 30) AS p
ON CONFLICT (id) DO NOTHING;
