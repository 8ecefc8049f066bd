//! Where checkpoints and final models go: one interface over the local file
//! system, S3 (and S3-compatible stores), GCS and Azure, through the
//! `object_store` crate. Credentials and endpoints come from the standard
//! environment of each store (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...).
//! Objects above the part size go up as multipart uploads.
//! Shared by the workers (checkpoints, final models) and the coordinator
//! (the registry hand-off reads the final model; the built-in registry
//! lives in a folder of its own).

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

/// Objects larger than this are uploaded in parts of this size.
pub const DEFAULT_PART_BYTES: usize = 8 << 20;
/// Environment variable that overrides [`DEFAULT_PART_BYTES`].
pub const PART_BYTES_ENV: &str = "FLOTILLA_UPLOAD_PART_BYTES";
/// S3 refuses parts smaller than this (but the last).
pub const S3_MIN_PART_BYTES: usize = 5 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{what} {location}: {source}")]
    Store { what: &'static str, location: String, source: object_store::Error },
    #[error("storage URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("{what} {location}: {source}")]
    Local { what: &'static str, location: String, source: std::io::Error },
    /// A name (from a listing, a manifest or a job) that would leave its
    /// folder: absolute, or with a `..` segment.
    #[error("{name:?} in {folder}: {message}")]
    Name { folder: String, name: String, message: String },
}

/// Why `name`, a path inside a folder, could leave it (or is no name at
/// all): empty, absolute, a `..` segment or a NUL byte.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("an empty name")
    } else if name.starts_with('/') || name.starts_with('\\') {
        Some("an absolute path where a name inside the folder is expected")
    } else if name.split(['/', '\\']).any(|s| s == "..") {
        Some("a `..` segment would leave the folder")
    } else if name.contains('\0') {
        Some("a NUL byte")
    } else {
        None
    }
}

/// Whether `location` (an absolute path, `file:///abs`, or an object-store
/// URL) lies inside one of `roots` (same forms); no roots: anywhere. The
/// comparison is by path segments, after `file://` is dropped and trailing
/// slashes trimmed; a location with a `..` segment lies nowhere.
pub fn within_roots(location: &str, roots: &[String]) -> bool {
    if roots.is_empty() {
        return true;
    }
    let norm = |s: &str| -> String {
        let s = s.strip_prefix("file://").unwrap_or(s);
        let s = s.trim_end_matches('/');
        if s.is_empty() {
            "/".into()
        } else {
            s.to_string()
        }
    };
    let loc = norm(location);
    if loc.split('/').any(|s| s == "..") {
        return false;
    }
    roots.iter().map(|r| norm(r)).any(|root| {
        root == "/" && loc.starts_with('/')
            || loc == root
            || loc.strip_prefix(&root).is_some_and(|r| r.starts_with('/'))
    })
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::Store { source: object_store::Error::NotFound { .. }, .. })
    }
}

/// A folder in some object store.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// The folder inside the store.
    prefix: String,
    /// The URL (or absolute path) the folder was opened from.
    url: String,
    part_bytes: usize,
    /// Whether the store is the local file system.
    local: bool,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.url)
    }
}

/// Upload statistics of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upload {
    pub bytes: usize,
    /// 0 for a single-request upload.
    pub parts: usize,
}

impl Storage {
    /// Opens `url`: an absolute path, `file:///abs`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix`.
    pub fn open(url: &str) -> Result<Storage, StorageError> {
        let bad = |message: String| StorageError::Url { url: url.to_string(), message };
        let url = url.trim_end_matches('/');
        if url.split(['/', '\\']).any(|s| s == "..") {
            return Err(bad("a `..` segment; name the folder without it".into()));
        }
        let local = url.strip_prefix("file://").unwrap_or(url);
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if local.starts_with('/') {
            (Arc::new(object_store::local::LocalFileSystem::new()), local.trim_start_matches('/').to_string())
        } else if let Some((scheme, rest)) = url.split_once("://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("needs a bucket".into()));
            }
            let root = format!("{scheme}://{bucket}");
            let store: Arc<dyn ObjectStore> = match scheme {
                "s3" => Arc::new(
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_url(root)
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                ),
                "gs" => Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(root)
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                ),
                "az" => Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(root)
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                ),
                other => return Err(bad(format!("unsupported scheme {other}://"))),
            };
            (store, prefix.to_string())
        } else {
            return Err(bad("use an absolute path or a URL".into()));
        };
        let local = local.starts_with('/');
        let part_bytes = std::env::var(PART_BYTES_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_PART_BYTES);
        let s3 = url.starts_with("s3://");
        let mut storage = Storage { store, prefix, url: url.to_string(), part_bytes: 1, local };
        storage = storage.with_part_bytes(part_bytes);
        if s3 {
            storage.part_bytes = storage.part_bytes.max(S3_MIN_PART_BYTES);
        }
        Ok(storage)
    }

    pub fn with_part_bytes(mut self, part_bytes: usize) -> Storage {
        self.part_bytes = part_bytes.max(1);
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The sub-folder `name`.
    pub fn child(&self, name: &str) -> Storage {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) };
        Storage {
            store: self.store.clone(),
            prefix,
            url: format!("{}/{name}", self.url),
            part_bytes: self.part_bytes,
            local: self.local,
        }
    }

    /// The object `name` of this folder; refused when the name (or the
    /// folder, made by `child`) would leave it.
    fn path(&self, name: &str) -> Result<ObjPath, StorageError> {
        let bad = |name: &str, message: &str| StorageError::Name {
            folder: self.url.clone(),
            name: name.chars().take(256).collect(),
            message: message.to_string(),
        };
        if let Some(message) = name_problem(name) {
            return Err(bad(name, message));
        }
        if self.prefix.split('/').any(|s| s == "..") {
            return Err(bad(&self.prefix, "a `..` segment would leave the folder"));
        }
        Ok(ObjPath::from(if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) }))
    }

    fn err(&self, what: &'static str, name: &str) -> impl FnOnce(object_store::Error) -> StorageError {
        let location = format!("{}/{name}", self.url);
        move |source| StorageError::Store { what, location, source }
    }

    /// Writes `name` whole (readers never see part of it); large objects go
    /// up in parts.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<Upload, StorageError> {
        self.put_pieces(name, vec![bytes::Bytes::from(bytes)]).await
    }

    /// Writes the concatenation of `pieces` as `name`, whole, without joining
    /// them in memory first. On the local file system: a temporary file,
    /// written and flushed to disk, then renamed. Elsewhere: one request up
    /// to the part size, a multipart upload above it.
    pub async fn put_pieces(&self, name: &str, pieces: Vec<bytes::Bytes>) -> Result<Upload, StorageError> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        if self.local {
            let path = std::path::PathBuf::from(format!("/{}", self.path(name)?));
            let location = format!("{}/{name}", self.url);
            tokio::task::spawn_blocking(move || write_file(&path, &pieces))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|source| StorageError::Local { what: "write", location, source })?;
            return Ok(Upload { bytes: len, parts: 0 });
        }
        let path = self.path(name)?;
        if len <= self.part_bytes {
            let payload: PutPayload = pieces.into_iter().collect();
            self.store.put(&path, payload).await.map_err(self.err("write", name))?;
            return Ok(Upload { bytes: len, parts: 0 });
        }
        let upload = self.store.put_multipart(&path).await.map_err(self.err("start upload of", name))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_bytes);
        for piece in pieces {
            // Whole parts of one piece go up without a copy; the writer
            // joins what straddles a part boundary.
            let mut at = 0;
            while at < piece.len() {
                writer.wait_for_capacity(4).await.map_err(self.err("upload part of", name))?;
                let end = (at + self.part_bytes).min(piece.len());
                writer.put(piece.slice(at..end));
                at = end;
            }
        }
        writer.finish().await.map_err(self.err("finish upload of", name))?;
        Ok(Upload { bytes: len, parts: len.div_ceil(self.part_bytes) })
    }

    pub async fn get(&self, name: &str) -> Result<Vec<u8>, StorageError> {
        let r = self.store.get(&self.path(name)?).await.map_err(self.err("read", name))?;
        Ok(r.bytes().await.map_err(self.err("read", name))?.to_vec())
    }

    /// Bytes `range` of `name` only (one ranged request): a reader of part
    /// of a large object never fetches the rest.
    pub async fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>, StorageError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let b = self.store.get_range(&self.path(name)?, range).await.map_err(self.err("read part of", name))?;
        Ok(b.to_vec())
    }

    /// The size in bytes of the object `name` (one metadata request; a
    /// missing object is an error for which `is_not_found` holds).
    pub async fn size(&self, name: &str) -> Result<u64, StorageError> {
        let meta = self.store.head(&self.path(name)?).await.map_err(self.err("look up", name))?;
        Ok(meta.size)
    }

    /// Writes `name` only if nothing is there yet: `Ok(false)` if it
    /// exists. Atomic against concurrent writers on the local file system
    /// (a hard link of a finished temporary file) and on stores with
    /// conditional writes (S3's `If-None-Match`, GCS, Azure).
    pub async fn put_new(&self, name: &str, bytes: Vec<u8>) -> Result<bool, StorageError> {
        if self.local {
            let path = std::path::PathBuf::from(format!("/{}", self.path(name)?));
            let location = format!("{}/{name}", self.url);
            return tokio::task::spawn_blocking(move || create_file(&path, &bytes))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|source| StorageError::Local { what: "create", location, source });
        }
        let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.store.put_opts(&self.path(name)?, PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.err("create", name)(e)),
        }
    }

    /// Deletes the object `name`; a missing one is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), StorageError> {
        match self.store.delete(&self.path(name)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", name)(e)),
        }
    }

    /// Every object under this folder, as (path relative to it, size),
    /// sorted by path. Temporary files of unfinished local writes (names
    /// starting with `.`) are left out.
    pub async fn files(&self) -> Result<Vec<(String, u64)>, StorageError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()));
        let objects: Vec<_> = match self.store.list(prefix.as_ref()).try_collect().await {
            Ok(o) => o,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.err("list", "")(e)),
        };
        let skip = if self.prefix.is_empty() { 0 } else { self.prefix.len() + 1 };
        let mut files: Vec<(String, u64)> = objects
            .into_iter()
            .filter(|o| !o.location.filename().is_some_and(|n| n.starts_with('.')))
            .map(|o| (o.location.as_ref().get(skip..).unwrap_or("").to_string(), o.size))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Names of the direct sub-folders.
    pub async fn folders(&self) -> Result<Vec<String>, StorageError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()));
        let listing = match self.store.list_with_delimiter(prefix.as_ref()).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.err("list", "")(e)),
        };
        Ok(listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
    }

    /// Deletes everything under the sub-folder `name`.
    pub async fn delete_folder(&self, name: &str) -> Result<(), StorageError> {
        let prefix = self.path(name)?;
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await.map_err(self.err("list", name))?;
        for o in objects {
            match self.store.delete(&o.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("delete", name)(e)),
            }
        }
        // A file system keeps the emptied folders; object stores have none.
        if self.local {
            let dir = std::path::Path::new("/").join(prefix.as_ref());
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let source = object_store::Error::Generic { store: "local", source: Box::new(e) };
                    return Err(StorageError::Store { what: "delete", location: dir.display().to_string(), source });
                }
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to a temporary file and links it to `path` unless `path`
/// exists: `Ok(false)` then. Readers see the whole file or none.
fn create_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<bool> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("object");
    let tmp = path.with_file_name(format!(".{name}.{}.new", std::process::id()));
    write_file(&tmp, &[bytes::Bytes::copy_from_slice(bytes)])?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `pieces` to a temporary file next to `path`, flushes it to disk and
/// renames it into place: a reader sees the whole file or none.
fn write_file(path: &std::path::Path, pieces: &[bytes::Bytes]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("object");
    let tmp = path.with_file_name(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        for piece in pieces {
            f.write_all(piece)?;
        }
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_put_get_list_delete_and_multipart() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Storage::open(&format!("file://{}", tmp.path().display())).unwrap().with_part_bytes(1000);
        let small = s.child("step-1").put("a.bin", vec![1; 10]).await.unwrap();
        assert_eq!(small, Upload { bytes: 10, parts: 0 });
        let big: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let up = s.child("step-2").put("b.bin", big.clone()).await.unwrap();
        assert_eq!(up, Upload { bytes: 2500, parts: 0 }, "one write on a local disk, whatever the size");
        assert_eq!(s.child("step-2").get("b.bin").await.unwrap(), big);
        assert_eq!(s.child("step-2").size("b.bin").await.unwrap(), 2500);
        assert!(s.child("step-2").size("c.bin").await.unwrap_err().is_not_found());
        assert_eq!(std::fs::read(tmp.path().join("step-2/b.bin")).unwrap(), big, "a plain file on disk");
        let mut folders = s.folders().await.unwrap();
        folders.sort();
        assert_eq!(folders, vec!["step-1", "step-2"]);
        s.delete_folder("step-1").await.unwrap();
        assert_eq!(s.folders().await.unwrap(), vec!["step-2"]);
        assert!(s.get("nope").await.unwrap_err().is_not_found());
        assert!(Storage::open("relative/path").is_err());
        assert!(Storage::open("s3://").is_err());
    }

    #[tokio::test]
    async fn names_that_leave_their_folder_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Storage::open(tmp.path().join("inner").to_str().unwrap()).unwrap();
        for bad in ["../outside.bin", "a/../../b", "/etc/passwd", ""] {
            let err = s.put(bad, vec![1]).await.unwrap_err();
            assert!(matches!(err, StorageError::Name { .. }), "{bad:?}: {err}");
            assert!(s.get(bad).await.is_err());
        }
        let err = s.child("..").put("x", vec![1]).await.unwrap_err();
        assert!(matches!(err, StorageError::Name { .. }), "{err}");
        assert!(!tmp.path().join("x").exists() && !tmp.path().join("outside.bin").exists());
        assert!(Storage::open(&format!("{}/inner/../other", tmp.path().display())).is_err());
        s.put("ok/..x", vec![1]).await.unwrap();
    }

    #[test]
    fn locations_lie_within_roots_by_whole_segments() {
        let roots = vec!["/data/jobs".to_string(), "s3://bucket/team".to_string()];
        assert!(within_roots("/data/jobs", &roots));
        assert!(within_roots("/data/jobs/j-1/step-10", &roots));
        assert!(within_roots("file:///data/jobs/j-1", &roots));
        assert!(within_roots("s3://bucket/team/runs", &roots));
        assert!(!within_roots("/data/jobs2/x", &roots));
        assert!(!within_roots("/data/jobs/../etc", &roots));
        assert!(!within_roots("/etc/passwd", &roots));
        assert!(!within_roots("s3://bucket/teammate", &roots));
        assert!(within_roots("/anything", &[]));
        assert!(within_roots("/anything", &["/".to_string()]));
    }

    #[tokio::test]
    async fn put_new_writes_once_and_files_lists_everything_below() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Storage::open(tmp.path().to_str().unwrap()).unwrap();
        assert!(s.put_new("m/claims/1", b"job-a".to_vec()).await.unwrap());
        assert!(!s.put_new("m/claims/1", b"job-b".to_vec()).await.unwrap(), "the second writer loses");
        assert_eq!(s.get("m/claims/1").await.unwrap(), b"job-a");
        s.put("m/1/model.bin", vec![0; 7]).await.unwrap();
        let files = s.child("m").files().await.unwrap();
        assert_eq!(files, vec![("1/model.bin".to_string(), 7), ("claims/1".to_string(), 5)]);
        s.delete("m/1/model.bin").await.unwrap();
        s.delete("m/1/model.bin").await.unwrap();
        assert_eq!(s.child("m").files().await.unwrap().len(), 1);
        assert!(s.child("none").files().await.unwrap().is_empty());
    }
}
