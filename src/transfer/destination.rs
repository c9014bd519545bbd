//! The receiving directory: what is there already, partial copies for
//! resuming, and writing without ever leaving it. Nothing is written
//! through a link: every directory on the way to a path is checked with
//! `symlink_metadata`, and files are opened with `O_NOFOLLOW`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use natter_wire::transfer::AbortKind;

use super::incoming::{Plan, PlannedFile, PlannedLink};
use super::names::RelativePath;
use super::outgoing::hasher_of_prefix;
use super::Refusal;

/// Appended to a file's name for its copy in progress, kept beside it.
pub const PARTIAL_SUFFIX: &str = ".natter-part";

/// What is already at a file's place, and what to do about it.
#[derive(Debug)]
pub enum FileState {
    /// Nothing, or a partial copy of `offset` bytes whose hash state is here.
    New {
        partial: Option<(u64, blake3::Hasher)>,
    },
    /// The same bytes are there already (the hash state after all of them).
    AlreadyThere(blake3::Hasher),
    /// A different file is there: replaced only if the user says so.
    Conflict,
}

pub struct Destination {
    root: PathBuf,
}

impl Destination {
    /// The receiving directory, made if missing.
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn target(&self, path: &RelativePath) -> PathBuf {
        path.under(&self.root)
    }

    pub fn partial(&self, path: &RelativePath) -> PathBuf {
        let mut partial = self.target(path).into_os_string();
        partial.push(PARTIAL_SUFFIX);
        PathBuf::from(partial)
    }

    /// Looks at every place the plan writes to, hashing what is there (a
    /// partial copy, or a file of the same size); refuses when a link lies
    /// on the way or something that cannot be replaced is in the way.
    pub fn survey(&self, plan: &Plan) -> Result<Vec<FileState>, Refusal> {
        for directory in &plan.directories {
            match self.inspect(directory)? {
                Some(metadata) if !metadata.is_dir() => {
                    return Err(in_the_way(directory, "a directory"))
                }
                _ => {}
            }
        }
        for link in &plan.links {
            if self.inspect(&link.path)?.is_some() && !self.link_is_there(link) {
                return Err(in_the_way(&link.path, "the same link"));
            }
        }
        plan.files
            .iter()
            .map(|file| self.survey_file(file))
            .collect()
    }

    fn survey_file(&self, file: &PlannedFile) -> Result<FileState, Refusal> {
        let io = |error| io_refusal(&self.target(&file.path), error);
        if let Some(metadata) = self.inspect(&file.path)? {
            if !metadata.is_file() {
                return Err(in_the_way(&file.path, "a file"));
            }
            if metadata.len() == file.size {
                let hasher = hasher_of_prefix(&self.target(&file.path), file.size).map_err(io)?;
                if hasher.finalize() == file.blake3 {
                    return Ok(FileState::AlreadyThere(hasher));
                }
            }
            return Ok(FileState::Conflict);
        }
        let partial = self.partial(&file.path);
        let partial = match fs::symlink_metadata(&partial) {
            Ok(metadata) if metadata.is_file() && metadata.len() <= file.size => {
                let hasher = hasher_of_prefix(&partial, metadata.len()).map_err(io)?;
                Some((metadata.len(), hasher))
            }
            _ => None,
        };
        Ok(FileState::New { partial })
    }

    fn link_is_there(&self, link: &PlannedLink) -> bool {
        fs::read_link(self.target(&link.path)).is_ok_and(|target| target == Path::new(&link.target))
    }

    /// What is at `path` (`None`: nothing), after checking that every
    /// directory on the way is a real directory, not a link.
    fn inspect(&self, path: &RelativePath) -> Result<Option<fs::Metadata>, Refusal> {
        for ancestor in path.ancestors() {
            let place = self.target(&ancestor);
            match fs::symlink_metadata(&place) {
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    return Err(Refusal::new(
                        AbortKind::SymlinkEscapes,
                        format!(
                            "{} is a link; natter does not write through links",
                            place.display()
                        ),
                    ))
                }
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => return Err(in_the_way(&ancestor, "a directory")),
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(io_refusal(&place, error)),
            }
        }
        match fs::symlink_metadata(self.target(path)) {
            Ok(metadata) => Ok(Some(metadata)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_refusal(&self.target(path), error)),
        }
    }

    /// Makes the plan's directories and every file's parents.
    pub fn make_directories(&self, plan: &Plan) -> Result<(), Refusal> {
        let files = plan.files.iter().map(|file| &file.path);
        let links = plan.links.iter().map(|link| &link.path);
        for path in files.chain(links) {
            for ancestor in path.ancestors() {
                self.make_directory(&ancestor)?;
            }
        }
        for directory in &plan.directories {
            self.make_directory(directory)?;
        }
        Ok(())
    }

    fn make_directory(&self, path: &RelativePath) -> Result<(), Refusal> {
        match self.inspect(path)? {
            Some(metadata) if metadata.is_dir() => Ok(()),
            Some(_) => Err(in_the_way(path, "a directory")),
            None => {
                fs::create_dir(self.target(path)).map_err(|e| io_refusal(&self.target(path), e))
            }
        }
    }

    /// Opens a file's partial copy, keeping its first `offset` bytes, ready
    /// to append.
    pub fn open_partial(&self, path: &RelativePath, offset: u64) -> Result<File, Refusal> {
        self.inspect(path)?;
        let partial = self.partial(path);
        let io = |error| io_refusal(&partial, error);
        let mut options = OpenOptions::new();
        options.write(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
        let mut file = options.open(&partial).map_err(io)?;
        file.set_len(offset).map_err(io)?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        Ok(file)
    }

    /// A whole, verified partial copy becomes the file (on disk first).
    pub fn put_in_place(&self, path: &RelativePath, file: File) -> Result<PathBuf, Refusal> {
        let target = self.target(path);
        file.sync_all().map_err(|e| io_refusal(&target, e))?;
        drop(file);
        self.inspect(path)?;
        fs::rename(self.partial(path), &target).map_err(|e| io_refusal(&target, e))?;
        Ok(target)
    }

    /// Removes a partial copy whose bytes turned out wrong.
    pub fn discard_partial(&self, path: &RelativePath) {
        let _ = fs::remove_file(self.partial(path));
    }

    /// Makes a link, checking on disk that its target's way never passes
    /// through another link (whose own target the text check cannot see).
    pub fn make_link(&self, link: &PlannedLink) -> Result<(), Refusal> {
        let escapes = || {
            Refusal::new(
                AbortKind::SymlinkEscapes,
                format!(
                    "the offer's link {} points to {:?}, through another link",
                    link.path, link.target
                ),
            )
        };
        let mut place: Vec<&str> = link.path.components()[..link.path.components().len() - 1]
            .iter()
            .map(String::as_str)
            .collect();
        for component in link.target.split('/') {
            match component {
                "" | "." => {}
                ".." => {
                    place.pop().ok_or_else(escapes)?;
                }
                name => {
                    place.push(name);
                    let on_disk = place.iter().fold(self.root.clone(), |p, c| p.join(c));
                    if fs::symlink_metadata(&on_disk).is_ok_and(|m| m.file_type().is_symlink()) {
                        return Err(escapes());
                    }
                }
            }
        }
        if self.inspect(&link.path)?.is_some() && self.link_is_there(link) {
            return Ok(());
        }
        let at = self.target(&link.path);
        symlink(&link.target, &at).map_err(|e| io_refusal(&at, e))
    }
}

#[cfg(unix)]
fn symlink(target: &str, at: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, at)
}

#[cfg(not(unix))]
fn symlink(_target: &str, at: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "cannot make the link {}: links are made on Unix only",
            at.display()
        ),
    ))
}

fn in_the_way(path: &RelativePath, wanted: &str) -> Refusal {
    Refusal::new(
        AbortKind::Exists,
        format!("{path} is already there, and is not {wanted}; it is left alone"),
    )
}

fn io_refusal(path: &Path, error: io::Error) -> Refusal {
    Refusal::new(AbortKind::Io, format!("{}: {error}", path.display()))
}
