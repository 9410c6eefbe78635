//! Turns a tar entry name into a clean root-relative path, refusing the
//! names a hostile layer uses to write outside the image root.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("absolute path")]
    Absolute,
    #[error("path traversal (`..`)")]
    Traversal,
    #[error("name is not UTF-8")]
    NotUtf8,
    #[error("name contains a NUL byte")]
    Nul,
}

/// Clean components of an entry name: `./a//b/` becomes `["a", "b"]`; the
/// root itself gives an empty list.
pub fn components(raw: &[u8]) -> Result<Vec<&str>, PathError> {
    let name = std::str::from_utf8(raw).map_err(|_| PathError::NotUtf8)?;
    if name.contains('\0') {
        return Err(PathError::Nul);
    }
    if name.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let mut out = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(PathError::Traversal),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_and_refuses() {
        assert_eq!(components(b"./a//b/").unwrap(), vec!["a", "b"]);
        assert!(components(b"./").unwrap().is_empty());
        assert_eq!(components(b"/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(components(b"a/../../x"), Err(PathError::Traversal));
        assert_eq!(components(b"a/\xff"), Err(PathError::NotUtf8));
    }
}
