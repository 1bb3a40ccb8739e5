//! Small metadata files (recovery point, leader-epoch cache), written so that a crash leaves either
//! the old or the new version, never a mix, and checked with a CRC-32 when read.
//!
//! Format, text so an operator can read it:
//! ```text
//! cairn <kind> v1
//! <one line per value>
//! crc32 <8 hex digits: CRC-32 of every byte above this line>
//! ```

use std::io;
use std::path::Path;

use crate::error::Fatal;
use crate::fs::{Fs, OpenMode};

/// Writes `lines` to `dir/name`: tmp file, fsync, rename over the old file, fsync the directory.
pub fn write(
    fs: &dyn Fs,
    dir: &Path,
    name: &str,
    kind: &str,
    lines: &[String],
) -> Result<(), Fatal> {
    let mut text = format!("cairn {kind} v1\n");
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    let crc = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("crc32 {crc:08x}\n"));
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let io_err = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| Fatal::Io { op, path, source }
    };
    let file = fs
        .open(&tmp, OpenMode::Truncate)
        .map_err(io_err("create checkpoint", &tmp))?;
    file.write_all_at(text.as_bytes(), 0)
        .map_err(io_err("write checkpoint", &tmp))?;
    // A crash after the rename must find the new contents, not an empty file: sync them first.
    file.sync_all().map_err(io_err("sync checkpoint", &tmp))?;
    fs.rename(&tmp, &path)
        .map_err(io_err("rename checkpoint", &path))?;
    // The rename itself is only durable once the directory is synced.
    fs.sync_dir(dir).map_err(io_err("sync directory", dir))
}

/// Reads `dir/name`: `Ok(None)` if absent, an `InvalidData` error if it is not an intact checkpoint
/// of `kind`.
pub fn read(fs: &dyn Fs, dir: &Path, name: &str, kind: &str) -> io::Result<Option<Vec<String>>> {
    /// Checkpoints are tiny; a larger file is not one of ours.
    const CHECKPOINT_BYTES_MAX: u64 = 16 * 1024 * 1024;
    let path = dir.join(name);
    if !fs.exists(&path)? {
        return Ok(None);
    }
    let file = fs.open(&path, OpenMode::Existing)?;
    let len = file.file_len()?;
    let invalid =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {what}"));
    if len > CHECKPOINT_BYTES_MAX {
        return Err(invalid("too large"));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0)?;
    let text = String::from_utf8(buf).map_err(|_| invalid("not UTF-8"))?;
    let body_end = text
        .trim_end_matches('\n')
        .rfind('\n')
        .map(|idx| idx + 1)
        .ok_or_else(|| invalid("no crc line"))?;
    let (body, crc_line) = text.split_at(body_end);
    let stored = crc_line
        .trim_end()
        .strip_prefix("crc32 ")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or_else(|| invalid("bad crc line"))?;
    if stored != crc32fast::hash(body.as_bytes()) {
        return Err(invalid("crc mismatch"));
    }
    let mut lines = body.lines();
    if lines.next() != Some(&format!("cairn {kind} v1")) {
        return Err(invalid("unknown header"));
    }
    Ok(Some(lines.map(str::to_string).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::StdFs;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let fs = StdFs;
        assert_eq!(read(&fs, dir.path(), "cp", "test").unwrap(), None);
        write(&fs, dir.path(), "cp", "test", &["1 2".into(), "3 4".into()]).unwrap();
        assert_eq!(
            read(&fs, dir.path(), "cp", "test").unwrap(),
            Some(vec!["1 2".to_string(), "3 4".to_string()])
        );
        assert!(read(&fs, dir.path(), "cp", "other").is_err());
        let path = dir.path().join("cp");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[16] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(read(&fs, dir.path(), "cp", "test").is_err());
        std::fs::write(&path, "garbage").unwrap();
        assert!(read(&fs, dir.path(), "cp", "test").is_err());
    }
}
