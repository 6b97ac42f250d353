-- Mercure updates (service/mercure) are custom events of the reserved topic _mercure; a
-- subscriber resumes with a publisher's id, found through this index.
CREATE INDEX IF NOT EXISTS changes_mercure_id ON realtime.changes ((data->>'id'))
    WHERE topic = '_mercure';
