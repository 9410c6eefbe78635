//! Turns a tar entry name into a clean root-relative path the way
//! containerd and Docker read member names: every name lives under the
//! image root, and only a name that climbs above the root is refused.

/// Linux's limit on a path, terminating NUL included: no name, link target
/// or resolved path may reach it (the kernel's unpacker could not create it).
pub const PATH_MAX: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path traversal (`..` above the root)")]
    Traversal,
    #[error("name is not UTF-8")]
    NotUtf8,
    #[error("name contains a NUL byte")]
    Nul,
    #[error("name is {0} bytes long, over the limit of {max}", max = PATH_MAX - 1)]
    TooLong(usize),
}

/// Clean components of an entry name: `./a//b/`, `/a/b` and `a/c/../b`
/// all become `["a", "b"]`; `/`, `./` and `.` give an empty list (the root
/// itself).
///
/// Cleaning is lexical, as Go's `filepath.Clean` does it for containerd:
/// `a/../b` is `b` even if the tree holds a symlink at `a`, because the
/// name is cleaned before it is looked up. Only a `..` with nothing left
/// to climb out of is an escape. Symlinks met on the way are resolved
/// later, inside the root, by the tree.
pub fn components(raw: &[u8]) -> Result<Vec<&str>, PathError> {
    let name = std::str::from_utf8(raw).map_err(|_| PathError::NotUtf8)?;
    if name.contains('\0') {
        return Err(PathError::Nul);
    }
    let mut out: Vec<&str> = Vec::new();
    let mut len = 0usize;
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                let gone = out.pop().ok_or(PathError::Traversal)?;
                len -= gone.len() + 1;
            }
            c => {
                out.push(c);
                len += c.len() + 1;
                if len >= PATH_MAX {
                    return Err(PathError::TooLong(len));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_like_containerd_and_refuses_climbing_out() {
        assert_eq!(components(b"./a//b/").unwrap(), vec!["a", "b"]);
        assert_eq!(components(b"/etc/passwd").unwrap(), vec!["etc", "passwd"]);
        assert_eq!(components(b"a/c/../b").unwrap(), vec!["a", "b"]);
        for root in [&b"./"[..], b"/", b".", b"", b"/./", b"a/.."] {
            assert!(components(root).unwrap().is_empty(), "{root:?}");
        }
        assert_eq!(components(b"a/../../x"), Err(PathError::Traversal));
        assert_eq!(components(b"/../etc"), Err(PathError::Traversal));
        assert_eq!(components(b"../x"), Err(PathError::Traversal));
        assert_eq!(components(b"a/\xff"), Err(PathError::NotUtf8));
        let long = "d/".repeat(2048);
        assert!(matches!(
            components(long.as_bytes()),
            Err(PathError::TooLong(_))
        ));
        // Long only before cleaning: fine.
        let dots = "./".repeat(100_000) + "x";
        assert_eq!(components(dots.as_bytes()).unwrap(), vec!["x"]);
    }
}
