//! The chat's state on disk, in SQLite (`history.sqlite3` in the config
//! directory, mode 0600): per peer, the numbers of the conversation, the
//! lines not yet confirmed, and (unless history is off) every line.
//!
//! The schema is versioned with `PRAGMA user_version`; each migration runs
//! once, in a transaction, in order.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::conversation::{OutLine, Resume};
use crate::identity::PublicKey;

/// File name of the database in the config directory.
pub const FILE_NAME: &str = "history.sqlite3";

/// Each entry takes the schema from the version before it to its own
/// (index + 1).
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE peers (
         key BLOB PRIMARY KEY,
         next_out INTEGER NOT NULL DEFAULT 1,
         last_in INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE lines (
         peer BLOB NOT NULL,
         outgoing INTEGER NOT NULL,
         seq INTEGER NOT NULL,
         typed_at_ms INTEGER NOT NULL,
         text TEXT NOT NULL,
         delivered INTEGER NOT NULL DEFAULT 0,
         PRIMARY KEY (peer, outgoing, seq)
     );",
    // 2: when a line was confirmed (a time, not a flag; version 1's
    // confirmed lines get the time they were typed, the best it knew), when
    // an incoming line arrived here (the sender's clock may be off), and an
    // index for `natter history --since`.
    "ALTER TABLE lines ADD COLUMN delivered_ms INTEGER;
     ALTER TABLE lines ADD COLUMN arrived_ms INTEGER;
     UPDATE lines SET delivered_ms = typed_at_ms WHERE delivered = 1;
     ALTER TABLE lines DROP COLUMN delivered;
     CREATE INDEX lines_by_time ON lines (peer, typed_at_ms);",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chat history {}: {reason}", path.display())]
    Sqlite {
        path: PathBuf,
        reason: rusqlite::Error,
    },
    #[error("chat history {}: {reason}", path.display())]
    Io {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("chat history {} has schema version {found}, newer than this natter's {known}; upgrade natter", path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
}

/// One line as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryLine {
    pub outgoing: bool,
    pub seq: u64,
    pub typed_at_ms: u64,
    pub text: String,
    /// Outgoing: when the peer confirmed it (`None`: not yet).
    pub delivered_ms: Option<u64>,
    /// Incoming: when it arrived here.
    pub arrived_ms: Option<u64>,
}

pub struct ChatStore {
    db: Connection,
    path: PathBuf,
    /// Keep every line; without it only what the conversation needs (its
    /// numbers and the unconfirmed lines) is kept.
    history: bool,
}

impl ChatStore {
    pub fn open(path: &Path, history: bool) -> Result<Self, StoreError> {
        let io = |reason| StoreError::Io {
            path: path.to_path_buf(),
            reason,
        };
        restrict(path).map_err(io)?;
        let db = Connection::open(path).map_err(|reason| StoreError::Sqlite {
            path: path.to_path_buf(),
            reason,
        })?;
        let mut store = Self {
            db,
            path: path.to_path_buf(),
            history,
        };
        store.migrate()?;
        Ok(store)
    }

    fn sqlite(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |reason| StoreError::Sqlite {
            path: self.path.clone(),
            reason,
        }
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let sqlite = |reason| StoreError::Sqlite {
            path: self.path.clone(),
            reason,
        };
        let version: i64 = self
            .db
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(sqlite)?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let transaction = self.db.transaction().map_err(sqlite)?;
            transaction.execute_batch(migration).map_err(sqlite)?;
            transaction
                .pragma_update(None, "user_version", index as i64 + 1)
                .map_err(sqlite)?;
            transaction.commit().map_err(sqlite)?;
        }
        Ok(())
    }

    /// Where the conversation with `peer` stands.
    pub fn resume(&self, peer: &PublicKey) -> Result<Resume, StoreError> {
        let key = peer.as_bytes().as_slice();
        let (next_seq, last_in) = self
            .db
            .query_row(
                "SELECT next_out, last_in FROM peers WHERE key = ?1",
                [key],
                |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .map_err(self.sqlite())?
            .unwrap_or((1, 0));
        let mut query = self
            .db
            .prepare(
                "SELECT seq, typed_at_ms, text FROM lines
                 WHERE peer = ?1 AND outgoing = 1 AND delivered_ms IS NULL ORDER BY seq",
            )
            .map_err(self.sqlite())?;
        let unconfirmed = query
            .query_map([key], |row| {
                Ok(OutLine {
                    seq: row.get::<_, i64>(0)? as u64,
                    typed_at_ms: row.get::<_, i64>(1)? as u64,
                    text: row.get(2)?,
                })
            })
            .map_err(self.sqlite())?
            .collect::<Result<_, _>>()
            .map_err(self.sqlite())?;
        Ok(Resume {
            next_seq,
            last_in,
            unconfirmed,
        })
    }

    /// A line typed here (kept until confirmed, or for good with history).
    pub fn typed(&self, peer: &PublicKey, line: &OutLine) -> Result<(), StoreError> {
        let key = peer.as_bytes().as_slice();
        self.db
            .execute(
                "INSERT INTO peers (key, next_out) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET next_out = max(next_out, ?2)",
                params![key, line.seq as i64 + 1],
            )
            .map_err(self.sqlite())?;
        self.db
            .execute(
                "INSERT INTO lines (peer, outgoing, seq, typed_at_ms, text) VALUES (?1, 1, ?2, ?3, ?4)",
                params![key, line.seq as i64, line.typed_at_ms as i64, line.text],
            )
            .map_err(self.sqlite())?;
        Ok(())
    }

    /// The peer confirmed every line up to `up_to`.
    pub fn delivered(&self, peer: &PublicKey, up_to: u64, now_ms: u64) -> Result<(), StoreError> {
        let key = peer.as_bytes().as_slice();
        let sql = if self.history {
            "UPDATE lines SET delivered_ms = ?3
             WHERE peer = ?1 AND outgoing = 1 AND seq <= ?2 AND delivered_ms IS NULL"
        } else {
            "DELETE FROM lines WHERE peer = ?1 AND outgoing = 1 AND seq <= ?2 AND ?3 >= 0"
        };
        self.db
            .execute(sql, params![key, up_to as i64, now_ms as i64])
            .map_err(self.sqlite())?;
        Ok(())
    }

    /// A new line of the peer's, number `seq`.
    pub fn received(
        &self,
        peer: &PublicKey,
        seq: u64,
        typed_at_ms: u64,
        text: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let key = peer.as_bytes().as_slice();
        let transaction = self.db.unchecked_transaction().map_err(self.sqlite())?;
        transaction
            .execute(
                "INSERT INTO peers (key, last_in) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET last_in = max(last_in, ?2)",
                params![key, seq as i64],
            )
            .map_err(self.sqlite())?;
        if self.history {
            transaction
                .execute(
                    "INSERT OR IGNORE INTO lines (peer, outgoing, seq, typed_at_ms, text, arrived_ms)
                     VALUES (?1, 0, ?2, ?3, ?4, ?5)",
                    params![key, seq as i64, typed_at_ms as i64, text, now_ms as i64],
                )
                .map_err(self.sqlite())?;
        }
        transaction.commit().map_err(self.sqlite())?;
        Ok(())
    }

    /// The lines with `peer` typed at or after `since_ms`, oldest first.
    pub fn lines(&self, peer: &PublicKey, since_ms: u64) -> Result<Vec<HistoryLine>, StoreError> {
        let mut query = self
            .db
            .prepare(
                "SELECT outgoing, seq, typed_at_ms, text, delivered_ms, arrived_ms FROM lines
                 WHERE peer = ?1 AND typed_at_ms >= ?2
                 ORDER BY coalesce(arrived_ms, typed_at_ms), outgoing, seq",
            )
            .map_err(self.sqlite())?;
        let lines = query
            .query_map(
                params![peer.as_bytes().as_slice(), since_ms as i64],
                |row| {
                    Ok(HistoryLine {
                        outgoing: row.get(0)?,
                        seq: row.get::<_, i64>(1)? as u64,
                        typed_at_ms: row.get::<_, i64>(2)? as u64,
                        text: row.get(3)?,
                        delivered_ms: row.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                        arrived_ms: row.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                    })
                },
            )
            .map_err(self.sqlite())?
            .collect::<Result<_, _>>()
            .map_err(self.sqlite())?;
        Ok(lines)
    }
}

/// Creates the file readable by its owner only, or makes it so.
fn restrict(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn line(seq: u64, text: &str) -> OutLine {
        OutLine {
            seq,
            typed_at_ms: 1000 * seq,
            text: text.into(),
        }
    }

    #[test]
    fn history_and_the_queue_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let bob = Identity::generate().public_key();
        {
            let store = ChatStore::open(&path, true).unwrap();
            store.typed(&bob, &line(1, "hi bob")).unwrap();
            store.typed(&bob, &line(2, "still there?")).unwrap();
            store.received(&bob, 1, 1500, "hi alice", 1600).unwrap();
            store.delivered(&bob, 1, 1700).unwrap();
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let store = ChatStore::open(&path, true).unwrap();
        let resume = store.resume(&bob).unwrap();
        assert_eq!(resume.next_seq, 3);
        assert_eq!(resume.last_in, 1);
        assert_eq!(resume.unconfirmed, [line(2, "still there?")]);
        let texts: Vec<(bool, String, Option<u64>)> = store
            .lines(&bob, 0)
            .unwrap()
            .into_iter()
            .map(|l| (l.outgoing, l.text, l.delivered_ms))
            .collect();
        assert_eq!(
            texts,
            [
                (true, "hi bob".into(), Some(1700)),
                (false, "hi alice".into(), None),
                (true, "still there?".into(), None)
            ]
        );
        assert_eq!(store.lines(&bob, 1500).unwrap().len(), 2);
    }

    #[test]
    fn without_history_only_the_queue_and_the_numbers_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let bob = Identity::generate().public_key();
        let store = ChatStore::open(&path, false).unwrap();
        store.typed(&bob, &line(1, "one")).unwrap();
        store.typed(&bob, &line(2, "two")).unwrap();
        store.received(&bob, 4, 0, "theirs", 0).unwrap();
        store.delivered(&bob, 1, 5).unwrap();
        let lines = store.lines(&bob, 0).unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].text, "two");
        let resume = store.resume(&bob).unwrap();
        assert_eq!((resume.next_seq, resume.last_in), (3, 4));
    }

    /// A database written by schema version 1 opens with this build: its
    /// lines are kept, the confirmed flag becomes a time, and it is usable.
    #[test]
    fn a_version_1_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let bob = Identity::generate().public_key();
        let key = bob.as_bytes().as_slice();
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(MIGRATIONS[0]).unwrap();
            db.pragma_update(None, "user_version", 1).unwrap();
            db.execute(
                "INSERT INTO peers (key, next_out, last_in) VALUES (?1, 3, 7)",
                [key],
            )
            .unwrap();
            db.execute(
                "INSERT INTO lines (peer, outgoing, seq, typed_at_ms, text, delivered)
                 VALUES (?1, 1, 1, 100, 'sent and confirmed', 1),
                        (?1, 1, 2, 200, 'still queued', 0),
                        (?1, 0, 7, 150, 'from bob', 0)",
                [key],
            )
            .unwrap();
        }
        let store = ChatStore::open(&path, true).unwrap();
        let version: i64 = store
            .db
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let resume = store.resume(&bob).unwrap();
        assert_eq!((resume.next_seq, resume.last_in), (3, 7));
        assert_eq!(
            resume.unconfirmed,
            [OutLine {
                seq: 2,
                typed_at_ms: 200,
                text: "still queued".into()
            }]
        );
        let lines = store.lines(&bob, 0).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].delivered_ms, Some(100));
        store.delivered(&bob, 2, 300).unwrap();
        assert!(store.resume(&bob).unwrap().unconfirmed.is_empty());
        // And a database from a newer natter is refused, not damaged.
        store.db.pragma_update(None, "user_version", 99).unwrap();
        drop(store);
        assert!(matches!(
            ChatStore::open(&path, true),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
