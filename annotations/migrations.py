"""The store's schema, as one sqlite-utils `Migrations` set.

Rules: migrations only ever add. Never edit or renumber one that has been applied anywhere;
write a new function with the next number instead. Each runs in its own transaction.
"""

from __future__ import annotations

from sqlite_utils.migrations import Migrations

migrations = Migrations("rankloop")

NOW = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"


def _sql(db, *statements: str) -> None:
    for statement in statements:
        db.execute(statement)


@migrations()
def m001_create_core(db):
    """Users, prompts, items and their candidates, judgements, derived pairs, ratings."""
    _sql(
        db,
        f"""CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL CHECK (role IN ('annotator', 'admin')),
            password_hash TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        f"""CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            messages TEXT NOT NULL,            -- JSON list of {{role, content}}
            content_hash TEXT NOT NULL UNIQUE, -- sha256 of the canonical messages JSON
            source TEXT NOT NULL DEFAULT '',
            external_id TEXT,
            tags TEXT NOT NULL DEFAULT '[]',
            split TEXT NOT NULL DEFAULT 'train' CHECK (split IN ('train', 'heldout')),
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        f"""CREATE TABLE items (
            id INTEGER PRIMARY KEY,
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            mode TEXT NOT NULL DEFAULT 'pairwise' CHECK (mode IN ('pairwise', 'ranking')),
            k INTEGER NOT NULL DEFAULT 2 CHECK (k BETWEEN 2 AND 6),
            overlap INTEGER NOT NULL DEFAULT 1 CHECK (overlap >= 1),
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'ready', 'complete', 'retired')),
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        "CREATE INDEX items_status ON items(status)",
        f"""CREATE TABLE candidates (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES items(id),
            text TEXT NOT NULL,
            policy_version TEXT,               -- NULL for a human-written answer
            author_id INTEGER REFERENCES users(id),
            sampling TEXT NOT NULL DEFAULT '{{}}',
            gen_seconds REAL,
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        "CREATE INDEX candidates_item ON candidates(item_id)",
        f"""CREATE TABLE leases (
            item_id INTEGER NOT NULL REFERENCES items(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            expires_at REAL NOT NULL,          -- unix time
            PRIMARY KEY (item_id, user_id)
        )""",
        f"""CREATE TABLE judgements (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES items(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            mode TEXT NOT NULL,
            ranking TEXT NOT NULL,             -- JSON tiers of candidate ids, best first
            both_bad INTEGER NOT NULL DEFAULT 0,
            shown_order TEXT NOT NULL,         -- JSON candidate ids in the order shown
            decision_ms INTEGER,
            idempotency_key TEXT UNIQUE,
            created_at TEXT NOT NULL DEFAULT {NOW},
            UNIQUE (item_id, user_id)
        )""",
        f"""CREATE TABLE pairs (
            id INTEGER PRIMARY KEY,
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            chosen TEXT NOT NULL,
            rejected TEXT NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('judgement', 'import', 'arena')),
            judgement_id INTEGER REFERENCES judgements(id),
            chosen_candidate_id INTEGER REFERENCES candidates(id),
            rejected_candidate_id INTEGER REFERENCES candidates(id),
            user_id INTEGER REFERENCES users(id),
            chosen_version TEXT,
            rejected_version TEXT,
            weight REAL NOT NULL DEFAULT 1.0,
            import_batch TEXT,
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        "CREATE INDEX pairs_prompt ON pairs(prompt_id)",
        f"""CREATE TABLE ratings (
            id INTEGER PRIMARY KEY,
            candidate_id INTEGER NOT NULL REFERENCES candidates(id),
            user_id INTEGER REFERENCES users(id),
            value INTEGER NOT NULL,            -- +1 thumbs up, -1 thumbs down
            source TEXT NOT NULL DEFAULT 'annotate',
            judgement_id INTEGER REFERENCES judgements(id),
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
    )


@migrations()
def m002_create_rounds_and_policies(db):
    """Training rounds and the model versions they register."""
    _sql(
        db,
        f"""CREATE TABLE rounds (
            id INTEGER PRIMARY KEY,
            method TEXT NOT NULL,
            config TEXT NOT NULL DEFAULT '{{}}',
            data_hash TEXT,
            n_pairs INTEGER,
            parent_version TEXT,
            version TEXT,
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            pid INTEGER,
            progress REAL NOT NULL DEFAULT 0,
            log_tail TEXT NOT NULL DEFAULT '',
            metrics TEXT NOT NULL DEFAULT '{{}}',
            error TEXT,
            code_version TEXT,
            created_by INTEGER REFERENCES users(id),
            created_at TEXT NOT NULL DEFAULT {NOW},
            started_at TEXT,
            finished_at TEXT
        )""",
        f"""CREATE TABLE policies (
            version TEXT PRIMARY KEY,
            kind TEXT NOT NULL DEFAULT 'policy' CHECK (kind IN ('policy', 'reward')),
            parent TEXT,
            method TEXT NOT NULL,
            round_id INTEGER REFERENCES rounds(id),
            path TEXT,                         -- adapter folder; NULL for the base
            metrics TEXT NOT NULL DEFAULT '{{}}',
            state TEXT NOT NULL DEFAULT 'candidate'
                CHECK (state IN ('candidate', 'live', 'retired')),
            created_at TEXT NOT NULL DEFAULT {NOW},
            promoted_at TEXT
        )""",
        # At most one live policy and one live reward model, enforced by the database itself.
        "CREATE UNIQUE INDEX policies_one_live ON policies(kind) WHERE state = 'live'",
        "INSERT INTO policies (version, kind, method, state) VALUES ('base', 'policy', 'base', 'live')",
    )


@migrations()
def m003_create_settings(db):
    """Key/value project settings (guidelines text, default judgement mode, K, overlap...)."""
    _sql(
        db,
        f"""CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL DEFAULT {NOW}
        )""",
    )


@migrations()
def m004_annotation_workflow(db):
    """Skips, content flags, gold items, per-item decoding and policy versions."""
    _sql(
        db,
        f"""CREATE TABLE skips (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES items(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            reason TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT {NOW},
            UNIQUE (item_id, user_id)
        )""",
        f"""CREATE TABLE flags (
            id INTEGER PRIMARY KEY,
            item_id INTEGER NOT NULL REFERENCES items(id),
            candidate_id INTEGER REFERENCES candidates(id),  -- NULL: the prompt itself
            user_id INTEGER NOT NULL REFERENCES users(id),
            reason TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        # Gold items carry a known ranking (JSON tiers of candidate ids); annotators are scored on them.
        "ALTER TABLE items ADD COLUMN gold TEXT",
        # Which policy versions answer this item (JSON list; NULL: the live one) and how to sample.
        "ALTER TABLE items ADD COLUMN versions TEXT",
        "ALTER TABLE items ADD COLUMN sampling TEXT",
        "CREATE INDEX judgements_item ON judgements(item_id)",
        "CREATE INDEX pairs_judgement ON pairs(judgement_id)",
    )


@migrations()
def m005_add_round_watermarks(db):
    """What a round trained on and over: the highest pair and rating ids its data snapshot saw
    (so "new data since the last round" is exact), and the base model folder it trained over."""
    _sql(
        db,
        "ALTER TABLE rounds ADD COLUMN data_until_pair_id INTEGER",
        "ALTER TABLE rounds ADD COLUMN data_until_rating_id INTEGER",
        "ALTER TABLE rounds ADD COLUMN base_path TEXT",
        "CREATE INDEX rounds_status ON rounds(status)",
    )


@migrations()
def m006_chat_and_arena(db):
    """Chat replies (with their thumbs) and blind arena battles between two versions."""
    _sql(
        db,
        f"""CREATE TABLE chat_replies (
            id INTEGER PRIMARY KEY,
            user_id INTEGER REFERENCES users(id),
            conversation TEXT NOT NULL,        -- client conversation id
            messages TEXT NOT NULL,            -- JSON: the conversation the reply answers
            reply TEXT NOT NULL,
            policy_version TEXT NOT NULL,
            sampling TEXT NOT NULL DEFAULT '{{}}',
            gen_seconds REAL,
            rating INTEGER CHECK (rating IN (-1, 1)),
            created_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        f"""CREATE TABLE arena_battles (
            id INTEGER PRIMARY KEY,
            user_id INTEGER REFERENCES users(id),
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            version_a TEXT NOT NULL,
            version_b TEXT NOT NULL,
            answer_a TEXT NOT NULL,
            answer_b TEXT NOT NULL,
            winner TEXT CHECK (winner IN ('A', 'B', 'tie', 'both_bad')),
            pair_id INTEGER REFERENCES pairs(id),
            created_at TEXT NOT NULL DEFAULT {NOW},
            voted_at TEXT
        )""",
        "CREATE INDEX arena_versions ON arena_battles(version_a, version_b)",
    )


@migrations()
def m007_round_metrics(db):
    """Per-step training metrics of each round (the admin page's curves)."""
    _sql(
        db,
        """CREATE TABLE round_metrics (
            round_id INTEGER NOT NULL REFERENCES rounds(id),
            step INTEGER NOT NULL,
            key TEXT NOT NULL,
            value REAL NOT NULL,
            PRIMARY KEY (round_id, step, key)
        )""",
    )


@migrations()
def m008_chat_reply_candidates(db):
    """A rated chat reply becomes a candidate (of a closed item), so its rating is training data."""
    _sql(db, "ALTER TABLE chat_replies ADD COLUMN candidate_id INTEGER REFERENCES candidates(id)")


@migrations()
def m009_round_staged_adapter(db):
    """A running round's trained adapter, written but not yet registered (the app loads it
    while the round evaluates, so the gate's promotion finds it ready)."""
    _sql(db, "ALTER TABLE rounds ADD COLUMN staged_path TEXT")


@migrations()
def m010_item_views_and_truncation(db):
    """What each person was shown (so a re-shown item keeps its letters and its served time,
    and an item someone has open stays answerable after it is retired or filled), and whether
    a generated answer was cut off by the token budget."""
    _sql(
        db,
        """CREATE TABLE item_views (
            item_id INTEGER NOT NULL REFERENCES items(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            shown_order TEXT NOT NULL,         -- JSON candidate ids in the order shown (letters A, B, ...)
            served_at REAL NOT NULL,           -- unix time the item was first shown to this user
            view_key TEXT NOT NULL,            -- the idempotency key its submission carries
            PRIMARY KEY (item_id, user_id)
        )""",
        # 1: the answer reached the token budget before its end-of-turn; 0: it ended by itself;
        # NULL: unknown (human-written, imported, or generated before this column existed).
        "ALTER TABLE candidates ADD COLUMN truncated INTEGER",
        # the highest judgement id a round's data snapshot saw (KTO labels come from judgements)
        "ALTER TABLE rounds ADD COLUMN data_until_judgement_id INTEGER",
        # a promotion gate's blind pair: JSON [candidate version, the live version it must beat]
        "ALTER TABLE items ADD COLUMN gate_versions TEXT",
        # why the prefetcher gave up on an item (retired with this reason; shown on the Health tab)
        "ALTER TABLE items ADD COLUMN park_reason TEXT",
    )


@migrations()
def m011_api_keys(db):
    """Per-user keys for the OpenAI-compatible API (only a key's sha256 is kept), and which key
    asked for each chat reply that came through the API."""
    _sql(
        db,
        f"""CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            label TEXT NOT NULL DEFAULT '',
            key_hash TEXT NOT NULL UNIQUE,     -- sha256 hex of the key; the key itself is shown once
            key_prefix TEXT NOT NULL,          -- its first characters, to tell keys apart in a list
            created_at TEXT NOT NULL DEFAULT {NOW},
            last_used_at TEXT,
            revoked_at TEXT
        )""",
        "ALTER TABLE chat_replies ADD COLUMN api_key_id INTEGER REFERENCES api_keys(id)",
    )


@migrations()
def m012_judgement_revisions(db):
    """An annotator may change a judgement for a while after giving it: the row moves to a new
    id with the new ranking (so it counts as new data), and what it was before — the row, its
    pairs as training read them, its ratings — is kept here (annotations/judgement_history.py)."""
    _sql(
        db,
        "ALTER TABLE judgements ADD COLUMN revised_at TEXT",
        "ALTER TABLE judgements ADD COLUMN revisions INTEGER NOT NULL DEFAULT 0",
        f"""CREATE TABLE judgement_revisions (
            id INTEGER PRIMARY KEY,
            judgement_id INTEGER NOT NULL,     -- the id the judgement had before this change
            new_judgement_id INTEGER NOT NULL REFERENCES judgements(id),
            user_id INTEGER NOT NULL REFERENCES users(id),
            item_id INTEGER NOT NULL REFERENCES items(id),
            before TEXT NOT NULL,              -- JSON: {{"judgement", "pairs", "ratings"}} as they were
            revised_at TEXT NOT NULL DEFAULT {NOW}
        )""",
        "CREATE INDEX judgement_revisions_new ON judgement_revisions(new_judgement_id)",
        "CREATE INDEX judgements_user ON judgements(user_id, id)",
    )


@migrations()
def m013_item_selection_and_reward_scores(db):
    """Which item is served next (annotations/selection.py): each item's priority under the
    project's selection policy, and the policy that set it; each answer's score by the live
    reward model when it was generated, and which reward model gave it."""
    _sql(
        db,
        "ALTER TABLE items ADD COLUMN selection TEXT",
        "ALTER TABLE items ADD COLUMN priority REAL",
        "ALTER TABLE candidates ADD COLUMN reward_score REAL",
        "ALTER TABLE candidates ADD COLUMN reward_version TEXT",
        "CREATE INDEX items_ready_priority ON items(status, priority)",
    )


@migrations()
def m014_suggestions(db):
    """The live reward model's suggested ranking, as shown to a person with an item (its
    scores, its version) and as it stood beside the judgement they gave (annotations/suggestions.py)."""
    _sql(
        db,
        "ALTER TABLE item_views ADD COLUMN suggestion TEXT",
        "ALTER TABLE judgements ADD COLUMN suggestion TEXT",
    )


@migrations()
def m015_implicit_rewards(db):
    """Each answer's implicit reward under the policy that generated it, log pi(answer) - log
    pi_base(answer), for the `model_disagreement` selection policy (annotations/selection.py)."""
    _sql(db, "ALTER TABLE candidates ADD COLUMN implicit_reward REAL")
