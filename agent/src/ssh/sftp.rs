//! The `sftp` subsystem (OpenSSH's `scp` and `sftp` use it): file
//! operations on the guest's filesystem, paths relative to the user's home.

use std::collections::HashMap;
use std::fs::{self, File as FsFile, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;

use crate::user::Identity;

/// Largest read answered at once (OpenSSH asks for at most 256 KiB).
const MAX_READ: u32 = 256 * 1024;

enum Open {
    File(FsFile),
    /// A listing, sent whole on the first READDIR.
    Dir(Option<Vec<File>>),
}

pub struct Sftp {
    home: PathBuf,
    /// Owner for files the session creates (the agent itself runs as root).
    owner: Option<(u32, u32)>,
    handles: HashMap<String, Open>,
    next: u64,
}

impl Sftp {
    pub fn new(id: &Identity) -> Self {
        Sftp {
            home: PathBuf::from(&id.home),
            owner: (id.uid != 0).then_some((id.uid, id.gid)),
            handles: HashMap::new(),
            next: 0,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        if p.is_empty() {
            self.home.clone()
        } else {
            self.home.join(p) // an absolute `p` replaces the home
        }
    }

    fn add(&mut self, open: Open) -> String {
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), open);
        h
    }

    fn file(&self, handle: &str) -> Result<&FsFile, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f),
            _ => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }

    fn chown(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner {
            let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
        }
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".to_string(),
        language_tag: "en-US".to_string(),
    }
}

fn err(e: std::io::Error) -> StatusReply {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    code.with_message(e.to_string())
}

/// `.` and `..` removed without touching the filesystem (the path may not exist).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn set_attrs(path: &Path, file: Option<&FsFile>, a: &FileAttributes) -> std::io::Result<()> {
    if let Some(size) = a.size {
        match file {
            Some(f) => f.set_len(size)?,
            None => OpenOptions::new().write(true).open(path)?.set_len(size)?,
        }
    }
    if let Some(mode) = a.permissions {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if a.uid.is_some() || a.gid.is_some() {
        std::os::unix::fs::chown(path, a.uid, a.gid)?;
    }
    if let (Some(atime), Some(mtime)) = (a.atime, a.mtime) {
        let at = |s: u32| UNIX_EPOCH + Duration::from_secs(s.into());
        let times = fs::FileTimes::new()
            .set_accessed(at(atime))
            .set_modified(at(mtime));
        match file {
            Some(f) => f.set_times(times)?,
            None => FsFile::open(path)?.set_times(times)?,
        }
    }
    Ok(())
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = self.path(&path);
        let real = fs::canonicalize(&p).unwrap_or_else(|_| normalize(&p));
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = self.path(&filename);
        let existed = path.exists();
        let mut opts = OpenOptions::from(pflags);
        if let Some(mode) = attrs.permissions {
            opts.mode(mode & 0o7777);
        }
        let f = opts.open(&path).map_err(err)?;
        if !existed {
            self.chown(&path);
        }
        Ok(Handle {
            id,
            handle: self.add(Open::File(f)),
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let f = self.file(&handle)?;
        let mut buf = vec![0u8; len.min(MAX_READ) as usize];
        let n = f.read_at(&mut buf, offset).map_err(err)?;
        if n == 0 && !buf.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        buf.truncate(n);
        Ok(Data { id, data: buf })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        self.file(&handle)?
            .write_all_at(&data, offset)
            .map_err(err)?;
        Ok(ok(id))
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let m = fs::metadata(self.path(&path)).map_err(err)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&m),
        })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let m = fs::symlink_metadata(self.path(&path)).map_err(err)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&m),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let m = self.file(&handle)?.metadata().map_err(err)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&m),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        set_attrs(&self.path(&path), None, &attrs).map_err(err)?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let f = self.file(&handle)?;
        let path = fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            f.as_raw_fd()
        }))
        .map_err(err)?;
        set_attrs(&path, Some(f), &attrs).map_err(err)?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let dir = self.path(&path);
        let mut files = Vec::new();
        for entry in fs::read_dir(&dir).map_err(err)? {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            files.push(File::new(
                entry.file_name().to_string_lossy(),
                FileAttributes::from(&meta),
            ));
        }
        Ok(Handle {
            id,
            handle: self.add(Open::Dir(Some(files))),
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir(listing)) => match listing.take() {
                Some(files) if !files.is_empty() => Ok(Name { id, files }),
                _ => Err(StatusCode::Eof.into()),
            },
            _ => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let p = self.path(&path);
        fs::create_dir(&p).map_err(err)?;
        if let Some(mode) = attrs.permissions {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777)).map_err(err)?;
        }
        self.chown(&p);
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        fs::remove_dir(self.path(&path)).map_err(err)?;
        Ok(ok(id))
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        fs::remove_file(self.path(&filename)).map_err(err)?;
        Ok(ok(id))
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        fs::rename(self.path(&oldpath), self.path(&newpath)).map_err(err)?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = fs::read_link(self.path(&path)).map_err(err)?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh_sftp::server::Handler;

    #[test]
    fn normalizes_without_the_filesystem() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../..")), PathBuf::from("/"));
    }

    #[tokio::test]
    async fn writes_reads_stats_lists_renames_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sftp {
            home: dir.path().to_path_buf(),
            owner: None,
            handles: HashMap::new(),
            next: 0,
        };
        let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE;
        let h = s
            .open(1, "f".into(), flags, FileAttributes::default())
            .await
            .unwrap()
            .handle;
        s.write(2, h.clone(), 0, b"hello".to_vec()).await.unwrap();
        s.close(3, h).await.unwrap();
        let h = s
            .open(4, "f".into(), OpenFlags::READ, FileAttributes::default())
            .await
            .unwrap()
            .handle;
        assert_eq!(s.read(5, h.clone(), 1, 100).await.unwrap().data, b"ello");
        let eof = s.read(6, h.clone(), 5, 100).await.unwrap_err();
        assert_eq!(eof.status_code, StatusCode::Eof);
        assert_eq!(s.fstat(7, h).await.unwrap().attrs.size, Some(5));
        let real = s.realpath(8, ".".into()).await.unwrap();
        assert_eq!(
            real.files[0].filename,
            fs::canonicalize(dir.path()).unwrap().to_string_lossy()
        );
        s.rename(9, "f".into(), "g".into()).await.unwrap();
        let d = s.opendir(10, "".into()).await.unwrap().handle;
        let names: Vec<_> = s
            .readdir(11, d.clone())
            .await
            .unwrap()
            .files
            .into_iter()
            .map(|f| f.filename)
            .collect();
        assert_eq!(names, vec!["g".to_string()]);
        assert!(s.readdir(12, d).await.is_err());
        let missing = s.stat(13, "f".into()).await.unwrap_err();
        assert_eq!(missing.status_code, StatusCode::NoSuchFile);
        s.remove(14, "g".into()).await.unwrap();
        assert!(!dir.path().join("g").exists());
    }
}
