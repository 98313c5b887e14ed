//! The files that hold a key (the master key, the upstream signing secret): written whole or
//! not at all, and readable by their owner alone.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use zeroize::Zeroizing;

/// Writes `text` and a newline through a temporary file (mode 0600), synced, then renamed into
/// place, and the rename synced: a crash leaves the old file or the new one, never half of one,
/// and once this returns the key is there for whatever comes to depend on it.
pub fn write(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    // A leftover (a crash, a copy) is not written into: it may be readable by others, or a link
    // to somewhere else. Made anew, the file has its mode from the start.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    write_new(&tmp, text)?;
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Writes `text` and a newline to `path` only if no file is there, however many processes try
/// at once (the gateway starting, `callgate upstream secret`): each makes its file whole under a
/// name of its own, then links it into place, which fails where a file already is. Whether
/// this one's file is the one in place: `false`, another was there first, and stands. Either
/// way the file in place is durable once this returns. On a filesystem without hard links
/// (FAT, some network and FUSE mounts) the file is written as `write` does, without that guard.
pub fn create(path: &Path, text: &str) -> io::Result<bool> {
    let tmp = path.with_extension(format!("new-{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let made = write_new(&tmp, text).and_then(|()| fs::hard_link(&tmp, path));
    if let Err(e) = fs::remove_file(&tmp) {
        // The key is in place (or another's is): a leftover copy is no reason to fail the start.
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %tmp.display(), error = %e, "could not remove a temporary key file; remove it by hand");
        }
    }
    let created = match made {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e)
            if matches!(e.kind(), io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied) && !path.exists() =>
        {
            write(path, text)?;
            return Ok(true);
        }
        Err(e) => return Err(e),
    };
    sync_parent(path)?;
    Ok(created)
}

/// Makes `path` (which must not exist) with mode 0600, holding `text` and a newline, synced.
fn write_new(path: &Path, text: &str) -> io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Makes the directory entries of `path`'s directory durable (a rename into it, say).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => fs::File::open(".")?.sync_all(),
    }
}

/// The file's text. One that other users may read (a restore or a copy under a loose umask)
/// is made private first, with a warning, since whoever could read it had the key; one that
/// cannot be made private is refused.
pub fn read(path: &Path) -> io::Result<Zeroizing<String>> {
    let text = Zeroizing::new(fs::read_to_string(path)?);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let private = fs::Permissions::from_mode(mode & 0o700);
            if let Err(e) = fs::set_permissions(path, private) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "other users may read it (mode {mode:o}) and it could not be made private ({e}): chmod 600 it"
                    ),
                ));
            }
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "other users could read this key file: it is now readable by its owner alone; whoever read it \
                 has the key, so rotate it if that may have happened"
            );
        }
    }
    Ok(text)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_key_file_is_written_private_and_one_others_may_read_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write(&path, "k1").unwrap();
        assert_eq!((mode(&path), fs::read_to_string(&path).unwrap()), (0o600, "k1\n".to_owned()));
        assert!(!path.with_extension("tmp").exists());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read(&path).unwrap().as_str(), "k1\n");
        assert_eq!(mode(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        read(&path).unwrap();
        assert_eq!(mode(&path), 0o400, "a private file is left as it is");
    }

    #[test]
    fn a_leftover_temporary_file_is_not_written_into() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        // Left world-readable, it kept its mode when written into, and the key with it.
        fs::write(path.with_extension("tmp"), "old").unwrap();
        fs::set_permissions(path.with_extension("tmp"), fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, "k2").unwrap();
        assert_eq!((mode(&path), fs::read_to_string(&path).unwrap()), (0o600, "k2\n".to_owned()));
        // A link in its place is replaced, not followed.
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, path.with_extension("tmp")).unwrap();
        write(&path, "k3").unwrap();
        assert!(!elsewhere.exists());
        assert_eq!((mode(&path), fs::read_to_string(&path).unwrap()), (0o600, "k3\n".to_owned()));
    }

    #[test]
    fn a_file_is_created_once_whoever_tries_at_the_same_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let made: Vec<bool> = std::thread::scope(|s| {
            let tries: Vec<_> = (0..8)
                .map(|i| {
                    let path = &path;
                    s.spawn(move || create(path, &format!("s{i}")).unwrap())
                })
                .collect();
            tries.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(made.iter().filter(|m| **m).count(), 1, "{made:?}");
        let first = made.iter().position(|m| *m).unwrap();
        assert_eq!((mode(&path), fs::read_to_string(&path).unwrap()), (0o600, format!("s{first}\n")));
        assert!(!create(&path, "later").unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("s{first}\n"), "what was there stands");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("secret")], "no temporary file is left");
    }
}
