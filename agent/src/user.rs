//! The OCI `User` field (`name`, `uid`, `name:group`, `uid:gid`) resolved
//! against the image's /etc/passwd and /etc/group.

use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub name: String,
}

/// Resolves `spec` with the files under `root` (the guest's `/`).
pub fn resolve(spec: Option<&str>, root: &Path) -> Result<Identity, UserError> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    let spec = spec.unwrap_or("0");
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let by_name = entries.iter().find(|f| f[0] == user);
    let (uid, mut gid, home, name) = match (by_name, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse().unwrap_or(0),
            f[3].parse().unwrap_or(0),
            f[5].to_string(),
            f[0].to_string(),
        ),
        (None, Ok(uid)) => match entries.iter().find(|f| f[2].parse() == Ok(uid)) {
            Some(f) => (
                uid,
                f[3].parse().unwrap_or(uid),
                f[5].to_string(),
                f[0].to_string(),
            ),
            // A numeric uid need not exist in the image, as in Docker.
            None => (uid, uid, "/".to_string(), uid.to_string()),
        },
        (None, Err(_)) => return Err(UserError::UnknownUser(user.to_string())),
    };
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        };
    }
    Ok(Identity {
        uid,
        gid,
        home,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        d
    }

    #[test]
    fn names_numbers_and_groups() {
        let r = root();
        let id = |s: Option<&str>| resolve(s, r.path());
        assert_eq!(id(None).unwrap().uid, 0);
        let app = id(Some("app")).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.home.as_str()),
            (1000, 1001, "/home/app")
        );
        assert_eq!(id(Some("1000")).unwrap().name, "app");
        assert_eq!(id(Some("app:staff")).unwrap().gid, 50);
        assert_eq!(
            id(Some("4242:7")).unwrap(),
            Identity {
                uid: 4242,
                gid: 7,
                home: "/".into(),
                name: "4242".into()
            }
        );
        assert_eq!(
            id(Some("nobody")),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            id(Some("app:wheel")),
            Err(UserError::UnknownGroup("wheel".into()))
        );
    }
}
