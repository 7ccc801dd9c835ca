//! Files and directories private to the agent, whatever the umask.
//!
//! Guest disks, staging directories, QEMU runtime directories (its QMP
//! and migration sockets, serial log and stderr), the state directory and
//! its keys and logs hold a tenant's data or the agent's secrets. They are
//! created through these functions: directories `0700`, files `0600`, the
//! mode set exactly with `fchmod`/`chmod` after creation (a umask can only
//! remove bits, so a strange umask would otherwise leave files the agent
//! itself cannot use). Directories that exist already are left as they
//! are: they are the operator's (`--disk-dir /srv/disks`), not ours.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// `dir/name`, where `name` must be one file name: not empty, not `.` or
/// `..`, no `/`, no NUL. Every path the agent builds from a name an
/// operator or a peer chose goes through here, so it stays inside `dir`
/// even if a name type's own checks were ever loosened.
pub fn join_one(dir: &Path, name: &str) -> io::Result<PathBuf> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(n)), None) if n == name && !name.contains('\0') => Ok(dir.join(n)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        )),
    }
}

/// Mode of every directory the agent creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the agent creates.
pub const FILE_MODE: u32 = 0o600;

/// Bytes free for unprivileged use on the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Creates `path` and any missing parent, each `0700`; an existing
/// directory is left alone.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent)?;
    }
    match create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        other => other,
    }
}

/// Creates the directory `path` (`0700`); fails if it exists.
pub fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// Creates the new file `path` (`0600`) for reading and writing; fails if
/// anything is there, a symlink included.
pub fn create_new(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Creates or truncates the file `path` for writing, `0600` either way.
/// Only for files inside a directory the agent made private.
pub fn create_truncate(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Writes the new file `path` (`0600`) whole or not at all, durably: the
/// bytes go to `path.tmp` (a leftover of an earlier crash is replaced),
/// are fsynced, renamed to `path`, and the directory is fsynced. Fails if
/// `path` exists.
pub fn create_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    if path.symlink_metadata().is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", path.display()),
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = create_new(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir_of(path)
}

/// Fsyncs the directory holding `path`, so that a file created, renamed or
/// truncated there stays so after a crash.
pub fn sync_dir_of(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Opens the file `path` for reading and writing, creating it if absent,
/// and leaves it `0600` either way (a database the agent keeps across
/// restarts). Only for files inside a directory the agent made private.
pub fn open_or_create(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// The permission bits of `path` (for tests and checks).
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn only_one_file_name_joins() {
        let dir = Path::new("/state/qemu");
        assert_eq!(join_one(dir, "vm-1").unwrap(), dir.join("vm-1"));
        assert_eq!(join_one(dir, "a.img").unwrap(), dir.join("a.img"));
        for bad in [
            "", ".", "..", "a/b", "/etc", "a/", "./a", "../a", "a/..", "a\0b",
        ] {
            let e = join_one(dir, bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    /// Runs `f` under `mask`, then restores the umask. The umask is the
    /// process's: other tests of this binary creating files meanwhile
    /// get it too, which only ever removes bits from them.
    fn with_umask(mask: u32, f: impl FnOnce()) {
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
        f();
        rustix::process::umask(old);
    }

    #[test]
    fn modes_are_exact_under_a_lax_and_a_strict_umask() {
        for mask in [0o000, 0o077, 0o277] {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("a/b/c");
            let file = dir.join("disk.img");
            let other = dir.join("serial.log");
            with_umask(mask, || {
                create_dir_all(&dir).unwrap();
                create_new(&file).unwrap();
                create_truncate(&other).unwrap();
            });
            for d in ["a", "a/b", "a/b/c"] {
                assert_eq!(
                    mode_of(&root.path().join(d)).unwrap(),
                    0o700,
                    "{d} {mask:o}"
                );
            }
            assert_eq!(mode_of(&file).unwrap(), 0o600, "{mask:o}");
            assert_eq!(mode_of(&other).unwrap(), 0o600, "{mask:o}");
        }
    }

    #[test]
    fn an_existing_directory_is_the_operators_and_keeps_its_mode() {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), Permissions::from_mode(0o755)).unwrap();
        create_dir_all(root.path()).unwrap();
        assert_eq!(mode_of(root.path()).unwrap(), 0o755);
    }

    #[test]
    fn a_new_file_never_follows_or_replaces_what_is_there() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let link = root.path().join("disk.img");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_new(&link).is_err());
        assert!(create_new(&target).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
