//! The sending side's files: what a path offers (a file, or a directory
//! walked in name order), each file's BLAKE3, and where a resumed file
//! starts.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use natter_wire::transfer::{Offer, OfferEntry, ResumePoint, MAX_OFFER_ENTRIES};
use natter_wire::BoundedString;

use super::names::{check_link_target, RelativePath};

/// What one `natter send PATH` offers, and where each file is read from.
#[derive(Debug)]
pub struct Outgoing {
    pub offer: Offer,
    /// By file index: the local file, its size and hash as offered.
    pub files: Vec<SourceFile>,
    /// Entries left out, with the reason (special files, links that lead
    /// outside what is sent): told to the user, not sent.
    pub skipped: Vec<String>,
}

#[derive(Debug)]
pub struct SourceFile {
    pub local: PathBuf,
    /// As offered: `/`-separated, relative.
    pub name: String,
    pub size: u64,
    pub blake3: blake3::Hash,
}

#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error("cannot read {}: {reason}", path.display())]
    Io { path: PathBuf, reason: io::Error },
    #[error("{} has a name that is not UTF-8; natter sends UTF-8 names only", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{} names no file or directory natter can send", path.display())]
    Unsendable { path: PathBuf },
    #[error("more than {MAX_OFFER_ENTRIES} files and directories in one offer")]
    TooMany,
}

impl Outgoing {
    /// Walks `path` and hashes every file.
    pub fn gather(path: &Path) -> Result<Self, GatherError> {
        let io_error = |reason| GatherError::Io {
            path: path.to_path_buf(),
            reason,
        };
        // The name it arrives under: the last component, also for `.`.
        let absolute = fs::canonicalize(path).map_err(io_error)?;
        let name = absolute
            .file_name()
            .ok_or_else(|| GatherError::Unsendable {
                path: path.to_path_buf(),
            })?
            .to_str()
            .ok_or_else(|| GatherError::NotUtf8 {
                path: path.to_path_buf(),
            })?
            .to_owned();
        let mut outgoing = Outgoing {
            offer: Offer {
                entries: Vec::new(),
            },
            files: Vec::new(),
            skipped: Vec::new(),
        };
        // The path itself is followed if it is a link: the user named it.
        let metadata = fs::metadata(path).map_err(io_error)?;
        outgoing.add(path, name, &metadata)?;
        Ok(outgoing)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|file| file.size).sum()
    }

    fn add(
        &mut self,
        local: &Path,
        name: String,
        metadata: &fs::Metadata,
    ) -> Result<(), GatherError> {
        if self.offer.entries.len() >= MAX_OFFER_ENTRIES {
            return Err(GatherError::TooMany);
        }
        let io_error = |reason| GatherError::Io {
            path: local.to_path_buf(),
            reason,
        };
        let offered = BoundedString::new(name.clone()).map_err(|_| GatherError::Unsendable {
            path: local.to_path_buf(),
        })?;
        if metadata.is_file() {
            let blake3 = hash_prefix(local, u64::MAX).map_err(io_error)?;
            self.offer.entries.push(OfferEntry::File {
                path: offered,
                size: metadata.len(),
                blake3: *blake3.as_bytes(),
            });
            self.files.push(SourceFile {
                local: local.to_path_buf(),
                name,
                size: metadata.len(),
                blake3,
            });
        } else if metadata.is_dir() {
            self.offer
                .entries
                .push(OfferEntry::Directory { path: offered });
            let mut children = fs::read_dir(local)
                .map_err(io_error)?
                .map(|entry| entry.map(|entry| entry.path()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_error)?;
            children.sort();
            for child in children {
                let child_name = child.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                    GatherError::NotUtf8 {
                        path: child.clone(),
                    }
                })?;
                let child_name = format!("{name}/{child_name}");
                let child_metadata =
                    fs::symlink_metadata(&child).map_err(|reason| GatherError::Io {
                        path: child.clone(),
                        reason,
                    })?;
                self.add(&child, child_name, &child_metadata)?;
            }
        } else if metadata.is_symlink() {
            let target = fs::read_link(local).map_err(io_error)?;
            let target = target.to_str().ok_or_else(|| GatherError::NotUtf8 {
                path: local.to_path_buf(),
            })?;
            // A link the receiver would refuse is left out here, with the
            // reason, rather than failing the whole offer.
            let link = RelativePath::parse(&name).map_err(|_| GatherError::Unsendable {
                path: local.to_path_buf(),
            })?;
            match check_link_target(&link, target).map(|()| BoundedString::new(target)) {
                Ok(Ok(target)) => self.offer.entries.push(OfferEntry::Symlink {
                    path: offered,
                    target,
                }),
                _ => self
                    .skipped
                    .push(format!("{name}: a link to {target}, outside what is sent")),
            }
        } else {
            self.skipped
                .push(format!("{name}: not a file, directory or link"));
        }
        Ok(())
    }

    /// Where to start file `index` for the receiver that asked to resume at
    /// `point`: there, if its bytes so far are this file's, else at 0.
    pub fn start_offset(&self, index: usize, point: Option<&ResumePoint>) -> io::Result<u64> {
        let file = &self.files[index];
        let Some(point) = point.filter(|p| p.offset <= file.size && p.offset > 0) else {
            return Ok(0);
        };
        let prefix = hash_prefix(&file.local, point.offset)?;
        Ok(if *prefix.as_bytes() == point.prefix_blake3 {
            point.offset
        } else {
            0
        })
    }
}

/// BLAKE3 of the first `len` bytes of a file (all of it for `u64::MAX`).
pub fn hash_prefix(path: &Path, len: u64) -> io::Result<blake3::Hash> {
    Ok(hasher_of_prefix(path, len)?.finalize())
}

/// The hash state after reading the first `len` bytes of a file.
pub fn hasher_of_prefix(path: &Path, len: u64) -> io::Result<blake3::Hasher> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?.take(len))?;
    Ok(hasher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_offered_in_name_order_with_hashes_and_inside_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("b.txt"), b"bee").unwrap();
        fs::write(root.join("a.txt"), b"ay").unwrap();
        fs::write(root.join("sub/c.bin"), vec![7u8; 70_000]).unwrap();
        std::os::unix::fs::symlink("../a.txt", root.join("sub/to-a")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("out")).unwrap();
        let outgoing = Outgoing::gather(&root).unwrap();
        let names: Vec<&str> = outgoing.offer.entries.iter().map(|e| e.path()).collect();
        assert_eq!(
            names,
            [
                "tree",
                "tree/a.txt",
                "tree/b.txt",
                "tree/sub",
                "tree/sub/c.bin",
                "tree/sub/to-a"
            ]
        );
        assert_eq!(outgoing.files.len(), 3);
        assert_eq!(outgoing.total_bytes(), 2 + 3 + 70_000);
        assert_eq!(outgoing.files[2].blake3, blake3::hash(&vec![7u8; 70_000]));
        assert_eq!(outgoing.skipped.len(), 1, "{:?}", outgoing.skipped);
        assert!(outgoing.skipped[0].starts_with("tree/out: a link to /etc/hostname"));
    }

    #[test]
    fn a_resume_point_is_honoured_only_when_its_bytes_match() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"hello world").unwrap();
        let outgoing = Outgoing::gather(&path).unwrap();
        let point = |offset, prefix: &[u8]| ResumePoint {
            index: 0,
            offset,
            prefix_blake3: *blake3::hash(prefix).as_bytes(),
        };
        assert_eq!(outgoing.start_offset(0, None).unwrap(), 0);
        assert_eq!(
            outgoing
                .start_offset(0, Some(&point(6, b"hello ")))
                .unwrap(),
            6
        );
        assert_eq!(
            outgoing
                .start_offset(0, Some(&point(6, b"HELLO ")))
                .unwrap(),
            0
        );
        assert_eq!(outgoing.start_offset(0, Some(&point(99, b"x"))).unwrap(), 0);
        assert_eq!(
            outgoing
                .start_offset(0, Some(&point(11, b"hello world")))
                .unwrap(),
            11
        );
    }
}
