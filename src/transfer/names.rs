//! Checking the paths and link targets an offer names, before anything is
//! written: pure functions of the text, so a hostile offer is refused whole.

use std::fmt;
use std::path::{Path, PathBuf};

use natter_wire::transfer::AbortKind;

use super::Refusal;

/// Longest file name component most file systems take, in bytes.
const MAX_COMPONENT: usize = 255;

/// A path from an offer that is relative, never climbs with `..`, and whose
/// every component is a plain name this platform can hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelativePath(Vec<String>);

impl RelativePath {
    /// Checks `text` (components separated by `/`).
    pub fn parse(text: &str) -> Result<Self, Refusal> {
        if is_absolute(text) {
            return Err(Refusal::new(
                AbortKind::AbsolutePath,
                format!("the offer names an absolute path, {text:?}"),
            ));
        }
        if text.is_empty() {
            return Err(invalid_name(text, "it is empty"));
        }
        let mut components = Vec::new();
        for component in text.split('/') {
            match component {
                ".." => {
                    return Err(Refusal::new(
                        AbortKind::PathTraversal,
                        format!("the offer names {text:?}, which climbs out of the receiving directory with \"..\""),
                    ))
                }
                "" | "." => return Err(invalid_name(text, "it has an empty or \".\" component")),
                name => {
                    check_component(name).map_err(|why| invalid_name(text, why))?;
                    components.push(name.to_owned());
                }
            }
        }
        Ok(Self(components))
    }

    /// Where this path lies under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(&self.0);
        path
    }

    /// The directories this path lies in, shortest first (not itself).
    pub fn ancestors(&self) -> impl Iterator<Item = RelativePath> + '_ {
        (1..self.0.len()).map(|len| Self(self.0[..len].to_vec()))
    }

    pub fn components(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for RelativePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

/// Checks that a link at `link` with this `target` stays inside the
/// receiving directory, by the text alone. (Whether the target passes
/// through another link is checked on disk, when the link is made.)
pub fn check_link_target(link: &RelativePath, target: &str) -> Result<(), Refusal> {
    let escapes = || {
        Refusal::new(
            AbortKind::SymlinkEscapes,
            format!(
                "the offer's link {link} points to {target:?}, outside the receiving directory"
            ),
        )
    };
    if target.is_empty() {
        return Err(invalid_name(target, "a link target is empty"));
    }
    if is_absolute(target) {
        return Err(escapes());
    }
    // Depth below the receiving directory, starting in the link's own.
    let mut depth = link.0.len() - 1;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1).ok_or_else(escapes)?,
            name => {
                check_component(name).map_err(|why| invalid_name(target, why))?;
                depth += 1;
            }
        }
    }
    Ok(())
}

fn is_absolute(text: &str) -> bool {
    // A drive (`C:`) or a leading backslash is absolute on Windows, and
    // refused everywhere, so an offer means the same on every platform.
    let bytes = text.as_bytes();
    text.starts_with('/')
        || text.starts_with('\\')
        || (bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':')
}

fn check_component(name: &str) -> Result<(), &'static str> {
    if name.len() > MAX_COMPONENT {
        return Err("a component is longer than 255 bytes");
    }
    // Control characters are legal in Unix names but would reach the
    // terminal when the offer is shown (an escape sequence can rewrite it).
    if name.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    // A backslash separates components on Windows.
    if name.contains('\\') {
        return Err("it contains a backslash");
    }
    if cfg!(windows) {
        if name.contains(['<', '>', ':', '"', '|', '?', '*']) {
            return Err("it contains a character Windows forbids in names");
        }
        if name.ends_with(['.', ' ']) {
            return Err("it ends with a dot or a space, which Windows drops");
        }
        let stem = name.split('.').next().unwrap_or(name).to_ascii_uppercase();
        let reserved = ["CON", "PRN", "AUX", "NUL"].contains(&stem.as_str())
            || ((stem.starts_with("COM") || stem.starts_with("LPT"))
                && stem.len() == 4
                && stem.as_bytes()[3].is_ascii_digit());
        if reserved {
            return Err("it is a device name on Windows");
        }
    }
    Ok(())
}

fn invalid_name(text: &str, why: &str) -> Refusal {
    Refusal::new(
        AbortKind::InvalidName,
        format!("the offer names {text:?}, which is not a valid file name here: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> Option<AbortKind> {
        RelativePath::parse(text).err().map(|refusal| refusal.kind)
    }

    #[test]
    fn plain_relative_paths_pass() {
        let path = RelativePath::parse("photos/2026/a b.jpg").unwrap();
        assert_eq!(path.to_string(), "photos/2026/a b.jpg");
        assert_eq!(
            path.under(Path::new("/out")),
            PathBuf::from("/out/photos/2026/a b.jpg")
        );
        let ancestors: Vec<String> = path.ancestors().map(|p| p.to_string()).collect();
        assert_eq!(ancestors, ["photos", "photos/2026"]);
        assert!(RelativePath::parse("..hidden").is_ok());
        assert!(RelativePath::parse("12:30 notes.txt").is_ok() || cfg!(windows));
    }

    #[test]
    fn each_hostile_path_is_refused_with_its_own_kind() {
        assert_eq!(kind("../x"), Some(AbortKind::PathTraversal));
        assert_eq!(kind("a/../../x"), Some(AbortKind::PathTraversal));
        assert_eq!(kind("/etc/passwd"), Some(AbortKind::AbsolutePath));
        assert_eq!(kind("C:/Windows"), Some(AbortKind::AbsolutePath));
        assert_eq!(kind("\\\\server\\share"), Some(AbortKind::AbsolutePath));
        assert_eq!(kind(""), Some(AbortKind::InvalidName));
        assert_eq!(kind("a//b"), Some(AbortKind::InvalidName));
        assert_eq!(kind("./a"), Some(AbortKind::InvalidName));
        assert_eq!(kind("a/"), Some(AbortKind::InvalidName));
        assert_eq!(kind("a\0b"), Some(AbortKind::InvalidName));
        assert_eq!(kind("evil\x1b[2Jname"), Some(AbortKind::InvalidName));
        assert_eq!(kind("a\\..\\b"), Some(AbortKind::InvalidName));
        assert_eq!(kind(&"x".repeat(256)), Some(AbortKind::InvalidName));
    }

    #[test]
    fn link_targets_must_stay_inside() {
        let link = RelativePath::parse("a/b/link").unwrap();
        assert!(check_link_target(&link, "c").is_ok());
        assert!(check_link_target(&link, "../../top.txt").is_ok());
        assert!(check_link_target(&link, "./../c/./d").is_ok());
        let escapes = |target| check_link_target(&link, target).unwrap_err().kind;
        assert_eq!(escapes("../../../x"), AbortKind::SymlinkEscapes);
        assert_eq!(escapes("/etc/passwd"), AbortKind::SymlinkEscapes);
        assert_eq!(escapes("c/../../../../x"), AbortKind::SymlinkEscapes);
        assert_eq!(escapes(""), AbortKind::InvalidName);
        let top = RelativePath::parse("link").unwrap();
        assert_eq!(
            check_link_target(&top, "..").unwrap_err().kind,
            AbortKind::SymlinkEscapes
        );
        assert!(check_link_target(&top, ".").is_ok());
    }
}
