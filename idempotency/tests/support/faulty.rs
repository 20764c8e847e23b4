//! An `ObjectStore` in front of a real one (moto's S3 in the tests) that injects faults from
//! outside: a manifest write answered wrongly, a store that cannot be read, a skewed or jumping
//! store clock.

#![allow(dead_code)] // each test binary uses a part

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// How the wrapper answers the next manifest write.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ManifestFault {
    /// Applied, then a server error (a 5xx after apply, or a timeout on the answer).
    AppliedThenError,
    /// Applied, then `Precondition` (the client retried the applied put into a 412).
    AppliedThenPrecondition,
    /// Not applied, and an error; reads fail too (the store is unreachable for a while).
    LostAndUnreadable,
}

/// An `ObjectStore` in front of a real one that injects faults from outside: the next manifest
/// write answered wrongly, and a clock `skew` on every `last_modified` it reports.
pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    fault: std::sync::Mutex<Option<ManifestFault>>,
    pub unreadable: AtomicBool,
    /// The store's clock minus ours in milliseconds (set it to make the store's clock jump):
    /// an object's `last_modified` is shifted by the skew at the time it was written.
    pub skew_ms: AtomicI64,
    /// The skew each object was written under (objects written through this wrapper).
    written: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    manifest_puts: AtomicUsize,
}

impl Faulty {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            fault: std::sync::Mutex::new(None),
            unreadable: AtomicBool::new(false),
            skew_ms: AtomicI64::new(0),
            written: std::sync::Mutex::new(std::collections::HashMap::new()),
            manifest_puts: AtomicUsize::new(0),
        }
    }

    pub fn arm(&self, fault: ManifestFault) {
        *self.fault.lock().unwrap() = Some(fault);
    }

    /// The skew `location` was written under (the current one if it was not written here).
    fn skew_of(&self, location: &Path) -> chrono::TimeDelta {
        let now = self.skew_ms.load(Ordering::SeqCst);
        let ms = self
            .written
            .lock()
            .unwrap()
            .get(location.as_ref())
            .copied()
            .unwrap_or(now);
        chrono::TimeDelta::milliseconds(ms)
    }

    fn shift(&self, mut meta: ObjectMeta) -> ObjectMeta {
        meta.last_modified += self.skew_of(&meta.location);
        meta
    }

    fn record_write(&self, location: &Path) {
        let now = self.skew_ms.load(Ordering::SeqCst);
        self.written
            .lock()
            .unwrap()
            .insert(location.as_ref().to_string(), now);
    }

    fn check_readable(&self) -> object_store::Result<()> {
        if self.unreadable.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: "connection reset (injected)".into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

impl fmt::Debug for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if location.filename() == Some("_manifest.json") {
            self.manifest_puts.fetch_add(1, Ordering::SeqCst);
            let fault = self.fault.lock().unwrap().take();
            match fault {
                Some(ManifestFault::AppliedThenError) => {
                    self.inner.put_opts(location, payload, opts).await?;
                    self.record_write(location);
                    return Err(object_store::Error::Generic {
                        store: "faulty",
                        source: "503 Slow Down after the write was applied (injected)".into(),
                    });
                }
                Some(ManifestFault::AppliedThenPrecondition) => {
                    self.inner.put_opts(location, payload, opts).await?;
                    self.record_write(location);
                    return Err(object_store::Error::Precondition {
                        path: location.to_string(),
                        source: "412 on the retry of an applied write (injected)".into(),
                    });
                }
                Some(ManifestFault::LostAndUnreadable) => {
                    self.unreadable.store(true, Ordering::SeqCst);
                    return Err(object_store::Error::Generic {
                        store: "faulty",
                        source: "timeout (injected)".into(),
                    });
                }
                None => {}
            }
        }
        let put = self.inner.put_opts(location, payload, opts).await?;
        self.record_write(location);
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        // S3 gives a multipart upload the time it started.
        self.record_write(location);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.check_readable()?;
        let mut got = self.inner.get_opts(location, options).await?;
        got.meta = self.shift(got.meta);
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let written = self.written.lock().unwrap().clone();
        let now = self.skew_ms.load(Ordering::SeqCst);
        self.inner
            .list(prefix)
            .map(move |m| {
                m.map(|mut m| {
                    let ms = written.get(m.location.as_ref()).copied().unwrap_or(now);
                    m.last_modified += chrono::TimeDelta::milliseconds(ms);
                    m
                })
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.check_readable()?;
        let mut listed = self.inner.list_with_delimiter(prefix).await?;
        listed.objects = listed.objects.into_iter().map(|m| self.shift(m)).collect();
        Ok(listed)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
