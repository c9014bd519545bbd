//! Saved peers: names for public keys the user has paired with once, so that
//! later sessions can meet without a pairing code and check that the peer
//! still has the same key (pinning). Kept in `contacts.json` in the config
//! directory, readable only by its owner: it says whom the user talks to.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use blake2::{Blake2s256, Digest};
use serde::{Deserialize, Serialize};

use crate::identity::{create_private_dir, too_open, write_private_file, Existing, PublicKey};

/// The contacts file's name inside the config directory.
pub const CONTACTS_FILE: &str = "contacts.json";

/// The file format's version; a file of another version is refused rather
/// than misread or overwritten.
const VERSION: u32 = 1;

const MAX_NAME_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ContactsError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("contacts file {} can be accessed by other users (mode {mode:03o}); fix it with `chmod 600 {}`", path.display(), path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("contacts file {} is malformed ({reason}); fix it by hand or move it away", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("contacts file {} has format version {version}, this natter reads version {VERSION}; upgrade natter", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("invalid contact name {name:?}: use 1 to {MAX_NAME_LEN} letters, digits, '_' or '-'")]
    InvalidName { name: String },
    #[error("contact {name:?} is already saved with a different key; if their key really changed, remove the contact first")]
    KeyConflict { name: String },
    #[error("no contact named {name:?}")]
    UnknownContact { name: String },
}

/// The saved contacts, loaded from and saved to one directory. Changes stay
/// in memory until [`Contacts::save`]. Two processes saving at once do not
/// corrupt the file, but the last save wins.
#[derive(Debug, Clone)]
pub struct Contacts {
    path: PathBuf,
    file: ContactsFile,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactsFile {
    version: u32,
    /// A BTreeMap so the file and `iter` are sorted by name.
    contacts: BTreeMap<String, PublicKey>,
    #[serde(default)]
    last_paired: Option<PublicKey>,
}

impl Contacts {
    /// Loads `dir/contacts.json`; a missing file (or directory) is an empty
    /// list. A file others can access or that does not parse is refused.
    pub fn load(dir: &Path) -> Result<Contacts, ContactsError> {
        let path = dir.join(CONTACTS_FILE);
        let file = match read_private(&path) {
            Ok(bytes) => parse(&path, &bytes)?,
            Err(ContactsError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                ContactsFile {
                    version: VERSION,
                    contacts: BTreeMap::new(),
                    last_paired: None,
                }
            }
            Err(error) => return Err(error),
        };
        Ok(Contacts { path, file })
    }

    /// Saves `key` as `name`. Saving the same key under the same name again
    /// is fine; a different key under a saved name is refused, because a
    /// silently replaced key would defeat pinning.
    pub fn add(&mut self, name: &str, key: PublicKey) -> Result<(), ContactsError> {
        check_name(name)?;
        match self.file.contacts.get(name) {
            Some(saved) if *saved != key => Err(ContactsError::KeyConflict { name: name.into() }),
            _ => {
                self.file.contacts.insert(name.into(), key);
                Ok(())
            }
        }
    }

    /// Forgets `name`, returning the key it had.
    pub fn remove(&mut self, name: &str) -> Result<PublicKey, ContactsError> {
        self.file
            .contacts
            .remove(name)
            .ok_or_else(|| ContactsError::UnknownContact { name: name.into() })
    }

    pub fn get(&self, name: &str) -> Option<PublicKey> {
        self.file.contacts.get(name).copied()
    }

    /// The contacts sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, PublicKey)> + '_ {
        self.file
            .contacts
            .iter()
            .map(|(name, key)| (name.as_str(), *key))
    }

    /// Remembers the peer of the last successful pairing, so that it can be
    /// saved by name afterwards without typing its key.
    pub fn set_last_paired(&mut self, key: PublicKey) {
        self.file.last_paired = Some(key);
    }

    pub fn last_paired(&self) -> Option<PublicKey> {
        self.file.last_paired
    }

    /// Writes the contacts back, creating the directory (0700) if needed.
    /// The file (0600) is replaced atomically, so a crash leaves the old
    /// list or the new one, never a mix.
    pub fn save(&self) -> Result<(), ContactsError> {
        let io_error = |action| {
            move |source| ContactsError::Io {
                action,
                path: self.path.clone(),
                source,
            }
        };
        if let Some(dir) = self.path.parent() {
            create_private_dir(dir).map_err(io_error("cannot create the directory of"))?;
        }
        let mut json = serde_json::to_string_pretty(&self.file).expect("contacts serialize");
        json.push('\n');
        write_private_file(&self.path, json.as_bytes(), Existing::Replace)
            .map_err(io_error("cannot write contacts file"))
    }
}

/// Checks that `name` can be a contact's name: 1 to 32 ASCII letters,
/// digits, `_` or `-`, so it is safe in a terminal and as a command-line
/// argument.
pub fn check_name(name: &str) -> Result<(), ContactsError> {
    let valid = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ContactsError::InvalidName { name: name.into() })
    }
}

/// The rendezvous room two contacts meet in. Both sides compute the same
/// room (the keys are sorted), and the server sees only a hash: it cannot
/// tell whose keys these are, though it can see the same pair meet again.
/// The domain-separation prefix keeps it unrelated to any other hash of the
/// keys; 16 bytes make rooms of different pairs collide practically never.
pub fn meeting_room(a: &PublicKey, b: &PublicKey) -> Vec<u8> {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let digest = Blake2s256::new()
        .chain_update(b"natter contact room v1")
        .chain_update(low.as_bytes())
        .chain_update(high.as_bytes())
        .finalize();
    format!("c-{}", hex::encode(&digest[..16])).into_bytes()
}

fn read_private(path: &Path) -> Result<Vec<u8>, ContactsError> {
    let io_error = |source| ContactsError::Io {
        action: "cannot read contacts file",
        path: path.to_path_buf(),
        source,
    };
    let metadata = fs::metadata(path).map_err(io_error)?;
    if let Some(mode) = too_open(&metadata) {
        return Err(ContactsError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path).map_err(io_error)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<ContactsFile, ContactsError> {
    let malformed = |reason: String| ContactsError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    // The version first, so a newer format is reported as such rather than
    // as malformed.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let Versioned { version } =
        serde_json::from_slice(bytes).map_err(|error| malformed(error.to_string()))?;
    if version != VERSION {
        return Err(ContactsError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let file: ContactsFile =
        serde_json::from_slice(bytes).map_err(|error| malformed(error.to_string()))?;
    for name in file.contacts.keys() {
        check_name(name).map_err(|error| malformed(error.to_string()))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_bytes([byte; 32])
    }

    #[test]
    fn a_missing_file_is_an_empty_list() {
        let temp = tempfile::tempdir().unwrap();
        let contacts = Contacts::load(&temp.path().join("not-yet")).unwrap();
        assert_eq!(contacts.iter().count(), 0);
        assert_eq!(contacts.last_paired(), None);
    }

    #[test]
    fn contacts_survive_a_save_and_load_sorted_by_name() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("natter");
        let mut contacts = Contacts::load(&dir).unwrap();
        contacts.add("zoe", key(1)).unwrap();
        contacts.add("Alice_2", key(2)).unwrap();
        contacts.add("bob-the-builder", key(3)).unwrap();
        contacts.set_last_paired(key(3));
        contacts.save().unwrap();

        let path = dir.join(CONTACTS_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let loaded = Contacts::load(&dir).unwrap();
        let names: Vec<&str> = loaded.iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["Alice_2", "bob-the-builder", "zoe"]);
        assert_eq!(loaded.get("zoe"), Some(key(1)));
        assert_eq!(loaded.get("nobody"), None);
        assert_eq!(loaded.last_paired(), Some(key(3)));
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file is left"
        );
    }

    #[test]
    fn a_name_keeps_its_key_until_removed() {
        let mut contacts = Contacts::load(Path::new("/nonexistent")).unwrap();
        contacts.add("alice", key(1)).unwrap();
        contacts.add("alice", key(1)).unwrap();
        let error = contacts.add("alice", key(2)).unwrap_err();
        assert!(matches!(error, ContactsError::KeyConflict { .. }));
        assert!(error.to_string().contains("different key"), "{error}");
        assert_eq!(contacts.get("alice"), Some(key(1)));

        assert_eq!(contacts.remove("alice").unwrap(), key(1));
        assert!(matches!(
            contacts.remove("alice"),
            Err(ContactsError::UnknownContact { .. })
        ));
        contacts.add("alice", key(2)).unwrap();
        assert_eq!(contacts.get("alice"), Some(key(2)));
    }

    #[test]
    fn names_are_short_and_plain() {
        let mut contacts = Contacts::load(Path::new("/nonexistent")).unwrap();
        for good in ["a", "Z9", "under_score", "dash-ed", &"x".repeat(32)] {
            contacts.add(good, key(1)).unwrap();
        }
        for bad in ["", "with space", "dot.ted", "ünï", "a/b", &"x".repeat(33)] {
            let error = contacts.add(bad, key(1)).unwrap_err();
            assert!(
                matches!(error, ContactsError::InvalidName { .. }),
                "{bad:?}"
            );
            assert!(error.to_string().contains("letters, digits"), "{error}");
        }
    }

    #[test]
    fn a_file_others_can_read_is_refused_with_the_fix() {
        let temp = tempfile::tempdir().unwrap();
        let mut contacts = Contacts::load(temp.path()).unwrap();
        contacts.add("alice", key(1)).unwrap();
        contacts.save().unwrap();
        let path = temp.path().join(CONTACTS_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = Contacts::load(temp.path()).unwrap_err();
        assert!(matches!(
            error,
            ContactsError::InsecurePermissions { mode: 0o644, .. }
        ));
        assert!(error.to_string().contains("chmod 600"), "{error}");
    }

    #[test]
    fn malformed_and_newer_files_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join(CONTACTS_FILE);
        let write = |json: &str| {
            write_private_file(&path, json.as_bytes(), Existing::Replace).unwrap();
            Contacts::load(temp.path()).unwrap_err()
        };
        let good_key = key(1).to_hex();
        for json in [
            "not json".to_string(),
            r#"{"contacts": {}}"#.to_string(),
            r#"{"version": 1, "contacts": {"alice": "abcd"}}"#.to_string(),
            format!(r#"{{"version": 1, "contacts": {{"bad name": "{good_key}"}}}}"#),
        ] {
            let error = write(&json);
            assert!(
                matches!(error, ContactsError::Malformed { .. }),
                "{json}: {error}"
            );
            assert!(error.to_string().contains("move it away"), "{error}");
        }
        let error = write(r#"{"version": 2, "something": "else"}"#);
        assert!(matches!(
            error,
            ContactsError::UnsupportedVersion { version: 2, .. }
        ));

        write_private_file(
            &path,
            format!(r#"{{"version": 1, "contacts": {{"alice": "{good_key}"}}}}"#).as_bytes(),
            Existing::Replace,
        )
        .unwrap();
        let contacts = Contacts::load(temp.path()).unwrap();
        assert_eq!(contacts.get("alice"), Some(key(1)));
        assert_eq!(contacts.last_paired(), None);
    }

    #[test]
    fn meeting_rooms_are_symmetric_short_and_distinct() {
        let room = meeting_room(&key(1), &key(2));
        assert_eq!(room, meeting_room(&key(2), &key(1)));
        // Pinned (computed independently with Python's hashlib): both sides
        // of every pair must keep computing the same room.
        assert_eq!(room, b"c-63440d522ddfc4103e69250d83d45324");
        assert!(room.starts_with(b"c-"));
        assert_eq!(room.len(), 34);
        assert!(room.len() <= natter_wire::MAX_ROOM_CODE);
        assert_ne!(room, meeting_room(&key(1), &key(3)));
        assert_ne!(room, meeting_room(&key(3), &key(2)));
    }
}
