//! OCI whiteouts: `.wh.NAME` deletes NAME from lower layers and
//! `.wh..wh..opq` empties a directory of everything lower layers put there.

const PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout<'a> {
    /// Delete this sibling.
    Remove(&'a str),
    /// Hide everything lower layers put in the parent directory.
    Opaque,
    /// Another aufs metadata name (`.wh..wh.plnk` etc.): not content.
    Meta,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("whiteout names {0:?}, which escapes its directory")]
pub struct EscapingWhiteout(pub String);

/// Classifies the last component of an entry name.
pub fn parse(name: &str) -> Result<Option<Whiteout<'_>>, EscapingWhiteout> {
    let Some(target) = name.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    if name == OPAQUE {
        return Ok(Some(Whiteout::Opaque));
    }
    if target.starts_with(PREFIX) {
        return Ok(Some(Whiteout::Meta));
    }
    if target.is_empty() || target == "." || target == ".." {
        return Err(EscapingWhiteout(target.to_string()));
    }
    Ok(Some(Whiteout::Remove(target)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(parse("foo"), Ok(None));
        assert_eq!(parse(".wh.foo"), Ok(Some(Whiteout::Remove("foo"))));
        assert_eq!(parse(".wh..wh..opq"), Ok(Some(Whiteout::Opaque)));
        assert_eq!(parse(".wh..wh.plnk"), Ok(Some(Whiteout::Meta)));
        assert!(parse(".wh...").is_err());
        assert!(parse(".wh.").is_err());
    }
}
