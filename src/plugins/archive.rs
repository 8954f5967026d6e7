//! Reading one file out of a plugin archive the way the reference does: zip first (GitHub
//! zipballs), then gzip'd tar (npm tarballs), with the file looked up under the archive's top
//! folder (the first entry's folder). Nothing is extracted to disk.

use std::io::{Cursor, Read};

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum ArchiveError {
    /// The reference's message when neither format can be read.
    #[error("Could not read archive as .zip or .tgz")]
    Unreadable,
}

/// The contents of `file` under the archive's root folder, `None` when absent.
pub fn file_from_archive(archive: &[u8], file: &str) -> Result<Option<String>, ArchiveError> {
    match file_from_zip(archive, file) {
        Ok(found) => Ok(found),
        Err(()) => file_from_tgz(archive, file).map_err(|()| ArchiveError::Unreadable),
    }
}

fn parent_folder(name: &str) -> &str {
    name.rfind('/').map(|index| &name[..index]).unwrap_or("")
}

fn file_from_zip(archive: &[u8], file: &str) -> Result<Option<String>, ()> {
    let mut zip = zip::ZipArchive::new(Cursor::new(archive)).map_err(|_| ())?;
    // An empty archive has no first entry; the reference fails on it and falls back to tar.
    let first = zip.by_index_raw(0).map_err(|_| ())?.name().to_string();
    let path =
        if first.ends_with('/') { format!("{first}{file}") } else { format!("{}/{file}", parent_folder(&first)) };
    let mut entry = match zip.by_name(&path) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(_) => return Err(()),
    };
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(|_| ())?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn file_from_tgz(archive: &[u8], file: &str) -> Result<Option<String>, ()> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut root: Option<String> = None;
    let mut found = None;
    for entry in tar.entries().map_err(|_| ())? {
        let mut entry = entry.map_err(|_| ())?;
        // GitHub tarballs start with a pax global header, which tar readers in Node skip.
        if matches!(entry.header().entry_type(), tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let root = root.get_or_insert_with(|| parent_folder(&name).to_string());
        if found.is_none() && name == format!("{root}/{file}") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|_| ())?;
            found = Some(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    // Every entry is read (as the reference's stream is), so a truncated archive is an error.
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn zip_with(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, contents) in entries {
            if name.ends_with('/') {
                writer.add_directory(name.trim_end_matches('/'), zip::write::SimpleFileOptions::default()).unwrap();
            } else {
                writer.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
                writer.write_all(contents.as_bytes()).unwrap();
            }
        }
        writer.finish().unwrap().into_inner()
    }

    fn tgz_with(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
        for (name, contents) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(contents.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, contents.as_bytes()).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn zip_with_top_folder_entry_or_file_first() {
        let archive = zip_with(&[("repo-abc/", ""), ("repo-abc/index.js", "code"), ("repo-abc/plugin.json", "{}")]);
        assert_eq!(file_from_archive(&archive, "index.js"), Ok(Some("code".into())));
        assert_eq!(file_from_archive(&archive, "missing.js"), Ok(None));
        let archive = zip_with(&[("testplugin/index.js", "code2"), ("testplugin/plugin.json", "{}")]);
        assert_eq!(file_from_archive(&archive, "index.js"), Ok(Some("code2".into())));
    }

    #[test]
    fn zip_with_top_level_files_finds_nothing_like_the_reference() {
        let archive = zip_with(&[("index.js", "code")]);
        assert_eq!(file_from_archive(&archive, "index.js"), Ok(None));
    }

    #[test]
    fn npm_tarball() {
        let archive = tgz_with(&[("package/package.json", "{}"), ("package/index.js", "npm code")]);
        assert_eq!(file_from_archive(&archive, "index.js"), Ok(Some("npm code".into())));
        assert_eq!(file_from_archive(&archive, "plugin.json"), Ok(None));
    }

    #[test]
    fn garbage_is_unreadable() {
        assert_eq!(file_from_archive(b"this is not a zip", "index.js"), Err(ArchiveError::Unreadable));
    }
}
