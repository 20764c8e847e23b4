//! Where datasets live: a local directory (the embedded default) or any `object_store`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;

use crate::error::{Error, Result, io};

/// A place that holds datasets: a local directory, or an object store.
///
/// The local directory is handled by this crate's own file code (not `object_store`'s
/// `LocalFileSystem`), because committing needs what that store does not offer: fsync of data,
/// manifest and directories, and an exclusive lock file for optimistic concurrency. Object stores
/// need conditional puts (`PutMode::Create`/`PutMode::Update`): S3, GCS, Azure and `InMemory`
/// have them.
#[derive(Clone, Debug)]
pub struct DatasetStore {
    pub(crate) backend: Backend,
}

#[derive(Clone, Debug)]
pub(crate) enum Backend {
    Local(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        base: ObjPath,
    },
}

impl DatasetStore {
    /// A local directory (created on first use).
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self {
            backend: Backend::Local(root.into()),
        }
    }

    /// An object store, with datasets under `base` (use `""` for the store's root).
    pub fn object_store(store: Arc<dyn ObjectStore>, base: &str) -> Result<Self> {
        let base = ObjPath::parse(base).map_err(|e| Error::UnsupportedUrl {
            url: base.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            backend: Backend::Object { store, base },
        })
    }

    /// A fresh in-memory store (for tests and examples).
    pub fn memory() -> Self {
        Self {
            backend: Backend::Object {
                store: Arc::new(InMemory::new()),
                base: ObjPath::default(),
            },
        }
    }

    /// Whether this is the local-directory backend.
    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }
}

impl From<Arc<dyn ObjectStore>> for DatasetStore {
    fn from(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            backend: Backend::Object {
                store,
                base: ObjPath::default(),
            },
        }
    }
}

impl<T: ObjectStore> From<Arc<T>> for DatasetStore {
    fn from(store: Arc<T>) -> Self {
        let store: Arc<dyn ObjectStore> = store;
        store.into()
    }
}

impl From<&DatasetStore> for DatasetStore {
    fn from(s: &DatasetStore) -> Self {
        s.clone()
    }
}

/// Options of [`store_from_url_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Remote stores: at most this many retries of a failed request (default: `object_store`'s,
    /// 10).
    pub max_retries: Option<usize>,
    /// Remote stores: retry a request only within this long in all (default: `object_store`'s,
    /// 3 minutes). A command-line tool wants a few retries within seconds, so that an
    /// unreachable endpoint fails fast.
    pub retry_timeout: Option<std::time::Duration>,
}

impl StoreOptions {
    /// At most `max_retries` retries of a request, within `timeout` in all.
    pub fn retry(mut self, max_retries: usize, timeout: std::time::Duration) -> Self {
        self.max_retries = Some(max_retries);
        self.retry_timeout = Some(timeout);
        self
    }

    /// `object_store`'s retry configuration with these options applied.
    #[cfg(any(feature = "aws", feature = "gcp", feature = "azure"))]
    fn retry_config(&self) -> object_store::RetryConfig {
        let mut retry = object_store::RetryConfig::default();
        if let Some(n) = self.max_retries {
            retry.max_retries = n;
        }
        if let Some(t) = self.retry_timeout {
            retry.retry_timeout = t;
        }
        retry
    }
}

/// Opens a dataset store from a URL.
///
/// - `file:///data/out`: a local directory, the embedded default (fsync + rename + lock file).
/// - `memory://` (or `memory:///base`): a fresh in-memory object store.
/// - `s3://bucket/path` (or `s3a://`), `gs://bucket/path`, `az://container/path`: with this
///   crate's `aws`, `gcp` or `azure` feature; endpoint, region and credentials come from the
///   `AWS_*`, `GOOGLE_*` and `AZURE_*` environment variables, as `object_store`'s `from_env`
///   builders read them (e.g. `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true` for MinIO or moto).
///   The path after the bucket is taken **literally**, as `aws s3` takes it (`%3A` stays three
///   characters; it is not decoded to `:`).
pub fn store_from_url(url: &str) -> Result<DatasetStore> {
    store_from_url_with(url, &StoreOptions::default())
}

/// [`store_from_url`] with options (retries of remote stores).
pub fn store_from_url_with(url: &str, options: &StoreOptions) -> Result<DatasetStore> {
    let env = std::env::vars().filter(|(k, _)| {
        k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
    });
    open_url(url, env.collect(), options)
}

/// [`store_from_url_with`] with the remote store's configuration given instead of read from the
/// environment.
fn open_url(
    url: &str,
    config: Vec<(String, String)>,
    options: &StoreOptions,
) -> Result<DatasetStore> {
    let unsupported = |reason: String| Error::UnsupportedUrl {
        url: url.to_string(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| unsupported(e.to_string()))?;
    let scheme = parsed.scheme();
    match scheme {
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|()| unsupported("not an absolute local path".into()))?;
            return Ok(DatasetStore::local(path));
        }
        "memory" => {
            let base = parsed.path().trim_matches('/').to_string();
            return DatasetStore::object_store(Arc::new(InMemory::new()), &base);
        }
        _ => {}
    }
    // The literal text after `scheme://bucket/`.
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let (bucket, base) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(unsupported("no bucket or container".into()));
    }
    let base = base.trim_matches('/');
    let store = remote(scheme, url, config, options).map_err(unsupported)?;
    let base = ObjPath::parse(base).map_err(|e| unsupported(e.to_string()))?;
    Ok(DatasetStore {
        backend: Backend::Object { store, base },
    })
}

/// Builds the remote store of `scheme` (its builder configured from `config`, then `url`).
#[allow(unused_variables)]
fn remote(
    scheme: &str,
    url: &str,
    config: Vec<(String, String)>,
    options: &StoreOptions,
) -> std::result::Result<Arc<dyn ObjectStore>, String> {
    match scheme {
        #[cfg(feature = "aws")]
        "s3" | "s3a" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let mut b = AmazonS3Builder::new();
            for (k, v) in config {
                if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            let store = b.with_url(url).with_retry(options.retry_config()).build();
            store
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "gcp")]
        "gs" => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let mut b = GoogleCloudStorageBuilder::new();
            for (k, v) in config {
                if let Ok(key) = k.to_ascii_lowercase().parse::<GoogleConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            let store = b.with_url(url).with_retry(options.retry_config()).build();
            store
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "azure")]
        "az" | "abfs" | "abfss" | "azure" => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let mut b = MicrosoftAzureBuilder::new();
            for (k, v) in config {
                if let Ok(key) = k.to_ascii_lowercase().parse::<AzureConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            let store = b.with_url(url).with_retry(options.retry_config()).build();
            store
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                .map_err(|e| e.to_string())
        }
        remote if ["s3", "s3a", "gs", "az", "abfs", "abfss", "azure"].contains(&remote) => {
            Err(format!(
                "{remote}:// needs this crate's `aws` (s3://), `gcp` (gs://) or `azure` (az://) \
             feature"
            ))
        }
        other => Err(format!("unknown scheme {other:?}")),
    }
}

// ---------- local file helpers (blocking; called from spawn_blocking) ----------

/// Creates `parent` (a directory under `root`) if it is missing, and records every directory
/// whose entries that changes, from `parent` up to and including `root`, in `touched` (they need
/// an fsync before what is renamed into them is durable). Returns whether it created anything.
pub(crate) fn create_parents(
    parent: &FsPath,
    root: &FsPath,
    touched: &mut std::collections::BTreeSet<PathBuf>,
) -> Result<bool> {
    if parent.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    let mut p = parent.to_path_buf();
    while p != root {
        touched.insert(p.clone());
        match p.parent() {
            Some(up) => p = up.to_path_buf(),
            None => break,
        }
    }
    touched.insert(root.to_path_buf());
    Ok(true)
}

/// Makes a directory's entries (renames, new files) durable. On Unix this fsyncs the directory;
/// elsewhere directories cannot be opened for it, and rename durability is the file system's.
pub(crate) fn fsync_dir(dir: &FsPath) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io("fsync directory", dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Fsyncs many files or directories at once, on up to 16 threads: the file system can merge
/// concurrent fsyncs into fewer journal commits, which matters for thousands of partitions.
pub(crate) fn fsync_many(paths: &[PathBuf], dirs: bool) -> Result<()> {
    const THREADS: usize = 16;
    #[cfg(target_os = "linux")]
    if paths.len() > SYNCFS_ABOVE {
        return syncfs_all(paths);
    }
    let one = |p: &PathBuf| {
        if dirs {
            fsync_dir(p)
        } else {
            File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(io("fsync", p))
        }
    };
    if paths.len() <= 2 {
        return paths.iter().try_for_each(one);
    }
    let chunk = paths.len().div_ceil(THREADS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().try_for_each(one)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join().unwrap_or_else(|_| {
                Err(Error::Io {
                    op: "fsync",
                    path: PathBuf::new(),
                    source: std::io::Error::other("an fsync thread panicked"),
                })
            })
        })
    })
}

/// Above this many paths, one `syncfs` per file system replaces the per-path fsyncs.
#[cfg(target_os = "linux")]
const SYNCFS_ABOVE: usize = 64;

/// Makes every path durable with one `syncfs(2)` per file system they live on: it writes back
/// all dirty data and metadata of that file system and waits for it (reporting write-back errors
/// since Linux 5.8), which covers each file's data and each directory's entries, at the cost of
/// also flushing unrelated dirty data. For thousands of staged files this is one journal commit
/// instead of thousands, as `cp -r && sync` does.
#[cfg(target_os = "linux")]
fn syncfs_all(paths: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut done: Vec<u64> = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(io("stat", p))?;
        if done.contains(&meta.dev()) {
            continue;
        }
        let f = File::open(p).map_err(io("open for syncfs", p))?;
        rustix::fs::syncfs(&f).map_err(|e| Error::Io {
            op: "syncfs",
            path: p.clone(),
            source: e.into(),
        })?;
        done.push(meta.dev());
    }
    Ok(())
}

/// Reads the manifest of the local dataset directory `dir` (`None` if there is none). No lock
/// needed: it is only ever replaced by a rename.
pub(crate) fn read_local_manifest(
    dir: &FsPath,
    accept_other_versions: bool,
) -> Result<Option<crate::manifest::Manifest>> {
    let path = dir.join(crate::manifest::MANIFEST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => crate::manifest::Manifest::decode(
            &bytes,
            &path.display().to_string(),
            accept_other_versions,
        )
        .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read manifest", &path)(e)),
    }
}

/// A manifest read from an object store, with what the writer needs for its conditional put.
pub(crate) struct ObjectManifest {
    pub manifest: crate::manifest::Manifest,
    /// Its e-tag/version.
    pub version: object_store::UpdateVersion,
    /// Its `last_modified`, on the store's clock (ms since the epoch).
    pub written_at_ms: i64,
}

/// Reads and decodes the manifest at `key` (`None` if there is none): the one object-store
/// manifest read of the writer, the reader and `verify`.
pub(crate) async fn read_object_manifest(
    store: &Arc<dyn ObjectStore>,
    key: &ObjPath,
    accept_other_versions: bool,
) -> Result<Option<ObjectManifest>> {
    use object_store::ObjectStoreExt;
    let got = match store.get(key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(crate::error::store("read", key)(e)),
    };
    let version = object_store::UpdateVersion {
        e_tag: got.meta.e_tag.clone(),
        version: got.meta.version.clone(),
    };
    let written_at_ms = got.meta.last_modified.timestamp_millis();
    let bytes = got
        .bytes()
        .await
        .map_err(crate::error::store("read", key))?;
    let manifest = crate::manifest::Manifest::decode(&bytes, key.as_ref(), accept_other_versions)?;
    Ok(Some(ObjectManifest {
        manifest,
        version,
        written_at_ms,
    }))
}

/// Writes `bytes` to a new file without fsync (staged data is fsynced in bulk at commit).
pub(crate) fn write_unsynced(path: &FsPath, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))
}

/// Writes `bytes` to a new file and fsyncs it (not its directory).
pub(crate) fn write_synced(path: &FsPath, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting at most `timeout`.
///
/// The kernel drops the lock when the process dies, so a crashed writer never leaves it held.
pub(crate) fn lock_exclusive(path: &FsPath, timeout: Duration) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("open lock file", path))?;
    let start = Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(TryLockError::WouldBlock) => {
                if start.elapsed() >= timeout {
                    return Err(Error::LockTimeout {
                        path: path.to_path_buf(),
                        waited: start.elapsed(),
                    });
                }
                // A blocking-pool thread; commits hold this lock for milliseconds.
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(TryLockError::Error(e)) => return Err(io("lock", path)(e)),
        }
    }
}

/// Tries to take an exclusive lock without waiting: `Ok(Some(file))` if we got it.
pub(crate) fn try_lock(path: &FsPath) -> Result<Option<File>> {
    let f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open lock file", path)(e)),
    };
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(io("lock", path)(e)),
    }
}

pub(crate) fn remove_file_if_exists(path: &FsPath) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

pub(crate) fn remove_dir_all_if_exists(path: &FsPath) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Runs blocking file work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io {
            op: "run blocking file task",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_many_takes_few_or_many_paths_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..100)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, b"x").unwrap();
                p
            })
            .collect();
        fsync_many(&files[..3], false).unwrap();
        fsync_many(&files, false).unwrap(); // one syncfs on Linux
        fsync_many(&[dir.path().to_path_buf()], true).unwrap();
        let mut missing = files.clone();
        missing.push(dir.path().join("gone"));
        let err = fsync_many(&missing, false).unwrap_err().to_string();
        assert!(err.contains("gone"), "{err}");
    }

    #[test]
    fn urls() {
        assert!(store_from_url("file:///tmp/x").unwrap().is_local());
        assert!(!store_from_url("memory://").unwrap().is_local());
        assert!(matches!(
            store_from_url("nope://x"),
            Err(Error::UnsupportedUrl { .. })
        ));
        assert!(matches!(
            store_from_url("not a url"),
            Err(Error::UnsupportedUrl { .. })
        ));
        #[cfg(not(feature = "aws"))]
        {
            let err = store_from_url("s3://bucket/data").unwrap_err();
            assert!(err.to_string().contains("`aws`"), "{err}");
        }
        #[cfg(feature = "aws")]
        {
            // Remote configuration and retries reach the store; the path is taken literally.
            let config = vec![
                (
                    "AWS_ENDPOINT_URL".to_string(),
                    "http://127.0.0.1:9".to_string(),
                ),
                ("AWS_REGION".to_string(), "eu-north-1".to_string()),
            ];
            let options = StoreOptions::default().retry(2, std::time::Duration::from_secs(4));
            let store = open_url("s3://bucket/data/p=a%3Ab", config, &options).unwrap();
            let shown = format!("{store:?}");
            assert!(
                shown.contains("127.0.0.1:9") && shown.contains("eu-north-1"),
                "{shown}"
            );
            assert!(shown.contains("max_retries: 2"), "{shown}");
            let Backend::Object { base, .. } = &store.backend else {
                panic!("not an object store")
            };
            assert_eq!(base.as_ref(), "data/p=a%3Ab");
            assert!(matches!(
                store_from_url("s3:///data"),
                Err(Error::UnsupportedUrl { .. })
            ));
        }
    }
}
