//! The user's long-term identity: an X25519 key pair kept in the config
//! directory. Its public half is what contacts pin and what people compare by
//! voice (the fingerprint); its secret half is the Noise static key.
//!
//! This module also holds the small file helpers that both it and
//! [`crate::contacts`] need: files only the owner may read, written so that a
//! crash never leaves half a file.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use blake2::{Blake2s256, Digest};
use rand::rngs::OsRng;
use rand::RngCore;
use x25519_dalek::StaticSecret;

/// The key file's name inside the config directory.
pub const KEY_FILE: &str = "identity.key";

/// Overrides the config directory (tests, several identities on one machine).
pub const HOME_VAR: &str = "NATTER_HOME";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot find a configuration directory (is HOME set?); set {HOME_VAR} to a directory natter may keep its key in")]
    NoConfigDir,
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("key file {} can be accessed by other users (mode {mode:03o}); fix it with `chmod 600 {}`", path.display(), path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("key file {} is malformed (expected 64 hex digits); move it away to make a new identity, which your contacts will have to pair with again", path.display())]
    MalformedKey { path: PathBuf },
}

/// The directory natter keeps its key and contacts in: `$NATTER_HOME` if set,
/// else the platform's config directory (`~/.config/natter` on Linux).
pub fn config_dir() -> Result<PathBuf, IdentityError> {
    config_dir_from(std::env::var_os(HOME_VAR))
}

// Apart from `config_dir` so tests need not change the process environment,
// which other threads may be reading.
fn config_dir_from(natter_home: Option<OsString>) -> Result<PathBuf, IdentityError> {
    if let Some(home) = natter_home.filter(|home| !home.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    directories::ProjectDirs::from("", "", "natter")
        .map(|dirs| dirs.config_dir().to_path_buf())
        .ok_or(IdentityError::NoConfigDir)
}

/// A long-term X25519 key pair. The secret is zeroed when dropped and never
/// shown by `Debug`.
pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
}

impl Identity {
    /// A fresh key pair from the OS random number generator.
    pub fn generate() -> Identity {
        Identity::from_secret(StaticSecret::random_from_rng(OsRng))
    }

    fn from_secret(secret: StaticSecret) -> Identity {
        let public = PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Identity { secret, public }
    }

    /// Loads `dir/identity.key`, creating the directory (mode 0700) and a new
    /// key (mode 0600) on first use. A key file others can access, or one
    /// that is not 64 hex digits, is refused rather than used or replaced:
    /// replacing it would silently change who this user is to their contacts.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let path = dir.join(KEY_FILE);
        match Identity::load(&path) {
            Err(IdentityError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            loaded => return loaded,
        }
        create_private_dir(dir).map_err(io_error("cannot create directory", dir))?;
        let identity = Identity::generate();
        let contents = format!("{}\n", hex::encode(identity.secret.as_bytes()));
        match write_private_file(&path, contents.as_bytes(), Existing::Keep) {
            Ok(()) => Ok(identity),
            // Another natter process created the key first: use that one, so
            // both processes are the same identity.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Identity::load(&path),
            Err(error) => Err(io_error("cannot write key file", &path)(error)),
        }
    }

    fn load(path: &Path) -> Result<Identity, IdentityError> {
        let file = File::open(path).map_err(io_error("cannot read key file", path))?;
        let metadata = file
            .metadata()
            .map_err(io_error("cannot read key file", path))?;
        if let Some(mode) = too_open(&metadata) {
            return Err(IdentityError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        // A key file is 65 bytes; reading a little more than that keeps a
        // huge file from being loaded whole and still finds it malformed.
        let mut contents = Vec::new();
        (&file)
            .take(256)
            .read_to_end(&mut contents)
            .map_err(io_error("cannot read key file", path))?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(contents.trim_ascii(), &mut bytes).map_err(|_| {
            IdentityError::MalformedKey {
                path: path.to_path_buf(),
            }
        })?;
        Ok(Identity::from_secret(StaticSecret::from(bytes)))
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The raw secret scalar, for `snow::Builder::local_private_key`.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io {
        action,
        path,
        source,
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// An X25519 public key: a user's identity as their contacts know it.
/// Written as 64 lowercase hex digits (`Display`, `FromStr`, serde).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed public key: expected 32 bytes, written as 64 hex digits")]
pub struct InvalidPublicKey;

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_hex(hex: &str) -> Result<PublicKey, InvalidPublicKey> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex, &mut bytes).map_err(|_| InvalidPublicKey)?;
        Ok(PublicKey(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Forty decimal digits in eight groups of five, for two people to read
    /// to each other and compare, e.g. `05871 33209 ...`.
    ///
    /// Digits rather than words: they are the same in every language, hard
    /// to mishear, and 40 of them carry about 133 bits, where words from the
    /// 256-word pairing list would need 16 words for 128 bits. Each group is
    /// four bytes of BLAKE2s("natter fingerprint v1" || key) taken modulo
    /// 100 000 (as in Signal's safety numbers); the modulo's bias is below
    /// 1 in 40 000 per group. At 133 bits, making a second key with the same
    /// fingerprint is out of reach, so a match means the same key.
    pub fn fingerprint(&self) -> String {
        let digest = Blake2s256::new()
            .chain_update(b"natter fingerprint v1")
            .chain_update(self.0)
            .finalize();
        digest
            .chunks_exact(4)
            .map(|chunk| {
                let group = u32::from_be_bytes(chunk.try_into().expect("chunks of 4"));
                format!("{:05}", group % 100_000)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl TryFrom<&[u8]> for PublicKey {
    type Error = InvalidPublicKey;

    /// For keys handed over as slices, such as snow's remote static key.
    fn try_from(bytes: &[u8]) -> Result<PublicKey, InvalidPublicKey> {
        bytes
            .try_into()
            .map(PublicKey)
            .map_err(|_| InvalidPublicKey)
    }
}

impl FromStr for PublicKey {
    type Err = InvalidPublicKey;

    fn from_str(hex: &str) -> Result<PublicKey, InvalidPublicKey> {
        PublicKey::from_hex(hex)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<PublicKey, D::Error> {
        let hex = String::deserialize(deserializer)?;
        PublicKey::from_hex(&hex).map_err(serde::de::Error::custom)
    }
}

/// Creates `dir` and any missing parents with mode 0700: it holds the secret
/// key and the list of whom this user talks to.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The file's permission bits if anyone but its owner may access it.
pub(crate) fn too_open(metadata: &Metadata) -> Option<u32> {
    let mode = metadata.mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// What [`write_private_file`] does when the file already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Replace it (saving a changed file).
    Replace,
    /// Leave it and fail with `AlreadyExists` (creating a key must never
    /// overwrite one another process has just created).
    Keep,
}

/// Writes `contents` to `path` with mode 0600 so that readers only ever see
/// the old file or the whole new one: the bytes go to a temporary file in the
/// same directory, created 0600 from the start (never briefly readable by
/// others), flushed to disk, then moved into place.
pub(crate) fn write_private_file(
    path: &Path,
    contents: &[u8],
    existing: Existing,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or(io::ErrorKind::InvalidInput)?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{:016x}.tmp", OsRng.next_u64()));
    let temp = dir.join(temp_name);
    let result = write_new(&temp, contents).and_then(|()| match existing {
        Existing::Replace => fs::rename(&temp, path),
        // A hard link, unlike rename, fails if the target exists.
        Existing::Keep => fs::hard_link(&temp, path),
    });
    // After a rename the temporary name is gone already; after a link or a
    // failure it must not be left behind.
    let _ = fs::remove_file(&temp);
    result?;
    // Makes the new directory entry itself durable.
    File::open(dir)?.sync_all()
}

fn write_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn first_use_creates_a_private_directory_and_key_that_later_loads_return() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("config").join("natter");
        let created = Identity::load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let loaded = Identity::load_or_create(&dir).unwrap();
        assert_eq!(loaded.public_key(), created.public_key());
        assert_eq!(loaded.secret_bytes(), created.secret_bytes());
        let entries: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn the_public_key_belongs_to_the_secret() {
        let identity = Identity::generate();
        let secret = StaticSecret::from(identity.secret_bytes());
        assert_eq!(
            identity.public_key().as_bytes(),
            x25519_dalek::PublicKey::from(&secret).as_bytes()
        );
        assert_ne!(
            Identity::generate().public_key(),
            identity.public_key(),
            "keys come from the OS random number generator"
        );
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        let temp = tempfile::tempdir().unwrap();
        Identity::load_or_create(temp.path()).unwrap();
        let path = temp.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = Identity::load_or_create(temp.path()).unwrap_err();
        assert!(matches!(
            error,
            IdentityError::InsecurePermissions { mode: 0o644, .. }
        ));
        assert!(error.to_string().contains("chmod 600"), "{error}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(Identity::load_or_create(temp.path()).is_err());
    }

    #[test]
    fn a_malformed_key_file_is_refused_and_left_alone() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join(KEY_FILE);
        for contents in ["not a key\n", "abcd\n", &"ab".repeat(33), "\u{ff}"] {
            write_private_file(&path, contents.as_bytes(), Existing::Replace).unwrap();
            let error = Identity::load_or_create(temp.path()).unwrap_err();
            assert!(
                matches!(error, IdentityError::MalformedKey { .. }),
                "{error}"
            );
            assert!(error.to_string().contains("move it away"), "{error}");
            assert_eq!(fs::read(&path).unwrap(), contents.as_bytes());
        }
        write_private_file(&path, &[0xff; 70], Existing::Replace).unwrap();
        let error = Identity::load_or_create(temp.path()).unwrap_err();
        assert!(
            matches!(error, IdentityError::MalformedKey { .. }),
            "{error}"
        );
    }

    #[test]
    fn keep_never_overwrites_and_replace_does() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("file");
        write_private_file(&path, b"one", Existing::Keep).unwrap();
        let error = write_private_file(&path, b"two", Existing::Keep).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_private_file(&path, b"three", Existing::Replace).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read_dir(temp.path()).unwrap().count(), 1);
    }

    #[test]
    fn natter_home_overrides_the_platform_config_dir() {
        let home = config_dir_from(Some("/tmp/natter-test-home".into())).unwrap();
        assert_eq!(home, Path::new("/tmp/natter-test-home"));
        for unset in [None, Some(OsString::new())] {
            let platform = config_dir_from(unset).unwrap();
            assert!(platform.ends_with("natter"), "{}", platform.display());
        }
    }

    #[test]
    fn public_keys_round_trip_through_hex_and_serde() {
        let key = Identity::generate().public_key();
        assert_eq!(key.to_hex().len(), 64);
        assert_eq!(PublicKey::from_hex(&key.to_hex()), Ok(key));
        assert_eq!(key.to_string().parse(), Ok(key));
        assert_eq!(format!("{key:?}"), format!("PublicKey({})", key.to_hex()));
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{}\"", key.to_hex()));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), key);
        assert!(serde_json::from_str::<PublicKey>("\"abcd\"").is_err());
        assert_eq!(PublicKey::try_from(&key.as_bytes()[..]), Ok(key));
        assert_eq!(PublicKey::try_from(&[0u8; 31][..]), Err(InvalidPublicKey));
        for bad in ["", "00", &"0".repeat(63), &"g".repeat(64), &"0".repeat(66)] {
            assert_eq!(PublicKey::from_hex(bad), Err(InvalidPublicKey), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_are_forty_digits_stable_and_distinct() {
        let zero = PublicKey::from_bytes([0; 32]);
        let fingerprint = zero.fingerprint();
        let groups: Vec<&str> = fingerprint.split(' ').collect();
        assert_eq!(groups.len(), 8);
        assert!(groups
            .iter()
            .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit())));
        // Pinned (computed independently with Python's hashlib): a change
        // here changes every user's fingerprint.
        assert_eq!(
            fingerprint,
            "73789 46224 62291 58442 41389 77115 18775 24378"
        );
        let fingerprints: HashSet<String> = (0..=255u8)
            .map(|i| PublicKey::from_bytes([i; 32]).fingerprint())
            .collect();
        assert_eq!(fingerprints.len(), 256);
    }

    #[test]
    fn debug_hides_the_secret() {
        let identity = Identity::generate();
        let shown = format!("{identity:?}");
        assert!(shown.contains(&identity.public_key().to_hex()));
        assert!(!shown.contains(&hex::encode(identity.secret_bytes())));
    }
}
